"""The ops a compute plan may call, each with its torch reference implementation (quantfw.ops).

Backends provide these names (the exact torch backend runs the reference itself). A plugin adds an
op through the `quantfw.plan_ops` entry-point group; a backend without it refuses in one line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from quantfw import ops
from quantfw.registry import Registry

PLAN_OPS: Registry[Callable[..., Any]] = Registry("plan op", "plan_ops")

for _name in (
    "dynamic_quant",
    "swiglu",
    "dequant_swiglu_quant",
    "swiglu_clip_quant",
    "grouped_matmul_a8w8",
    "grouped_matmul_a8w4",
):
    PLAN_OPS.add(_name, getattr(ops, _name))
