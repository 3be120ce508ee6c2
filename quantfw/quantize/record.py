"""What quantizing expert projections with a data-driven weight observer did, in one schema for
both paths: `ExpertRecord` per projection (its JSON is what the converter's resume records hold),
`QuantReport` over many (the in-memory summary, and the checkpoint metadata's
`weight_calibration` entry)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from quantfw.io.experts import ROLE_OF
from quantfw.quantize import observers
from quantfw.quantize.qweight import QuantizedWeight

# The serialized fields, in this order (resume records; older records have the same keys).
FIELDS = ("layer", "expert", "proj", "observer", "tokens", "fallback", "clip_ratio_mean")


@dataclass(frozen=True)
class ExpertRecord:
    """One expert projection quantized by a data-driven observer (or its declared fallback)."""

    layer: int | None  # MoE layer index (None: an in-memory layer quantized without one)
    expert: int
    proj: str  # gate / up / down as the converter writes them; the role w13 / w2 quantized whole
    observer: str  # the observer that ran
    tokens: int  # calibration rows it was given
    fallback: str | None = None  # why the chosen observer did not run (None: it did)
    clip_ratio_mean: float | None = None  # mean learned clip ratio over channels, 6 digits
    # Per output channel; in memory only (a checkpoint records the mean).
    clip_ratio: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def role(self) -> str:
        return ROLE_OF.get(self.proj, self.proj)

    @classmethod
    def of(
        cls, qw: QuantizedWeight, x: torch.Tensor | None, layer: int | None, expert: int, proj: str
    ) -> ExpertRecord:
        """The record of `qw`, quantized by `quantize_weight` (its info names the observer) from
        calibration inputs x [M, K] (None: none)."""
        ratio = qw.info.get("clip_ratio")
        return cls(
            layer,
            expert,
            proj,
            qw.info["observer"],
            0 if x is None else int(x.shape[0]),
            qw.info["fallback"],
            None if ratio is None else round(float(ratio.mean()), 6),
            ratio,
        )

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in FIELDS}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ExpertRecord:
        return cls(**{k: d[k] for k in FIELDS})


def _reason(r: ExpertRecord) -> str:
    return "no calibration inputs" if r.tokens == 0 else "too few calibration tokens"


@dataclass
class QuantReport:
    """The records of one quantization (`quantize_experts`, or a converter run)."""

    observer: str = ""
    records: list[ExpertRecord] = field(default_factory=list)

    @property
    def fallbacks(self) -> list[ExpertRecord]:
        return [r for r in self.records if r.fallback]

    def to_json(self) -> list[dict[str, Any]]:
        """The records in layer, expert, projection order (independent of thread timing)."""
        key = lambda r: (r.layer if r.layer is not None else -1, r.expert, r.proj)  # noqa: E731
        return [r.to_json() for r in sorted(self.records, key=key)]

    @classmethod
    def from_json(cls, records: Iterable[Mapping[str, Any]], observer: str = "") -> QuantReport:
        return cls(observer, [ExpertRecord.from_json(r) for r in records])

    def metadata(self) -> dict[str, Any]:
        """In-memory summary: the observer, the experts that fell back, and each role's learned
        per-channel clip ratios, one row of N per record in order ([E][N] for one layer; 1 where
        an expert fell back)."""
        meta: dict[str, Any] = {
            "weight_observer": self.observer,
            "fallback_experts": [
                {"role": r.role, "expert": r.expert, "observer": r.observer, "reason": r.fallback}
                for r in self.fallbacks
            ],
        }
        learned = [r for r in self.records if r.clip_ratio is not None]
        if learned:
            meta["weight_clip_ratio"] = {"method": "learned_clip: per-channel grid, layer-output MSE"}
            for role in dict.fromkeys(r.role for r in learned):
                rows = next(r.clip_ratio.numel() for r in learned if r.role == role)
                meta["weight_clip_ratio"][role] = [
                    (r.clip_ratio if r.clip_ratio is not None else torch.ones(rows)).tolist()
                    for r in self.records
                    if r.role == role
                ]
        return meta

    def weight_calibration(self, flags: Mapping, data: dict | None) -> dict[str, Any]:
        """The checkpoint-metadata entry, kept small: the observer and its parameters, the
        calibration data and coverage, per-layer lists of the experts that fell back, and each
        expert's mean learned clip ratio (not every channel)."""
        fallback: dict[str, dict[str, list[int]]] = {}
        reasons: dict[str, int] = {}
        clip: dict[str, dict[str, list]] = {}
        for r in self.records:
            layer = str(r.layer)
            if r.fallback:
                fallback.setdefault(layer, {}).setdefault(r.proj, []).append(r.expert)
                reasons[_reason(r)] = reasons.get(_reason(r), 0) + 1
            if r.clip_ratio_mean is not None:
                clip.setdefault(layer, {}).setdefault(r.proj, []).append([r.expert, r.clip_ratio_mean])
        used = [r for r in self.records if not r.fallback]
        meta: dict = {
            **observers.data_params(flags),
            "data": data or {"source": "none: no calibration inputs"},
            "projections": len(self.records),
            "data_driven": len(used),
            "tokens_used": sum(r.tokens for r in used),
            "fallback": {"observer": observers.param(flags, "fallback_observer"), "count": sum(reasons.values())},
        }
        meta["fallback"].update(reasons=reasons, experts=fallback)
        if clip:
            meta["clip_ratio_mean"] = clip  # layer -> proj -> [[expert, mean ratio over channels], ...]
        return meta
