"""Expert- and tensor-parallel MoE layer (quantfw.moe.parallel) on 2 and 4 gloo processes.

One launch per world size runs every job (scheme x format x placement x TP); each rank feeds its
own, deliberately uneven, slice of the tokens and writes its output; the parent compares the
concatenation with the single-process layer on all tokens.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from quantfw.api import components
from quantfw.config.compose import compose
from quantfw.errors import ConfigError, QuantfwError
from quantfw.eval.metrics import compare, peer_check
from quantfw.eval.synthetic import hidden_states, random_routing
from quantfw.integrations.hf import save_tiny_checkpoint
from quantfw.io.loader import from_checkpoint as load_one
from quantfw.ops.rowmax import rows_split
from quantfw.quantize.checkpoint import quantize_checkpoint

E, H, K, T = 8, 512, 3, 40
SCHEMES = {  # (scheme, format) -> recipe overrides
    ("w8a8", "msmodelslim"): ["scheme=w8a8", "format=msmodelslim"],
    ("w8a8", "compressed_tensors"): ["scheme=w8a8", "format=compressed_tensors"],
    # two-level, group 64: divides w2's K = I / tp = 128 at tp 2 and 64 at tp 4
    ("w4a8", "msmodelslim"): ["scheme=w4a8", "scheme.group_size=64", "format=msmodelslim"],
    ("w4a8", "compressed_tensors"): ["scheme=w4a8", "scheme.group_size=0", "format=compressed_tensors"],
    ("w4a8_clip", "msmodelslim"): ["scheme=w4a8_clip", "format=msmodelslim"],
    ("w4a8_clip", "compressed_tensors"): ["scheme=w4a8_clip", "format=compressed_tensors"],
}
# Token counts per rank (sum T): uneven, and on 4 ranks one rank brings no tokens at all.
SPLITS = {2: [29, 11], 4: [7, 0, 25, 8]}
LAUNCH_TIMEOUT_S = 900
# Schemes the placement / idle-rank scenarios run on at 4 ranks (every scheme at 2 ranks).
SCENARIO_SCHEMES = (("w8a8", "msmodelslim"), ("w4a8_clip", "compressed_tensors"))


def _name(key) -> str:
    return "-".join(key)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ep")
    src = save_tiny_checkpoint("qwen3_moe", root / "float", num_layers=1, num_experts=E)
    out = {}
    for key, overrides in SCHEMES.items():
        s, f, _ = components(compose("default", overrides))
        out[key] = quantize_checkpoint(src, root / _name(key), s, f, progress=False)
    return out


def _inputs(skip_experts=()):
    """Tokens and top-k routing with uneven expert loads; no pair goes to `skip_experts`."""
    allowed = torch.tensor([e for e in range(E) if e not in skip_experts])
    x = hidden_states(T, H, seed=5)
    w, ids = random_routing(T, len(allowed), K, seed=6, skew=3.0)
    return x, w, allowed[ids]


# ----------------------------------------------------------------------------- the launcher


def _worker(rank: int, world: int, store: str, jobs_file: str, out_dir: str, die_rank: int | None) -> None:
    import torch.distributed as dist

    import quantfw

    # One intra-op thread here and in the single-process reference (_single): a BLAS that picks
    # its thread count at run time (under load) may otherwise split reductions differently.
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=30)
    )
    # Every rank is connected before any job: a rank that dies "during load" must not die while
    # the others are still joining (they would fail in init, not in the load under test).
    dist.barrier()
    jobs = json.loads(Path(jobs_file).read_text())
    for job in jobs:
        result: dict = {}
        try:
            if die_rank == rank:
                os._exit(3)  # a rank that dies during load, reporting nothing
            moe = quantfw.from_checkpoint(job["path"], tp_size=job["tp"], recipe_overrides=job["overrides"])
            x, w, ids = torch.load(job["inputs"])
            split = job["split"]
            lo, hi = sum(split[:rank]), sum(split[: rank + 1])
            torch.save(moe(x[lo:hi], w[lo:hi], ids[lo:hi]), f"{out_dir}/{job['name']}.{rank}.pt")
        except QuantfwError as e:
            result = {"error": str(e), "type": type(e).__name__}
        Path(f"{out_dir}/{job['name']}.{rank}.json").write_text(json.dumps(result))
    try:
        dist.destroy_process_group()
    except RuntimeError:
        pass  # a peer died (the dying-rank test): nothing left to tear down cleanly


def launch(world: int, jobs: list[dict], tmp: Path, die_rank: int | None = None) -> tuple[list[int], float]:
    """Run `jobs` on `world` spawned ranks; (exit codes, seconds). Ranks still alive after
    LAUNCH_TIMEOUT_S are killed (exit code None fails the test: a hang)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    ctx = mp.get_context("spawn")
    args = (world, str(tmp / "store"), str(tmp / "jobs.json"), str(tmp), die_rank)
    procs = [ctx.Process(target=_worker, args=(r, *args)) for r in range(world)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(max(1.0, LAUNCH_TIMEOUT_S - (time.monotonic() - t0)))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    return codes, time.monotonic() - t0


def _job(name, path, tmp, inputs, world, overrides=(), tp=1) -> dict:
    return {
        "name": name,
        "path": str(path),
        "overrides": list(overrides),
        "tp": tp,
        "inputs": str(inputs),
        "split": SPLITS[world],
    }


def outputs(tmp: Path, name: str, world: int):
    """The ranks' outputs concatenated, or the per-rank error messages."""
    reports = [json.loads((tmp / f"{name}.{r}.json").read_text()) for r in range(world)]
    if any(reports):
        return None, reports
    return torch.cat([torch.load(tmp / f"{name}.{r}.pt") for r in range(world)]), reports


# Placements (recipe key `placement`) per world, beyond the default contiguous blocks.
PLACEMENTS = {
    2: {
        "interleaved": [[0, 2, 4, 6], [1, 3, 5, 7]],
        "redundant": [[0, 1, 2, 3, 7], [0, 4, 5, 6, 7]],  # 0 and 7 twice: rank 0 is their primary
    },
    4: {"redundant": [[0, 1, 7], [2, 3, 0], [4, 5], [6, 7, 1]]},
}


@pytest.fixture(scope="module", params=[2, 4])
def run(request, ckpts, tmp_path_factory):
    world = request.param
    tmp = tmp_path_factory.mktemp(f"run{world}")
    torch.save(_inputs(), tmp / "in.pt")
    torch.save(_inputs(skip_experts=(6, 7) if world == 4 else (4, 5, 6, 7)), tmp / "in_idle.pt")
    jobs = []
    for key, path in ckpts.items():
        n = _name(key)
        jobs.append(_job(f"ep-{n}", path, tmp, tmp / "in.pt", world))
        for tp in TP_SIZES[world]:
            jobs.append(_job(_tp_name(tp, n), path, tmp, tmp / "in.pt", world, tp=tp))
        if world == 4 and key not in SCENARIO_SCHEMES:
            continue  # 4 ranks are slow to launch jobs on: the scenarios on two schemes there
        jobs.append(_job(f"idle-{n}", path, tmp, tmp / "in_idle.pt", world))
        for pname, lists in PLACEMENTS[world].items():
            jobs.append(_job(f"{pname}-{n}", path, tmp, tmp / "in.pt", world, [f"placement={lists}"]))
    codes, seconds = launch(world, jobs, tmp)
    assert codes == [0] * world, (codes, seconds)
    return world, tmp


# TP sizes run per world: TP 2 (EP 1 x TP 2, EP 2 x TP 2) and TP 4 (EP 1 x TP 4).
TP_SIZES = {2: (2,), 4: (2, 4)}


def _tp_name(tp: int, n: str) -> str:
    return f"tp-{n}" if tp == 2 else f"tp{tp}-{n}"


def _slices_one_by_one(
    path, x, w, ids, world: int, tp: int, backend: str = "torch", seen=None
) -> torch.Tensor:
    """The TP ranks' slices run one by one in this process, their partial outputs summed; each
    slice's per-token w2-input bound is the max over the slices of its TP group (what the TP
    layer's MAX all_reduce gives), found by a first pass that records every slice's bounds in
    `seen` (one list per rank)."""
    ep = world // tp
    layers = [
        load_one(path, backend=backend, ep_rank=r // tp, ep_size=ep, tp_rank=r % tp, tp_size=tp)
        for r in range(world)
    ]
    seen = [[] for _ in range(world)] if seen is None else seen
    for r, layer in enumerate(layers):
        with rows_split(lambda a, r=r: seen[r].append(a) or a):
            layer(x, w, ids)
    total = 0
    for r, layer in enumerate(layers):
        group = seen[r // tp * tp : r // tp * tp + tp]
        calls = iter(torch.stack(per_call).amax(0) for per_call in zip(*group, strict=True))
        with rows_split(lambda a, calls=calls: next(calls)):
            total = total + layer(x, w, ids).float()
    return total


def _single(path, name):
    x, w, ids = torch.load(name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return load_one(path, layer=-1)(x, w, ids)
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("key", list(SCHEMES), ids=_name)
@pytest.mark.parametrize("kind", ["ep", "idle", "interleaved", "redundant"])
def test_expert_parallel_equals_single_process_bit_for_bit(run, ckpts, key, kind):
    world, tmp = run
    if kind != "ep" and world == 4 and key not in SCENARIO_SCHEMES:
        pytest.skip(f"the {kind} scenario runs on {SCENARIO_SCHEMES} at 4 ranks")
    if kind == "interleaved" and kind not in PLACEMENTS[world]:
        pytest.skip(f"no {kind} placement declared for {world} ranks")
    y, errors = outputs(tmp, f"{kind}-{_name(key)}", world)
    assert y is not None, errors
    ref = _single(ckpts[key], tmp / ("in_idle.pt" if kind == "idle" else "in.pt"))
    assert y.dtype == ref.dtype and y.shape == ref.shape == (T, H)
    assert torch.equal(y, ref), compare(y, ref)
    assert float(ref.float().abs().mean()) > 0  # a real output, not two zero tensors


@pytest.mark.parametrize("key", list(SCHEMES), ids=_name)
@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_equals_its_ranks_slices_and_meets_the_peer_criterion(run, ckpts, key, tp):
    world, tmp = run
    if tp not in TP_SIZES[world]:
        pytest.skip(f"TP {tp} runs on {[w for w, s in TP_SIZES.items() if tp in s]} ranks")
    y, errors = outputs(tmp, _tp_name(tp, _name(key)), world)
    if key[1] == "compressed_tensors" and key[0] != "w8a8":
        # The clip format's single [N] bias sums over all of K: no TP (declared shard: refuse).
        assert y is None
        assert {e["type"] for e in errors} == {"CheckpointError"}
        msgs = {e["error"] for e in errors}
        assert len(msgs) == 1 and "\n" not in next(iter(msgs)), msgs
        assert "down_proj.bias" in next(iter(msgs)) and "sums over all of K" in next(iter(msgs))
        return
    assert y is not None, errors
    x, w, ids = torch.load(tmp / "in.pt")
    # Peer: the same TP slices run one by one in this process, their partial outputs summed.
    slices = _slices_one_by_one(ckpts[key], x, w, ids, world, tp)
    assert peer_check(y, slices)["ok"], peer_check(y, slices)
    torch.testing.assert_close(y.float(), slices, rtol=0, atol=1e-5)
    # Against TP 1: every TP rank quantizes its slice of the SwiGLU output with the whole row's
    # per-token amax, so the int8 w2 input is TP 1's and only the K-split partial sums differ:
    # the spec's peer criterion (1.4), and far closer than a wrong slicing (O(1) off).
    single = _single(ckpts[key], tmp / "in.pt")
    assert peer_check(y, single)["ok"], peer_check(y, single)
    m = compare(y, single)
    assert m["rel_l2"] < 0.005 and m["cosine"] > 0.99999, m


def test_rank_failing_during_load_stops_every_rank_with_one_line(ckpts, tmp_path):
    """Expert 6 of layer 0 has a wrong-shape tensor: only the rank holding it fails; every rank raises the same
    one-line error naming that rank and the tensor, and exits."""
    src = ckpts["w8a8", "msmodelslim"]
    broken = tmp_path / "broken"
    broken.mkdir()
    from safetensors.torch import load_file, save_file

    for f in src.iterdir():
        if f.suffix == ".safetensors":
            t = load_file(f)
            key = next(k for k in t if k.endswith("experts.6.down_proj.weight_scale"))
            t[key] = torch.ones(H, 2)  # declared [H, 1]
            save_file(t, broken / f.name, metadata={"format": "pt"})
        else:
            (broken / f.name).write_bytes(f.read_bytes())
    torch.save(_inputs(), tmp_path / "in.pt")
    jobs = [_job("load", broken, tmp_path, tmp_path / "in.pt", 2)]
    codes, seconds = launch(2, jobs, tmp_path)
    assert codes == [0, 0] and seconds < 120, (codes, seconds)
    _, errors = outputs(tmp_path, "load", 2)
    assert errors[0] == errors[1] and errors[0]["type"] == "CheckpointError"
    msg = errors[0]["error"]
    assert "\n" not in msg and msg.count("rank 1 of 2") == 1, msg
    assert "experts.6.down_proj.weight_scale" in msg, msg


def test_rank_dying_during_load_ends_the_others_in_bounded_time(ckpts, tmp_path):
    torch.save(_inputs(), tmp_path / "in.pt")
    jobs = [_job("dead", ckpts["w8a8", "msmodelslim"], tmp_path, tmp_path / "in.pt", 2)]
    codes, seconds = launch(2, jobs, tmp_path, die_rank=1)
    assert codes[1] == 3 and codes[0] == 0 and seconds < 120, (codes, seconds)
    err = json.loads((tmp_path / "dead.0.json").read_text())
    assert err["type"] == "CheckpointError" and "a rank stopped before reporting" in err["error"], err
    assert "\n" not in err["error"]


def test_tp_not_dividing_the_scale_bias_partials_is_refused_naming_the_rule(ckpts):
    # I = 256 splits into 32 slices, but w2's 16 scale_bias partials do not.
    with pytest.raises(ConfigError) as e:
        load_one(ckpts["w4a8_clip", "msmodelslim"], layer=-1, tp_rank=0, tp_size=32)
    msg = str(e.value)
    assert "\n" not in msg and "scale_bias.shape" in msg and "'16/tp'" in msg and "32" in msg, msg


def test_a_placement_leaving_a_rank_without_experts_is_refused(ckpts):
    path = ckpts["w8a8", "msmodelslim"]
    with pytest.raises(ConfigError, match="ep_rank=1 holds no experts"):
        load_one(path, ep_rank=1, ep_size=2, recipe_overrides=["placement=[[0,1,2,3,4,5,6,7],[]]"])


# ----------------------------------------------------------------------------- torchrun CLI


def _torchrun(nproc: int) -> tuple[str, ...]:
    import socket
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return (
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={port}",
    )


def test_torchrun_eval_equals_single_process_eval(ckpts, tmp_path):
    from checkpoint_helpers import cli

    from quantfw.eval.checkpoint import evaluate_checkpoint

    path, ref = (
        ckpts["w4a8_clip", "compressed_tensors"],
        ckpts["w4a8_clip", "compressed_tensors"].parent / "float",
    )
    out = tmp_path / "eval.json"
    args = ("eval", f"checkpoint={path}", f"reference={ref}", "tokens=48", "progress=false", f"out={out}")
    r = cli(*args, prefix=_torchrun(2))
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads(out.read_text())["layers"][0]
    single = evaluate_checkpoint(path, ref, tokens=48, progress=False)[0]
    assert row["ep_size"] == 2 and row["layer"] == single["layer"] == 0
    for m in ("rel_l2", "cosine", "max_abs"):  # the float reference's fp32 sum order differs only
        assert row[m] == pytest.approx(single[m], rel=1e-4, abs=1e-6), (m, row, single)


def test_torchrun_bench_times_the_expert_parallel_layer(tmp_path):
    from checkpoint_helpers import cli

    out = tmp_path / "bench.json"
    args = ("bench", "model=tiny", "bench.layers=[model]", "bench.tokens=[8]", "bench.modes=[fast]")
    args += ("bench.schemes=[w8a8]", "bench.repeats=2", "bench.load=false", "progress=false", f"out={out}")
    r = cli(*args, prefix=_torchrun(2))
    assert r.returncode == 0, r.stderr[-3000:]
    (rec,) = json.loads(out.read_text())["records"]
    assert rec["kind"] == "forward_ep" and rec["ranks"] == 2 and rec["repeats"] == 2
    assert len(rec["peak_rss_mb_per_rank"]) == 2 and rec["median_ms"] >= rec["min_ms"] > 0
