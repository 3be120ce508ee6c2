"""Post-load transforms: a registry of named, shape-checked ops (see registry.py)."""

from quantfw.transforms import builtin as _builtin  # noqa: F401  (registers the built-in ops)
from quantfw.transforms import cpu_fast as _cpu_fast  # noqa: F401  (fast CPU backend layout ops)
from quantfw.transforms import pack_quantized as _pack_quantized  # noqa: F401
from quantfw.transforms.registry import Pipeline, Step, available, parse_steps, register

__all__ = ["Pipeline", "Step", "available", "parse_steps", "register"]
