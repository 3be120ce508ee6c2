"""The torch backend: `mode: exact` runs quantfw.ops (exact integer semantics of the Ascend
kernels, the reference); `mode: fast` runs torch's packed CPU kernels on a layout that the
fast mode's post-load steps (conf/backend/torch.yaml, `modes.fast`) prepare once."""

from __future__ import annotations

from quantfw.backends.base import Backend, register_backend
from quantfw.schemes.plan_ops import PLAN_OPS


@register_backend("torch")
def make_torch_backend(cfg) -> Backend:
    if cfg.get("mode", "exact") == "exact":
        return Backend(name="torch", ops={name: PLAN_OPS.get(name) for name in PLAN_OPS})
    from quantfw.backends.torch_fast import FAST_OPS

    return Backend(
        name="torch",
        ops={name: FAST_OPS.get(name) or PLAN_OPS.get(name) for name in PLAN_OPS},
        notes={"mode": "fast"},
    )
