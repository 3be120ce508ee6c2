"""Per-expert alpha calibration: capture from a float experts module, coverage policy, objective."""

import pytest
import torch
from alpha_search_reference import _error

from quantfw import ops
from quantfw.calibrate.experts import ExpertCapture, LayerCapture, alpha_metadata, learn_expert_alphas
from quantfw.errors import CalibrationError, ConfigError
from quantfw.eval import synthetic
from quantfw.moe.reference import FloatMoE
from quantfw.quantize.experts import fake_quant_weights
from quantfw.schemes.scheme import Scheme

E, H, I = 4, 64, 32


@pytest.fixture(scope="module")
def clip_scheme():
    from quantfw.config.compose import compose

    return Scheme.from_config(compose("default", ["scheme=w4a8_clip"]).scheme)


@pytest.fixture(scope="module")
def weights():
    return synthetic.expert_weights(E, H, I, seed=0)


def capture_run(w13, w2, tokens=256, k=2, max_rows=None, layer=3, skew=3.0):
    moe = FloatMoE(w13, w2)
    x = synthetic.hidden_states(tokens, H, seed=5)
    tw, ids = synthetic.random_routing(tokens, E, k, seed=6, skew=skew)
    cap = ExpertCapture({layer: (moe, w13)}, max_rows=max_rows)
    with cap.attached():
        moe(x, tw, ids)
    moe(x, tw, ids)  # detached: must not record again
    return cap.layers[layer], x, ids


def test_capture_counts_equal_routing_and_rows_are_pre_swiglu(weights):
    w13, w2 = weights
    cap, x, ids = capture_run(w13, w2)
    assert cap.counts.tolist() == torch.bincount(ids.reshape(-1), minlength=E).tolist()
    for e in range(E):
        tok = (ids == e).any(-1)
        torch.testing.assert_close(cap.h(e), x[tok] @ w13[e].T, rtol=0, atol=0)


def test_capture_row_cap_keeps_full_counts(weights):
    w13, w2 = weights
    cap, _, ids = capture_run(w13, w2, max_rows=20)
    assert cap.counts.sum().item() == ids.numel()
    assert all(cap.h(e).shape[0] == min(20, int(cap.counts[e])) for e in range(E))


def starved_capture(w13):
    """Expert 1 sees 3 tokens, the others 200 (rows with a few large outliers, where clipping pays)."""
    cap = LayerCapture(layer=7, num_experts=E)
    g = torch.Generator().manual_seed(0)
    for e in range(E):
        x = synthetic.hidden_states(3 if e == 1 else 200, H, seed=10 + e)
        cap.add(e, x @ w13[e].T + 0 * torch.randn(1, generator=g))
    return cap


def test_policy_ones_falls_back_and_reports(clip_scheme, weights):
    w13, w2 = weights
    alphas, report = learn_expert_alphas(clip_scheme, w13, w2, starved_capture(w13), min_tokens=16)
    assert alphas[1].item() == 1.0 and report[1]["status"] == "fallback_too_few_tokens"
    assert report[1]["tokens"] == 3 and report[1]["layer"] == 7
    assert [r["status"] for r in report].count("learned") == E - 1
    assert torch.isfinite(alphas).all() and ((alphas > 0) & (alphas <= 1)).all()
    meta = alpha_metadata(report, "synthetic", 16, "ones")
    assert meta["method"] == "grid_search_output_mse" and meta["fallback_experts"] == [[7, 1]]
    assert meta["tokens"] == 3 + 200 * (E - 1) and meta["grid"]["lo"] == 0.05


def test_policy_fail_names_layer_and_expert(clip_scheme, weights):
    w13, w2 = weights
    with pytest.raises(CalibrationError) as exc:
        learn_expert_alphas(clip_scheme, w13, w2, starved_capture(w13), min_tokens=16, policy="fail")
    msg = str(exc.value)
    assert "\n" not in msg and "layer 7 expert 1" in msg and "3 calibration tokens" in msg and "16" in msg


def test_expert_with_no_tokens_and_bad_inputs(clip_scheme, weights):
    w13, w2 = weights
    cap = LayerCapture(layer=0, num_experts=E)  # nothing routed anywhere
    alphas, report = learn_expert_alphas(clip_scheme, w13, w2, cap, min_tokens=1)
    assert alphas.tolist() == [1.0] * E and all(r["rows"] == 0 for r in report)
    with pytest.raises(ConfigError, match="policy 'maybe'"):
        learn_expert_alphas(clip_scheme, w13, w2, cap, policy="maybe")
    bad = starved_capture(w13)
    bad.rows[0][0][0, 0] = float("nan")
    with pytest.raises(CalibrationError, match="layer 7 expert 0: non-finite"):
        learn_expert_alphas(clip_scheme, w13, w2, bad, min_tokens=1)


def test_learned_alphas_never_worse_than_one_and_near_brute_force(clip_scheme, weights):
    w13, w2 = weights
    cap = starved_capture(w13)
    alphas, report = learn_expert_alphas(clip_scheme, w13, w2, cap, min_tokens=16)
    deq = fake_quant_weights(clip_scheme, w2).dequantize()
    clipped = 0
    for e in (0, 2, 3):
        h = cap.h(e)
        ref = ops.swiglu(h) @ w2[e].T
        at_alpha = _error(h, alphas[e].item(), deq[e], ref)
        at_one = _error(h, 1.0, deq[e], ref)
        assert at_alpha <= at_one and report[e]["error"] == pytest.approx(at_alpha)
        brute = min(_error(h, a, deq[e], ref) for a in torch.linspace(0.05, 1.0, 60).tolist())
        assert at_alpha <= brute * 1.03  # searched on 3/4 of the rows (1/4 held out), judged on all
        clipped += alphas[e].item() < 1.0
    assert clipped >= 1  # outlier rows: the search really clips somewhere


def test_outlier_row_known_optimum(clip_scheme):
    """One huge, output-irrelevant entry per row: alpha = 1 wastes the int8 range on it, so the
    best clip sits near the bulk of the row (|y| ~ 2 of ~144), far below 1."""
    torch.manual_seed(0)
    w2 = torch.eye(H, I)  # int4-exact, so only activation quantization matters
    w2[0, 0] = 1e-3  # ... and the outlier channel barely reaches the output
    h = torch.randn(512, 2 * I)
    h[:, 0] = 12.0
    h[:, I] = 12.0  # y[:, 0] = silu(12) * 12 ~ 144, the rest ~ N(0, 0.5)
    w13 = torch.zeros(E, 2 * I, H)
    cap = LayerCapture(layer=0, num_experts=E)
    cap.add(0, h)
    alphas, report = learn_expert_alphas(clip_scheme, w13, w2.expand(E, H, I).contiguous(), cap, min_tokens=1)
    assert alphas[0].item() < 0.2 and report[0]["error"] < report[0]["error_at_one"] / 2


def test_search_runs_on_the_rows_the_deployed_clip_sees(clip_scheme, weights):
    """With expert inputs captured, alpha is searched on h after int8 activations and the int4
    first GEMM (bf16), against the float expert output; computed independently here."""
    from quantfw.calibrate.alpha import search_alpha

    w13, w2 = weights
    cap, _, _ = capture_run(w13, w2)
    alphas, report = learn_expert_alphas(clip_scheme, w13, w2, cap, min_tokens=16)
    d13 = fake_quant_weights(clip_scheme, w13).dequantize()
    d2 = fake_quant_weights(clip_scheme, w2).dequantize()
    for e in range(E):
        x, h = cap.x(e), cap.h(e)
        if h.shape[0] < 16:
            continue
        amax = x.abs().amax(-1, keepdim=True)
        s = torch.where(amax == 0, torch.ones_like(amax), amax / 127)
        xdq = torch.clamp(torch.round(x / s), -128, 127) * s
        h_dep = (xdq @ d13[e].T).to(torch.bfloat16).float()
        assert not torch.equal(h_dep, h)
        r = search_alpha(h_dep, w2[e], d2[e], h_ref=h)
        assert alphas[e].item() == r.alpha and report[e]["error"] == pytest.approx(r.error)


def _shared_outlier_experts(n=512, i=16, h_out=8, seed=0):
    """Two experts that see the same tokens, each with one large SwiGLU channel whose w2 column is
    the same output direction: their clip errors add coherently in the layer output, their int8
    rounding errors do not."""
    from quantfw.calibrate.alpha import ExpertRows

    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(h_out, generator=g)
    rows = []
    for _ in range(2):
        h = torch.randn(n, 2 * i, generator=g)
        h[:, 0] = 6.0 + torch.rand(n, generator=g)  # y[:, 0] = silu(h0) * h0, ~40 vs bulk ~0.5
        h[:, i] = h[:, 0]
        w2 = torch.randn(h_out, i, generator=g)
        w2[:, 0] = shared * 0.005
        rows.append(
            ExpertRows(h=h, ref=ops.swiglu(h) @ w2.T, w2_deq=w2, tokens=torch.arange(n), weight=torch.ones(n))
        )
    return rows


def _layer_error(rows, alphas):
    from quantfw.calibrate.alpha import _expert_error

    err = sum(
        r.weight.unsqueeze(-1) * _expert_error(r.h, a, r.w2_deq, r.ref)
        for r, a in zip(rows, alphas, strict=True)
    )
    ref = sum(r.weight.unsqueeze(-1) * r.ref for r in rows)
    return (err.norm() / ref.norm()).item()


def test_layer_objective_matches_the_joint_brute_force_optimum():
    """Coordinate descent on the layer output finds the joint (alpha_0, alpha_1) optimum of a 2D
    brute force, and it differs from optimising each expert alone, which over-clips."""
    from quantfw.calibrate.alpha import search_alpha, search_layer_alphas

    rows = _shared_outlier_experts()
    found = search_layer_alphas(rows, holdout=0)
    grid = torch.linspace(0.05, 1.0, 40).tolist()
    brute = min(_layer_error(rows, (a, b)) for a in grid for b in grid)
    assert found.error == pytest.approx(_layer_error(rows, found.alphas.tolist()), rel=1e-4)
    assert found.error <= brute * 1.005 and found.error < found.error_at_one
    alone = [search_alpha(r.h, r.w2_deq, r.w2_deq, holdout=0).alpha for r in rows]
    assert all(a < b for a, b in zip(alone, found.alphas.tolist(), strict=True))  # alone clips harder
    assert _layer_error(rows, alone) > found.error * 1.01


def test_held_out_tokens_reject_a_clip_that_does_not_carry_over():
    """Rows where clipping helps only on the search tokens: the held-out paired test resets alpha to 1,
    and the report carries the statistic."""
    from quantfw.calibrate.alpha import search_alpha

    torch.manual_seed(0)
    h = torch.randn(400, 64)
    w2 = torch.randn(16, 32) * 0.1
    held = torch.arange(400) % 4 == 0
    h[~held, 0] = 12.0  # the outlier the clip would cut exists only on the search rows ...
    h[~held, 32] = 12.0
    w2[:, 0] *= 1e-3  # ... and barely reaches the output
    r = search_alpha(h, w2, w2)
    assert r.alpha == 1.0 and r.z is not None and r.z < 2.0
    unchecked = search_alpha(h, w2, w2, min_z=-float("inf"))
    assert unchecked.alpha < 0.5  # the same search without the test clips hard


def test_row_cap_keeps_a_uniform_sample_of_the_whole_run():
    cap = LayerCapture(layer=0, num_experts=1, max_rows=100)
    src = torch.randn(1000, 2 * I)
    for i in range(0, 1000, 50):
        cap.add(0, src[i : i + 50], x=src[i : i + 50, : H // 2], weights=torch.full((50,), 0.5))
    tokens = torch.cat(cap.tokens[0])
    assert cap.counts[0] == 1000 and cap.kept(0) == 100 and tokens.unique().numel() == 100
    torch.testing.assert_close(cap.h(0), src[tokens], rtol=0, atol=0)  # rows stay with their tokens
    torch.testing.assert_close(cap.x(0), src[tokens, : H // 2], rtol=0, atol=0)
    assert torch.cat(cap.weights[0]).eq(0.5).all()
    halves = (tokens < 500).sum().item()
    assert 30 < halves < 70  # both halves of the run, not the first 100 rows
