"""Where a calibrated layer's time and memory go: seconds per stage and the process's peak RSS.

tracemalloc does not see torch's allocations, so memory is the kernel's own count
(/proc/self/status VmRSS and VmHWM, Linux only; None elsewhere). Stages may run in several
threads (the weight reader works ahead of the compute), so their seconds can add up to more
than the wall time.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

__all__ = ["STAGES", "Stages", "rss_mb"]


def rss_mb() -> tuple[float | None, float | None]:
    """(current, peak) resident set size of this process in MB."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None, None
    found = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) / 1024
    return found.get("VmRSS"), found.get("VmHWM")


class Stages:
    """Seconds per named stage since the last `reset`, safe to add to from several threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - t0
            with self.lock:
                self.seconds[name] = self.seconds.get(name, 0.0) + spent

    def reset(self) -> dict[str, float]:
        with self.lock:
            out, self.seconds = self.seconds, {}
        return out

    @staticmethod
    def line(seconds: dict[str, float]) -> str:
        parts = [f"{name} {s:.1f} s" for name, s in seconds.items()]
        _, peak = rss_mb()
        if peak is not None:
            parts.append(f"peak RSS {peak / 1024:.2f} GB")
        return ", ".join(parts)


STAGES = Stages()  # the calibration's stages (quantfw.calibrate.layerwise prints them per layer)
