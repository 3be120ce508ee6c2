"""The per-token bound of an int8 quantization is the amax of the WHOLE row.

Under tensor parallelism a row (the SwiGLU output, the down-projection input) is split over the
TP ranks, so each rank's local amax is not the row's: the TP layer installs a reduction (a MAX
all_reduce over its TP group, as the engines do) for the duration of its expert compute, and every
quantization op takes its bound through `row_amax`. Outside that, a row's bound is its local amax.
A fused device op (torch_npu's quant kernels) only ever sees its slice: `rows_local` models that in
the CPU emulation, and `is_split` tells the NPU backend to compose those ops around `row_amax`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

__all__ = ["is_split", "row_amax", "rows_local", "rows_split"]

_REDUCE: ContextVar[Callable[[torch.Tensor], torch.Tensor] | None] = ContextVar(
    "row_amax_reduce", default=None
)


def row_amax(y: torch.Tensor) -> torch.Tensor:
    """max |y| over the last dim (0 for an empty row), over the whole row inside `rows_split`."""
    amax = y.abs().amax(dim=-1) if y.shape[-1] else y.new_zeros(y.shape[:-1])
    reduce = _REDUCE.get()
    return amax if reduce is None else reduce(amax)


@contextmanager
def rows_split(reduce: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Inside: `row_amax` returns reduce(local amax), the amax over the row's every slice."""
    token = _REDUCE.set(reduce)
    try:
        yield
    finally:
        _REDUCE.reset(token)


def is_split() -> bool:
    """True inside `rows_split`: a row's bound must come from `row_amax`, not from a fused op."""
    return _REDUCE.get() is not None


@contextmanager
def rows_local() -> Iterator[None]:
    """Inside: `row_amax` is the local amax, as a fused kernel computes it on its own slice."""
    token = _REDUCE.set(None)
    try:
        yield
    finally:
        _REDUCE.reset(token)
