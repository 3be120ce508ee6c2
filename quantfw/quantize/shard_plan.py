"""The tensors an output shard will hold, in order, from the input's headers and the format's
declarations, before any weight is read: the shard's header can then be written first and its
data streamed once behind it (quantize/store.py ShardWriter). A plan is a prediction only: the
writer checks each tensor against it and falls back to writing the header last when they differ.
"""

from __future__ import annotations

import torch

from quantfw.quantize.encode import ExpertEncoder, layer_of
from quantfw.quantize.routing import TensorRouter, fused_projs

Planned = tuple[str, torch.dtype, tuple[int, ...]]


def plan_shard(
    router: TensorRouter, encoder_of: dict[int, ExpertEncoder], default: ExpertEncoder, shard: str
) -> list[Planned]:
    """(key, dtype, shape) of every tensor `router.jobs(shard)` makes, in the order it makes them;
    encoder_of: the encoders of layers with their own scheme choice."""
    reader, model = router.reader, router.model
    out: list[Planned] = []
    for key in sorted(reader.keys_in(shard)):
        info = reader.info(key)
        r = router.route(key, info.dtype, len(info.shape))
        if r.kind in ("scale", "drop"):
            continue
        if r.kind == "pass":
            out.append((key, torch.bfloat16 if r.was_fp8 else info.dtype, tuple(info.shape)))
            continue
        if r.kind == "linear":
            n, k = info.shape
            out += default.planned_linear(key[: -len(".weight")], n, k)
            continue
        if r.kind == "expert":
            prefix, _, expert, proj, _ = r.parsed
            parts = [(prefix, expert, proj)]
        else:
            prefix, name = r.fused
            parts = [
                (prefix, e, proj)
                for e in range(model.num_experts)
                for proj, _ in fused_projs(model, name)
            ]
        for prefix, expert, proj in parts:
            out += encoder_of.get(layer_of(prefix), default).planned_expert(prefix, expert, proj)
    return out
