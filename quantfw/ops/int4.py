"""int4 packing and UINT64 scale encoding (spec 1.5, 1.6).

On disk (msModelSlim, cann-recipes) int4 weights are packed along the OUTPUT dim: int8 [..., N/2, K],
low nibble = even channel. After the post-load transpose to [..., K, N/2] the bytes are viewed as
int32 [..., K, N/8], so nibble i of word c is channel 8c+i. These helpers are pure layout ops: they
accept meta tensors wherever no value has to be inspected, so shape planning can run them.
"""

from __future__ import annotations

import sys

import torch

from quantfw.ops._checks import check_tensor, fail

_SIGNED_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int4 values q [..., N, K] in [-8, 7] into the on-disk int8 [..., N/2, K] layout.

    byte[j, k] = (q[2j, k] & 0xF) | ((q[2j+1, k] & 0xF) << 4), two's-complement nibbles, no offset.
    """
    op = "pack_int4"
    check_tensor(op, "q", q, _SIGNED_INT_DTYPES, min_ndim=2)
    n = q.shape[-2]
    if n % 2:
        raise fail(op, "q", "an even number of output channels (dim -2)", f"N = {n}")
    if not q.is_meta and q.numel():
        lo_v, hi_v = torch.aminmax(q)  # one pass instead of two comparisons and an any()
        if lo_v < -8 or hi_v > 7:
            raise fail(op, "q", "int4 values in [-8, 7]", f"range [{int(lo_v)}, {int(hi_v)}]")
    q8 = q.to(torch.int8)  # in range, so exact; int8 arithmetic below cannot overflow
    lo = q8[..., 0::2, :] & 0xF  # 0..15
    hi = q8[..., 1::2, :] * 16  # -128..112: the signed high nibble
    return hi.add_(lo)  # -128..127, i.e. the byte read as int8


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: int8 [..., N/2, K] -> int8 [..., N, K] with sign-extended nibbles."""
    check_tensor("unpack_int4", "packed", packed, (torch.int8,), min_ndim=2)
    b = packed.to(torch.int16)
    lo = ((b & 0xF) ^ 8) - 8  # sign-extend the low nibble
    hi = b >> 4  # arithmetic shift keeps the sign of the high nibble
    out = torch.stack((lo, hi), dim=-2)  # [..., N/2, 2, K]
    return out.reshape(*packed.shape[:-2], 2 * packed.shape[-2], packed.shape[-1]).to(torch.int8)


def int4_weight_to_int32(packed_t: torch.Tensor) -> torch.Tensor:
    """View the transposed packed weight int8 [..., K, N/2] as int32 [..., K, N/8] (post-load layout).

    Little-endian byte order is what makes nibble i of word c hold channel 8c+i.
    """
    op = "int4_weight_to_int32"
    check_tensor(op, "packed_t", packed_t, (torch.int8,), min_ndim=2)
    if packed_t.shape[-1] % 4:
        raise fail(op, "packed_t", "last dim N/2 divisible by 4 (N % 8 == 0)", list(packed_t.shape))
    if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
        raise fail(op, "packed_t", "a little-endian host", sys.byteorder)
    t = packed_t.contiguous()
    # contiguous() keeps odd strides on size-1 dims, which view(int32) rejects: restride canonically.
    strides, acc = [], 1
    for size in reversed(t.shape):
        strides.append(acc)
        acc *= max(size, 1)
    return t.as_strided(t.shape, tuple(reversed(strides))).view(torch.int32)


def unpack_int4_int32(w: torch.Tensor) -> torch.Tensor:
    """int32 [..., K, N/8] -> int8 [..., K, N]: nibble i (bits 4i..4i+3) of word c is column 8c+i."""
    check_tensor("unpack_int4_int32", "w", w, (torch.int32,), min_ndim=1)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=w.device)
    nib = (w.unsqueeze(-1) >> shifts) & 0xF  # [..., N/8, 8], 0..15
    nib = (nib ^ 8) - 8  # two's-complement sign extension
    return nib.reshape(*w.shape[:-1], w.shape[-1] * 8).to(torch.int8)


def encode_scale_u64(s: torch.Tensor) -> torch.Tensor:
    """fp32 scales -> int64 words holding the fp32 bit pattern in the low 32 bits (high 32 bits 0)."""
    check_tensor("encode_scale_u64", "s", s, (torch.float32,))
    return s.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def decode_scale_u64(word: torch.Tensor) -> torch.Tensor:
    """int64 UINT64-encoded scales -> fp32: bitcast of (word & 0xFFFFFFFF)."""
    check_tensor("decode_scale_u64", "word", word, (torch.int64,))
    low = word & 0xFFFFFFFF
    low = torch.where(low >= 2**31, low - 2**32, low)  # reinterpret as signed int32 without overflow
    return low.to(torch.int32).view(torch.float32)


__all__ = [
    "decode_scale_u64",
    "encode_scale_u64",
    "int4_weight_to_int32",
    "pack_int4",
    "unpack_int4",
    "unpack_int4_int32",
]
