"""The compiled min-max kernel gives the eager primitives' bits (quantfw/quantize/fused.py)."""

import pytest
import torch

from quantfw.io.fp8 import dequantize
from quantfw.quantize import fused
from quantfw.quantize import primitives as P


@pytest.fixture
def small_threshold(monkeypatch):
    monkeypatch.setattr(fused, "MIN_ELEMS", 1)


def _eager(w, bits):
    old, fused.MIN_ELEMS = fused.MIN_ELEMS, 1 << 62
    try:
        return P.quantize_per_channel(w, bits)
    finally:
        fused.MIN_ELEMS = old


def _weight(n=256, k=384, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[3] = 0  # a zero row gets scale 1
    w[5, 7] = 1.5  # an outlier
    return w


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_weights_bit_identical(small_threshold, bits, dtype):
    w = _weight().to(dtype)
    q, s = fused.quantize_per_channel_fused(w, bits)
    q0, s0 = _eager(w, bits)
    assert torch.equal(q, q0) and torch.equal(s, s0)
    assert float(s[3]) == 1.0


@pytest.mark.parametrize("bits", [4, 8])
def test_fp8_blocks_dequantized_in_the_kernel(small_threshold, bits):
    sinv = torch.rand(2, 3, generator=torch.Generator().manual_seed(1)) * 1e-3 + 1e-4
    w8 = (_weight() / sinv.repeat_interleave(128, 0).repeat_interleave(128, 1)).to(torch.float8_e4m3fn)
    q, s = fused.quantize_per_channel_fused(w8, bits, sinv, (128, 128))
    q0, s0 = _eager(dequantize(w8, sinv, (128, 128)), bits)
    assert torch.equal(q, q0) and torch.equal(s, s0)


def test_primitives_dispatch_and_nan(small_threshold):
    w = _weight()
    assert torch.equal(P.quantize_per_channel(w, 4)[0], _eager(w, 4)[0])
    w[10, 3] = float("nan")
    _, s = P.quantize_per_channel(w, 4)
    assert torch.isnan(s[10]) and torch.isfinite(s[11])


def test_small_or_untileable_weights_stay_eager():
    assert not fused.applies(torch.zeros(8, 8), 4)
    assert not fused.applies(torch.zeros(1 << 11, 1 << 11), 4, (128, 100))


@pytest.mark.parametrize("fp8_in", [False, True])
@pytest.mark.parametrize("shape", [(256, 384), (384, 256)])
def test_fused_encodings_equal_eager_encoders(small_threshold, fp8_in, shape):
    from quantfw import ops

    w = _weight(*shape, seed=2)
    w[7] *= 1e30  # bias products near the bf16 range: overflowed rows are redone in fp64 either way
    args = ()
    if fp8_in:
        sinv = torch.rand(shape[0] // 128, shape[1] // 128, generator=torch.Generator().manual_seed(3)) * 1e-3
        w = (w / sinv.repeat_interleave(128, 0).repeat_interleave(128, 1)).to(torch.float8_e4m3fn)
        args = (sinv, (128, 128))
    q, s, enc = fused.quantize_per_channel_encoded(w, 4, *args, encodings=fused.ENCODINGS)
    assert set(enc) == set(fused.ENCODINGS)
    q0, s0 = _eager(dequantize(w, *args) if fp8_in else w, 4)
    assert torch.equal(q, q0) and torch.equal(s, s0)
    assert torch.equal(enc["pack_int4"], ops.pack_int4(q0))
    assert torch.equal(P.a8w4_bias(q0, s0, sums=enc["a8w4_bias"]), P.a8w4_bias(q0, s0))


def test_bias_sums_fused_only_where_exact_in_any_order(small_threshold):
    wide = torch.zeros(2, 9400)  # K * 7 * 256 > 2^24: the order of the sum could matter
    assert not fused._fusable("a8w4_bias", wide, 4) and fused._fusable("a8w4_bias", _weight(), 4)
    assert not fused._fusable("pack_int4", _weight(), 8)
    _, _, enc = fused.quantize_per_channel_encoded(_weight(), 8, encodings=fused.ENCODINGS)
    assert list(enc) == ["a8w4_bias"]


def test_worker_threads_compile_every_shape(small_threshold):
    """torch keeps compile settings per thread: a converter worker thread compiling more shapes
    than dynamo's default limit (8) still gets compiled kernels, never a silent eager fallback."""
    import threading

    import torch._dynamo.utils as dynamo_utils

    shapes = [(16 * (i + 1), 32) for i in range(10)]
    results, errors = [], []

    def work():
        try:
            for n, k in shapes:
                w = _weight(n, k, seed=n)
                results.append((fused.quantize_per_channel_fused(w, 4), _eager(w, 4)))
        except BaseException as e:  # reported below
            errors.append(e)

    def in_a_thread(target):
        t = threading.Thread(target=target)
        t.start()
        t.join()

    fused.quantize_per_channel_fused(_weight(8, 32), 4)  # compiled first elsewhere, as by an earlier shard
    before = dynamo_utils.counters["frames"]["ok"]
    in_a_thread(work)
    assert not errors
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in results)
    assert dynamo_utils.counters["frames"]["ok"] - before == len(shapes)  # one compiled frame per shape


def _eager_dequant(w, scale_inv, block):
    old, fused.MIN_ELEMS = fused.MIN_ELEMS, 1 << 62
    try:
        return dequantize(w, scale_inv, block)
    finally:
        fused.MIN_ELEMS = old


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_compiled_fp8_dequantization_into_a_block_slot_is_bit_identical(small_threshold, scale_dtype):
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(256, 384, generator=g) * 0.05).to(torch.float8_e4m3fn)
    w.view(torch.uint8)[0, :8] = torch.tensor([0, 1, 2, 7, 0x80, 0x81, 0x7E, 0xFE], dtype=torch.uint8)
    scale_inv = (torch.rand(2, 3, generator=g) * 1e-3 + 1e-5).to(scale_dtype)
    want = _eager_dequant(w, scale_inv, (128, 128))
    block = torch.full((2, 512, 384), float("nan"))  # a [E, 2I, H] block: write the up half of expert 1
    got = dequantize(w, scale_inv, (128, 128), out=block[1, 256:])
    assert got.data_ptr() == block[1, 256:].data_ptr()
    assert torch.equal(block[1, 256:], want)
    assert torch.isnan(block[1, :256]).all() and torch.isnan(block[0]).all()  # nothing else written
    assert float(want[0, 1]) == 2.0**-9 * float(scale_inv[0, 0])  # subnormal fp8 kept exactly
    assert fused.dequantize_fp8_into(w, scale_inv, (128, 128), torch.empty(256, 384))  # compiled, not eager


def test_fp8_dequantization_with_edge_blocks_takes_the_eager_ops_into_out(small_threshold):
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(200, 300, generator=g) * 0.05).to(torch.float8_e4m3fn)
    scale_inv = torch.rand(2, 3, generator=g) * 1e-3
    out = torch.empty(200, 300)
    assert not fused.dequantize_fp8_into(w, scale_inv, (128, 128), out)
    assert torch.equal(
        dequantize(w, scale_inv, (128, 128), out=out), _eager_dequant(w, scale_inv, (128, 128))
    )
