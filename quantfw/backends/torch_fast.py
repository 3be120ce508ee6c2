"""Fast CPU ops for `backend.mode=fast`: the same plan ops, on the layout `cpu_fast` prepares.

Grouped dispatch: one kernel call per expert that received rows (no per-token loop), writing into
one preallocated output. Kernels (torch 2.13, measured on the bench machine, see docs/performance.md):
- A8W8: torch._int_mm (int8 x int8 -> int32, exact, AMX/VNNI via oneDNN) on the [E, N, K] weight
  viewed transposed; the integer result is the same as the exact op's, so W8A8 fast is exact.
- A8W4: torch._weight_int4pack_mm_for_cpu with bf16 activations (int8 values are exact in bf16)
  and bf16 scales (the approximation: bf16 scales and a bf16 kernel output), plus the fp32
  residual bias and the per-token scale in fp32.
Activation ops (dynamic quant, SwiGLU, fused quant) are already vectorised tensor code and are
shared with the exact backend (quantfw.schemes.plan_ops): one implementation of their rounding rules.
"""

from __future__ import annotations

import torch

from quantfw.ops import check_tensor, fail
from quantfw.ops import row_groups as _spans  # one host sync per op call
from quantfw.transforms.cpu_fast import int4pack_group_size


def grouped_matmul_a8w8(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    per_token_scale: torch.Tensor | None,
    group_list: torch.Tensor,
    bias: torch.Tensor | None = None,
    output_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """A8W8 GMM on the fast layout: weight int8 [G, N, K]; otherwise as `quantfw.ops.grouped_matmul_a8w8`."""
    op = "grouped_matmul_a8w8 (fast)"
    check_tensor(op, "x", x, (torch.int8,), ndim=2)
    check_tensor(op, "weight", weight, (torch.int8,), shape=(None, None, x.shape[1]))
    rows, n = x.shape[0], weight.shape[1]
    raw = scale is None
    out = torch.zeros((rows, n), dtype=torch.int32 if raw else output_dtype)
    for e, r0, r1 in _spans(group_list):
        acc = torch._int_mm(x[r0:r1], weight[e].T)
        if raw:
            out[r0:r1] = acc
            continue
        y = acc.to(torch.float32) * scale[e].to(torch.float32)
        if per_token_scale is not None:
            y *= per_token_scale[r0:r1].unsqueeze(-1)
        if bias is not None:
            y += bias[e]
        out[r0:r1] = y
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
    """A8W4 GMM on the fast layout: weight uint8 int4pack [G, N, K/2], scale bf16 [G, P, K/kg, N, 2],
    bias = residual fp32 [G, N]: y = (int4pack_mm(bf16(x), W, S) + residual) * per_token_scale."""
    op = "grouped_matmul_a8w4 (fast)"
    check_tensor(op, "x", x, (torch.int8,), ndim=2)
    rows, k = x.shape
    if weight.dtype != torch.uint8:
        raise fail(
            op,
            "weight",
            "the int4pack layout uint8 [G, N, K/2] (prepared by post-load int4pack)",
            weight.dtype,
        )
    check_tensor(op, "weight", weight, shape=(None, None, k // 2))
    check_tensor(
        op, "scale", scale, (torch.bfloat16,), shape=(weight.shape[0], None, None, weight.shape[1], 2)
    )
    kg = int4pack_group_size(k, scale.shape[2], op)
    n = weight.shape[1]
    out = torch.zeros((rows, n), dtype=output_dtype)
    spans = _spans(group_list)
    if not spans:
        return out
    xb = x[: spans[-1][2]].to(torch.bfloat16)  # int8 values are exact in bf16
    for e, r0, r1 in spans:
        xe = xb[r0:r1]
        y = torch._weight_int4pack_mm_for_cpu(xe, weight[e], kg, scale[e, 0]).to(torch.float32)
        for part in range(1, scale.shape[1]):  # the lo part of split per-group scales
            y += torch._weight_int4pack_mm_for_cpu(xe, weight[e], kg, scale[e, part])
        y += bias[e]
        y *= per_token_scale[r0:r1].unsqueeze(-1)
        out[r0:r1] = y
    return out


# The matmuls read the layout that conf/backend/torch.yaml's `modes.fast` post-load steps prepare;
# the other plan ops are the reference ones.
FAST_OPS = {"grouped_matmul_a8w8": grouped_matmul_a8w8, "grouped_matmul_a8w4": grouped_matmul_a8w4}
