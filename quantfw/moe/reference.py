"""Float reference experts module (the contract every quantized experts module meets).

Expert e is a SwiGLU MLP with fused weights w13[e] = [gate rows; up rows] ([2I, H]) and
w2[e] ([H, I]):  y = w2[e] @ (silu(w13[e][:I] x) * (w13[e][I:] x)).
forward(hidden_states [T, H], topk_weights [T, k], topk_ids [T, k]) returns
sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x_t), computed in fp32, cast to the input dtype.
Ids outside [0, E) (e.g. experts owned by another expert-parallel rank) contribute nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantfw.errors import LayoutError

__all__ = ["FloatMoE"]


class FloatMoE(nn.Module):
    """fp32 float experts: sort tokens by expert, one matmul pair per expert, index_add combine."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor):
        super().__init__()
        if w13.dim() != 3 or w2.dim() != 3:
            raise LayoutError(
                "FloatMoE: w13 must be [E, 2I, H] and w2 [E, H, I], "
                f"got {tuple(w13.shape)} and {tuple(w2.shape)}"
            )
        num_experts, two_i, hidden = w13.shape
        if two_i % 2 or tuple(w2.shape) != (num_experts, hidden, two_i // 2):
            raise LayoutError(
                f"FloatMoE: w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} disagree "
                f"(expected w2 [{num_experts}, {hidden}, {two_i // 2}])"
            )
        self.num_experts = num_experts
        self.hidden_size = hidden
        self.intermediate_size = two_i // 2
        self.register_buffer("w13", w13.detach().to(torch.float32).contiguous())
        self.register_buffer("w2", w2.detach().to(torch.float32).contiguous())

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}"

    def forward(
        self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        if hidden_states.dim() != 2 or hidden_states.shape[-1] != self.hidden_size:
            raise LayoutError(
                f"FloatMoE: hidden_states must be [T, {self.hidden_size}], got {tuple(hidden_states.shape)}"
            )
        if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != hidden_states.shape[0]:
            raise LayoutError(
                f"FloatMoE: topk_weights {tuple(topk_weights.shape)} and topk_ids {tuple(topk_ids.shape)} "
                f"must both be [T={hidden_states.shape[0]}, k]"
            )
        x = hidden_states.to(torch.float32)
        out = torch.zeros_like(x)
        k = topk_ids.shape[1]
        flat_ids = topk_ids.reshape(-1).to(torch.int64)
        flat_w = topk_weights.reshape(-1).to(torch.float32)
        valid = (flat_ids >= 0) & (flat_ids < self.num_experts)
        slots = torch.nonzero(valid).squeeze(1)
        order = slots[torch.argsort(flat_ids[slots], stable=True)]
        counts = torch.bincount(flat_ids[order], minlength=self.num_experts).tolist()
        tokens = order // k
        inter = self.intermediate_size
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            sel = order[start : start + count]
            tok = tokens[start : start + count]
            start += count
            h = x[tok] @ self.w13[e].t()
            y = (F.silu(h[:, :inter]) * h[:, inter:]) @ self.w2[e].t()
            out.index_add_(0, tok, y * flat_w[sel, None])
        return out.to(hidden_states.dtype)
