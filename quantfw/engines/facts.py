"""The facts of a quantized checkpoint that engine rules test: scheme flags as detected, dims,
tensor dtypes/shapes of one routed expert, the config groups and which non-expert linears are
quantized. Rules see `env` (names usable in their expressions) and the structural parts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from quantfw.io.experts import FUSED_RE, key_of, parse_expert_key
from quantfw.io.loader import Opened


@dataclass
class CheckpointFacts:
    env: dict[str, Any]
    config_groups: dict[str, Any]
    ignore: list[str]
    modules: dict[str, bool]  # non-expert 2-D linear module -> stored as int8 (W8A8)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def gather(op: Opened, tp: int = 1, ep: int = 1) -> CheckpointFacts:
    r, m = op.reader, op.model
    flags = op.scheme.flags
    prefix = next(iter(op.prefixes.values()))
    gate, down = (lambda s: key_of(prefix, 0, m, "gate", s)), (lambda s: key_of(prefix, 0, m, "down", s))
    scale = gate("weight_scale")
    sb = down("scale_bias")
    I = m.moe_intermediate_size  # noqa: E741
    env: dict[str, Any] = {
        "metadata": op.fmt.metadata,
        "format": op.fmt.name,
        "weight_bits": int(flags["weight_bits"]),
        "group_size": int(flags.get("group_size") or 0),
        "clip": bool(flags.get("activation_use_clip")),
        "has_alpha": any(key_of(p, e, m, "down", "alpha") in r for p in op.prefixes.values() for e in range(m.num_experts)),
        "H": m.hidden_size,
        "I": I,
        "E": m.num_experts,
        "tp": int(tp),
        "ep": int(ep),
        "I_tp": I // tp if tp > 0 and I % tp == 0 else 0,
        "expert_scale_dtype": _dtype_name(r.info(scale).dtype) if scale in r else "none",
        "w2_scale_bias_chunks": int(r.info(sb).shape[-1]) if sb in r else 0,
        "w2_bias": down("bias") in r,
        "moe_layers": len(op.prefixes),
    }
    qc = r.config().get("quantization_config") or {}
    modules = {}
    for k in r.keys():
        if not k.endswith(".weight") or parse_expert_key(k, m) or FUSED_RE.match(k):
            continue
        info = r.info(k)
        if len(info.shape) == 2:
            modules[k[: -len(".weight")]] = info.dtype == torch.int8
    groups = qc.get("config_groups") if isinstance(qc, dict) else None
    ignore = qc.get("ignore") if isinstance(qc, dict) else None
    return CheckpointFacts(env, dict(groups or {}), list(ignore or []), modules)
