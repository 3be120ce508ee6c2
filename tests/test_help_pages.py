"""`quantfw <command> --help`: one page per command (what, required keys, options with their
defaults, examples, docs page), and every example shown in a page runs as written."""

from __future__ import annotations

import shlex

import pytest

from quantfw.cli.commands import COMMANDS
from tests.test_cli import ROOT, quantfw

# The pages whose examples write what the other pages' examples read.
WRITERS = ["example", "quantize"]


def test_every_command_has_a_page(tmp_path):
    r = quantfw("--help", cwd=tmp_path)
    assert r.returncode == 0
    for name, cmd in COMMANDS.items():
        assert f"  {name:<10} {cmd.summary}" in r.stdout
    assert "quantfw <command> --help" in r.stdout
    for name, cmd in COMMANDS.items():
        assert 2 <= len(cmd.examples) <= 3, name
        assert (ROOT / cmd.docs).is_file(), cmd.docs
        r = quantfw(name, "--help", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0].startswith(f"usage: quantfw {name} ")
        assert cmd.what.splitlines()[0] in r.stdout
        for req in cmd.required:
            assert req.split(":", 1)[0] in lines[0]
        for e in cmd.examples:
            assert f"  quantfw {e}" in lines
        assert f"docs: {cmd.docs}" in lines
        assert len(lines) < 45  # a page, not Hydra's 300-line generic help


@pytest.mark.parametrize(
    "args, shown",
    [
        (("demo", "-h"), ["tokens=256", "seed=0", "scheme=w4a8_clip", "model=tiny"]),
        (
            ("quantize", "--help"),
            ["quantize.mtp=quantize", "overwrite=false", "engine=null", "format=msmodelslim"],
        ),
        (
            ("quantize", "recipe=deepseek_v3_w4a8_clip", "--help"),
            ["engine=cann_recipes", "format=compressed_tensors"],
        ),
        (("plan", "--help", "tp_size=4"), ["tp_size=4", "with your overrides"]),
        (("bench", "--help"), ["bench.tokens=[1,16,128,1024]", "bench.load=true"]),
    ],
)
def test_pages_show_the_recipes_defaults(tmp_path, args, shown):
    r = quantfw(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for text in shown:
        assert text in r.stdout, text


def test_bad_override_on_a_help_page_is_one_line(tmp_path):
    r = quantfw("plan", "--help", "scheme=w9", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("quantfw plan: error: ") and len(r.stderr.strip().splitlines()) == 1


def _run(args: list[str], folder) -> None:
    args = [a.replace("=qfw/", f"={folder}/qfw/") for a in args]
    r = quantfw(*args, "progress=false", cwd=folder)
    assert r.returncode == 0, f"quantfw {shlex.join(args)}\n{r.stderr[-2000:]}"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A folder where the example and quantize pages' examples ran (what the others read)."""
    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("help")
    for name in WRITERS:
        for e in COMMANDS[name].examples:
            _run(shlex.split(e), folder)
    return folder


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_example_runs(scratch, name):
    if name not in WRITERS:  # those ran in the fixture
        for e in COMMANDS[name].examples:
            _run(shlex.split(e), scratch)
    outputs = {"plan": "plan.json", "eval": "eval.json", "bench": "bench.json", "quantize": "ds-cann"}
    if name in outputs:
        assert (scratch / "qfw" / outputs[name]).exists()
