"""Shared helpers of the checkpoint tests: tiny HF checkpoints, resharding, CLI runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from quantfw.api import components
from quantfw.config.compose import compose
from quantfw.io.reader import CheckpointReader
from quantfw.quantize.checkpoint import quantize_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCHEMES = {
    "w8a8": ["scheme=w8a8", "format=msmodelslim"],
    "w4a8": ["scheme=w4a8", "format=msmodelslim"],  # two-level, group 256
    "w4a8_pc": ["scheme=w4a8", "scheme.group_size=0", "format=msmodelslim"],
    "w4a8_g128": ["scheme=w4a8", "scheme.group_size=128", "format=msmodelslim"],
    "clip": ["scheme=w4a8_clip", "format=compressed_tensors"],
    # the same with the (slower) mse scale search: a conversion that lasts long enough to signal
    "clip_mse": ["scheme=w4a8_clip", "format=compressed_tensors", "scheme.weight_observer=mse"],
}


def quantize(src, dst, scheme: str, **kw) -> Path:
    s, f, _ = components(compose("default", SCHEMES[scheme]))
    return quantize_checkpoint(src, dst, s, f, progress=False, **kw)


def reshard(src: Path, dst: Path, n: int) -> Path:
    """Rewrite a checkpoint as n shards + model.safetensors.index.json (keys split in sorted order)."""
    r = CheckpointReader(src)
    dst.mkdir(parents=True)
    keys = sorted(r.keys())
    per = -(-len(keys) // n)
    weight_map = {}
    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = keys[i * per : (i + 1) * per]
        save_file({k: r.get(k).contiguous() for k in part}, str(dst / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def cli(
    *args: str, env: dict | None = None, prefix: tuple[str, ...] | None = None
) -> subprocess.CompletedProcess:
    cmd = [*(prefix or (sys.executable,)), "-m", "quantfw.cli.main", *args]
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)


def float_experts(reader: CheckpointReader, layer: int):
    from quantfw.io.experts import MoEModel, read_float_experts

    return read_float_experts(reader, MoEModel.from_config(reader.config(), "config.json"), layer)


def files_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    r = CheckpointReader(folder)
    return {k: r.get(k) for k in r.keys()}


def default_sigint() -> None:
    """Popen preexec_fn: the child gets Ctrl-C's default action even when the test run was started
    in the background (a shell's background job ignores SIGINT, and children inherit that)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
