"""The quantized weight every observer returns and every encoder reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from quantfw.quantize import primitives as P


@dataclass
class QuantizedWeight:
    """Integer weights q [..., N, K], per-channel s1 [..., N], optional per-group s2 [..., N, K/G]."""

    q: torch.Tensor
    s1: torch.Tensor
    s2: torch.Tensor | None = None
    info: dict[str, Any] | None = None  # what a data-driven observer chose (e.g. clip ratios)
    # Encoder results a fused kernel computed with q (quantize/fused.py ENCODINGS), by op name.
    encoded: dict[str, torch.Tensor] = field(default_factory=dict)

    def dequantize(self) -> torch.Tensor:
        return P.dequantize(self.q, self.s1, self.s2)
