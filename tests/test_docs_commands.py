"""Every `quantfw ...` line of a ```bash block in README.md and docs/*.md runs as written, and the
YAML recipe examples of docs/recipes.md plan: a doc example cannot break silently.

Commands run in order per page in one temp folder (a journey's later steps use the files of its
earlier ones); the relative `qfw/` paths are rewritten to that folder. The `my_recipes/...` YAML blocks of
docs/recipes.md are written there first, so commands naming `--config-dir my_recipes` find them.
"""

import re
import shlex
from pathlib import Path

import pytest

from tests.test_cli import ROOT, quantfw

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BASH = re.compile(r"```bash\n(.*?)```", re.S)
YAML = re.compile(r"```yaml\n(.*?)```", re.S)


def commands(page: Path) -> list[list[str]]:
    out = []
    for block in BASH.findall(page.read_text()):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("quantfw "):
                out.append(shlex.split(line)[1:])
    return out


def recipe_examples() -> dict[str, str]:
    """`# my_recipes/<path>` YAML blocks of docs/recipes.md: path -> text."""
    found = {}
    for block in YAML.findall((ROOT / "docs" / "recipes.md").read_text()):
        m = re.match(r"# (my_recipes/[\w/.-]+\.yaml)", block)
        if m:
            found[m.group(1)] = block
    return found


def _write_recipes(folder: Path) -> None:
    for rel, text in recipe_examples().items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)


def test_pages_have_commands():
    assert len(commands(ROOT / "README.md")) >= 10
    assert set(recipe_examples()) == {"my_recipes/model/my_moe.yaml", "my_recipes/my_moe_w4a8.yaml"}


# Commands that read no files (plan, demo) are run once even when several pages show them.
_PASSED: set[tuple[str, ...]] = set()


@pytest.mark.parametrize("page", [p for p in PAGES if commands(p)], ids=lambda p: p.name)
def test_page_commands_run(tmp_path, page):
    _write_recipes(tmp_path)
    for args in commands(page):
        args = [a.replace("=qfw/", f"={tmp_path}/qfw/") for a in args]
        if tuple(args) in _PASSED:
            continue
        if args[:1] in (["example"], ["quantize"], ["eval"]):
            pytest.importorskip("transformers")
        r = (
            quantfw(*args, "progress=false", cwd=tmp_path)
            if args[0] != "--help"
            else quantfw(*args, cwd=tmp_path)
        )
        assert r.returncode == 0, f"{page.name}: quantfw {shlex.join(args)}\n{r.stderr[-2000:]}"
        if args[0] in ("plan", "demo") and "/" not in " ".join(args):
            _PASSED.add(tuple(args))


def test_recipe_examples_plan(tmp_path):
    _write_recipes(tmp_path)
    for rel in recipe_examples():
        if rel.count("/") == 1:  # a recipe (model/... etc. are groups)
            recipe = Path(rel).stem
            r = quantfw("plan", "--config-dir", "my_recipes", f"recipe={recipe}", cwd=tmp_path)
            assert r.returncode == 0, f"{rel}: {r.stderr}"
            assert "routed-expert memory of my_moe" in r.stdout


def test_shipped_recipe_shown_in_docs_is_the_shipped_file():
    for block in YAML.findall((ROOT / "docs" / "recipes.md").read_text()):
        m = re.match(r"# (recipes/[\w.-]+\.yaml)\n", block)
        if m:
            shipped = (ROOT / m.group(1)).read_text()
            body = block[m.end() :]
            assert body.strip() in shipped, m.group(1)
