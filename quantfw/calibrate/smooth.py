"""Input smoothing of w13 folded into the preceding RMSNorm (SmoothQuant, one vector per layer).

x' = x / s, W' = W * s (columns) for every reader of the post-attention norm: all routed and shared
experts' gate/up projections, the router and any shared-expert gate. Folding 1/s into the norm
weight makes it free at run time, and since the router reads x' with columns times s, its logits
(hence routing) are unchanged in float.

s_j = max|x_j|^a / max|W_j|^(1-a) over the routed experts' w13 (a on a grid; the identity is a
candidate too), chosen to minimise the relative error of every routed expert's w13 output with the
int8 per-token input and the int4 weight under the scheme's (data-free) observer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from quantfw import ops
from quantfw.calibrate.equalize import search_flags
from quantfw.calibrate.residual import mlp_readers, scale_dim
from quantfw.errors import ConfigError, LayoutError
from quantfw.quantize.weights import quantize_weight

__all__ = ["check_quantize", "fold_smoothing", "search_smooth_scale", "smooth_layer"]

DEFAULT_ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
_MAX_ROWS = 1024


def _candidate(xmax: torch.Tensor, wmax: torch.Tensor, a: float) -> torch.Tensor:
    s = xmax.clamp_min(1e-5).pow(a) / wmax.clamp_min(1e-5).pow(1 - a)
    return s / (s.max() * s.min()).sqrt()


def search_smooth_scale(
    x: torch.Tensor, w13: torch.Tensor, flags: Mapping[str, Any], alphas=DEFAULT_ALPHAS
) -> tuple[torch.Tensor, float | None, float, float]:
    """x [M, H] MLP inputs, w13 [..., N, H] routed weights -> (s [H], chosen a (None: identity),
    relative error at identity, relative error at s)."""
    if x.shape[-1] != w13.shape[-1]:
        raise LayoutError(f"smooth: x {list(x.shape)} and w13 {list(w13.shape)} differ in H")
    fl = search_flags(flags)
    w = w13.float().reshape(-1, w13.shape[-1])
    x = x.float()
    if x.shape[0] > _MAX_ROWS:  # evenly spread rows: the statistic, not every token, is needed
        x = x[torch.linspace(0, x.shape[0] - 1, _MAX_ROWS).long()]
    ref = x @ w.T
    norm = ref.norm().clamp_min(1e-30)

    def error(s):
        q, sc = ops.dynamic_quant(x / s)
        wq = quantize_weight(w * s, fl).dequantize()
        return (((q.float() * sc.unsqueeze(1)) @ wq.T - ref).norm() / norm).item()

    ones = torch.ones(w.shape[1])
    first = error(ones)
    best = (first, None, ones)
    xmax, wmax = x.abs().amax(dim=0), w.abs().amax(dim=0)
    for a in alphas:
        s = _candidate(xmax, wmax, a)
        err = error(s)
        if err < best[0]:
            best = (err, a, s)
    return best[2], best[1], first, best[0]


def fold_smoothing(norm_weight: torch.Tensor, readers: list, s: torch.Tensor) -> None:
    """norm weight / s and every reader * s along its hidden dim, in place."""
    with torch.no_grad():
        norm_weight.div_(s.to(norm_weight.dtype))
        for p, dim in readers:
            scale_dim(p, dim, s)


def smooth_layer(
    layer: nn.Module, x: torch.Tensor, w13: torch.Tensor, flags: Mapping[str, Any], alphas=DEFAULT_ALPHAS
) -> dict[str, Any]:
    """Search s on a decoder layer's MLP inputs x and routed w13, fold it; returns its report."""
    hidden = layer.post_attention_layernorm.weight.shape[0]
    s, a, before, after = search_smooth_scale(x, w13, flags, alphas)
    if a is not None:
        fold_smoothing(layer.post_attention_layernorm.weight, mlp_readers(layer, hidden), s)
    return {"alpha": a, "error_before": before, "error_after": after}


def check_quantize(calib) -> None:
    """`quantize` with calibration.smooth=true: refused (one line), since the converter writes the
    routed experts and copies every other tensor unchanged, while smoothing must rewrite the
    post-attention norm, the router gate and the shared experts consistently with the experts."""
    if calib.get("smooth", False):
        raise ConfigError(
            "calibration.smooth=true: quantize does not write smoothed checkpoints yet (the folded "
            "post-attention norm, router gate and shared experts are non-expert tensors it copies "
            "unchanged); expected calibration.smooth=false, see docs/accuracy.md"
        )
