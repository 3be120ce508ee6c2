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

__all__ = [
    "LayerCost",
    "choose_layers",
    "expert_output_error",
    "layer_ranges",
    "measure_layer",
    "plan_fragment",
]


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


def layout_bytes(scheme, fmt, dims) -> int:
    """Bytes of one MoE layer's routed experts as the format stores them."""
    return int(sum(s.nbytes for s in fmt.loaded_layout(dims, scheme).values()))


def expert_output_error(scheme, fmt, backend, w13: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> float:
    """Squared error of one expert (w13 [2I, H], w2 [H, I]) quantized in `scheme` on its routed rows
    x [M, H], against float; the data-driven observers see the same rows, a clip runs at alpha = 1."""
    from quantfw.layout.spec import Dims
    from quantfw.moe.layer import MoELayer
    from quantfw.moe.reference import FloatMoE
    from quantfw.quantize.experts import RoutedInputs, quantize_experts

    w13, w2 = w13.unsqueeze(0).float(), w2.unsqueeze(0).float()
    ids = torch.zeros(x.shape[0], 1, dtype=torch.long)
    ones = torch.ones(x.shape[0], 1)
    alpha = torch.ones(1) if scheme.clips else None
    t = quantize_experts(scheme, fmt, w13, w2, alpha=alpha, calib=RoutedInputs(x, ids, w13), log=None)
    dims = Dims(E=1, H=w13.shape[2], I=w13.shape[1] // 2)
    layer = MoELayer(scheme, fmt, backend, dims).load(t, source="sensitivity")
    with torch.no_grad():
        ref = FloatMoE(w13, w2)(x.float(), ones, ids)
    return output_error(lambda z: layer(z, ones, ids), ref, x.float())


def measure_layer(
    layer: int, experts: Callable[[int], tuple], num_experts: int, dims, base, wide
) -> LayerCost:
    """LayerCost of one MoE layer. `experts(e)` -> (w13 [2I, H], w2 [H, I], routed rows x [M, H] or
    None); `base` / `wide` are (scheme, format, backend). The error is summed over the experts'
    routed rows (routing weights left out: every routed row counts once)."""
    errors = [0.0, 0.0]
    for e in range(num_experts):
        w13, w2, x = experts(e)
        if x is None or x.shape[0] == 0:
            continue
        for j, (scheme, fmt, backend) in enumerate((base, wide)):
            errors[j] += expert_output_error(scheme, fmt, backend, w13, w2, x)
    return LayerCost(
        layer,
        errors[0],
        errors[1],
        layout_bytes(base[0], base[1], dims),
        layout_bytes(wide[0], wide[1], dims),
    )
