"""Backends: the operator table a compute plan runs on, plus declared post-load steps.

Resolved by registered name (`backend=torch|npu_sim|npu`, or a plugin's), never by an import path
from YAML. The built-in backends register on import of this package; plugins through the
`quantfw.backends` entry-point group (quantfw/registry.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig

from quantfw.backends import npu as _npu  # noqa: F401  (registers npu and npu_sim; torch_npu imported lazily)
from quantfw.backends import torch_backend as _torch_backend  # noqa: F401  (registers torch)
from quantfw.backends.base import BACKENDS, Backend, build_backend, declared_modes, register_backend

__all__ = ["BACKENDS", "Backend", "declared_modes", "get_backend", "register_backend"]


def get_backend(cfg: DictConfig | Mapping[str, Any] | str) -> Backend:
    """The backend a recipe's `backend` node (or a bare registered name) declares."""
    return build_backend(cfg)
