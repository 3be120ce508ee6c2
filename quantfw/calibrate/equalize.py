"""Per-expert up/down equalization: w2's input channels times s, the up-projection rows divided by s.

Exact in float through SwiGLU: silu(g) * (u / s) * s = silu(g) * u. It moves range between the
w2 input (the int8 per-token activation, divided by s) and w2's columns (the int4 weight, times s).
The w13 quantization is unchanged by it: a per-output-row scale of w13 absorbs the 1/s of the up
rows exactly (per-channel and per-group alike).

s is chosen activation-aware (AWQ): s_j = a_j^r / sqrt(max a^r * min a^r) with a_j = mean |u_j| over
the expert's captured rows, r on a grid in [0, 1]; r = 0 is the identity, so the chosen s never
raises the objective on the calibration rows. The objective is the expert's output error with the
deployed arithmetic of its down projection: the clipped int8 w2 input at the expert's alpha and the
int4 w2 quantized by the scheme's observer (its data-free fallback when the observer needs data:
the search quantizes w2 once per grid point).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from quantfw import ops
from quantfw.errors import ConfigError, LayoutError
from quantfw.quantize import observers
from quantfw.quantize.weights import quantize_weight
from quantfw.registry import Registry

__all__ = [
    "EQUALIZERS",
    "EqualizeReport",
    "EqualizedInputs",
    "apply_updown",
    "equalize_block",
    "equalize_experts",
    "search_updown_scale",
]

DEFAULT_GRID = 21  # r = 0, 0.05, ..., 1


@dataclass
class EqualizeReport:
    """Per expert: the chosen exponent r (None: too few rows, left as is) and the relative output
    error of the down projection on its calibration rows before / after."""

    ratio: list[float | None] = field(default_factory=list)
    error_before: list[float | None] = field(default_factory=list)
    error_after: list[float | None] = field(default_factory=list)

    def metadata(self) -> dict[str, Any]:
        done = [r for r in self.ratio if r is not None]
        return {
            "method": "updown: w2 columns * s, up rows / s, s = mean|swiglu|^r (AWQ grid)",
            "experts_equalized": sum(1 for r in done if r > 0),
            "experts_skipped": len(self.ratio) - len(done),
            "ratio": self.ratio,
        }


def search_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    """The scheme flags the search quantizes w2 with: a data-driven observer's data-free fallback."""
    out = dict(flags)
    if observers.needs_data(flags):
        out["weight_observer"] = flags.get("fallback_observer", "minmax")
    return out


def _w2_input(h: torch.Tensor, s: torch.Tensor, alpha: float) -> torch.Tensor:
    """Dequantized clipped int8 w2 input [M, I] with the up half of h [M, 2I] divided by s."""
    inter = h.shape[1] // 2
    hs = torch.cat([h[:, :inter], h[:, inter:] / s], dim=1)
    counts = torch.tensor([h.shape[0]], dtype=torch.int64)
    q, scale = ops.swiglu_clip_quant(hs, counts, torch.tensor([float(alpha)]))
    return q.float() * scale.unsqueeze(1)


def _scale(a: torch.Tensor, r: float) -> torch.Tensor:
    s = a.clamp_min(1e-8).pow(r)
    return s / (s.max() * s.min()).sqrt()


def search_updown_scale(
    w13: torch.Tensor,
    w2: torch.Tensor,
    x: torch.Tensor,
    flags: Mapping[str, Any],
    alpha: float = 1.0,
    grid: int = DEFAULT_GRID,
) -> tuple[torch.Tensor, float, float, float]:
    """One expert: w13 [2I, H], w2 [H, I], its routed hidden states x [M, H] -> (s [I], r, relative
    error at r = 0, relative error at r)."""
    if w13.dim() != 2 or w2.dim() != 2 or w13.shape[0] != 2 * w2.shape[1] or x.shape[-1] != w13.shape[1]:
        raise LayoutError(
            f"equalize: expected w13 [2I, H], w2 [H, I], x [M, H]; found {list(w13.shape)}, "
            f"{list(w2.shape)}, {list(x.shape)}"
        )
    if grid < 2:
        raise ConfigError(f"calibration.equalize_grid={grid} (must be >= 2)")
    fl = search_flags(flags)
    h = x.float() @ w13.float().T
    u = ops.swiglu(h)
    ref = u @ w2.float().T
    norm = ref.norm().clamp_min(1e-30)
    a = u.abs().mean(dim=0)
    best = (float("inf"), 0.0, torch.ones_like(a))
    first = None
    for r in torch.linspace(0, 1, grid).tolist():
        s = _scale(a, r) if r > 0 else torch.ones_like(a)
        wq = quantize_weight(w2.float() * s, fl).dequantize()
        err = ((_w2_input(h, s, alpha) @ wq.T - ref).norm() / norm).item()
        first = err if first is None else first
        if err < best[0]:
            best = (err, r, s)
    return best[2], best[1], first, best[0]


def apply_updown(w13: torch.Tensor, w2: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(w13 with up rows / s, w2 with columns * s); w13 [..., 2I, H], w2 [..., H, I], s [..., I]."""
    inter = w2.shape[-1]
    up = w13[..., inter:, :] / s.unsqueeze(-1)
    return torch.cat([w13[..., :inter, :], up], dim=-2), w2 * s.unsqueeze(-2)


def equalize_experts(
    w13: torch.Tensor,
    w2: torch.Tensor,
    inputs: Callable[[int], torch.Tensor | None],
    flags: Mapping[str, Any],
    alphas: torch.Tensor | None = None,
    grid: int = DEFAULT_GRID,
    min_rows: int = 16,
    report: EqualizeReport | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Equalize every expert of w13 [E, 2I, H] / w2 [E, H, I]; `inputs(e)` gives expert e's routed
    hidden states [M, H] (None or fewer than `min_rows`: left unchanged). Returns new tensors."""
    report = report if report is not None else EqualizeReport()
    scales = torch.ones(w2.shape[0], w2.shape[2])
    for e in range(w13.shape[0]):
        x = inputs(e)
        if x is None or x.shape[0] < min_rows:
            report.ratio.append(None)
            report.error_before.append(None)
            report.error_after.append(None)
            continue
        alpha = 1.0 if alphas is None else float(alphas[e])
        s, r, before, after = search_updown_scale(w13[e], w2[e], x, flags, alpha, grid)
        scales[e] = s
        report.ratio.append(r)
        report.error_before.append(before)
        report.error_after.append(after)
    return apply_updown(w13.float(), w2.float(), scales)


# --------------------------------------------------------------------------- recipe and pipeline
# `calibration.equalize: [updown]` names expert equalizers of this registry. An equalizer takes
# (flags, w13 [2I, H], w2 [H, I], routed hidden rows x [M, H], alpha, grid) and returns (s [I], r).
EQUALIZERS: Registry = Registry("equalizer")


@EQUALIZERS.register("updown")
def _updown(flags, w13, w2, x, alpha, grid):
    s, r, _, _ = search_updown_scale(w13, w2, x, flags, alpha, grid)
    return s, r


def declared(calib) -> list[str]:
    """The recipe's equalizers, checked against the registry (ConfigError naming the key)."""
    names = list(calib.get("equalize", None) or [])
    for n in names:
        EQUALIZERS.get(n, "calibration.equalize")
    return names


def equalize_block(calib, flags, w13, w2, cap, ids: range):
    """The layerwise hook: equalize experts `ids` of a block (w13 [B, 2I, H], w2 [B, H, I]) on
    their captured rows, before the alpha search. The capture's pre-SwiGLU rows get the same up/s,
    so the search sees the equalized expert. Returns (w13, w2, scales [B, I] or None)."""
    names = declared(calib)
    if not names:
        return w13, w2, None
    grid = int(calib.get("equalize_grid", DEFAULT_GRID) or DEFAULT_GRID)
    min_rows = int(calib.get("min_tokens", 16) or 16)
    inter = w2.shape[-1]
    scales = torch.ones(len(ids), inter)
    for j, e in enumerate(ids):
        x = cap.x(e)
        if x.shape[0] < min_rows:
            continue
        for name in names:
            s, _ = EQUALIZERS.get(name)(flags, *apply_updown(w13[j], w2[j], scales[j]), x, 1.0, grid)
            scales[j] *= s
        cap.rows[e] = [torch.cat([h[:, :inter], h[:, inter:] / scales[j]], dim=1) for h in cap.rows[e]]
    w13, w2 = apply_updown(w13.float(), w2.float(), scales)
    return w13, w2, scales


class EqualizedInputs:
    """A layer's observer inputs (CalibrationInputs) seen through its equalization: the w2 input
    of expert e is divided by s[e] (w13 inputs are unchanged)."""

    def __init__(self, inner, scales: torch.Tensor):
        self.inner, self.scales = inner, scales

    def __call__(self, role: str, expert: int):
        x = self.inner(role, expert)
        return x / self.scales[expert] if role == "w2" and x is not None else x


def equalize_weight(proj: str, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """One expert projection as the equalized checkpoint stores it: up rows / s, down columns * s."""
    if proj == "up":
        return w / s.to(w.dtype).unsqueeze(1)
    if proj == "down":
        return w * s.to(w.dtype).unsqueeze(0)
    return w


def equalize_metadata(names: list[str], scales: dict[int, torch.Tensor]) -> dict:
    moved = {str(k): int((v != 1).any(dim=1).sum()) for k, v in scales.items()}
    return {
        "equalizers": names,
        "method": "w2 columns * s, up rows / s (exact in float through SwiGLU), s = mean|swiglu|^r, r on "
        "an AWQ grid minimising the clipped int8 x int4 down-projection output error",
        "experts_equalized": moved,
    }
