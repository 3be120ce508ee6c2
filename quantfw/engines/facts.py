"""The facts of a quantized checkpoint that engine rules test: scheme flags as detected, dims,
tensor dtypes/shapes of one routed expert, the config groups and which non-expert linears are
quantized. Rules see `env` (names usable in their expressions) and the structural parts. Whether
the scheme clips and which optional parameters (`has_NAME`) are stored come from the scheme
declarations, the projections from their roles; nothing here names a scheme, flag or clip tensor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from quantfw.io.experts import FUSED_RE, PROJS, ROLE_OF, key_of, parse_expert_key
from quantfw.io.loader import Opened
from quantfw.schemes.scheme import optional_params


@dataclass
class CheckpointFacts:
    env: dict[str, Any]
    config_groups: dict[str, Any]
    ignore: list[str]
    modules: dict[str, bool]  # non-expert 2-D linear module -> stored as int8 (W8A8)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _projs(role: str) -> list[str]:
    """The on-disk projections of a role (w13: gate, up; w2: down)."""
    return [p for p in PROJS if ROLE_OF[p] == role]


def optional_names(op: Opened) -> dict[str, tuple[str, ...]]:
    """name -> roles of every optional runtime parameter a scheme declares (the opened one and the
    shipped ones, so `has_NAME` is a fact of every checkpoint, whichever scheme it was read as)."""
    from quantfw.config.declared import declarations

    runtimes = [d.get("runtime") or {} for d in declarations("scheme").values()] + [op.scheme.runtime]
    return {n: p.roles for rt in runtimes for n, p in optional_params(rt).items()}


def stored(op: Opened, name: str, roles: tuple[str, ...]) -> bool:
    """Whether any routed expert of any MoE layer stores tensor `name` on a projection of `roles`."""
    m, r = op.model, op.reader
    projs = [p for role in roles for p in _projs(role)]
    return any(
        key_of(prefix, e, m, p, name) in r
        for prefix in op.prefixes.values()
        for e in range(m.num_experts)
        for p in projs
    )


def gather(op: Opened, tp: int = 1, ep: int = 1) -> CheckpointFacts:
    r, m = op.reader, op.model
    flags = op.scheme.flags
    prefix = next(iter(op.prefixes.values()))

    def first(role: str, suffix: str) -> str:  # expert 0's tensor on the role's first projection
        return key_of(prefix, 0, m, _projs(role)[0], suffix)

    scale = first("w13", "weight_scale")
    sb = first("w2", "scale_bias")
    I = m.moe_intermediate_size  # noqa: E741
    env: dict[str, Any] = {
        "metadata": op.fmt.metadata,
        "format": op.fmt.name,
        "weight_bits": int(flags["weight_bits"]),
        "group_size": int(flags.get("group_size") or 0),
        "clip": op.scheme.clips,
        **{f"has_{n}": stored(op, n, roles) for n, roles in optional_names(op).items()},
        "H": m.hidden_size,
        "I": I,
        "E": m.num_experts,
        "tp": int(tp),
        "ep": int(ep),
        "I_tp": I // tp if tp > 0 and I % tp == 0 else 0,
        "expert_scale_dtype": _dtype_name(r.info(scale).dtype) if scale in r else "none",
        "w2_scale_bias_chunks": int(r.info(sb).shape[-1]) if sb in r else 0,
        "w2_bias": first("w2", "bias") in r,
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
