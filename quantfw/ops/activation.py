"""Activation ops: per-token dynamic quant, SwiGLU and the two fused SwiGLU+quant kernels (spec 1.1-1.4).

All math is fp32 and follows the spec's operation order exactly (divide by the scale, round
half-to-even), because a 1-LSB difference at small |q| already fails the peer criterion.
Rows past sum(group_index) are ignored: their q is 0 and their scale 1.
"""

from __future__ import annotations

import torch

from quantfw.ops._checks import FLOAT_DTYPES, check_group_list, check_tensor, fail
from quantfw.ops.rowmax import row_amax


def _silu(a: torch.Tensor) -> torch.Tensor:
    """silu(a) = a / (1 + e^-a), written as the spec states it (fp32 in, fp32 out)."""
    return a / (1.0 + torch.exp(-a))


def _quant_rows(y: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize fp32 rows y [..., K] with bound t [...] (amax or clip bound): s = t/127, 0 -> 1."""
    s = t / 127.0
    s = torch.where(s == 0, torch.ones_like(s), s)
    q = torch.clamp(torch.round(y / s.unsqueeze(-1)), -128, 127).to(torch.int8)
    return q, s


def dynamic_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 quant (npu_dynamic_quant): q int8 [..., K], scale fp32 [...].

    s = rowmax|x| / 127 (1 for an all-zero row); q = clamp(round_half_even(x / s), -128, 127), in fp32.
    """
    check_tensor("dynamic_quant", "x", x, FLOAT_DTYPES, min_ndim=1)
    xf = x.to(torch.float32)
    return _quant_rows(xf, row_amax(xf))


def _swiglu_f32(xf: torch.Tensor, activate_left: bool) -> torch.Tensor:
    half = xf.shape[-1] // 2
    a, b = xf[..., :half], xf[..., half:]
    gate, up = (a, b) if activate_left else (b, a)
    return _silu(gate) * up


def _check_halves(op: str, x: torch.Tensor) -> None:
    if x.shape[-1] % 2:
        raise fail(op, "x", "an even last dim 2I", list(x.shape))


def swiglu(x: torch.Tensor, activate_left: bool = True) -> torch.Tensor:
    """SwiGLU on x [..., 2I] -> [..., I] in x.dtype, computed in fp32 (npu_swiglu).

    y = silu(gate) * up; gate is the first half when activate_left (w13 = [gate; up]).
    """
    check_tensor("swiglu", "x", x, FLOAT_DTYPES, min_ndim=1)
    _check_halves("swiglu", x)
    return _swiglu_f32(x.to(torch.float32), activate_left).to(x.dtype)


def _expert_of_rows(counts: torch.Tensor) -> torch.Tensor:
    """Expert id of each valid row (rows grouped consecutively by the counts)."""
    return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)


def _pad_rows(q: torch.Tensor, s: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Extend valid-row results to all rows: q 0 and scale 1 past sum(counts)."""
    q_out = q.new_zeros((rows, q.shape[-1]))
    s_out = s.new_ones((rows,))
    q_out[: q.shape[0]] = q
    s_out[: s.shape[0]] = s
    return q_out, s_out


def dequant_swiglu_quant(
    x: torch.Tensor,
    weight_scale: torch.Tensor,
    activation_scale: torch.Tensor,
    group_index: torch.Tensor,
    activate_left: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """npu_dequant_swiglu_quant (W8A8): int32 accumulator [T, 2I] -> (q int8 [T, I], scale fp32 [T]).

    h = x * weight_scale[e(row)] * activation_scale[row] (fp32), y = swiglu(h), then `dynamic_quant(y)`.
    """
    op = "dequant_swiglu_quant"
    check_tensor(op, "x", x, (torch.int32,), ndim=2)
    _check_halves(op, x)
    rows, width = x.shape
    check_tensor(op, "weight_scale", weight_scale, (torch.float32,), ndim=2)
    groups = weight_scale.shape[0]
    check_tensor(op, "weight_scale", weight_scale, shape=(groups, width))
    check_tensor(op, "activation_scale", activation_scale, (torch.float32,), shape=(rows,))
    counts = check_group_list(op, "group_index", group_index, groups, rows)
    valid = int(counts.sum())
    eid = _expert_of_rows(counts)
    h = x[:valid].to(torch.float32) * weight_scale[eid] * activation_scale[:valid].unsqueeze(-1)
    y = _swiglu_f32(h, activate_left)
    q, s = _quant_rows(y, row_amax(y))
    return _pad_rows(q, s, rows)


def swiglu_clip_quant(
    x: torch.Tensor,
    group_index: torch.Tensor,
    group_alpha: torch.Tensor,
    activate_left: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """npu_swiglu_clip_quant (W4A8-clip down-proj input): x [T, 2I] -> (q int8 [T, I], scale fp32 [T]).

    Per row of expert e, in fp32: y = swiglu(x); t = alpha[e] * rowmax|y|; y_c = clamp(y, -t, t);
    s = t / 127 (0 -> 1); q = clamp(round_half_even(y_c / s), -128, 127). alpha = 1 is dynamic quant.
    """
    op = "swiglu_clip_quant"
    check_tensor(op, "x", x, (torch.bfloat16, torch.float32), ndim=2)
    _check_halves(op, x)
    rows = x.shape[0]
    check_tensor(op, "group_alpha", group_alpha, (torch.float32,), ndim=1)
    groups = group_alpha.shape[0]
    counts = check_group_list(op, "group_index", group_index, groups, rows)
    valid = int(counts.sum())
    y = _swiglu_f32(x[:valid].to(torch.float32), activate_left)
    t = group_alpha[_expert_of_rows(counts)] * row_amax(y)
    y_c = torch.clamp(y, -t.unsqueeze(-1), t.unsqueeze(-1))
    q, s = _quant_rows(y_c, t)
    return _pad_rows(q, s, rows)


# Public names for the NPU backend's composed paths (same functions).
quant_rows, pad_rows = _quant_rows, _pad_rows
