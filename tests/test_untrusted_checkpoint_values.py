"""Dims and values of a checkpoint are checked before they are trusted: config.json dims are
positive, bounded and agree with the tensor headers before anything is sized from them (a
config claiming 10^12 experts is an error in milliseconds, with no big allocation), and every
alpha is finite and in (0, 1] at load and in `check` (naming the tensor and the expert)."""

from __future__ import annotations

import math
import time

import pytest
from hostile_checkpoints import (
    E,
    H,
    copy,
    edit_json,
    float_checkpoint,
    one_line,
    quantized,
    refused,
    run,
    set_alpha,
)

from quantfw import from_checkpoint
from quantfw.errors import CheckpointError
from quantfw.io.experts import MoEModel
from quantfw.io.loader import check, open_checkpoint
from quantfw.io.reader import CheckpointReader

LIMIT = 1 << 30  # address space of the CLI runs: a valid tiny check fits easily


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("valid")
    return {s: quantized(root, s) for s in ("clip", "w4a8")}


@pytest.fixture
def clip(ckpts, tmp_path):
    return copy(ckpts["clip"], tmp_path / "clip")


def _dims(folder, **values):
    edit_json(folder / "config.json", lambda d: d.update(values))
    return folder


def _fails_fast(folder, *needles) -> str:
    t = time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(folder)
    elapsed = time.perf_counter() - t
    msg = one_line(e)
    assert elapsed < 2.0, elapsed
    assert "config.json" in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_a_valid_check_fits_the_address_space_limit(ckpts):
    r = run("check", f"checkpoint={ckpts['clip']}", limit_bytes=LIMIT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "OK" in r.stdout


def test_trillion_experts_is_an_error_in_milliseconds_without_allocating(clip):
    _dims(clip, num_experts=10**12)
    _fails_fast(clip, "num_experts", "found integer 1000000000000")
    t = time.perf_counter()
    line = refused(run("check", f"checkpoint={clip}", limit_bytes=LIMIT))
    assert time.perf_counter() - t < 60  # interpreter start included; the check itself is ms
    assert "num_experts" in line and "1000000000000" in line


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("num_experts", 60000, "num_experts=60000 disagrees with the tensors (routed experts 0..7"),
        ("num_experts", 4, "num_experts=4 disagrees with the tensors (routed experts 0..7"),
        ("hidden_size", 10**9, "hidden_size must be an integer in [1, 262144], found integer 1000000000"),
        ("num_hidden_layers", 10**9, "num_hidden_layers must be an integer in [1, 16384]"),
    ],
)
def test_dims_bounded_and_agreeing_with_the_tensors(clip, key, value, needle):
    _fails_fast(_dims(clip, **{key: value}), needle)


@pytest.mark.parametrize(
    "key,value",
    [("hidden_size", 2 * H), ("moe_intermediate_size", 2**19), ("hidden_size", 7)],
)
def test_float_dims_checked_from_headers(tmp_path, key, value):
    ref = float_checkpoint(tmp_path / "float")
    assert MoEModel.from_reader(CheckpointReader(ref)).num_experts == E
    _dims(ref, **{key: value})
    t = time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        MoEModel.from_reader(CheckpointReader(ref))
    assert time.perf_counter() - t < 2.0
    msg = one_line(e)
    assert f"{key}={value}" in msg and "proj.weight' [" in msg and "expected [" in msg


def test_quantized_dims_checked_against_the_declared_layout(clip):
    # H too big for the tensors: nothing is sized from it; loading stops at the layout check
    _dims(clip, hidden_size=4 * H)
    t = time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        from_checkpoint(clip, layer=0)
    assert time.perf_counter() - t < 5.0
    assert "down_proj.weight" in one_line(e) and "problem(s)" in one_line(e)
    problems = check(open_checkpoint(clip))
    assert len(problems) >= 2 * E and all("layer" not in p or "MoE" not in p for p in problems)


@pytest.mark.parametrize(
    "key,value",
    [
        ("num_experts", -8),
        ("num_experts", 0),
        ("hidden_size", -512),
        ("moe_intermediate_size", 0),
        ("num_hidden_layers", -1),
        ("num_experts", True),
        ("hidden_size", False),
    ],
)
def test_zero_negative_and_boolean_dims(clip, key, value):
    _fails_fast(_dims(clip, **{key: value}), key, "must be an integer in [1,")


def test_ep_and_tp_sizes_checked_before_use(clip):
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(clip, ep_size=0)
    assert "ep_size=0" in one_line(e)


BAD_ALPHAS = [math.nan, math.inf, -math.inf, 0.0, -1.0, 2.0]


@pytest.mark.parametrize("value", BAD_ALPHAS, ids=str)
def test_alpha_out_of_range_refused_at_load(clip, value):
    key = set_alpha(clip, 0, 3, value)
    with pytest.raises(CheckpointError) as e:
        from_checkpoint(clip, layer=0)
    msg = one_line(e)
    assert key in msg and "(expert 3)" in msg and "finite and in (0, 1]" in msg
    assert from_checkpoint(clip, layer=1).w2_alpha.shape == (E,)  # the other layer is fine


def test_alpha_out_of_range_every_one_in_check(clip):
    keys = [set_alpha(clip, layer, e, v) for (layer, e), v in zip([(0, 1), (0, 6), (1, 2)], BAD_ALPHAS)]
    problems = check(open_checkpoint(clip))
    bad = [p for p in problems if "finite and in (0, 1]" in p]
    assert len(bad) == 3 and all(k in p for k, p in zip(keys, bad))
    assert "(expert 1) = nan" in bad[0] and "(expert 6) = inf" in bad[1] and "(expert 2) = -inf" in bad[2]
    r = run("check", f"checkpoint={clip}")
    line = refused(r)
    assert "3 problem(s)" in line
    assert all(k in r.stdout for k in keys)


def test_alpha_at_the_edges_is_accepted(clip):
    set_alpha(clip, 0, 0, 1.0)
    set_alpha(clip, 0, 1, 1e-6)
    assert check(open_checkpoint(clip)) == []


def test_oversized_json_refused_before_reading(clip):
    cfg = clip / "config.json"
    with cfg.open("r+b") as f:  # sparse: 65 MiB on paper, nothing written
        f.truncate(65 << 20)
    t = time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(clip)
    assert time.perf_counter() - t < 2.0
    assert "config.json" in one_line(e) and "bytes (at most" in one_line(e)
