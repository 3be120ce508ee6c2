"""Backends: the operator table a compute plan runs on, plus backend-only post-load steps.

Resolved by registered name (`backend=torch|npu_sim|npu`), never by an import path from YAML.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from quantfw.errors import ConfigError
from quantfw.transforms import Pipeline, parse_steps


@dataclass
class Backend:
    name: str
    ops: Mapping[str, Callable[..., Any]]
    post_load: Pipeline = field(default_factory=lambda: Pipeline([]))
    notes: dict[str, Any] = field(default_factory=dict)  # e.g. which clip path ran on the NPU
    # Optional token dispatch/combine (e.g. npu_moe_init_routing_v2 + npu_moe_token_unpermute);
    # None = the layer's torch implementation. Signatures: see quantfw.moe.layer.route_tokens/combine_tokens.
    route: Callable[..., Any] | None = None
    combine: Callable[..., Any] | None = None

    def op(self, name: str) -> Callable[..., Any]:
        if name not in self.ops:
            raise ConfigError(
                f"backend '{self.name}' has no op '{name}' (has: {', '.join(sorted(self.ops))})"
            )
        return self.ops[name]


_FACTORIES: dict[str, Callable[[Mapping[str, Any]], Backend]] = {}


def register_backend(name: str):
    def deco(factory):
        if name in _FACTORIES:
            raise ValueError(f"backend '{name}' is already registered")
        _FACTORIES[name] = factory
        return factory

    return deco


def _load_builtin() -> None:
    from quantfw.backends import npu, npu_sim, torch_backend  # noqa: F401  (npu imports torch_npu lazily)


def get_backend(cfg: DictConfig | Mapping[str, Any] | str) -> Backend:
    _load_builtin()
    if isinstance(cfg, str):
        cfg = {"name": cfg, "mode": "exact", "post_load": []}
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    name = data.get("name")
    if name not in _FACTORIES:
        raise ConfigError(f"unknown backend '{name}' (available: {', '.join(sorted(_FACTORIES))})")
    backend = _FACTORIES[name](data)
    extra = parse_steps(data.get("post_load") or [], f"backend '{name}' post_load")
    backend.post_load = backend.post_load + Pipeline(extra)
    return backend
