"""Where the package's own config lives, and the Hydra search path over it and user folders."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "conf"
RECIPES_DIR = ROOT / "recipes"


def searchpath_override(extra: Sequence[str] = ()) -> str:
    """The `hydra.searchpath` override that makes conf/, the shipped recipes (so user recipes can
    build on them) and user folders visible."""
    paths = [f"file://{CONF_DIR}", f"file://{RECIPES_DIR}"] + [
        p if "://" in p else f"file://{Path(p).resolve()}" for p in extra
    ]
    return "hydra.searchpath=[" + ",".join(paths) + "]"
