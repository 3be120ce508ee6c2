"""`quantfw bench` as a user runs it: a subprocess on the tiny model, small sizes, real JSON.
No timed assertions: only that every point was measured and the records are well-formed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORWARD_KEYS = {
    "kind",
    "layer",
    "scheme",
    "mode",
    "tokens",
    "median_ms",
    "min_ms",
    "max_ms",
    "bytes",
    "roofline_ms",
}
SMALL = [
    "bench.layers=[model]",
    "bench.tokens=[1,5]",
    "bench.repeats=1",
    "bench.max_seconds=0.01",
    "bench.copy_mb=8",
]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "quantfw.cli.main", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_bench_writes_documented_records(tmp_path):
    out = tmp_path / "bench.json"
    r = _run(*SMALL, "bench.schemes=[w8a8,w4a8_pc]", f"out={out}")
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["bandwidth_gbs"] > 0 and data["machine"]["torch"].startswith("2.13")
    fwd = [x for x in data["records"] if x["kind"] == "forward"]
    # 2 float baselines + 2 schemes x 2 modes, each at 2 token counts
    assert len(fwd) == (2 + 2 * 2) * 2
    for rec in fwd:
        assert FORWARD_KEYS <= rec.keys()
        assert rec["min_ms"] <= rec["median_ms"] <= rec["max_ms"] and rec["bytes"] > 0
        assert rec["layer"] == "tiny" and (rec["E"], rec["H"], rec["I"], rec["top_k"]) == (8, 512, 256, 2)
    quant = [x for x in fwd if x["mode"] != "float"]
    assert {(x["scheme"], x["mode"]) for x in quant} == {
        (s, m) for s in ("w8a8", "w4a8 per-channel") for m in ("exact", "fast")
    }
    for rec in quant:
        assert rec["baseline"] == "bf16_eager" and rec["baseline_ms"] > 0 and rec["fp32_baseline_ms"] > 0
    # bytes: W4A8 per-channel reads about half of W8A8 per active expert, bf16 about twice
    by = {(x["scheme"], x["tokens"]): x["bytes"] for x in fwd if x["mode"] in ("exact", "float")}
    assert 0.4 < by[("w4a8 per-channel", 1)] / by[("w8a8", 1)] < 0.6
    assert by[("bf16_eager", 1)] == 2 * 3 * 512 * 256 * 2  # top-2 experts, 3 bf16 matrices each
    loads = [x for x in data["records"] if x["kind"] == "load"]
    assert len(loads) == 4 and all(x["raw_read_ms"] > 0 and x["ratio_vs_raw"] > 0 for x in loads)


def test_bench_multirun_appends_to_one_file(tmp_path):
    out = tmp_path / "sweep.json"
    r = _run(
        "-m",
        *SMALL,
        "bench.load=false",
        "bench.schemes=[w4a8_clip]",
        "bench.modes=[exact],[fast]",
        f"out={out}",
    )
    assert r.returncode == 0, r.stderr
    recs = json.loads(out.read_text())["records"]
    assert {x["mode"] for x in recs if x["scheme"] == "w4a8_clip"} == {"exact", "fast"}
    assert not (ROOT / "multirun").exists() and not (ROOT / "outputs").exists()


@pytest.mark.parametrize(
    "override, needle",
    [("bench.schemes=[w5a5]", "bench.schemes"), ("bench.modes=[turbo]", "bench.modes")],
)
def test_bench_bad_option_is_one_line_error(override, needle):
    r = _run(*SMALL, override)
    assert r.returncode == 2
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
