"""Quantize throughput (GB/s of float input) and peak RSS for synthetic 1/2/4 GB checkpoints.

Not a test. Each size is generated into a temp dir as bf16 Qwen3-30B-A3B-shaped routed experts
(H=2048, I=768) in ~0.5 GB shards, then quantized in a fresh child process whose peak RSS
(VmHWM) is read at exit, so sizes do not share memory.

    python benchmarks/quantize_throughput.py [--sizes 1 2 4] [--recipe-overrides scheme=w4a8 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
H, I, SHARD_GB = 2048, 768, 0.5


def make_checkpoint(folder: Path, gb: float) -> int:
    """bf16 experts, 3 projections of I*H each; layers of 32 experts, one shard per ~SHARD_GB."""
    per_expert = 3 * I * H * 2
    experts = int(gb * 1e9 // per_expert)
    per_shard = int(SHARD_GB * 1e9 // per_expert)
    n = -(-experts // per_shard)
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for s in range(n):
        name = f"model-{s + 1:05d}-of-{n:05d}.safetensors"
        ts = {}
        for e in range(s * per_shard, min(experts, (s + 1) * per_shard)):
            layer, ex = divmod(e, 32)
            p = f"model.layers.{layer}.mlp.experts.{ex}"
            ts[f"{p}.gate_proj.weight"] = (torch.randn(I, H, generator=g) * 0.02).bfloat16()
            ts[f"{p}.up_proj.weight"] = (torch.randn(I, H, generator=g) * 0.02).bfloat16()
            ts[f"{p}.down_proj.weight"] = (torch.randn(H, I, generator=g) * 0.02).bfloat16()
        save_file(ts, str(folder / name))
        total += (folder / name).stat().st_size
        weight_map.update(dict.fromkeys(ts, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = {"model_type": "qwen3_moe", "hidden_size": H, "moe_intermediate_size": I, "num_experts": 32}
    (folder / "config.json").write_text(json.dumps(config))
    return total


CHILD = """
import sys, time, json
sys.path.insert(0, {root!r})
from quantfw.api import components
from quantfw.config.compose import compose
from quantfw.quantize.checkpoint import quantize_checkpoint
s, f, _ = components(compose("default", {overrides!r}))
t = time.perf_counter()
quantize_checkpoint({src!r}, {dst!r}, s, f, progress=False)
dt = time.perf_counter() - t
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({{"seconds": dt, "peak_rss_mb": hwm / 1024}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=float, nargs="+", default=[1, 2, 4])
    ap.add_argument(
        "--recipe-overrides", nargs="*", default=["scheme=w4a8_clip", "format=compressed_tensors"]
    )
    ap.add_argument("--tmp", default=None, help="where to generate (default: system temp)")
    args = ap.parse_args()
    rows = []
    for gb in args.sizes:
        with tempfile.TemporaryDirectory(dir=args.tmp) as d:
            src, dst = Path(d) / "float", Path(d) / "quant"
            src.mkdir()
            size = make_checkpoint(src, gb)
            code = CHILD.format(root=str(ROOT), overrides=args.recipe_overrides, src=str(src), dst=str(dst))
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
            if out.returncode:
                sys.exit(out.stderr)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"input_gb": size / 1e9, "gb_per_s": size / 1e9 / r["seconds"], **r})
            print(json.dumps(rows[-1]), flush=True)
    rss = [r["peak_rss_mb"] for r in rows]
    print(
        f"overrides {args.recipe_overrides}; torch threads {torch.get_num_threads()}; at {time.strftime('%Y-%m-%d')}"
    )
    print(
        f"peak RSS spread: {(max(rss) - min(rss)) / min(rss) * 100:.1f}% (max/min {max(rss):.0f}/{min(rss):.0f} MB)"
    )


if __name__ == "__main__":
    main()
