"""The Backend type, the backend registry and the generic part of building one from its YAML.

A backend is a factory registered by name (`BACKENDS`, entry-point group `quantfw.backends` for
plugins) plus its conf/backend/NAME.yaml: the factory supplies the op table, the YAML declares the
post-load steps (`post_load` for every mode, `modes.MODE` for one mode), never Python.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from quantfw.errors import ConfigError
from quantfw.registry import Registry
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


BackendFactory = Callable[[Mapping[str, Any]], Backend]
BACKENDS: Registry[BackendFactory] = Registry("backend")
register_backend = BACKENDS.register


def declared_modes(data: Mapping[str, Any]) -> dict[str, list[Any]]:
    """Mode name -> that mode's post-load steps; a backend declaring no `modes` has its one `mode`."""
    modes = data.get("modes")
    if not modes:
        return {str(data.get("mode", "exact")): []}
    return {str(k): list(v or []) for k, v in modes.items()}


def backend_data(cfg: DictConfig | Mapping[str, Any] | str) -> dict[str, Any]:
    if isinstance(cfg, str):
        return {"name": cfg, "mode": "exact", "post_load": []}
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def build_backend(cfg: DictConfig | Mapping[str, Any] | str) -> Backend:
    data = backend_data(cfg)
    name = data.get("name")
    factory = BACKENDS.get(name, "backend.name")
    modes = declared_modes(data)
    mode = str(data.get("mode", "exact"))
    if mode not in modes:
        raise ConfigError(f"backend.mode '{mode}' is not available (available: {', '.join(modes)})")
    backend = factory(data)
    where = f"backend '{name}'"
    steps = parse_steps(modes[mode], f"{where} modes.{mode}") + parse_steps(
        data.get("post_load") or [], f"{where} post_load"
    )
    backend.post_load = backend.post_load + Pipeline(steps)
    return backend
