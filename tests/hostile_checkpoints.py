"""Helpers of the untrusted-checkpoint tests: a tiny valid checkpoint (no transformers needed),
quantized with the project's quantizer, then corrupted file by file."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from checkpoint_helpers import ROOT, quantize
from safetensors.torch import load_file, save_file

H, I, E, LAYERS = 512, 256, 8, 2


def float_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A qwen3_moe-shaped float checkpoint: LAYERS MoE layers of E experts, plus router gates."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    ts = {}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}.mlp"
        ts[f"{p}.gate.weight"] = torch.randn(E, H, generator=g) * 0.02
        for e in range(E):
            ts[f"{p}.experts.{e}.gate_proj.weight"] = torch.randn(I, H, generator=g) * 0.02
            ts[f"{p}.experts.{e}.up_proj.weight"] = torch.randn(I, H, generator=g) * 0.02
            ts[f"{p}.experts.{e}.down_proj.weight"] = torch.randn(H, I, generator=g) * 0.02
    save_file(ts, str(folder / "model.safetensors"))
    config = {
        "model_type": "qwen3_moe",
        "hidden_size": H,
        "moe_intermediate_size": I,
        "num_experts": E,
        "num_experts_per_tok": 2,
        "num_hidden_layers": LAYERS,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text("{}")
    return folder


def quantized(root: Path, scheme: str) -> Path:
    """A valid quantized checkpoint (schemes of checkpoint_helpers.SCHEMES) under root."""
    src = root / "float"
    if not src.exists():
        float_checkpoint(src)
    return quantize(src, root / scheme, scheme)


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, fn: Callable[[dict], object]) -> None:
    """Apply fn to the parsed JSON file; if fn returns something other than None, write that."""
    data = json.loads(path.read_text())
    out = fn(data)
    path.write_text(json.dumps(data if out is None else out))


def index_of(folder: Path) -> Path:
    return next(folder.glob("*.safetensors.index.json"))


def shard_of(folder: Path) -> Path:
    return next(p for p in sorted(folder.glob("*.safetensors")))


def edit_tensors(shard: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Rewrite one shard after fn edits its tensors in place (dtypes such as U64 kept)."""
    ts = load_file(str(shard))
    fn(ts)
    save_file(ts, str(shard), metadata={"format": "pt"})


def set_alpha(folder: Path, layer: int, expert: int, value: float) -> str:
    key = f"model.layers.{layer}.mlp.experts.{expert}.down_proj.alpha"
    edit_tensors(shard_of(folder), lambda ts: ts.__setitem__(key, torch.tensor(value, dtype=ts[key].dtype)))
    return key


def run(*args: str, timeout: float = 120, limit_bytes: int | None = None) -> subprocess.CompletedProcess:
    """`python -m quantfw ARGS` in a subprocess, optionally under an address-space limit."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "quantfw", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limit if limit_bytes else None,
    )


def python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """A snippet in a fresh interpreter (for reads that might block: the timeout proves they do not)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def refused(r: subprocess.CompletedProcess) -> str:
    """The one stderr line of a CLI run that exited 2 without a traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    return msg


def split(folder: Path, names: tuple[str, str] = ("part-1.safetensors", "part-2.safetensors")) -> dict:
    """Rewrite a one-shard checkpoint as two shards (sorted keys halved) and its index; the new
    weight_map is returned (dtypes kept, other files untouched)."""
    shard, index = shard_of(folder), index_of(folder)
    ts = load_file(str(shard))
    shard.unlink()
    keys = sorted(ts)
    halves = (keys[: len(keys) // 2], keys[len(keys) // 2 :])
    weight_map = {}
    for name, part in zip(names, halves):
        save_file({k: ts[k] for k in part}, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map
