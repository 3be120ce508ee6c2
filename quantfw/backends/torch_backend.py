"""The torch backend: `mode: exact` runs quantfw.ops (exact integer semantics of the Ascend
kernels, the reference); `mode: fast` runs torch's packed CPU kernels on a layout prepared once at
post-load (quantfw.backends.torch_fast, quantfw.transforms.cpu_fast)."""

from __future__ import annotations

from quantfw import ops
from quantfw.backends import Backend, register_backend
from quantfw.errors import ConfigError
from quantfw.schemes.scheme import PLAN_OPS
from quantfw.transforms import Pipeline, parse_steps

MODES = ("exact", "fast")


@register_backend("torch")
def make_torch_backend(cfg) -> Backend:
    mode = cfg.get("mode", "exact")
    if mode not in MODES:
        raise ConfigError(f"backend.mode '{mode}' is not available (available: {', '.join(MODES)})")
    if mode == "exact":
        return Backend(name="torch", ops={name: getattr(ops, name) for name in PLAN_OPS})
    from quantfw.backends.torch_fast import FAST_OPS, FAST_POST_LOAD

    return Backend(
        name="torch",
        ops={name: FAST_OPS[name] for name in PLAN_OPS},
        post_load=Pipeline(parse_steps(FAST_POST_LOAD, "backend 'torch' (mode fast) post_load")),
        notes={"mode": "fast"},
    )
