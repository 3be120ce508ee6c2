"""Mixed precision by measurement: which MoE layers get the wider scheme within a byte budget.

Per layer, the sensitivity is the squared error of the layer's quantized expert output against
float on its calibration rows (absolute, not relative: it is what the layer adds to the residual
stream), under the base scheme and under the wider one; the gain of widening a layer is the
difference. Layers are taken greedily by gain per extra byte while the extra bytes fit the budget;
the bytes are those of the format's expert tensors (what the checkpoint stores). The result is a
recipe fragment in the per-layer syntax `layers: {"0-2": w8a8}`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from quantfw.errors import ConfigError

__all__ = ["LayerCost", "choose_layers", "layer_ranges", "plan_fragment"]


@dataclass
class LayerCost:
    """One layer: output squared error under the base / wide scheme and the bytes of each."""

    layer: int
    error_base: float
    error_wide: float
    bytes_base: int
    bytes_wide: int

    @property
    def gain(self) -> float:
        return self.error_base - self.error_wide

    @property
    def extra_bytes(self) -> int:
        return self.bytes_wide - self.bytes_base


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors.values()))


def output_error(run: Callable[[torch.Tensor], torch.Tensor], ref: torch.Tensor, x: torch.Tensor) -> float:
    """Squared error of run(x) against ref."""
    with torch.no_grad():
        return float((run(x).float() - ref).square().sum())


def choose_layers(costs: list[LayerCost], budget_bytes: int) -> list[int]:
    """Layers to widen: best gain per extra byte first, while the extra bytes fit the budget."""
    if budget_bytes < 0:
        raise ConfigError(f"mixed precision: byte budget {budget_bytes} (must be >= 0)")
    ranked = sorted((c for c in costs if c.gain > 0), key=lambda c: -c.gain / max(c.extra_bytes, 1))
    chosen, spent = [], 0
    for c in ranked:
        if spent + c.extra_bytes <= budget_bytes:
            chosen.append(c.layer)
            spent += c.extra_bytes
    return sorted(chosen)


def layer_ranges(layers: list[int]) -> list[str]:
    """[0, 1, 2, 5] -> ["0-2", "5"]."""
    out, start = [], None
    for i, n in enumerate(sorted(layers)):
        if start is None:
            start = prev = n
        elif n != prev + 1:
            out.append(f"{start}-{prev}" if prev > start else f"{start}")
            start = n
        prev = n
        if i == len(layers) - 1:
            out.append(f"{start}-{prev}" if prev > start else f"{start}")
    return out


def plan_fragment(costs: list[LayerCost], budget_bytes: int, wide: str) -> dict:
    """The recipe fragment and the plan's numbers (JSON-serialisable)."""
    chosen = choose_layers(costs, budget_bytes)
    base_total = sum(c.bytes_base for c in costs)
    extra = sum(c.extra_bytes for c in costs if c.layer in chosen)
    return {
        "fragment": {"layers": {r: wide for r in layer_ranges(chosen)}},
        "wide_layers": chosen,
        "budget_bytes": int(budget_bytes),
        "base_bytes": base_total,
        "extra_bytes": extra,
        "total_bytes": base_total + extra,
        "error_base": sum(c.error_base for c in costs),
        "error_planned": sum(c.error_wide if c.layer in chosen else c.error_base for c in costs),
        "per_layer": [vars(c) for c in costs],
    }
