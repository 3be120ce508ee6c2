"""The alpha search's evaluation modes against the reference direct search (tests/alpha_search_reference):
"direct" is the same arithmetic (bit-identical), "gram" the same objective rounded differently."""

import alpha_search_reference as reference
import pytest
import torch
from test_calibrate import E, H, _layer_error, _shared_outlier_experts, starved_capture

from quantfw import ops
from quantfw.calibrate import alpha as A
from quantfw.calibrate import experts as X
from quantfw.errors import ConfigError
from quantfw.eval import synthetic
from quantfw.moe.reference import FloatMoE
from quantfw.schemes.scheme import Scheme


@pytest.fixture(scope="module")
def clip_scheme():
    from quantfw.config.compose import compose

    return Scheme.from_config(compose("default", ["scheme=w4a8_clip"]).scheme)


def _learn_rows(scheme, w13, w2, cap, monkeypatch):
    """The ExpertRows and search arguments learn_expert_alphas hands to the search."""
    seen = {}

    def spy(rows, **kw):
        seen.update(rows=rows, kw=kw)
        return A.search_layer_alphas(rows, **kw)

    monkeypatch.setattr(X, "search_layer_alphas", spy)
    X.learn_expert_alphas(scheme, w13, w2, cap, min_tokens=16)
    return seen["rows"], seen["kw"]


def _routed_capture(w13, w2, tokens=256, k=2):
    moe = FloatMoE(w13, w2)
    x = synthetic.hidden_states(tokens, H, seed=5)
    tw, ids = synthetic.random_routing(tokens, E, k, seed=6, skew=3.0)
    cap = X.ExpertCapture({3: (moe, w13)})
    with cap.attached():
        moe(x, tw, ids)
    return cap.layers[3]


def _random_layer(seed, experts=6, tokens=240, h=48, i=24, k=2):
    """Top-k routed experts with shared tokens, random weights and an outlier SwiGLU channel."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    tw = torch.rand(tokens, k, generator=g).softmax(-1)
    rows = []
    for e in range(experts):
        hit = ids == e
        tok = hit.any(-1).nonzero().squeeze(1)
        hh = torch.randn(tok.numel(), 2 * i, generator=g)
        hh[:, 0] = hh[:, i] = 4.0 + 3 * torch.rand(tok.numel(), generator=g)
        w2 = torch.randn(h, i, generator=g) * 0.1
        w2_deq = (w2 / 0.02).round() * 0.02  # a coarse grid: the weight error of an int4 w2
        ref = ops.swiglu(hh) @ w2.T
        rows.append(A.ExpertRows(hh, ref, w2_deq, tok, (tw * hit).sum(-1)[tok]))
    return rows


def _cases(clip_scheme, monkeypatch):
    w13, w2 = synthetic.expert_weights(E, H, 32, seed=0)
    yield "starved", *_learn_rows(clip_scheme, w13, w2, starved_capture(w13), monkeypatch)
    yield "routed", *_learn_rows(clip_scheme, w13, w2, _routed_capture(w13, w2), monkeypatch)
    yield "shared_outliers", _shared_outlier_experts(), {"holdout": 0}
    yield "shared_outliers_heldout", _shared_outlier_experts(seed=1), {}
    for seed in range(4):
        yield f"random{seed}", _random_layer(seed), {}


def _same(a: A.LayerAlphas, b: A.LayerAlphas) -> None:
    assert torch.equal(a.alphas, b.alphas)
    assert (a.error, a.error_at_one) == (b.error, b.error_at_one)
    assert [vars(r) if r else None for r in a.experts] == [vars(r) if r else None for r in b.experts]


def test_direct_mode_is_bit_identical_to_the_reference_search(clip_scheme, monkeypatch):
    checked = 0
    for name, rows, kw in _cases(clip_scheme, monkeypatch):
        new = A.search_layer_alphas(rows, **{**kw, "mode": "direct"})
        _same(new, reference.search_layer_alphas(rows, **kw))
        checked += sum(r is not None for r in new.experts)
        assert new.error <= new.error_at_one, name
    assert checked > 20


def test_gram_mode_chooses_the_reference_alphas(clip_scheme, monkeypatch):
    clipped = 0
    for name, rows, kw in _cases(clip_scheme, monkeypatch):
        ref = reference.search_layer_alphas(rows, **kw)
        gram = A.search_layer_alphas(rows, **{**kw, "mode": "gram"})
        assert torch.equal(gram.alphas, ref.alphas), name
        assert gram.error == pytest.approx(ref.error, rel=1e-5), name  # the residual is updated, not rebuilt
        assert gram.error_at_one == ref.error_at_one
        for g, r in zip(gram.experts, ref.experts, strict=True):
            assert (g and (g.alpha, g.error, g.error_at_one)) == (r and (r.alpha, r.error, r.error_at_one))
            if r is not None and r.z is not None:  # held-out test on the updated residual
                assert g.z == pytest.approx(r.z, rel=1e-4)
            else:
                assert g is None or g.z is None
        clipped += int((ref.alphas < 1).sum())
    assert clipped >= 5  # the cases really clip, so the comparison is not between alphas of 1


def test_gram_objective_equals_the_direct_layer_error():
    """The Gram expansion around a clipped current alpha scores each candidate with the layer error."""
    rows = _shared_outlier_experts()
    cur, resid = 0.4, None
    x = rows[0]
    err = [
        r.weight.unsqueeze(-1) * A._expert_error(r.h, a, r.w2_deq, r.ref) for r, a in zip(rows, (cur, 0.7))
    ]
    resid = err[0] + err[1]
    scores = {}
    fit = torch.ones(x.h.shape[0], dtype=torch.bool)
    A._gram_step(x, cur, resid, fit, lambda loss: scores.update(loss([0.2, 0.55, 1.0])) or cur)
    for a, s in scores.items():
        direct = (_layer_error(rows, (a, 0.7)) * sum(r.ref for r in rows).norm()) ** 2
        assert s == pytest.approx(direct.item(), rel=1e-4)


def test_auto_picks_gram_only_where_it_costs_less():
    assert not A._use_gram("auto", rows=16, fit=12, points=30, H=7168, I=2048)
    assert A._use_gram("auto", rows=512, fit=384, points=30, H=7168, I=2048)
    assert A._use_gram("gram", rows=16, fit=12, points=30, H=7168, I=2048)
    assert not A._use_gram("direct", rows=512, fit=384, points=30, H=7168, I=2048)
    with pytest.raises(ConfigError, match="mode 'fast'"):
        A.search_layer_alphas(_shared_outlier_experts(), mode="fast")


def test_exact_integer_products_choose_the_alphas_of_the_fp32_products(clip_scheme, monkeypatch):
    """The search multiplies held int4 down-projections as integers (exact, as the kernel does);
    on these layers it picks the alphas the fp32 GEMM of the dequantized weights picked."""
    from dataclasses import replace

    compared = 0
    for name, rows, kw in _cases(clip_scheme, monkeypatch):
        if not any(r is not None and isinstance(r.operand(), A.IntWeight) for r in rows):
            continue  # hand-built rows with fp32 weights
        dense = [None if r is None else replace(r, w2_deq=r.w2()) for r in rows]
        exact, fp32 = A.search_layer_alphas(rows, **kw), A.search_layer_alphas(dense, **kw)
        assert torch.equal(exact.alphas, fp32.alphas), name
        assert exact.error == pytest.approx(fp32.error, rel=1e-5), name
        compared += 1
    assert compared == 2
