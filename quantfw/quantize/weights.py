"""Weight quantization as a scheme's flags declare it (spec section 9, quantizer defaults); the
scales and rounding come from the observer the flags select (quantfw/quantize/observers.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from quantfw.errors import ConfigError
from quantfw.quantize import observers
from quantfw.quantize.qweight import QuantizedWeight

__all__ = ["QuantizedWeight", "quantize_weight"]


def quantize_weight(
    w: torch.Tensor, flags: Mapping[str, Any], x: torch.Tensor | None = None, fp8=None
) -> QuantizedWeight:
    """Quantize float weights [..., N, K] under the scheme flags with the observer they select
    (`weight_observer`, default minmax; its typed config from the flat observer keys of the flags,
    see observers.settings). Any width from 2 to 8 bits. Data-driven observers take one weight [N, K] and its
    calibration inputs x [M, K]; without enough inputs the declared fallback observer runs.
    fp8 (quantfw.io.fp8.BlockScales): w is an FP8 weight with these block scales; an observer
    registered with `fp8=True` dequantizes it itself, any other gets the fp32 dequantization."""
    observer, why = observers.resolve(flags, x)
    data = x if observer.needs_data else None
    if fp8 is not None and observer.takes_fp8:
        qw = observer.fn(w, flags, data, fp8=fp8)
    else:
        if fp8 is not None:
            from quantfw.io.fp8 import dequantize

            w = dequantize(w, fp8.scale_inv, fp8.block)
        qw = observer.fn(w, flags, data)
    # Which observer ran and why it is the fallback (None: the chosen one), for the caller's report.
    qw.info = {**(qw.info or {}), "observer": observer.name, "fallback": why}
    # s1 comes from amax over each row, which propagates NaN and Inf: checking it replaces a full
    # isfinite pass over w (the slowest step of a quantize run).
    if not torch.isfinite(qw.s1).all():
        raise ConfigError("weight contains NaN or Inf")
    return qw
