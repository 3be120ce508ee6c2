"""The generic MoE layer on the torch backend: every scheme against float and an independent
fake-quant computation, the learned clip, expert parallelism, and load-time conformance."""

import pytest
import torch

from quantfw.api import build_layer
from quantfw.calibrate.alpha import search_alpha
from quantfw.errors import LayoutError
from quantfw.eval import synthetic
from quantfw.eval.metrics import compare
from quantfw.eval.scheme_table import learn_alphas
from quantfw.moe.reference import FloatMoE
from quantfw.quantize.experts import fake_quant_weights, quantize_experts

E, H, I, K_TOP, T = 8, 512, 256, 2, 192


@pytest.fixture(scope="module")
def data():
    w13, w2 = synthetic.expert_weights(E, H, I, seed=0)
    x = synthetic.hidden_states(T, H, seed=5).to(torch.bfloat16)
    w, ids = synthetic.random_routing(T, E, K_TOP, seed=3, skew=3.0)
    ids[ids == 7] = 6  # expert 7 receives no tokens
    ref = FloatMoE(w13, w2)(x.float(), w, ids)
    return w13, w2, x, w, ids, ref


def _layer(compose, overrides, w13, w2, alpha=None):
    layer = build_layer(compose("default", overrides))
    layer.load(quantize_experts(layer.scheme, layer.format, w13, w2, alpha=alpha))
    return layer


# rel-L2 bounds vs float on Student-t weights with 30x outlier channels: int8 is a few percent,
# int4 per-channel min-max a few tens of percent (measured 0.05 / 0.30-0.40; bounds leave margin).
@pytest.mark.parametrize(
    "overrides, bound",
    [
        (["scheme=w8a8"], 0.08),
        (["scheme=w8a8", "scheme.fused_swiglu_quant=false"], 0.08),
        (["scheme=w4a8"], 0.45),
        (["scheme=w4a8", "scheme.group_size=128"], 0.45),
        (["scheme=w4a8", "scheme.group_size=0"], 0.5),
        (["scheme=w4a8_clip", "format=compressed_tensors"], 0.5),
        (["scheme=w4a8_clip", "format=msmodelslim"], 0.5),
    ],
)
def test_each_scheme_close_to_float(compose, data, overrides, bound):
    w13, w2, x, w, ids, ref = data
    out = _layer(compose, overrides, w13, w2)(x, w, ids)
    m = compare(out, ref)
    assert out.dtype == torch.bfloat16 and out.shape == (T, H)
    assert m["rel_l2"] < bound and m["cosine"] > 1 - bound, m


def _fake_quant_forward(scheme_overrides, compose, w13, w2, x, w, ids, clip_alpha=None):
    """Independent of quantfw.ops: per-token int8 quant with the spec formula, dequantized
    weights, bf16 rounding where the kernels round, float matmuls."""
    scheme = build_layer(compose("default", scheme_overrides)).scheme
    d13 = fake_quant_weights(scheme, w13).dequantize()
    d2 = fake_quant_weights(scheme, w2).dequantize()

    def quant(v, t=None):
        t = v.abs().amax(-1, keepdim=True) if t is None else t
        s = torch.where(t == 0, torch.ones_like(t), t / 127)
        return torch.clamp(torch.round(torch.clamp(v, -t, t) / s), -128, 127) * s

    out = torch.zeros(x.shape[0], H)
    for e in range(E):
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        h = (quant(x[tok].float()) @ d13[e].T).to(torch.bfloat16).float()
        g, u = h[:, :I], h[:, I:]
        y = g / (1 + torch.exp(-g)) * u
        if clip_alpha is None:
            yq = quant(y.to(torch.bfloat16).float())
        else:
            yq = quant(y, clip_alpha[e] * y.abs().amax(-1, keepdim=True))
        out.index_add_(0, tok, (yq @ d2[e].T).to(torch.bfloat16).float() * w[tok, slot, None])
    return out


@pytest.mark.parametrize(
    "overrides",
    [
        ["scheme=w4a8"],
        ["scheme=w4a8", "scheme.group_size=0"],
        ["scheme=w4a8_clip", "format=compressed_tensors"],
    ],
)
def test_layer_matches_independent_fake_quant(compose, data, overrides):
    w13, w2, x, w, ids, _ = data
    alpha = torch.linspace(0.7, 1.0, E) if "scheme=w4a8_clip" in overrides else None
    out = _layer(compose, overrides, w13, w2, alpha=alpha)(x, w, ids).float()
    want = _fake_quant_forward(overrides, compose, w13, w2, x, w, ids, clip_alpha=alpha)
    # Differences: fp16-rounded fused scales, the bf16 bias residual and 1-LSB requant flips.
    m = compare(out, want)
    assert m["rel_l2"] < 0.02 and m["cosine"] > 0.999, m


def test_w8a8_fused_and_unfused_plans_agree(compose, data):
    w13, w2, x, w, ids, _ = data
    a = _layer(compose, ["scheme=w8a8"], w13, w2)(x, w, ids)
    b = _layer(compose, ["scheme=w8a8", "scheme.fused_swiglu_quant=false"], w13, w2)(x, w, ids)
    assert compare(a, b)["rel_l2"] < 0.01


def test_learned_alpha_not_worse_than_one_on_held_out_tokens(compose, data):
    w13, w2, x, w, ids, ref = data
    cfg = ["scheme=w4a8_clip", "format=compressed_tensors"]
    scheme = build_layer(compose("default", cfg)).scheme
    x_cal = synthetic.hidden_states(512, H, seed=11).to(torch.bfloat16).float()
    w_cal, ids_cal = synthetic.random_routing(512, E, K_TOP, seed=12)
    alpha, report = learn_alphas(scheme, w13, w2, x_cal, w_cal, ids_cal)
    assert ((alpha > 0) & (alpha <= 1)).all()
    learned = compare(_layer(compose, cfg, w13, w2, alpha=alpha)(x, w, ids), ref)["rel_l2"]
    ones = compare(_layer(compose, cfg, w13, w2)(x, w, ids), ref)["rel_l2"]
    assert learned <= ones * 1.001, (learned, ones)
    assert all(r["error"] <= r["error_at_one"] for r in report if r["status"] == "learned")


def test_alpha_search_finds_the_brute_force_optimum():
    torch.manual_seed(0)
    h = torch.randn(256, 128)
    h[:, 3] *= 40  # a massive activation channel whose down-proj column is nearly dead:
    h[:, 67] *= 3  # clipping it costs little output error and buys int8 resolution elsewhere
    w2 = torch.randn(32, 64) * 0.1
    w2[:, 3] *= 0.01
    r = search_alpha(h, w2, w2, lo=0.05, steps=40, refine=1, holdout=0)
    from alpha_search_reference import _error

    ref = (torch.nn.functional.silu(h[:, :64]) * h[:, 64:]) @ w2.T
    brute = min((_error(h, a, w2, ref), a) for a in torch.linspace(0.05, 1, 400).tolist())
    assert r.error <= brute[0] * 1.02 and abs(r.alpha - brute[1]) < 0.05
    assert r.alpha < 1 and r.error < r.error_at_one


def test_expert_parallel_ranks_sum_to_the_full_layer(compose, data):
    w13, w2, x, w, ids, _ = data
    full = _layer(compose, ["scheme=w4a8"], w13, w2)(x, w, ids).float()
    parts = []
    for rank in range(2):
        layer = build_layer(compose("default", ["scheme=w4a8", "ep_size=2", f"ep_rank={rank}"]))
        sl = slice(rank * 4, rank * 4 + 4)
        layer.load(quantize_experts(layer.scheme, layer.format, w13[sl], w2[sl]))
        parts.append(layer(x, w, ids).float())
    # Same experts, same math; only the bf16 rounding of each rank's partial sum differs.
    assert compare(parts[0] + parts[1], full)["rel_l2"] < 4e-3
    assert (parts[0] != 0).any() and (parts[1] != 0).any()


def test_load_reports_every_problem_at_once(compose, data):
    w13, w2, *_ = data
    layer = build_layer(compose("default", ["scheme=w4a8"]))
    tensors = quantize_experts(layer.scheme, layer.format, w13, w2)
    del tensors["w2_scale_bias"], tensors["w13_weight_scale_second"]
    tensors["w13_weight"] = tensors["w13_weight"].float()
    tensors["w2_weight_offset"] = tensors["w2_weight_offset"][:, :7]
    tensors["w2_extra"] = torch.zeros(1)
    with pytest.raises(LayoutError) as e:
        layer.load(tensors, source="test.safetensors")
    msg = str(e.value)
    assert msg.startswith("5 problem(s) with test.safetensors")
    for part in [
        "missing w2_scale_bias",
        "missing w13_weight_scale_second",
        "w13_weight: expected [8, 256, 512] int8, found [8, 256, 512] float32",
        "w2_weight_offset",
        "unexpected w2_extra",
    ]:
        assert part in msg


def test_plan_allocates_on_meta(compose):
    layer = build_layer(compose("deepseek_v3_w4a8_clip"))
    layer.load({n: s.allocate("meta") for n, s in layer.loaded_specs.items()})
    t = layer.runtime_tensors()
    assert t["w13_weight"].device.type == "meta" and t["w13_weight"].shape == (256, 7168, 4096 // 8)
    assert t["w2_scale"].shape == (256, 1, 7168) and t["w2_alpha"].shape == (256,)
