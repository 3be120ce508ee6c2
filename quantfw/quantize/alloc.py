"""Keep freed memory in the process during a conversion.

A conversion allocates and frees the same few tensor sizes (tens of MB) thousands of times.
glibc serves blocks that big with a fresh mmap each time and unmaps them on free, so every
tensor is page-faulted and zeroed by the kernel again: a third of a conversion's CPU time was
system time. Raising the mmap and trim thresholds lets freed blocks be reused; the peak resident
memory is unchanged (it is the tensors in flight either way).
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 1 << 29  # blocks up to 512 MiB (a dense FP8 projection) come from the heap
_done = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; False where there is no glibc."""
    global _done
    if _done:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
        ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_THRESHOLD) == 1
    except (OSError, AttributeError):  # musl, macOS: no mallopt
        return False
    _done = ok
    return ok
