"""Quantize float experts in memory into a format's expert-stacked tensors (what a loader would
read from that format's checkpoint), ready for `MoELayer.load`."""

from __future__ import annotations

import torch

from quantfw.formats.encoders import encode_role
from quantfw.formats.format import Format
from quantfw.layout.spec import Dims
from quantfw.quantize.weights import QuantizedWeight, quantize_weight
from quantfw.schemes.scheme import Scheme


def quantize_experts(
    scheme: Scheme,
    fmt: Format,
    w13: torch.Tensor,
    w2: torch.Tensor,
    alpha: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """w13 [E, 2I, H] (gate rows then up rows), w2 [E, H, I] float -> `{role}_{tensor}` stacked."""
    E, two_i, H = w13.shape
    dims = Dims(E=E, H=H, I=two_i // 2)
    fmt.check_compatible(scheme)
    loaded = fmt.loaded_layout(dims, scheme)
    out: dict[str, torch.Tensor] = {}
    for role, w in (("w13", w13), ("w2", w2)):
        specs = {n: s for n, s in loaded.items() if s.role == role}
        qw = quantize_weight(w.float(), scheme.flags)
        out.update(encode_role(specs, qw, alpha if role == "w2" else None, f"{fmt.where} {role}"))
    return out


def fake_quant_weights(scheme: Scheme, w: torch.Tensor) -> QuantizedWeight:
    """The quantized weight alone (for calibration and error analysis)."""
    return quantize_weight(w.float(), scheme.flags)
