"""Helpers for the untrusted-recipe tests: write a hostile recipe folder, run the real CLI on it,
and prove that nothing ran and nothing was written."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_folder(root: Path, files: dict[str, str]) -> Path:
    for name, body in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(body).lstrip())
    return root


def recipe(hydra_yaml: str = "", extra_defaults: str = "", body: str = "") -> str:
    """A recipe on the package base whose `hydra:` node (or body) is the hostile part."""
    text = "defaults:\n  - quantfw\n" + extra_defaults + "  - _self_\n"
    if hydra_yaml:
        text += "hydra:\n" + textwrap.indent(textwrap.dedent(hydra_yaml), "  ")
    return text + textwrap.dedent(body)


def run_cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "quantfw", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its content (None for folders): a before/after comparison
    shows any file created, truncated or rewritten."""
    out: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            out[str(p.relative_to(root))] = b"<special>"
        else:
            out[str(p.relative_to(root))] = p.read_bytes() if p.is_file() else None
    return out


def assert_one_line_exit_2(r: subprocess.CompletedProcess, *needles: str) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("quantfw "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]
