"""What calibration hands to the quantizer, whole: the learned alphas and how they were found, the
per-expert inputs of the data-driven weight observers, the token data and coverage, and the
equalization scales."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class CalibrationResult:
    alphas: dict[int, torch.Tensor]  # MoE layer index -> alpha [E] fp32 (empty: scheme does not clip)
    report: list[dict] = field(default_factory=list)  # one row per (layer, expert): tokens, rows, alpha, status
    metadata: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable provenance of the alphas
    # MoE layer index -> per-expert weight-observer inputs, `inputs[layer](role, e)` (LayerCapture,
    # or the layerwise path's disk-backed SpilledInputs)
    inputs: dict[int, Any] = field(default_factory=dict)
    # token source and coverage, alpha-independent: coverage[layer][e] routed tokens, rows[layer][e] kept rows
    data: dict[str, Any] = field(default_factory=dict)
    work_dir: Any = None  # keeps a temporary work dir (the spills `inputs` read) alive
    # MoE layer index -> equalization scales [E, I] (calibration.equalize; empty: none declared)
    scales: dict[int, torch.Tensor] = field(default_factory=dict)
    equalization: dict[str, Any] | None = None  # its provenance, for checkpoint metadata

    @property
    def alpha_metadata(self) -> dict[str, Any] | None:
        """How the alphas were obtained (None: no alphas, or alphas given without a record)."""
        return self.metadata if self.alphas and self.metadata else None

    @property
    def alpha_method(self) -> str:
        return (self.alpha_metadata or {}).get("method", "given")
