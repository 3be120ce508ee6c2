"""Routing helpers vs transformers' own routers; FloatMoE vs a per-token loop."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from quantfw.errors import ConfigError, LayoutError
from quantfw.moe import FloatMoE, grouped_topk_sigmoid, softmax_topk

tf = pytest.importorskip("transformers")
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter  # noqa: E402

H, E, T = 64, 16, 257


def _by_id(weights, ids):
    order = torch.argsort(ids, dim=1)
    return weights.gather(1, order), ids.gather(1, order)


def _assert_same_routing(ref_w, ref_ids, w, ids, atol=1e-6):
    rw, ri = _by_id(ref_w.float(), ref_ids)
    qw, qi = _by_id(w, ids)
    assert torch.equal(ri, qi)
    torch.testing.assert_close(qw, rw, atol=atol, rtol=1e-6)
    assert w.dtype == torch.float32 and ids.dtype == torch.int64


def _hidden(seed=0):
    return torch.randn(T, H, generator=torch.Generator().manual_seed(seed))


def _randomize(router, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=g) * 0.3)
        if hasattr(router, "e_score_correction_bias"):
            router.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.3)
    return router


@pytest.mark.parametrize("k", [1, 2, 4])
def test_softmax_topk_matches_mixtral_router(k):
    cfg = tf.MixtralConfig(hidden_size=H, num_local_experts=E, num_experts_per_tok=k)
    router = _randomize(MixtralTopKRouter(cfg))
    logits, ref_w, ref_ids = router(_hidden())
    _assert_same_routing(ref_w, ref_ids, *softmax_topk(logits, k, renormalize=True))


def test_mixtral_softmax_over_topk_logits_is_the_same():
    logits = _hidden() @ torch.randn(H, E)
    top_logits, ids = torch.topk(logits, 2, dim=-1)
    w, ids2 = softmax_topk(logits, 2, renormalize=True)
    assert torch.equal(ids, ids2)
    torch.testing.assert_close(w, torch.softmax(top_logits, dim=-1))


@pytest.mark.parametrize("norm", [True, False])
def test_softmax_topk_matches_qwen3_moe_router(norm):
    cfg = tf.Qwen3MoeConfig(hidden_size=H, num_experts=E, num_experts_per_tok=4, norm_topk_prob=norm)
    router = _randomize(Qwen3MoeTopKRouter(cfg))
    logits, ref_w, ref_ids = router(_hidden())
    w, ids = softmax_topk(logits, 4, renormalize=norm)
    _assert_same_routing(ref_w, ref_ids, w, ids)
    if not norm:
        assert (w.sum(-1) < 1).all()


@pytest.mark.parametrize(
    ("n_group", "topk_group", "k", "norm", "scale"),
    [(4, 2, 4, True, 2.5), (8, 3, 2, True, 1.0), (2, 1, 3, False, 1.5), (1, 1, 6, True, 2.5)],
)
def test_grouped_topk_sigmoid_matches_deepseek_v3_router(n_group, topk_group, k, norm, scale):
    cfg = tf.DeepseekV3Config(
        hidden_size=H,
        n_routed_experts=E,
        num_experts_per_tok=k,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=norm,
        routed_scaling_factor=scale,
    )
    router = _randomize(DeepseekV3TopkRouter(cfg))
    logits, ref_w, ref_ids = router(_hidden())
    w, ids = grouped_topk_sigmoid(
        logits,
        k,
        n_group,
        topk_group,
        correction_bias=router.e_score_correction_bias,
        renormalize=norm,
        routed_scaling_factor=scale,
    )
    _assert_same_routing(ref_w, ref_ids, w, ids)
    # the bias only steers selection: weights are the unbiased sigmoid scores
    raw = torch.sigmoid(logits).gather(1, ids)
    expected = raw / (raw.sum(-1, keepdim=True) + 1e-20) if norm else raw
    torch.testing.assert_close(w, expected * scale)


def test_grouped_topk_respects_groups():
    logits = torch.full((1, 8), -5.0)
    logits[0, [0, 1]] = 5.0  # group 0 of 4 groups (2 experts each)
    logits[0, 7] = 6.0  # best single expert in group 3
    bias = torch.zeros(8)
    w, ids = grouped_topk_sigmoid(logits, 2, n_group=4, topk_group=1, correction_bias=bias)
    assert sorted(ids[0].tolist()) == [0, 1]  # group 0 sums more than group 3's (6, -5)


@pytest.mark.parametrize(
    "kwargs",
    [dict(n_group=3, topk_group=1), dict(n_group=16, topk_group=1), dict(n_group=4, topk_group=5)],
)
def test_grouped_topk_rejects_invalid_groups(kwargs):
    with pytest.raises(ConfigError):
        grouped_topk_sigmoid(torch.randn(4, E), 2, **kwargs)


def test_topk_rejects_bad_k():
    with pytest.raises(ConfigError, match="top_k"):
        softmax_topk(torch.randn(4, E), E + 1)
    with pytest.raises(ConfigError, match="top_k"):
        grouped_topk_sigmoid(torch.randn(4, E), 5, n_group=4, topk_group=1)


def _naive_moe(w13, w2, x, weights, ids):
    inter = w13.shape[1] // 2
    out = torch.zeros_like(x, dtype=torch.float32)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if not 0 <= e < w13.shape[0]:
                continue
            h = w13[e] @ x[t].float()
            out[t] += weights[t, j] * (w2[e] @ (F.silu(h[:inter]) * h[inter:]))
    return out


@settings(max_examples=20, deadline=None)
@given(
    t=st.integers(0, 9),
    e=st.integers(1, 6),
    k=st.integers(1, 3),
    inter=st.sampled_from([1, 4, 8]),
    seed=st.integers(0, 2**16),
)
def test_float_moe_matches_per_token_loop(t, e, k, inter, seed):
    k = min(k, e)
    g = torch.Generator().manual_seed(seed)
    h = 12
    w13, w2 = torch.randn(e, 2 * inter, h, generator=g), torch.randn(e, h, inter, generator=g)
    x = torch.randn(t, h, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]) if t else torch.zeros(0, k)
    ids = ids.long()
    weights = torch.rand(t, k, generator=g)
    out = FloatMoE(w13, w2)(x, weights, ids)
    torch.testing.assert_close(out, _naive_moe(w13, w2, x, weights, ids), atol=1e-4, rtol=1e-4)


def test_float_moe_ignores_foreign_ids_and_keeps_dtype():
    g = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(4, 16, 32, generator=g), torch.randn(4, 32, 8, generator=g)
    x = torch.randn(5, 32, generator=g)
    ids = torch.tensor([[0, -1], [4, 1], [3, 3], [2, 0], [-1, 9]])
    w = torch.rand(5, 2, generator=g)
    moe = FloatMoE(w13, w2)
    torch.testing.assert_close(moe(x, w, ids), _naive_moe(w13, w2, x, w, ids), atol=1e-4, rtol=1e-4)
    assert moe(x, w, ids)[4].abs().max() == 0
    assert moe(x.bfloat16(), w, ids).dtype == torch.bfloat16


def test_float_moe_rejects_bad_shapes():
    with pytest.raises(LayoutError):
        FloatMoE(torch.zeros(2, 6, 4), torch.zeros(2, 4, 4))
    moe = FloatMoE(torch.zeros(2, 6, 4), torch.zeros(2, 4, 3))
    with pytest.raises(LayoutError):
        moe(torch.zeros(3, 5), torch.zeros(3, 1), torch.zeros(3, 1, dtype=torch.long))
