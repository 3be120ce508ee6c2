"""Weight observers: each against a brute-forced optimum, SSZ never worse than min-max, GPTQ
better than round-to-nearest on held-out inputs, identical layouts across observers, fallback
policy, and compose-time validation of observer names and parameters."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from quantfw.api import build_layer
from quantfw.errors import ConfigError
from quantfw.quantize import observers as O
from quantfw.quantize import primitives as P
from quantfw.quantize.experts import QuantReport, RoutedInputs, quantize_experts
from quantfw.quantize.weights import quantize_weight


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small sequential ops (GPTQ columns) slow down badly with OpenMP threads on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


GRIDS = {
    "int8": dict(weight_bits=8, group_size=0),
    "int4": dict(weight_bits=4, group_size=0),
    "int4_g32": dict(weight_bits=4, group_size=32),
}


def _w(n=24, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[:, 3] *= 6  # a heavy column so clipping pays off
    return w


def _flags(grid, observer="minmax", **kw):
    return {**GRIDS[grid], "weight_observer": observer, **kw}


def _run(name, w, flags, x=None):
    return O.get_observer(name).fn(w, flags, x)


@pytest.mark.parametrize("grid", GRIDS)
def test_minmax_is_bit_identical_to_the_spec_quantizer(grid):
    w = _w()
    qw = quantize_weight(w, _flags(grid))
    if GRIDS[grid]["group_size"]:
        q, s1, s2 = P.quantize_two_level(w, 32)
        assert torch.equal(qw.s2, s2)
    else:
        q, s1 = P.quantize_per_channel(w, GRIDS[grid]["weight_bits"])
        assert qw.s2 is None
    assert torch.equal(qw.q, q) and torch.equal(qw.s1, s1)


def _brute_mse(v_rows: torch.Tensor, qmax: int, ratios, target=None) -> torch.Tensor:
    """Independent per-row search, one python loop per row and ratio: the best scale per row."""
    best = []
    target = v_rows if target is None else target
    for row, tgt in zip(v_rows, target):
        amax = row.abs().max().item()
        errs = []
        for r in ratios:
            t = amax * r / qmax or 1.0
            q = torch.clamp(torch.round(row / t), -qmax, qmax)
            errs.append((((tgt - q * t) ** 2).sum().item(), t))
        best.append(min(errs, key=lambda e: e[0])[1])
    return torch.tensor(best)


@pytest.mark.parametrize("grid", GRIDS)
def test_mse_matches_an_exhaustive_grid_search(grid):
    w = _w()
    flags = _flags(grid, "mse", observer_grid=11, observer_min_ratio=0.5)
    qw = _run("mse", w, flags)
    ratios = torch.linspace(0.5, 1.0, 11).tolist()
    if GRIDS[grid]["group_size"]:
        s1 = w.abs().amax(1) / 127
        q8 = torch.clamp(torch.round(w / s1[:, None]), -127, 127)
        target = (w / s1[:, None]).reshape(-1, 32)  # error measured on the float weight
        expected = _brute_mse(q8.reshape(-1, 32), 7, ratios, target).reshape(qw.s2.shape)
        torch.testing.assert_close(qw.s2, expected, rtol=1e-6, atol=0)
    else:
        qmax = 127 if GRIDS[grid]["weight_bits"] == 8 else 7
        torch.testing.assert_close(qw.s1, _brute_mse(w, qmax, ratios), rtol=1e-6, atol=0)
    # and it pays off: strictly lower weight MSE than min-max on int4 with an outlier column
    err = ((qw.dequantize() - w) ** 2).sum()
    err_mm = ((quantize_weight(w, _flags(grid)).dequantize() - w) ** 2).sum()
    assert err <= err_mm
    if GRIDS[grid]["weight_bits"] == 4:
        assert err < 0.95 * err_mm


def _block_errors(qw, w, grid):
    d = (qw.dequantize() - w) ** 2
    gs = GRIDS[grid]["group_size"]
    return d.reshape(w.shape[0], -1, gs).sum(-1) if gs else d.sum(-1)


@given(
    seed=st.integers(0, 10_000),
    grid=st.sampled_from(sorted(GRIDS)),
    heavy=st.floats(0.1, 20.0),
    iters=st.integers(1, 6),
)
def test_ssz_never_worse_than_its_minmax_start(seed, grid, heavy, iters):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 64, generator=g) * torch.rand(8, 1, generator=g)
    w[:, seed % 64] *= heavy
    flags = _flags(grid, "ssz", ssz_iters=iters)
    e_ssz = _block_errors(_run("ssz", w, flags), w, grid)
    e_mm = _block_errors(_run("minmax", w, flags), w, grid)
    # per block (channel or group), with fp32 slack for re-evaluating the same scale
    assert (e_ssz <= e_mm * (1 + 1e-5) + 1e-12).all()


def test_ssz_improves_gaussian_int4_and_keeps_zero_rows_finite():
    w = _w()
    w[5] = 0
    qw = _run("ssz", w, _flags("int4", "ssz"))
    assert torch.isfinite(qw.s1).all() and qw.s1[5] == 1 and (qw.q[5] == 0).all()
    e, e_mm = _block_errors(qw, w, "int4"), _block_errors(_run("minmax", w, _flags("int4")), w, "int4")
    assert e.sum() < 0.9 * e_mm.sum()


def _x(m, k, seed):
    """Correlated inputs with a few large channels (what makes output-aware methods win)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=torch.Generator().manual_seed(99)) / k**0.5 + torch.eye(k)
    x = torch.randn(m, k, generator=g) @ mix
    x[:, :4] *= 8
    return x


@pytest.mark.parametrize("grid", GRIDS)
def test_learned_clip_matches_brute_force_over_output_error(grid):
    w, x = _w(16, 64), _x(40, 64, 1)
    flags = _flags(grid, "learned_clip", observer_grid=9, observer_min_ratio=0.6)
    qw = _run("learned_clip", w, flags, x)
    ratios = torch.linspace(0.6, 1.0, 9).tolist()
    base = _run("minmax", w, flags)
    best = []
    for n in range(w.shape[0]):
        errs = []
        for r in ratios:
            # rebuild channel n at ratio r with the independent primitives
            if GRIDS[grid]["group_size"]:
                s1 = base.s1[n]
                q8 = torch.clamp(torch.round(w[n] / s1), -127, 127).reshape(-1, 32)
                t = q8.abs().amax(1) / 7 * r
                deq = (torch.clamp(torch.round(q8 / t[:, None]), -7, 7) * t[:, None]).reshape(-1) * s1
            else:
                qmax = 127 if GRIDS[grid]["weight_bits"] == 8 else 7
                t = w[n].abs().max() / qmax * r
                deq = torch.clamp(torch.round(w[n] / t), -qmax, qmax) * t
            errs.append(((x @ (w[n] - deq)) ** 2).sum().item())
        best.append(ratios[min(range(len(ratios)), key=errs.__getitem__)])
    torch.testing.assert_close(qw.info["clip_ratio"], torch.tensor(best), rtol=1e-6, atol=1e-6)

    def out_err(q):
        return ((x @ (w - q.dequantize()).T) ** 2).sum()

    assert out_err(qw) <= out_err(base)


def test_output_factor_preserves_output_norms_when_tokens_exceed_k():
    x = _x(300, 32, 2)
    a = O._output_factor(x)
    assert a.shape == (32, 32)
    d = torch.randn(32, 10, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close((a @ d).pow(2).sum(0), (x @ d).pow(2).sum(0), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("grid", GRIDS)
def test_gptq_beats_round_to_nearest_on_heldout_inputs(grid):
    k = 64
    w = _w(32, k, seed=4)
    calib, heldout = _x(1024, k, 10), _x(512, k, 11)
    flags = _flags(grid, "gptq", gptq_block=16)
    qw = _run("gptq", w, flags, calib)
    assert qw.q.dtype == torch.int8 and qw.q.abs().max() <= (7 if GRIDS[grid]["weight_bits"] == 4 else 127)

    def out_err(q):
        return ((heldout @ (w - q.dequantize()).T) ** 2).sum().item()

    rtn_same_scales = _run("mse", w, flags)  # gptq_scale_observer = mse: same scales, plain rounding
    torch.testing.assert_close(qw.s1, rtn_same_scales.s1)
    assert out_err(qw) < 0.85 * out_err(rtn_same_scales)
    assert out_err(qw) < 0.85 * out_err(_run("minmax", w, flags))
    # deterministic, and act_order / block size keep it working
    assert torch.equal(_run("gptq", w, flags, calib).q, qw.q)
    qa = _run("gptq", w, {**flags, "gptq_act_order": True, "gptq_block": 7}, calib)
    assert out_err(qa) < 0.85 * out_err(rtn_same_scales)


def test_gptq_handles_dead_input_channels():
    w, x = _w(16, 64), _x(256, 64, 5)
    x[:, 10] = 0
    qw = _run("gptq", w, _flags("int4", "gptq"), x)
    assert (qw.q[:, 10] == 0).all() and torch.isfinite(qw.dequantize()).all()


# ---------------------------------------------------------------------------------------------
# Through the core: quantize_experts, layouts, fallback, compose-time validation.

VARIANTS = {
    "w8a8": ["scheme=w8a8"],
    "w4a8_g128": ["scheme=w4a8", "scheme.group_size=128"],
    "w4a8_pc": ["scheme=w4a8", "scheme.group_size=0"],
    "w4a8_clip_ct": ["scheme=w4a8_clip", "format=compressed_tensors"],
}
SMALL = ["model.hidden_size=256", "model.moe_intermediate_size=128", "model.num_experts=2"]


def _experts(E=2, H=256, I=128):
    g = torch.Generator().manual_seed(0)
    return torch.randn(E, 2 * I, H, generator=g) * 0.05, torch.randn(E, H, I, generator=g) * 0.05


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_observer_gives_the_same_layout(compose, variant):
    w13, w2 = _experts()
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[0, 1]]).expand(64, 2)
    ref = None
    for obs in O.available():
        fast = ["scheme.observer_grid=4", "scheme.ssz_iters=2", "scheme.gptq_block=64"]
        cfg = compose("default", [*VARIANTS[variant], *SMALL, *fast, f"scheme.weight_observer={obs}"])
        layer = build_layer(cfg)
        tensors = quantize_experts(
            layer.scheme, layer.format, w13, w2, calib=RoutedInputs(x, ids, w13), log=None
        )
        sig = {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}
        ref = ref or sig
        assert sig == ref, obs
        layer.load(tensors)  # conformance-checked and post-loaded
        out = layer(x[:8], torch.ones(8, 2), ids[:8])
        assert torch.isfinite(out.float()).all()


def test_experts_without_enough_tokens_fall_back_and_are_reported(compose):
    w13, w2 = _experts()
    cfg = compose(
        "default",
        [
            "scheme=w4a8",
            "scheme.group_size=0",
            *SMALL,
            "scheme.weight_observer=gptq",
            "scheme.observer_min_tokens=8",
        ],
    )
    layer = build_layer(cfg)
    x = torch.randn(40, 256, generator=torch.Generator().manual_seed(2))
    ids = torch.zeros(40, 1, dtype=torch.int64)
    ids[:3] = 1  # expert 1 sees 3 tokens < 8
    report, lines = QuantReport(), []
    tensors = quantize_experts(
        layer.scheme,
        layer.format,
        w13,
        w2,
        calib=RoutedInputs(x, ids, w13),
        report=report,
        label="L0",
        log=lines.append,
    )
    assert [(r.role, r.expert, r.observer) for r in report.fallbacks] == [
        ("w13", 1, "minmax"),
        ("w2", 1, "minmax"),
    ]
    assert "3 calibration tokens < observer_min_tokens=8" in report.fallbacks[0].fallback
    assert len(lines) == 4 and all(ln.startswith("[quantfw] L0 ") for ln in lines)
    assert "FALLBACK from gptq" in lines[1]
    meta = report.metadata()
    assert meta["weight_observer"] == "gptq" and len(meta["fallback_experts"]) == 2
    # the fallback expert is exactly min-max; no NaN anywhere
    mm = quantize_experts(
        build_layer(compose("default", ["scheme=w4a8", "scheme.group_size=0", *SMALL])).scheme,
        layer.format,
        w13,
        w2,
    )
    assert torch.equal(tensors["w13_weight"][1], mm["w13_weight"][1])
    assert not torch.equal(tensors["w13_weight"][0], mm["w13_weight"][0])
    assert all(torch.isfinite(t.float()).all() for t in tensors.values())


def test_learned_clip_ratios_land_in_the_report_metadata(compose):
    w13, w2 = _experts()
    cfg = compose(
        "default", ["scheme=w4a8", "scheme.group_size=0", *SMALL, "scheme.weight_observer=learned_clip"]
    )
    layer = build_layer(cfg)
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    report = QuantReport()
    quantize_experts(
        layer.scheme,
        layer.format,
        w13,
        w2,
        calib=RoutedInputs(x, torch.tensor([[0, 1]]).expand(64, 2), w13),
        report=report,
        log=None,
    )
    ratios = report.metadata()["weight_clip_ratio"]
    assert len(ratios["w13"]) == 2 and len(ratios["w13"][0]) == 256 and len(ratios["w2"][1]) == 256
    assert all(0.5 <= r <= 1.0 for row in ratios["w2"] for r in row)


def test_routed_inputs_give_float_swiglu_outputs_for_w2():
    w13, _ = _experts()
    x = torch.randn(10, 256)
    ids = torch.tensor([[0], [1]] * 5)
    inputs = RoutedInputs(x, ids, w13)
    assert torch.equal(inputs("w13", 1), x[1::2])
    h = x[0::2] @ w13[0].T
    torch.testing.assert_close(inputs("w2", 0), torch.nn.functional.silu(h[:, :128]) * h[:, 128:])


@pytest.mark.parametrize(
    "override, key",
    [
        (
            "scheme.weight_observer=awq",
            "weight_observer='awq' is unknown (available: gptq, learned_clip, minmax, mse, ssz)",
        ),
        ("scheme.observer_grid=1", "observer_grid=1"),
        ("scheme.observer_min_ratio=1.5", "observer_min_ratio=1.5"),
        ("scheme.ssz_iters=0", "ssz_iters=0"),
        ("scheme.gptq_damp=0", "gptq_damp=0"),
        ("scheme.fallback_observer=gptq", "fallback_observer='gptq'"),
        ("scheme.gptq_scale_observer=nope", "gptq_scale_observer='nope'"),
    ],
)
def test_bad_observer_settings_are_rejected_at_compose_time(compose, override, key):
    with pytest.raises(ConfigError) as e:
        compose("default", [override])
    msg = str(e.value)
    assert key in msg and "\n" not in msg


def test_bad_observer_param_type_is_rejected_by_the_schema(compose):
    with pytest.raises(ConfigError, match="observer_grid"):
        compose("default", ["scheme.observer_grid=many"])


def test_quantize_weight_dispatches_through_the_registry():
    w = _w()
    for name in ("mse", "ssz"):
        flags = _flags("int4_g32", name)
        a, b = quantize_weight(w, flags), _run(name, w, flags)
        assert torch.equal(a.q, b.q) and torch.equal(a.s2, b.s2)
    # a data-driven observer without inputs runs the declared fallback
    flags = _flags("int4", "gptq", fallback_observer="ssz")
    assert torch.equal(quantize_weight(w, flags).s1, _run("ssz", w, flags).s1)


# ---------------------------------------------------------------------------------------------
# Fast forms at real dims: the same results as the reference forms.


@pytest.mark.parametrize("grid", GRIDS)
def test_row_blocked_observers_equal_the_whole_weight_bit_for_bit(grid, monkeypatch):
    w = _w(40, 64, seed=7).reshape(2, 20, 64)
    flags = _flags(grid)
    got = {name: _run(name, w, flags) for name in ("mse", "ssz")}
    x = _x(40, 64, 3)
    got["learned_clip"] = _run("learned_clip", w[0], {**flags, "weight_observer": "learned_clip"}, x)
    monkeypatch.setattr(P, "_BLOCK_ELEMS", 64)  # one channel per block: many blocks
    monkeypatch.setattr(O, "_CLIP_BLOCK", 3 * 64)
    for name, qw in got.items():
        small = _run(name, w, flags) if name != "learned_clip" else _run(name, w[0], flags, x)
        assert torch.equal(small.q, qw.q) and torch.equal(small.s1, qw.s1)
        assert (small.s2 is None) == (qw.s2 is None) and (qw.s2 is None or torch.equal(small.s2, qw.s2))


def _gptq_both(w, x, flags):
    base = _run("mse", w, flags)
    scale = O._element_scales(base, w.shape[1]).contiguous()
    qmax = 7 if flags["weight_bits"] == 4 else 127
    args = (
        x,
        O.param(flags, "gptq_damp"),
        O.param(flags, "gptq_act_order"),
        O.param(flags, "gptq_block"),
        qmax,
    )
    qs = [run(w.clone(), scale, *args) for run in (O._gptq_dense, O._gptq_low_rank)]
    return [O.QuantizedWeight(q.to(torch.int8), base.s1, base.s2) for q in qs]


@pytest.mark.parametrize(
    "grid,extra", [("int4", {}), ("int4_g32", {"gptq_act_order": True, "gptq_block": 7}), ("int8", {})]
)
def test_low_rank_gptq_rounds_like_the_dense_factorisation(grid, extra):
    """Fewer rows than half of K (the low-rank path gptq takes): the same integer weights as the
    K x K Cholesky form on small layers, dead channel included."""
    w, x = _w(32, 64, seed=3), _x(24, 64, 6)
    x[:, 9] = 0
    flags = _flags(grid, "gptq", **{"gptq_block": 16, **extra})
    dense, low = _gptq_both(w, x, flags)
    assert torch.equal(dense.q, low.q) and (low.q[:, 9] == 0).all()
    assert torch.equal(_run("gptq", w, flags, x).q, low.q)  # 24 rows < 64 / 2: the observer's choice


def test_low_rank_gptq_output_error_matches_dense_at_width_1024():
    """Wider K: rounding differences flip a few integers, the output error stays the same."""
    w, x = _w(64, 1024, seed=2), _x(96, 1024, 8)
    dense, low = _gptq_both(w, x, _flags("int4", "gptq"))

    def out_err(q):
        return ((x @ (w - q.dequantize()).T) ** 2).sum().item()

    assert (dense.q != low.q).float().mean() < 0.01
    assert out_err(low) == pytest.approx(out_err(dense), rel=0.01)
    assert out_err(low) < 0.85 * out_err(_run("mse", w, _flags("int4")))
