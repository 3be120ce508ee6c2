"""Quantize float experts in memory into a format's expert-stacked tensors (what a loader would
read from that format's checkpoint), ready for `MoELayer.load`."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from quantfw import ops
from quantfw.formats.encoders import encode_role
from quantfw.formats.format import Format
from quantfw.layout.spec import Dims
from quantfw.quantize import observers
from quantfw.quantize.weights import QuantizedWeight, quantize_weight
from quantfw.schemes.scheme import Scheme


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


@dataclass
class ExpertRecord:
    role: str
    expert: int
    observer: str  # the observer that ran
    tokens: int
    seconds: float
    fallback: str | None = None  # why the chosen data-driven observer did not run
    clip_ratio_mean: float | None = None


@dataclass
class QuantReport:
    """What quantize_experts did per (role, expert); `metadata()` is the checkpoint-metadata entry."""

    observer: str = ""
    records: list[ExpertRecord] = field(default_factory=list)
    clip_ratios: dict[str, list[list[float]]] = field(default_factory=dict)  # role -> [E][N]

    @property
    def fallbacks(self) -> list[ExpertRecord]:
        return [r for r in self.records if r.fallback]

    def metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "weight_observer": self.observer,
            "fallback_experts": [
                {"role": r.role, "expert": r.expert, "observer": r.observer, "reason": r.fallback}
                for r in self.fallbacks
            ],
        }
        if self.clip_ratios:
            meta["weight_clip_ratio"] = {"method": "learned_clip: per-channel grid, layer-output MSE"}
            meta["weight_clip_ratio"].update(self.clip_ratios)
        return meta


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _stack(parts: list[QuantizedWeight]) -> QuantizedWeight:
    s2 = None if parts[0].s2 is None else torch.stack([p.s2 for p in parts])
    return QuantizedWeight(torch.stack([p.q for p in parts]), torch.stack([p.s1 for p in parts]), s2)


def quantize_experts(
    scheme: Scheme,
    fmt: Format,
    w13: torch.Tensor,
    w2: torch.Tensor,
    alpha: torch.Tensor | None = None,
    calib: CalibrationInputs | None = None,
    report: QuantReport | None = None,
    label: str = "",
    log: Callable[[str], None] | None = _stderr,
) -> dict[str, torch.Tensor]:
    """w13 [E, 2I, H] (gate rows then up rows), w2 [E, H, I] float -> `{role}_{tensor}` stacked.

    Data-free observers quantize all experts at once. Data-driven ones (learned_clip, gptq) stream
    experts one at a time with `calib(role, e)` inputs (so one Hessian is alive at a time), fall
    back per expert as declared, and log one progress line per expert (`label` names the layer).
    """
    E, two_i, H = w13.shape
    dims = Dims(E=E, H=H, I=two_i // 2)
    fmt.check_compatible(scheme)
    loaded = fmt.loaded_layout(dims, scheme)
    flags = scheme.flags
    chosen = observers.get_observer(flags.get("weight_observer", "minmax"))
    report = report if report is not None else QuantReport()
    report.observer = chosen.name
    out: dict[str, torch.Tensor] = {}
    for role, w in (("w13", w13), ("w2", w2)):
        specs = {n: s for n, s in loaded.items() if s.role == role}
        if not chosen.needs_data:
            qw = quantize_weight(w.float(), flags)
        else:
            parts, ratios = [], []
            for e in range(E):
                start = time.perf_counter()
                x = calib(role, e) if calib is not None else None
                obs, why = observers.resolve(flags, x)
                part = obs.fn(w[e].float(), flags, x if obs.needs_data else None)
                parts.append(part)
                ratio = (part.info or {}).get("clip_ratio")
                ratios.append(ratio if ratio is not None else torch.ones(w.shape[1]))
                rec = ExpertRecord(
                    role,
                    e,
                    obs.name,
                    0 if x is None else x.shape[0],
                    time.perf_counter() - start,
                    why,
                    None if ratio is None else float(ratio.mean()),
                )
                report.records.append(rec)
                if log is not None:
                    line = f"[quantfw] {label + ' ' if label else ''}{role} expert {e + 1}/{E}: {obs.name}"
                    line += f" ({rec.tokens} tokens, {rec.seconds:.2f}s)"
                    if why:
                        line += f" FALLBACK from {chosen.name}: {why}"
                    log(line)
                del x
            qw = _stack(parts)
            if any(p.info for p in parts):
                report.clip_ratios[role] = torch.stack(ratios).tolist()
        out.update(encode_role(specs, qw, alpha if role == "w2" else None, f"{fmt.where} {role}"))
    return out


def fake_quant_weights(scheme: Scheme, w: torch.Tensor) -> QuantizedWeight:
    """The quantized weight alone (for calibration and error analysis)."""
    return quantize_weight(w.float(), scheme.flags)
