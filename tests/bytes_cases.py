"""The written-bytes guard's cases: each shipped recipe quantized on its tiny model, plus calibrated runs.

`produce` writes a case's output through the quantize command's own code path and returns the
sha256 of every file it wrote; tests/test_bytes_preserved.py compares that with the fixture.
Run as a script to record the fixtures (tests/fixtures/bytes_<case>.json) from the current tree:

    .venv/bin/python tests/bytes_cases.py [CASE ...]
"""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
# A recipe's model (by its hf_model_type) -> the tiny model of the same architecture.
TINY_OF = {
    "qwen3_moe": ("tiny_qwen3_moe", "qwen3_moe"),
    "mixtral": ("tiny_mixtral", "mixtral"),
    "deepseek_v3": ("tiny_deepseek_v3", "deepseek_v3"),
    "deepseek_v32": ("tiny_deepseek_v3", "deepseek_v3"),  # no tiny V3.2 writer: same expert layout
}
SMALL_CALIBRATION = [
    "calibration.source=model",
    "calibration.tokens=96",
    "calibration.seq_len=32",
    "calibration.max_rows=48",
    "calibration.min_tokens=4",
    "calibration.guard_tokens=0",
    "calibration.progress=false",
]
# Calibrated cases: (name, recipe, overrides) on the default recipe's tiny model.
CALIBRATED = {
    "calibrated_clip": ("default", SMALL_CALIBRATION),
    "calibrated_gptq": (
        "default",
        ["scheme=w4a8", "scheme.weight_observer=gptq", "scheme.observer_min_tokens=4", *SMALL_CALIBRATION],
    ),
}


def model_arch(model: str) -> str:
    """conf/model/<model>.yaml's hf_model_type, following its `defaults` bases."""
    import yaml

    data = yaml.safe_load((ROOT / "conf" / "model" / f"{model}.yaml").read_text())
    if "hf_model_type" in data:
        return data["hf_model_type"]
    base = next(d for d in data.get("defaults", []) if d != "_self_")
    return model_arch(base)


def recipe_cases() -> dict[str, tuple[str, list[str]]]:
    """case name -> (recipe, overrides) for every recipes/*.yaml, on the tiny model of its arch
    (read from the recipe's `override model:` line and conf/model, cheaper than composing)."""
    import yaml

    cases = {}
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        defaults = yaml.safe_load(path.read_text()).get("defaults", [])
        model = next(
            (d["override model"] for d in defaults if isinstance(d, dict) and "override model" in d), None
        )
        tiny = "tiny"
        if model is not None:
            tiny = TINY_OF[model_arch(model)][0]
        cases[path.stem] = (path.stem, [f"model={tiny}"])
    return cases


@functools.cache
def cases() -> dict[str, tuple[str, list[str]]]:
    return {**recipe_cases(), **CALIBRATED}


def float_input(root: Path, model: str) -> Path:
    """The tiny float checkpoint of `model`'s architecture (written once under root)."""
    from quantfw.integrations.hf import save_tiny_checkpoint

    arch = model_arch(model)
    folder = root / "float" / arch
    if not (folder / "config.json").exists():
        save_tiny_checkpoint(TINY_OF[arch][1], folder, seed=7)
    return folder


def produce(name: str, root: Path) -> dict[str, str]:
    """Quantize case `name` into root/<name> as `quantfw quantize` does; sha256 of every output file."""
    from quantfw.cli import quantize as command
    from quantfw.config.compose import compose

    recipe, overrides = cases()[name]
    model = next((o.split("=", 1)[1] for o in overrides if o.startswith("model=")), "tiny")
    src = float_input(root, model)
    out = root / name
    cfg = compose(recipe, [*overrides, f"input={src}", f"output={out}", "progress=false"])
    command.run(cfg)
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def fixture_path(name: str) -> Path:
    return FIXTURES / f"bytes_{name}.json"


def record(root: Path, names: list[str]) -> None:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    FIXTURES.mkdir(exist_ok=True)
    for name in names or cases():
        data = {"commit": commit, "files": produce(name, root)}
        fixture_path(name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        print(f"{fixture_path(name).relative_to(ROOT)}: {len(data['files'])} files", file=sys.stderr)


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory(prefix="quantfw-bytes-") as tmp:
        record(Path(tmp), sys.argv[1:])
