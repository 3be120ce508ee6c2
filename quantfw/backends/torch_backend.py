"""The torch reference backend: quantfw.ops, exact integer semantics of the Ascend kernels."""

from __future__ import annotations

from quantfw import ops
from quantfw.backends import Backend, register_backend
from quantfw.errors import ConfigError
from quantfw.schemes.scheme import PLAN_OPS


@register_backend("torch")
def make_torch_backend(cfg) -> Backend:
    mode = cfg.get("mode", "exact")
    if mode != "exact":
        raise ConfigError(f"backend.mode '{mode}' is not available yet (available: exact)")
    return Backend(name="torch", ops={name: getattr(ops, name) for name in PLAN_OPS})
