"""Weight quantization as a scheme's flags declare it (spec section 9, quantizer defaults)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from quantfw.errors import ConfigError
from quantfw.quantize import primitives as P


@dataclass
class QuantizedWeight:
    """Integer weights q [..., N, K], per-channel s1 [..., N], optional per-group s2 [..., N, K/G]."""

    q: torch.Tensor
    s1: torch.Tensor
    s2: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        return P.dequantize(self.q, self.s1, self.s2)


def quantize_weight(w: torch.Tensor, flags: Mapping[str, Any]) -> QuantizedWeight:
    """Round-to-nearest min-max quantization of float weights [..., N, K] under the scheme flags."""
    bits, gs = flags["weight_bits"], flags.get("group_size", 0)
    if bits == 4 and gs:
        if w.shape[-1] % gs:
            raise ConfigError(
                f"group_size {gs} does not divide K={w.shape[-1]}; use a divisor of K or scheme.group_size=0 (per-channel)"
            )
        qw = QuantizedWeight(*P.quantize_two_level(w, gs))
    else:
        qw = QuantizedWeight(*P.quantize_per_channel(w, bits))
    # s1 comes from amax over each row, which propagates NaN and Inf: checking it replaces a full
    # isfinite pass over w (the slowest step of a quantize run).
    if not torch.isfinite(qw.s1).all():
        raise ConfigError("weight contains NaN or Inf")
    return qw
