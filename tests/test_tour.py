"""`quantfw tour`: the journey in one process (example -> quantize with each declared scheme ->
check -> eval) prints numbers equal to the separate commands', keeps or removes its files as
told, and is what `make demo` runs (and README says)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

import pytest

from quantfw.config.compose import available, compose
from quantfw.errors import ConfigError
from tests.test_cli import ROOT, quantfw

# Cheaper than the defaults (tokens=256, eval.ppl_tokens=2048) but the same code paths.
SMALL = ["tokens=64", "eval.ppl_tokens=512", "progress=false"]


def tour(*args, cwd, env=None):
    """The tour as a user runs it (a longer timeout than tests.test_cli.quantfw: three evals)."""
    return subprocess.run(
        [sys.executable, "-m", "quantfw.cli.main", "tour", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=900,
    )


@cache
def held_schemes(fmt: str = "msmodelslim") -> list[str]:
    """Declared schemes the format holds at the default model's dims, found by composing each."""
    held = []
    for name in available("scheme"):
        try:
            compose("default", [f"scheme={name}", f"format={fmt}"])
        except ConfigError:
            continue
        held.append(name)
    return held


def table_rows(stdout: str) -> dict[str, list[str]]:
    """scheme -> the cells of its table line (cells are separated by two or more spaces)."""
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.startswith("scheme "))
    rows = [re.split(r"\s{2,}", ln.strip()) for ln in lines[start:]]
    head = rows[0]
    assert head[:4] == ["scheme", "format", "on disk", "vs float"], head
    return {r[0]: r for r in rows[1:]}


def folder_mb(folder: Path) -> str:
    return f"{sum(p.stat().st_size for p in folder.rglob('*') if p.is_file()) / 1e6:.2f} MB"


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    """One tour with out=DIR (the files kept)."""
    pytest.importorskip("transformers")
    cwd = tmp_path_factory.mktemp("tour")
    r = tour("out=qfw/tour", *SMALL, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return cwd, cwd / "qfw" / "tour", r


def test_tour_has_a_row_per_scheme_and_a_line_per_step(kept):
    _, out, r = kept
    schemes = held_schemes()
    assert len(schemes) >= 2
    rows = table_rows(r.stdout)
    assert list(rows) == ["float (bf16)", *schemes]
    steps = [ln for ln in r.stderr.splitlines() if re.match(r"quantfw tour: \[\d+/\d+\] ", ln)]
    total = 1 + 3 * len(schemes)
    assert len(steps) == total
    assert [int(re.search(r"\[(\d+)/", s).group(1)) for s in steps] == list(range(1, total + 1))
    for s in steps:
        assert re.search(r" \d+\.\d s$", s), s  # seconds
        assert str(Path("qfw") / "tour") in s  # where
    n = len(schemes)
    assert [s.split()[3] for s in steps] == ["example", *["quantize"] * n, *["check"] * n, *["eval"] * n]
    for name in ["float", *schemes]:
        assert (out / name / "config.json").is_file(), name
    assert (out / "tour.log").is_file() and (out / "eval.json").is_file()


def test_bytes_and_check_are_the_files_and_the_check_command(kept):
    cwd, out, r = kept
    rows = table_rows(r.stdout)
    float_mb = float(folder_mb(out / "float").split()[0])
    assert rows["float (bf16)"][2] == folder_mb(out / "float")
    for name in held_schemes():
        row = rows[name]
        assert row[1] == "msmodelslim"
        assert row[2] == folder_mb(out / name)
        assert float(row[3].rstrip("x")) == pytest.approx(float(row[2].split()[0]) / float_mb, abs=0.006)
        assert float(row[3].rstrip("x")) < 1  # every scheme is smaller than bf16
        assert row[-1] == "OK"
    name = held_schemes()[-1]
    c = quantfw("check", f"checkpoint={out / name}", cwd=cwd)
    assert c.returncode == 0 and "OK: every routed-expert tensor matches" in c.stdout


def test_a_failed_check_is_a_table_cell_with_its_problems_shown(kept, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from quantfw.cli.tour import Journey, Row, _check

    _, out, _ = kept
    name = held_schemes()[-1]
    broken = tmp_path / name
    shutil.copytree(out / name, broken)
    shard = next(broken.glob("*.safetensors"))
    tensors = load_file(shard)
    dropped = next(k for k in tensors if ".experts.3." in k)
    del tensors[dropped]
    save_file(tensors, shard, metadata={"format": "pt"})
    journey = Journey("default", [], [], tmp_path, total=1)
    result = _check(journey, Row(name, "msmodelslim", broken))
    assert re.fullmatch(r"FAIL \(\d+ problem\(s\)\)", result), result
    err = capsys.readouterr().err
    assert dropped in err  # the check's own report, shown although the tour captured it
    assert "[1/1] check" in err and "FAILED after" in err
    assert dropped in (tmp_path / "tour.log").read_text()


def test_eval_numbers_equal_the_eval_command_on_the_kept_files(kept, tmp_path):
    cwd, out, r = kept
    rows = table_rows(r.stdout)
    name = held_schemes()[0]
    alone = tmp_path / "eval.json"
    e = quantfw(
        "eval",
        f"checkpoint={out / name}",
        f"reference={out / 'float'}",
        "eval.perplexity=true",
        *SMALL,
        f"out={alone}",
        cwd=cwd,
    )
    assert e.returncode == 0, e.stderr[-2000:]
    doc = json.loads(alone.read_text())
    run = doc["runs"][-1]
    row = rows[name]
    assert row[4] == f"{run['rel_l2_mean']:.4f}"
    assert row[5] == f"{run['cosine_min']:.5f}"
    assert row[6] == f"{run['ppl_quantized']:.3f}"
    lo, hi = doc["perplexity"]["delta_ci95"]
    assert row[7] == f"{100 * run['ppl_delta']:+.2f}% [{100 * lo:+.2f}, {100 * hi:+.2f}]"
    assert rows["float (bf16)"][6] == f"{run['ppl_float']:.3f}"
    # the tour's own eval.json holds one run per scheme, the same numbers
    tour_runs = {x["scheme"]: x for x in json.loads((out / "eval.json").read_text())["runs"]}
    assert sorted(tour_runs) == sorted(held_schemes())
    assert tour_runs[name]["rel_l2_mean"] == run["rel_l2_mean"]
    assert tour_runs[name]["ppl_delta"] == run["ppl_delta"]


def test_without_out_the_folder_is_temporary_and_removed_even_on_failure(tmp_path, monkeypatch):
    from quantfw.cli.tour import _root

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with _root(None) as root:
        assert root.parent == tmp_path and root.name.startswith("quantfw-tour-")
        (root / "float").mkdir()
        (root / "float" / "model.safetensors").write_bytes(b"x" * 10)
    assert not root.exists()
    with pytest.raises(ConfigError), _root(None) as failed:
        raise ConfigError("a step failed")
    assert not failed.exists()
    with _root(str(tmp_path / "kept")) as kept:
        (kept / "tour.log").write_text("log")
    assert (tmp_path / "kept" / "tour.log").read_text() == "log"


@pytest.mark.parametrize("setup", ["file_inside", "is_a_file"])
def test_out_not_empty_is_refused_in_one_line(tmp_path, setup):
    target = tmp_path / "busy"
    if setup == "file_inside":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    else:
        target.write_text("mine")
    r = tour(f"out={target}", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("quantfw tour: error: out=") and len(r.stderr.strip().splitlines()) == 1
    assert str(target) in r.stderr
    left = target.read_text() if setup == "is_a_file" else sorted(os.listdir(target))
    assert left in ("mine", ["notes.txt"])  # untouched


def test_scheme_name_is_refused_in_one_line(tmp_path):
    r = tour("scheme=w8a8", f"out={tmp_path / 'x'}", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "scheme=NAME" in r.stderr
    assert not (tmp_path / "x").exists()


def test_plan_skips_the_schemes_a_format_cannot_hold_with_a_note(tmp_path):
    from quantfw.cli.tour import Journey, _schemes

    for fmt in ("msmodelslim", "compressed_tensors"):
        journey = Journey("default", [f"format={fmt}"], [], tmp_path, total=1)
        planned, notes = _schemes(journey, tmp_path / "float", seed=0)
        names = [row.scheme for row, _, _ in planned]
        assert names == held_schemes(fmt)
        skipped = sorted(set(available("scheme")) - set(names))
        assert [n.split()[2].rstrip(":") for n in notes] == skipped
        assert all(row.format == fmt for row, _, _ in planned)
    assert skipped, "compressed_tensors holds int4 per channel only: a grouped scheme is skipped"


def test_a_scheme_declared_in_the_users_folder_is_toured(tmp_path):
    from quantfw.cli.tour import Journey, _schemes

    (tmp_path / "mine" / "scheme").mkdir(parents=True)
    base = held_schemes()[0]
    (tmp_path / "mine" / "scheme" / "my_variant.yaml").write_text(
        f"defaults:\n  - {base}\n  - _self_\nname: my_variant\nweight_observer: mse\n"
    )
    journey = Journey("default", [], [str(tmp_path / "mine")], tmp_path, total=1)
    planned, notes = _schemes(journey, tmp_path / "float", seed=0)
    by_name = {row.scheme: cfg for row, _, cfg in planned}
    assert sorted(by_name) == sorted([*held_schemes(), "my_variant"]) and notes == []
    assert by_name["my_variant"].scheme.weight_observer == "mse"
    assert by_name[base].scheme.weight_observer != "mse"
    assert by_name["my_variant"].output == str(tmp_path / "my_variant")


def test_make_demo_runs_the_tour_with_what_it_needs_and_readme_says_so(tmp_path):
    venv = tmp_path / "venv"
    r = subprocess.run(
        ["make", "-n", "--no-print-directory", "demo", f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == f"{venv}/bin/quantfw tour"
    installs = [ln for ln in lines if "pip install" in ln and "-e" in ln]
    assert len(installs) == 1 and "torch==" in installs[0] and ".[hf]" in installs[0]
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", setup, re.S).group(1)
    assert [ln.split("#")[0].strip() for ln in block.strip().splitlines()] == ["make demo", "make test"]
    assert "`quantfw tour`" in setup
