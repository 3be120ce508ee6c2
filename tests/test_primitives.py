"""Tests of the weight-quantization primitives against independent numpy formulas (spec section 9)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantfw.errors import ConfigError, LayoutError
from quantfw.quantize.primitives import (
    a8w4_bias,
    dequantize,
    fuse_scales_fp16,
    quantize_per_channel,
    quantize_two_level,
    scale_bias_msmodelslim,
)

F32 = np.float32


def np_bf16(a) -> np.ndarray:
    """Round float32 to the nearest bfloat16 (ties to even), returned as float32."""
    u = np.asarray(a, dtype=F32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16
    return u.astype(np.uint32).view(F32)


def np_per_channel(w: np.ndarray, bits: int, ratio=None, bf16: bool = False):
    """Spec 9 per-channel quant; with bf16=True every elementwise result is rounded to bf16."""
    rnd = np_bf16 if bf16 else (lambda a: np.asarray(a, dtype=F32))
    qmax = F32(127 if bits == 8 else 7)
    wc = rnd(w)
    s = np.abs(wc).max(axis=-1)
    if ratio is not None:
        s = rnd(s * rnd(np.asarray(ratio, dtype=F32)))
    s = rnd(s / qmax)
    s[s == 0] = 1
    q = np.clip(np.rint(rnd(wc / s[..., None])), -qmax, qmax).astype(np.int8)
    return q, s


def np_two_level(w: np.ndarray, gs: int):
    s1 = np.abs(w).max(axis=-1) / F32(127)
    s1[s1 == 0] = 1
    q8 = np.clip(np.rint(w / s1[..., None]), -127, 127).astype(F32)
    q8g = q8.reshape(*q8.shape[:-1], -1, gs)
    s2 = np.abs(q8g).max(axis=-1) / F32(7)
    s2[s2 == 0] = 1
    q = np.clip(np.rint(q8g / s2[..., None]), -7, 7).reshape(q8.shape).astype(np.int8)
    return q, s1, s2


def _weights(seed: int, shape, zero_channel: bool = True) -> torch.Tensor:
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    w[..., 3, 5] = 0.3  # an outlier
    if zero_channel:
        w[..., 1, :] = 0
    return w


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("ratio", [None, 0.9, "tensor"])
def test_per_channel_fp32(bits, ratio):
    w = _weights(0, (3, 16, 96))
    if ratio == "tensor":
        ratio = torch.rand(3, 16, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.5
    q, s = quantize_per_channel(w, bits, clip_ratio=ratio)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (3, 16)
    r = ratio.numpy() if isinstance(ratio, torch.Tensor) else ratio
    q_ref, s_ref = np_per_channel(w.numpy(), bits, r)
    np.testing.assert_array_equal(q.numpy(), q_ref)
    np.testing.assert_array_equal(s.numpy(), s_ref)
    qmax = 127 if bits == 8 else 7
    assert bool((s[:, 1] == 1).all()) and bool((q[:, 1] == 0).all())  # zero channel
    assert int(q.abs().max()) == qmax and not bool(torch.isnan(s).any())


@pytest.mark.parametrize("bits", [8, 4])
def test_per_channel_bf16_compute(bits):
    w = _weights(2, (2, 24, 128))
    ratio = torch.rand(2, 24, generator=torch.Generator().manual_seed(3)) * 0.4 + 0.6
    q, s = quantize_per_channel(w, bits, clip_ratio=ratio, compute_dtype=torch.bfloat16)
    q_ref, s_ref = np_per_channel(w.numpy(), bits, ratio.numpy(), bf16=True)
    np.testing.assert_array_equal(q.numpy(), q_ref)
    np.testing.assert_array_equal(s.numpy(), s_ref)
    assert s.dtype == torch.float32
    assert torch.equal(s, s.to(torch.bfloat16).float())  # s is a bf16 value
    # and it really differs from the fp32 computation somewhere
    q32, s32 = quantize_per_channel(w, bits, clip_ratio=ratio)
    assert not torch.equal(s, s32)


def test_per_channel_rejects_bad_args():
    for bits in (1, 9, 4.0):  # widths 2..8 are on the grid (test_observer_configs)
        with pytest.raises(ConfigError, match="bits"):
            quantize_per_channel(torch.zeros(4, 4), bits)
    with pytest.raises(LayoutError, match="clip_ratio"):
        quantize_per_channel(torch.ones(4, 8), 8, clip_ratio=torch.ones(3))
    with pytest.raises(LayoutError, match="'w'"):
        quantize_per_channel(torch.ones(8), 8)


@pytest.mark.parametrize("gs", [256, 64])
def test_two_level(gs):
    w = _weights(4, (2, 16, 512))
    w[0, 4, :gs] = 0  # a zero group in a non-zero channel
    q, s1, s2 = quantize_two_level(w, gs)
    q_ref, s1_ref, s2_ref = np_two_level(w.numpy(), gs)
    np.testing.assert_array_equal(q.numpy(), q_ref)
    np.testing.assert_array_equal(s1.numpy(), s1_ref)
    np.testing.assert_array_equal(s2.numpy(), s2_ref)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 7
    assert s1.shape == (2, 16) and s2.shape == (2, 16, 512 // gs)
    assert s1.dtype == s2.dtype == torch.float32
    assert bool((s1[:, 1] == 1).all()) and bool((s2[:, 1] == 1).all()) and s2[0, 4, 0] == 1
    for t in (q, s1, s2):
        assert not bool(torch.isnan(t.float()).any())
    # dequant reconstructs the weight to within the two quantization steps
    # dequant error <= half a step of each stage: |w - q8*s1| <= s1/2 and |q8 - q*s2| <= s2/2
    err = (dequantize(q, s1, s2) - w).abs().numpy()
    bound = s1.numpy()[..., None] * (0.5 + 0.5 * np.repeat(s2.numpy(), gs, axis=-1))
    assert np.all(err <= bound * (1 + 1e-5))


def test_two_level_group_size_must_divide_k():
    with pytest.raises(ConfigError, match="group_size 256.*K = 1408"):
        quantize_two_level(torch.ones(4, 1408), 256)
    with pytest.raises(ConfigError, match="group_size"):
        quantize_two_level(torch.ones(4, 512), 0)


def test_dequantize():
    g = torch.Generator().manual_seed(5)
    q = torch.randint(-7, 8, (3, 8, 64), generator=g, dtype=torch.int8)
    s1 = torch.rand(3, 8, generator=g)
    s2 = torch.rand(3, 8, 4, generator=g)
    ref = q.numpy().astype(F32) * np.repeat(s2.numpy(), 16, axis=-1) * s1.numpy()[..., None]
    np.testing.assert_array_equal(dequantize(q, s1, s2).numpy(), ref)
    np.testing.assert_array_equal(dequantize(q, s1).numpy(), q.numpy().astype(F32) * s1.numpy()[..., None])


@pytest.mark.parametrize("chunks", [1, 16])
@pytest.mark.parametrize("two_level", [True, False])
def test_scale_bias_msmodelslim(chunks, two_level):
    w = _weights(6, (2, 8, 512), zero_channel=False)
    if two_level:
        q, s1, s2 = quantize_two_level(w, 256)
    else:
        (q, s1), s2 = quantize_per_channel(w, 4), None
    sb = scale_bias_msmodelslim(q, s1, s2, chunks=chunks)
    assert sb.shape == (2, 8, chunks) and sb.dtype == torch.float32
    deq = q.numpy().astype(np.float64) * np_bf16(s1.numpy())[..., None].astype(np.float64)
    if two_level:
        deq = deq * np.repeat(np_bf16(s2.numpy()), 256, axis=-1)
    ref = 8 * deq.reshape(2, 8, chunks, 512 // chunks).sum(axis=-1)
    np.testing.assert_allclose(sb.numpy(), ref, rtol=1e-5, atol=1e-6)
    # the partials add up to the single-chunk value (how a TP=1 loader folds w2's 16 partials)
    total = scale_bias_msmodelslim(q, s1, s2, chunks=1)[..., 0]
    torch.testing.assert_close(sb.sum(dim=-1), total, rtol=1e-5, atol=1e-6)


def test_scale_bias_chunks_must_divide_k():
    with pytest.raises(ConfigError, match="chunks"):
        scale_bias_msmodelslim(torch.zeros(4, 100, dtype=torch.int8), torch.ones(4), chunks=16)


def test_a8w4_bias():
    w = _weights(7, (2, 32, 1024), zero_channel=False)
    q, s = quantize_per_channel(w, 4, compute_dtype=torch.bfloat16)
    b = a8w4_bias(q, s)
    assert b.shape == (2, 32) and b.dtype == torch.float32
    # independent bf16 emulation: product rounded to bf16, summed in fp32-ish precision
    prod = np_bf16(np_bf16(s.numpy())[..., None] * q.numpy().astype(F32))
    np.testing.assert_allclose(b.numpy(), 8 * prod.astype(np.float64).sum(-1), rtol=1e-5, atol=1e-6)
    exact = 8 * s.numpy().astype(np.float64) * q.numpy().astype(np.float64).sum(-1)
    scale_of_terms = 8 * (s.numpy().astype(np.float64)[..., None] * np.abs(q.numpy())).sum(-1)
    assert np.all(np.abs(b.numpy() - exact) <= 2**-8 * scale_of_terms)  # bf16-precision approximation
    b32 = a8w4_bias(q, s, compute_dtype=torch.float32)
    np.testing.assert_allclose(b32.numpy(), exact, rtol=1e-5, atol=1e-5 * scale_of_terms.max())


def test_fuse_scales_fp16():
    g = torch.Generator().manual_seed(8)
    s1 = torch.rand(3, 16, generator=g) * 1e-2
    s2 = torch.rand(3, 16, 4, generator=g) * 0.3
    fused = fuse_scales_fp16(s1, s2)
    assert fused.shape == (3, 4, 16) and fused.dtype == torch.float32
    ref = (s1.numpy()[..., None] * s2.numpy()).astype(np.float16).astype(F32).transpose(0, 2, 1)
    np.testing.assert_array_equal(fused.numpy(), ref)
    assert not np.array_equal(fused.numpy(), (s1.numpy()[..., None] * s2.numpy()).transpose(0, 2, 1))
    with pytest.raises(LayoutError, match="s2"):
        fuse_scales_fp16(s1, s2[:, :8])
