"""Calibration inputs of the data-driven weight observers, per expert projection."""

from __future__ import annotations

from typing import Protocol

import torch

from quantfw import ops


class CalibrationInputs(Protocol):
    """Per-expert calibration inputs of a projection: (role "w13"|"w2", local expert) -> x [M, K]
    (w13: the hidden states routed to the expert; w2: the expert's float SwiGLU outputs), or None."""

    def __call__(self, role: str, expert: int) -> torch.Tensor | None: ...


class RoutedInputs:
    """Calibration inputs from routed tokens: hidden [T, H] and topk_ids [T, k] (global ids).

    w2 inputs are recomputed on demand from the float w13 [E, 2I, H], so nothing per expert is
    held beyond the call (experts are quantized one at a time)."""

    def __init__(
        self, hidden: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor, expert_offset: int = 0
    ):
        self.hidden, self.topk_ids, self.w13, self.offset = hidden, topk_ids, w13, expert_offset

    def tokens(self, expert: int) -> torch.Tensor:
        return (self.topk_ids == expert + self.offset).any(dim=1).nonzero().squeeze(1)

    def __call__(self, role: str, expert: int) -> torch.Tensor:
        x = self.hidden[self.tokens(expert)].float()
        if role == "w13":
            return x
        return ops.swiglu(x @ self.w13[expert].float().T)
