"""Quantize float experts in memory into a format's expert-stacked tensors (what a loader would
read from that format's checkpoint), ready for `MoELayer.load`. The quantization itself is the
converter's (`ExpertQuantizer`, quantize/encode.py), with the same records (quantize/record.py)."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable

import torch

from quantfw.formats.format import Format
from quantfw.layout.spec import Dims
from quantfw.quantize.encode import ExpertQuantizer
from quantfw.quantize.inputs import CalibrationInputs, RoutedInputs
from quantfw.quantize.record import ExpertRecord, QuantReport
from quantfw.quantize.weights import QuantizedWeight, quantize_weight
from quantfw.schemes.scheme import Scheme

__all__ = [
    "CalibrationInputs",
    "ExpertRecord",
    "QuantReport",
    "RoutedInputs",
    "fake_quant_weights",
    "quantize_experts",
]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _by_role(specs: dict) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for n, s in specs.items():
        out.setdefault(s.role, {})[n] = s
    return out


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
    layer: int | None = None,
) -> dict[str, torch.Tensor]:
    """w13 [E, 2I, H] (gate rows then up rows), w2 [E, H, I] float -> `{role}_{tensor}` stacked.

    Data-free observers quantize all experts at once. Data-driven ones (learned_clip, gptq) stream
    experts one at a time with `calib(role, e)` inputs (so one Hessian is alive at a time), fall
    back per expert as declared, record each projection in `report` (as layer `layer`) and log one
    progress line per expert (`label` names the layer).
    """
    E, two_i, H = w13.shape
    dims = Dims(E=E, H=H, I=two_i // 2)
    fmt.check_compatible(scheme)
    weights = {"w13": w13, "w2": w2}
    stacked = _by_role(fmt.loaded_layout(dims, scheme))
    rows = {role: w.shape[-2] for role, w in weights.items()}
    quantizer = ExpertQuantizer(scheme.flags, stacked, fmt.where, rows)
    out: dict[str, torch.Tensor] = {}
    report = report if report is not None else QuantReport()
    report.observer = scheme.flags.get("weight_observer", "minmax")
    if not quantizer.needs_data:
        for role, w in weights.items():
            out.update(quantizer.projection(role, w.float(), f"{role} [{E} experts]", alpha=alpha)[0])
        return out
    # One expert at a time: the stacked declarations without their expert dim.
    one = {r: {n: dataclasses.replace(s, shape=s.shape[1:]) for n, s in p.items()} for r, p in stacked.items()}
    quantizer = ExpertQuantizer(scheme.flags, one, fmt.where, rows)
    for role, w in weights.items():
        parts = []
        for e in range(E):
            start = time.perf_counter()
            tensors, rec = quantizer.projection(
                role,
                w[e].float(),
                f"{role} expert {e}",
                layer=layer,
                expert=e,
                inputs=calib,
                alpha=None if alpha is None else alpha[e],
            )
            parts.append(tensors)
            report.records.append(rec)
            if log is not None:
                line = f"[quantfw] {label + ' ' if label else ''}{role} expert {e + 1}/{E}: {rec.observer}"
                line += f" ({rec.tokens} tokens, {time.perf_counter() - start:.2f}s)"
                if rec.fallback:
                    line += f" FALLBACK from {report.observer}: {rec.fallback}"
                log(line)
        out.update({n: torch.stack([p[n] for p in parts]) for n in parts[0]})
    return out


def fake_quant_weights(scheme: Scheme, w: torch.Tensor) -> QuantizedWeight:
    """The quantized weight alone (for calibration and error analysis)."""
    return quantize_weight(w.float(), scheme.flags)
