"""`calibration.propagate=quantized`: the next layer sees this layer's quantized experts.

GPTQ-style sequential calibration: once a layer's alphas are learned (and its data-driven
observers have their inputs), its routed experts are quantized a block at a time exactly as the
checkpoint will hold them and run on the layer's recorded MoE inputs through the generic
`MoELayer` on the given backend; those outputs, not the float ones, form the hidden states the
next layer calibrates on. Attention, dense MLPs and shared experts stay float here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from quantfw.calibrate.stages import STAGES
from quantfw.calibrate.streaming import ExpertSource, read_blocks
from quantfw.errors import ConfigError

__all__ = ["PROPAGATE", "check_propagate", "quantized_outputs"]

PROPAGATE = ("float", "quantized")


def check_propagate(propagate: str, fmt, backend) -> None:
    if propagate not in PROPAGATE:
        raise ConfigError(f"calibration.propagate={propagate} (allowed: {', '.join(PROPAGATE)})")
    if propagate == "quantized" and (fmt is None or backend is None):
        raise ConfigError(
            "calibration.propagate=quantized: needs the checkpoint format and backend to run the "
            "quantized experts (given by quantfw quantize)"
        )


def quantized_outputs(
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    source: ExpertSource,
    num_experts: int,
    block: int,
    scheme,
    fmt,
    backend,
    alphas: torch.Tensor | None,
    inputs: Callable[[str, int], torch.Tensor | None] | None,
) -> list[torch.Tensor]:
    """Routed outputs fp32 [T_b, H] of every recorded call (hidden, topk_weights, topk_ids) through
    the layer's quantized experts; `inputs(role, e)` feeds a data-driven weight observer."""
    from quantfw.layout.spec import Dims
    from quantfw.moe.layer import MoELayer
    from quantfw.quantize.experts import quantize_experts

    outs = [torch.zeros_like(x, dtype=torch.float32) for x, _, _ in calls]
    for experts, w13, w2 in read_blocks(source, num_experts, block):
        with STAGES("quantized forward"):
            first = experts.start
            alpha = None if alphas is None else alphas[experts.start : experts.stop]
            local = None if inputs is None else (lambda role, e, first=first: inputs(role, first + e))
            tensors = quantize_experts(scheme, fmt, w13, w2, alpha=alpha, calib=local, log=None)
            dims = Dims(E=w13.shape[0], H=w13.shape[2], I=w13.shape[1] // 2)
            layer = MoELayer(scheme, fmt, backend, dims, expert_offset=first)
            layer.load(tensors, source=f"calibration.propagate=quantized, experts {first}-{experts.stop - 1}")
            del tensors
            for b, (x, weights, ids) in enumerate(calls):
                outs[b] += layer(x, weights, ids).float()
            del layer
    return outs
