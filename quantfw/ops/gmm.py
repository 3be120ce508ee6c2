"""Grouped matmuls over M (npu_grouped_matmul, spec 1.5) with exact integer accumulation.

An fp32 GEMM on integer-valued floats is exact as long as every partial sum (in any summation order
the BLAS picks) stays below 2^24 in magnitude; each K-chunk is therefore bounded by
max|a| * max|b| * chunk < 2^24, and chunk results are summed in float64 (exact below 2^53).
This is much faster on CPU than torch._int_mm and gives the same integers.
"""

from __future__ import annotations

import torch

from quantfw.ops._checks import check_group_list, check_tensor, fail, row_groups
from quantfw.ops.int4 import decode_scale_u64, unpack_int4_int32

# A8W8: |x|, |W| <= 128 -> |partial| <= 128 * 128 * 512 = 2^23 < 2^24.
A8W8_K_CHUNK = 512
# A8W4: |x - 8| <= 136, |W| <= 8 -> |partial| <= 136 * 8 * 8192 = 8_912_896 < 2^24 (16_777_216).
A8W4_K_CHUNK = 8192

OUTPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _exact_mm(a: torch.Tensor, b: torch.Tensor, chunk: int) -> torch.Tensor:
    """Exact integer product of integer-valued fp32 a [M, K] @ b [K, N], as float64 (K split in chunks)."""
    k = a.shape[1]
    if k <= chunk:
        return (a @ b).to(torch.float64)
    acc = torch.zeros((a.shape[0], b.shape[1]), dtype=torch.float64, device=a.device)
    for k0 in range(0, k, chunk):
        acc += (a[:, k0 : k0 + chunk] @ b[k0 : k0 + chunk]).to(torch.float64)
    return acc


def _check_output_dtype(op: str, output_dtype: torch.dtype) -> None:
    if output_dtype not in OUTPUT_DTYPES:
        raise fail(op, "output_dtype", "bfloat16, float16 or float32", output_dtype)


def grouped_matmul_a8w8(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    per_token_scale: torch.Tensor | None,
    group_list: torch.Tensor,
    bias: torch.Tensor | None = None,
    output_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """A8W8 GMM: x int8 [T, K] rows grouped by expert, weight int8 [G, K, N] -> [T, N].

    acc = exact sum_k x*W. With scale None the raw int32 accumulator is returned (W8A8 feeds it to
    dequant_swiglu_quant); otherwise y = fp32(acc) * scale[e, n] * per_token_scale[m] (+ bias[e, n]),
    cast to output_dtype. Rows past sum(group_list) are zero.
    """
    op = "grouped_matmul_a8w8"
    check_tensor(op, "x", x, (torch.int8,), ndim=2)
    rows, k = x.shape
    check_tensor(op, "weight", weight, (torch.int8,), ndim=3)
    groups, _, n = weight.shape
    check_tensor(op, "weight", weight, shape=(groups, k, n))
    counts = check_group_list(op, "group_list", group_list, groups, rows)
    if scale is None:
        for arg, val in (("per_token_scale", per_token_scale), ("bias", bias)):
            if val is not None:
                raise fail(op, arg, "None when scale is None (raw int32 accumulator)", "a tensor")
    else:
        check_tensor(op, "scale", scale, (torch.float32, torch.bfloat16), shape=(groups, n))
        _check_output_dtype(op, output_dtype)
    if per_token_scale is not None:
        check_tensor(op, "per_token_scale", per_token_scale, (torch.float32,), shape=(rows,))
    if bias is not None:
        check_tensor(op, "bias", bias, (torch.float32,), shape=(groups, n))

    out_dtype = torch.int32 if scale is None else output_dtype
    out = torch.zeros((rows, n), dtype=out_dtype, device=x.device)
    for e, r0, r1 in row_groups(counts):
        acc = _exact_mm(x[r0:r1].to(torch.float32), weight[e].to(torch.float32), A8W8_K_CHUNK)
        if scale is None:
            out[r0:r1] = acc.to(torch.int64).to(torch.int32)
            continue
        y = acc.to(torch.float32) * scale[e].to(torch.float32)
        if per_token_scale is not None:
            y = y * per_token_scale[r0:r1].unsqueeze(-1)
        if bias is not None:
            y = y + bias[e]
        out[r0:r1] = y.to(output_dtype)
    return out


def grouped_matmul_a8w4(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    per_token_scale: torch.Tensor,
    group_list: torch.Tensor,
    output_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """A8W4 GMM: x int8 [T, K], weight int32 [G, K, N/8] (8 int4 nibbles per word) -> [T, N].

    scale is int64 [G, K/group_size, N] UINT64-encoded fp32 (K/group_size == 1: per-channel).
    y[m, n] = (sum_g P_g[m, n] * S[g, n] + bias[e, n]) * per_token_scale[m], where P_g is the exact
    integer sum over group g of (x - 8) * W, the groups are summed in fp32, and the result is cast
    to output_dtype. The required bias (~ 8 * sum_k W * S) cancels the kernel's -8 activation shift.
    """
    op = "grouped_matmul_a8w4"
    check_tensor(op, "x", x, (torch.int8,), ndim=2)
    rows, k = x.shape
    check_tensor(op, "weight", weight, (torch.int32,), ndim=3)
    groups, _, n8 = weight.shape
    check_tensor(op, "weight", weight, shape=(groups, k, n8))
    n = n8 * 8  # N % 8 == 0 holds by construction of the int32 view
    check_tensor(op, "scale", scale, (torch.int64,), ndim=3)
    n_kgroups = scale.shape[1]
    check_tensor(op, "scale", scale, shape=(groups, None, n))
    if n_kgroups == 0 or k % n_kgroups:
        raise fail(op, "scale", f"a dim 1 (K/group_size) dividing K = {k}", list(scale.shape))
    gs = k // n_kgroups
    if bias is None:
        raise fail(op, "bias", "an fp32 [G, N] tensor (required: cancels the -8 activation shift)", None)
    check_tensor(op, "bias", bias, (torch.float32,), shape=(groups, n))
    if per_token_scale is None:
        raise fail(op, "per_token_scale", f"an fp32 [{rows}] tensor", None)
    check_tensor(op, "per_token_scale", per_token_scale, (torch.float32,), shape=(rows,))
    counts = check_group_list(op, "group_list", group_list, groups, rows)
    _check_output_dtype(op, output_dtype)

    out = torch.zeros((rows, n), dtype=output_dtype, device=x.device)
    for e, r0, r1 in row_groups(counts):
        xs = x[r0:r1].to(torch.float32) - 8.0  # exact: -136..119
        w = unpack_int4_int32(weight[e]).to(torch.float32)  # [K, N], -8..7
        s = decode_scale_u64(scale[e])  # [K/gs, N] fp32
        y = None
        for g in range(n_kgroups):
            k0 = g * gs
            part = _exact_mm(xs[:, k0 : k0 + gs], w[k0 : k0 + gs], A8W4_K_CHUNK).to(torch.float32)
            y = part * s[g] if y is None else y + part * s[g]
        y = (y + bias[e]) * per_token_scale[r0:r1].unsqueeze(-1)
        out[r0:r1] = y.to(output_dtype)
    return out
