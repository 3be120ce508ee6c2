"""Quantize throughput (GB/s of float input) and peak RSS for synthetic 1/2/4 GB checkpoints.

Not a test. Each size is generated into a temp dir as bf16 Qwen3-30B-A3B-shaped routed experts
(H=2048, I=768) in ~0.5 GB shards, then quantized in a fresh child process whose peak RSS
(VmHWM) is read at exit, so sizes do not share memory.

    python benchmarks/quantize_throughput.py [--sizes 1 2 4] [--recipe-overrides scheme=w4a8 ...]
    python benchmarks/quantize_throughput.py --stages      # per-stage limits on one 0.5 GB shard

--stages times each stage of the converter alone, single-threaded, best of 3, in GB/s of float
input: read (safetensors -> tensors), quantize (quantize_weight), encode (the format's encoders:
packing, scales, bias), write (save_file), hash (sha256 of the written shard).
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


def stages(overrides: list[str], tmp: str | None) -> None:
    sys.path.insert(0, str(ROOT))
    import hashlib

    from quantfw.api import components
    from quantfw.config.compose import compose
    from quantfw.formats.encoders import encode_role
    from quantfw.io.experts import MoEModel, parse_expert_key, projection_specs
    from quantfw.io.reader import CheckpointReader
    from quantfw.quantize.weights import quantize_weight

    torch.set_num_threads(1)
    scheme, fmt, _ = components(compose("default", overrides))
    with tempfile.TemporaryDirectory(dir=tmp) as d:
        src = Path(d)
        make_checkpoint(src, SHARD_GB)
        reader = CheckpointReader(src)
        shard = reader.shards[0]
        gb = (src / shard).stat().st_size / 1e9
        model = MoEModel.from_config(reader.config(), "config.json")
        specs = projection_specs(fmt, scheme, model.dims())

        def best(fn):
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                r = fn()
                times.append(time.perf_counter() - t0)
            return min(times), r

        t_read, tensors = best(lambda: dict(reader.iter_shard(shard)))
        projs = {k: parse_expert_key(k, model)[3] for k in tensors}
        t_q, qws = best(lambda: {k: quantize_weight(t, scheme.flags) for k, t in tensors.items()})
        t_e, enc = best(
            lambda: {
                f"{k}.{n}": v
                for k, qw in qws.items()
                for n, v in encode_role(specs[projs[k]], qw, None, k).items()
            }
        )
        out = src / "out.safetensors"
        t_w, _ = best(lambda: save_file(enc, str(out)))
        out_gb = out.stat().st_size / 1e9
        t_h, _ = best(lambda: hashlib.sha256(out.read_bytes()).hexdigest())
    rows = {"read": t_read, "quantize": t_q, "encode": t_e, "write": t_w, "hash": t_h}
    total = sum(rows.values())
    print(
        f"overrides {overrides}; shard {gb:.3f} GB in, {out_gb:.3f} GB out; 1 thread; load {os.getloadavg()[0]:.1f}"
    )
    for k, v in rows.items():
        print(f"{k:9s} {v:6.2f} s  {gb / v:6.2f} GB/s of input")
    print(f"{'sum':9s} {total:6.2f} s  {gb / total:6.2f} GB/s of input (one thread, no overlap)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=float, nargs="+", default=[1, 2, 4])
    ap.add_argument(
        "--recipe-overrides", nargs="*", default=["scheme=w4a8_clip", "format=compressed_tensors"]
    )
    ap.add_argument("--tmp", default=None, help="where to generate (default: system temp)")
    ap.add_argument("--stages", action="store_true", help="time each converter stage on one shard")
    args = ap.parse_args()
    if args.stages:
        stages(args.recipe_overrides, args.tmp)
        return
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
            rows.append(
                {
                    "input_gb": size / 1e9,
                    "gb_per_s": size / 1e9 / r["seconds"],
                    **r,
                    "load_avg": os.getloadavg()[0],
                }
            )
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
