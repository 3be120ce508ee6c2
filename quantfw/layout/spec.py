"""Parameter layouts: declared entries instantiated into concrete specs per role and rank.

A declaration names a parameter once for both projections; each role gets its own dims
(w13: N = 2I/tp, K = H; w2: N = H, K = I/tp) and the parameter is called `{role}_{name}`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from quantfw.errors import ConfigError
from quantfw.layout import expr

ROLES = ("w13", "w2")

DTYPES: dict[str, torch.dtype] = {
    "int4": torch.int8,  # never a storage dtype; kept for readable declarations of logical values
    "int8": torch.int8,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint64": torch.int64,  # torch stores u64-encoded scales in int64 (spec 1.5)
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}

ENTRY_KEYS = {
    "shape",
    "dtype",
    "roles",
    "when",
    "init",
    "optional",
    "values",
    "encoding",
    "packing",
    "shard",
    "encode",
    "doc",
}
INITS = {"empty", "zeros", "ones"}


@dataclass(frozen=True)
class Dims:
    """Model dims of one MoE layer as a rank sees them."""

    E: int  # local experts
    H: int
    I: int  # full moe intermediate size (before TP)
    tp: int = 1

    def __post_init__(self):
        if self.I % self.tp:
            raise ConfigError(f"moe intermediate size {self.I} is not divisible by tp size {self.tp}")

    def role(self, role: str) -> dict[str, int]:
        i_local = self.I // self.tp
        n, k = (2 * i_local, self.H) if role == "w13" else (self.H, i_local)
        return {"E": self.E, "H": self.H, "I": i_local, "N": n, "K": k, "tp": self.tp}


@dataclass(frozen=True)
class ParamSpec:
    name: str
    role: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    init: str = "empty"
    meta: Mapping[str, Any] = field(default_factory=dict)  # encoding, packing, shard, encode, doc

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()

    def describe(self) -> str:
        return f"{self.name} {list(self.shape)} {str(self.dtype).removeprefix('torch.')}"

    def allocate(self, device: str | torch.device = "cpu") -> torch.Tensor:
        make = {"empty": torch.empty, "zeros": torch.zeros, "ones": torch.ones}[self.init]
        return make(self.shape, dtype=self.dtype, device=device)


def parse_dtype(value: Any, where: str, env: Mapping[str, Any] | None = None) -> torch.dtype:
    if isinstance(value, str) and not value.isidentifier() and env is not None:
        value = expr.evaluate(value, env, where)  # e.g. "'uint64' if weight_bits == 4 else 'float32'"
    if value not in DTYPES:
        raise ConfigError(f"{where}: unknown dtype {value!r} (allowed: {', '.join(DTYPES)})")
    return DTYPES[value]


def _per_role(value: Any, role: str) -> Any:
    """`{w13: a, w2: b}` picks the role's value; anything else applies to both roles."""
    if isinstance(value, Mapping) and set(value) <= set(ROLES):
        if role not in value:
            return None
        return value[role]
    return value


per_role = _per_role  # the public name for other packages


def instantiate(
    entries: Mapping[str, Mapping[str, Any]],
    dims: Dims,
    flags: Mapping[str, Any],
    where: str,
    stack_experts: bool = False,
) -> dict[str, ParamSpec]:
    """Turn declared entries into `{role}_{name}` specs for this rank's dims and these flags.

    `stack_experts` prepends E: on-disk entries describe one expert, runtime entries all of them.
    """
    specs: dict[str, ParamSpec] = {}
    for name, entry in entries.items():
        at = f"{where}: {name}"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{at}: expected a mapping with shape/dtype, found {entry!r}")
        unknown = set(entry) - ENTRY_KEYS
        if unknown:
            raise ConfigError(f"{at}: unknown key(s) {sorted(unknown)} (allowed: {sorted(ENTRY_KEYS)})")
        for key in ("shape", "dtype"):
            if key not in entry:
                raise ConfigError(f"{at}: missing '{key}'")
        roles = entry.get("roles", list(ROLES))
        if not set(roles) <= set(ROLES):
            raise ConfigError(f"{at}.roles: {list(roles)} (allowed: {list(ROLES)})")
        for role in roles:
            env = {**flags, **dims.role(role), "role_is_w13": role == "w13"}
            if not expr.holds(entry.get("when"), env, f"{at}.when"):
                continue
            raw_shape = _per_role(entry["shape"], role)
            if raw_shape is None:
                continue
            shp = expr.shape(raw_shape, env, f"{at}.shape")
            if stack_experts:
                shp = (dims.E, *shp)
            init = entry.get("init", "empty")
            if init not in INITS:
                raise ConfigError(f"{at}.init: {init!r} (allowed: {sorted(INITS)})")
            meta = {
                k: _per_role(entry[k], role)
                for k in ("encoding", "packing", "shard", "encode", "doc")
                if k in entry
            }
            specs[f"{role}_{name}"] = ParamSpec(
                name=f"{role}_{name}",
                role=role,
                shape=shp,
                dtype=parse_dtype(_per_role(entry["dtype"], role), f"{at}.dtype", env),
                init=init,
                meta=meta,
            )
    return specs


def conformance_problems(
    specs: Mapping[str, ParamSpec], tensors: Mapping[str, torch.Tensor], what: str
) -> list[str]:
    """Every missing, unexpected, wrong-shape and wrong-dtype tensor, as one list of lines."""
    problems = []
    for name, spec in specs.items():
        t = tensors.get(name)
        if t is None:
            problems.append(f"missing {name} (declared {spec.describe()})")
        elif tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
            found = f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}"
            problems.append(f"{name}: expected {spec.describe().split(' ', 1)[1]}, found {found}")
    for name in tensors:
        if name not in specs:
            problems.append(f"unexpected {name}")
    return [f"{what}: {p}" for p in problems]
