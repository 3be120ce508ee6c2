"""Progress bars (tqdm) for long steps: on only when stderr is a terminal and `progress` is true,
so logs, pipes and tests stay free of bar redraws."""

from __future__ import annotations

import sys
from collections.abc import Iterable


def enabled(progress: bool = True) -> bool:
    return bool(progress) and sys.stderr.isatty()


def bar(iterable: Iterable | None = None, *, progress: bool = True, **kwargs):
    """tqdm over `iterable` (or a manual bar with `total=`), disabled when progress is off."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not enabled(progress), file=sys.stderr, leave=False, **kwargs)


def announce(command: str, message: str) -> None:
    """One line before a step that takes long or needs much memory: its size."""
    print(f"quantfw {command}: {message}", file=sys.stderr, flush=True)


def quiet_transformers(progress: bool = True) -> None:
    """transformers draws its own load/save bars even into pipes: off unless ours are on."""
    if not enabled(progress):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
