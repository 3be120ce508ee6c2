"""Alpha-search rows over the memory budget wait in the work dir and come back exact."""

import pickle

import torch

from quantfw import ops
from quantfw.calibrate.alpha import ExpertRows, search_layer_alphas
from quantfw.calibrate.row_store import CompactWeight, RowStore, SpilledRows, discard
from quantfw.config.compose import compose
from quantfw.quantize.experts import fake_quant_weights
from quantfw.schemes.scheme import Scheme


def _rows(n_experts=3, M=24, H=64, I=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    scheme = Scheme.from_config(compose("default", ["scheme=w4a8_clip"]).scheme)
    out = []
    for e in range(n_experts):
        h = torch.randn(M, 2 * I, generator=g)
        h[:, I + e] *= 30  # an outlier channel, so clipping has something to win
        w2 = torch.randn(H, I, generator=g) / I**0.5
        compact = CompactWeight.of(fake_quant_weights(scheme, w2.unsqueeze(0)))
        tokens = torch.randperm(64, generator=g)[:M].sort().values
        out.append(ExpertRows(h, ops.swiglu(h) @ w2.T, compact, tokens, torch.rand(M, generator=g)))
    return out


def test_rows_over_the_budget_spill_and_load_back_exactly(tmp_path):
    rows = _rows()
    probe = RowStore(0, 1 << 40, tmp_path)
    assert probe.keep(0, rows[0]) is rows[0]
    store = RowStore(7, 2 * probe.used, tmp_path)  # room for two experts' rows
    kept = [store.keep(e, r) for e, r in enumerate(rows)]
    assert [isinstance(k, SpilledRows) for k in kept] == [False, False, True]
    assert kept[2].path == tmp_path / "layer-0007-expert-0002.safetensors" and kept[2].path.is_file()
    sent = pickle.loads(pickle.dumps(kept))  # as the gather to another rank's search sends them
    back = sent[2].load()
    for name in ("h", "ref", "tokens", "weight"):
        assert torch.equal(getattr(back, name), getattr(rows[2], name)), name
    assert torch.equal(back.w2(), rows[2].w2())
    found = search_layer_alphas(sent, holdout=0)
    assert torch.equal(found.alphas, search_layer_alphas(rows, holdout=0).alphas)
    assert (found.alphas < 1).any()
    discard(sent)
    assert not kept[2].path.exists()


def test_compact_weight_round_trips_through_its_tensors():
    scheme = Scheme.from_config(compose("default", ["scheme=w4a8_clip"]).scheme)
    w = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(3))
    qw = fake_quant_weights(scheme, w)
    c = CompactWeight.of(qw)
    assert c.packed and c.q.dtype == torch.uint8 and c.q.shape[-1] == 4
    again = CompactWeight.from_tensors(c.tensors())
    assert torch.equal(again.dequantize(), qw.dequantize())
    assert torch.equal(c.operand().dense(), qw.dequantize()[0].float())


def test_candidate_products_with_an_int_weight_are_the_exact_integer_gemm():
    from quantfw.calibrate.alpha import IntWeight, _clipped_int, _outputs

    rows = _rows(n_experts=1, M=40, H=96, I=48)[0]
    w = rows.operand()
    assert isinstance(w, IntWeight) and w.codes.dtype == torch.int8 and int(w.codes.abs().max()) <= 8
    alphas = [0.3, 0.7, 1.0]
    (_, got), (_, q, s) = next(_outputs(rows.h, alphas, w)), next(_clipped_int(rows.h, alphas, 96))
    # the exact integer sums in float64, then the per-token and per-channel scales in fp32
    acc = (q.double() @ w.codes.double().T).float()
    want = (acc * s.unsqueeze(1) * w.scale).view(3, 40, 96)
    assert torch.equal(got, want)
    # against the fp32 GEMM of the dequantized operands: the same up to its rounding
    ((_, dense),) = list(_outputs(rows.h, alphas, w.dense()))
    assert torch.allclose(got, dense, rtol=1e-5, atol=1e-5) and not torch.equal(got, dense)
