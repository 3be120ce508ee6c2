"""Expert-parallel layer-by-layer calibration under torchrun (gloo, CPU): the same bytes for any
number of processes, placement or "node" split; failures and dead ranks end every rank in bounded
time with one line; a killed run resumes with any number of processes."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from checkpoint_helpers import ROOT, cli, files_bytes
from safetensors.torch import load_file, save_file

from quantfw.integrations.hf import save_tiny_checkpoint
from quantfw.parallel.calibration import ExpertShare
from quantfw.parallel.dist import Dist
from quantfw.quantize.checkpoint import busy_local_ranks, default_workers

CLIP = ["scheme=w4a8_clip", "format=compressed_tensors"]
CALIB = [
    "calibration.source=model",
    "calibration.tokens=256",
    "calibration.seq_len=64",
    "calibration.expert_block=3",
]
# Byte identity across world sizes holds at equal intra-op threads (torchrun's default is 1).
ENV = {"OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, env: dict | None = None, timeout: float = 300, nodes=None):
    """`torchrun --nproc-per-node nproc -m quantfw ...` (nodes: extra launcher flags)."""
    prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    prefix += nodes or ["--master-port", str(free_port())]
    cmd = [*prefix, "-m", "quantfw.cli.main", *args]
    e = {**os.environ, "PYTHONPATH": str(ROOT), **ENV, **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


def quantize_args(src, out, *extra):
    return ("quantize", f"input={src}", f"output={out}", *CLIP, *CALIB, "progress=false", *extra)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Tiny DeepSeek-V3 (3 layers: one dense, two MoE with 8 routed experts)."""
    return save_tiny_checkpoint("deepseek_v3", tmp_path_factory.mktemp("float") / "ds", seed=5, num_layers=3)


@pytest.fixture(scope="module")
def single(model, tmp_path_factory):
    """The one-process output every distributed run must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("single") / "q"
    r = cli(*quantize_args(model, out), env=ENV)
    assert r.returncode == 0, r.stderr[-4000:]
    return files_bytes(out)


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("quantfw quantize: error:")]


def test_observer_inputs_under_torchrun_byte_identical(model, tmp_path):
    """GPTQ reads each expert's captured inputs back from the shared work dir on every rank."""
    gptq = ["scheme=w4a8", "scheme.group_size=0", "format=msmodelslim", "scheme.weight_observer=gptq"]
    args = ["calibration.max_rows=64"]
    one, two = tmp_path / "one", tmp_path / "two"
    r = cli("quantize", f"input={model}", f"output={one}", *gptq, *CALIB, *args, "progress=false", env=ENV)
    assert r.returncode == 0, r.stderr[-4000:]
    r = torchrun(2, "quantize", f"input={model}", f"output={two}", *gptq, *CALIB, *args, "progress=false")
    assert r.returncode == 0, r.stderr[-4000:]
    assert files_bytes(two) == files_bytes(one)


def test_blocks_follow_the_placement_primaries_only():
    share = ExpertShare(Dist(rank=1, world=2), [[0, 1, 5, 6], [2, 3, 4, 5, 6, 7]])
    # 5 and 6 are redundant copies on rank 1: their primary (rank 0) computes them
    assert share.owned(8) == (2, 3, 4, 7)
    assert share.blocks(8, 2) == [range(2, 4), range(4, 5), range(7, 8)]
    assert ExpertShare(Dist(rank=0, world=2)).blocks(8, 3) == [range(0, 3), range(3, 4)]


def test_a_rank_left_converting_alone_on_its_node_takes_the_freed_cores(monkeypatch):
    # 3 shards over 2 ranks on one node: rank 0 converts shards 0 and 2, rank 1 shard 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert [busy_local_ranks(0, 2, 3, k) for k in (0, 1)] == [2, 1]
    assert busy_local_ranks(1, 2, 3, 0) == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
    assert [default_workers(2, busy_local_ranks(0, 2, 3, k)) for k in (0, 1)] == [1, 2]
    # two nodes of 2 ranks, 5 shards: rank 0 has shards 0 and 4, ranks 1, 2, 3 one each; in
    # round 1 rank 0 is alone on node 0, and node 1's ranks are done
    assert busy_local_ranks(2, 4, 5, 0) == 2 and busy_local_ranks(0, 4, 5, 1) == 1
    assert busy_local_ranks(2, 4, 5, 1) == 0


@pytest.mark.parametrize(
    "nproc, extra",
    [
        (2, []),
        # uneven, redundant copies of 1 and 6, rank 3 holds only copies: it computes nothing; every
        # expert's search rows spilled to the work dir, so they reach the searcher as file names
        (4, ["placement=[[0,1,2],[3,4,5,6],[7,1],[6]]", "calibration.search_memory_mb=0"]),
    ],
)
def test_torchrun_output_is_byte_identical_to_one_process(model, single, tmp_path, nproc, extra):
    out = tmp_path / "q"
    r = torchrun(nproc, *quantize_args(model, out, *extra))
    assert r.returncode == 0, r.stderr[-6000:]
    assert files_bytes(out) == single
    assert r.stderr.count("model-level guard skipped") == 1  # said once, not once per rank
    assert not (tmp_path / ".q.calibration").exists()


@pytest.mark.slow
def test_two_nodes_on_one_machine_byte_identical(model, single, tmp_path):
    out = tmp_path / "q"
    port = free_port()
    e = {**os.environ, "PYTHONPATH": str(ROOT), **ENV}
    procs = []
    for node in (0, 1):
        flags = ["--nnodes", "2", "--node-rank", str(node), "--rdzv-backend", "c10d"]
        flags += ["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"qfw-{port}"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", *flags]
        cmd += ["-m", "quantfw.cli.main", *quantize_args(model, out)]
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    results = [p.communicate(timeout=400) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results[0][1][-4000:] + results[1][1][-4000:]
    assert files_bytes(out) == single


def test_a_rank_that_raises_ends_every_rank_with_one_line(model, tmp_path):
    """Expert 7 of layer 1 is missing: only rank 1 reads it, and every rank says so."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in model.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    shard = bad / "model.safetensors"
    t = load_file(shard)
    missing = "model.layers.1.mlp.experts.7.down_proj.weight"
    del t[missing]
    save_file(t, str(shard), metadata={"format": "pt"})
    t0 = time.monotonic()
    r = torchrun(2, *quantize_args(bad, tmp_path / "q"), timeout=240)
    assert r.returncode != 0 and time.monotonic() - t0 < 240
    lines = error_lines(r.stderr)
    assert lines and all(ln == lines[0] for ln in lines), r.stderr[-4000:]
    assert "rank 1 failed during layer 1 (routed experts)" in lines[0] and missing in lines[0], lines
    assert "Traceback" not in r.stderr.split("quantfw quantize: error:")[0]
    assert not (tmp_path / ".q.calibration").exists()  # bad input: nothing worth resuming


def test_a_dead_rank_ends_all_and_any_world_resumes_byte_identical(model, single, tmp_path):
    out = tmp_path / "q"
    work = tmp_path / ".q.calibration"
    t0 = time.monotonic()
    # rank 1 is SIGKILLed as it starts layer 2's experts: layers 0 and 1 are in the work dir
    r = torchrun(2, *quantize_args(model, out), env={"QUANTFW_DIST_KILL": "1:2"}, timeout=240)
    assert r.returncode != 0 and time.monotonic() - t0 < 240, r.stderr[-4000:]
    state = json.loads((work / "state.json").read_text())
    assert sorted(state["layers"]) == ["0", "1"] and not out.exists()
    r = torchrun(4, *quantize_args(model, out), "progress=true")
    assert r.returncode == 0, r.stderr[-4000:]
    layers = [ln for ln in r.stderr.splitlines() if ln.startswith("quantfw calibrate: layer")]
    assert [ln.split(":")[1].split()[1] for ln in layers] == ["3/3"], layers  # resumed at layer 3
    assert files_bytes(out) == single


def test_a_rank_killed_in_its_deferred_search_ends_all_and_the_rerun_resumes_byte_identical(
    model, single, tmp_path
):
    out = tmp_path / "q"
    work = tmp_path / ".q.calibration"
    t0 = time.monotonic()
    # MoE layer 2 is rank 1's to search, after the last layer; its rows wait in the work dir
    args = quantize_args(model, out, "calibration.search_memory_mb=0")
    r = torchrun(2, *args, env={"QUANTFW_DIST_KILL": "1:2:search"}, timeout=240)
    assert r.returncode != 0 and time.monotonic() - t0 < 240, r.stderr[-4000:]
    state = json.loads((work / "state.json").read_text())
    assert sorted(state["layers"]) == ["0", "1"] and not out.exists()  # layer 2 lost its search
    assert list((work / "search-rows").glob("layer-0002-*"))  # the dead search's rows, left behind
    r = cli(*args[:-1], "progress=true", args[-1], env=ENV)  # one process now
    assert r.returncode == 0, r.stderr[-4000:]
    layers = [ln for ln in r.stderr.splitlines() if ln.startswith("quantfw calibrate: layer")]
    assert [ln.split(":")[1].split()[1] for ln in layers] == ["3/3"], layers
    assert files_bytes(out) == single and not work.exists()


def test_a_stalled_rank_times_out_in_bounded_time(model, tmp_path):
    t0 = time.monotonic()
    r = torchrun(
        2,
        *quantize_args(model, tmp_path / "q", "dist_timeout_s=20"),
        env={"QUANTFW_DIST_KILL": "1:1:stall"},
        timeout=240,
    )
    took = time.monotonic() - t0
    assert r.returncode != 0 and took < 240, r.stderr[-4000:]
    lines = error_lines(r.stderr)
    assert lines and "rank 0: lost the torch.distributed group" in lines[0], r.stderr[-4000:]
    assert "dist_timeout_s" in lines[0]


def test_rank0_finalize_failure_ends_the_other_ranks(model, tmp_path):
    script = tmp_path / "finalize_fails.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys
            from quantfw.errors import CheckpointError
            from quantfw.quantize.checkpoint import Converter

            def fail(self, done):
                raise CheckpointError("finalize: disk said no (test)")

            if os.environ["RANK"] == "0":
                Converter._finalize = fail
            from quantfw.cli.main import main
            sys.exit(main(sys.argv[1:]))
            """
        )
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-port", str(free_port()), str(script), *quantize_args(model, tmp_path / "q")]
    e = {**os.environ, "PYTHONPATH": str(ROOT), **ENV}
    r = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=240)
    assert r.returncode != 0
    lines = error_lines(r.stderr)
    assert len(lines) == 2 and all("finalize: disk said no (test)" in ln for ln in lines), r.stderr[-4000:]
    assert any("rank 0" in ln for ln in lines)


def test_alpha_searches_go_round_robin_over_the_ranks_unless_propagation_needs_them():
    from quantfw.parallel.search import AlphaSearches

    share = ExpertShare(Dist(rank=1, world=3))
    spread = AlphaSearches(share, {5: None, 1: None, 3: None, 7: None}, clips=True)
    # MoE layers in stack order 1, 3, 5, 7 -> ranks 0, 1, 2, 0 (a dense layer between changes nothing)
    assert [spread.searcher(i) for i in (1, 3, 5, 7)] == [0, 1, 2, 0]
    lead_only = AlphaSearches(share, [1, 3, 5, 7], clips=True, spread=False)  # propagate=quantized
    assert [lead_only.searcher(i) for i in (1, 3, 5, 7)] == [0, 0, 0, 0]
