"""Argument validation shared by the reference ops.

Every failure raises `LayoutError` naming the op, the argument, what was expected and what was found,
so a wrong layout is caught at the op boundary instead of surfacing as a broadcasting error deep inside.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from quantfw.errors import LayoutError

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fail(op: str, arg: str, expected: str, found: object) -> LayoutError:
    """Build the error (callers `raise fail(...)` so tracebacks point at the check)."""
    return LayoutError(f"{op}: argument '{arg}' expected {expected}, found {found}")


def _dtype_name(dtypes: Sequence[torch.dtype]) -> str:
    return " or ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensor(
    op: str,
    arg: str,
    t: object,
    dtypes: Sequence[torch.dtype] | None = None,
    shape: Sequence[int | None] | None = None,
    ndim: int | None = None,
    min_ndim: int | None = None,
) -> torch.Tensor:
    """Check type, dtype and shape (None in `shape` = any size) of one argument; returns it."""
    if not isinstance(t, torch.Tensor):
        raise fail(op, arg, "a torch.Tensor", type(t).__name__)
    if dtypes is not None and t.dtype not in dtypes:
        raise fail(op, arg, f"dtype {_dtype_name(dtypes)}", str(t.dtype).removeprefix("torch."))
    if shape is not None:
        ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape))
        if not ok:
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise fail(op, arg, f"shape {want}", list(t.shape))
    if ndim is not None and t.dim() != ndim:
        raise fail(op, arg, f"{ndim} dims", f"{t.dim()} dims {list(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise fail(op, arg, f"at least {min_ndim} dims", f"{t.dim()} dims {list(t.shape)}")
    return t


def check_group_list(op: str, arg: str, counts: object, groups: int, rows: int) -> torch.Tensor:
    """Per-expert counts: int64 [G], non-negative, sum <= rows (rows past the sum are ignored)."""
    counts = check_tensor(op, arg, counts, (torch.int64,), shape=(groups,))
    if counts.numel() and bool((counts < 0).any()):
        raise fail(op, arg, "non-negative per-expert counts", counts.tolist())
    total = int(counts.sum())
    if total > rows:
        raise fail(op, arg, f"sum(counts) <= {rows} rows", f"sum {total}")
    return counts


def row_groups(counts: torch.Tensor) -> list[tuple[int, int, int]]:
    """(expert, start, end) for each expert with at least one row, in order."""
    out, start = [], 0
    for e, c in enumerate(counts.tolist()):
        if c:
            out.append((e, start, start + c))
        start += c
    return out
