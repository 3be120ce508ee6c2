"""Time and peak memory of each weight observer on one DeepSeek-V3-sized expert projection.

gate/up: W [2048, 7168] (K = 7168: a 7168^2 fp32 Hessian is 205 MB); down: W [7168, 2048].
Random weights and random calibration inputs X [M, K]. Each (method, projection) runs in a fresh
subprocess so its peak RSS (ru_maxrss) is its own; "peak extra" is that peak minus the RSS after
the inputs were built. One torch thread by default (--threads) so numbers do not depend on
OpenMP contention with other processes.

    python benchmarks/weight_observer_cost.py --out observer_cost.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"gate_proj [2048, 7168]": (2048, 7168), "down_proj [7168, 2048]": (7168, 2048)}
METHODS = ["minmax", "mse", "ssz", "learned_clip", "gptq"]
GRIDS = {
    "int4 per-channel": {"weight_bits": 4, "group_size": 0},
    "int4 g256": {"weight_bits": 4, "group_size": 256},
    "int8": {"weight_bits": 8, "group_size": 0},
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(method: str, shape: str, grid: str, tokens: int, threads: int) -> None:
    import torch

    from quantfw.quantize import observers

    if threads:
        torch.set_num_threads(threads)
    n, k = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(tokens, k, generator=g)
    x_eval = torch.randn(512, k, generator=g)  # held out: GPTQ / learned_clip fit x
    before = _rss_mb()
    flags = {**GRIDS[grid], "weight_observer": method}
    obs = observers.get_observer(method)
    start = time.perf_counter()
    qw = obs.fn(w, flags, x if obs.needs_data else None)
    seconds = time.perf_counter() - start
    err = ((x_eval @ (w - qw.dequantize()).T).norm() / (x_eval @ w.T).norm()).item()
    print(json.dumps({"seconds": seconds, "peak_extra_mb": _rss_mb() - before, "rel_out_err": err}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1, help="torch threads; 0 = torch's default")
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--grids", nargs="+", default=["int4 per-channel", "int4 g256"])
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child, args.tokens, args.threads)
        return
    rows = []
    for grid in args.grids:
        for shape in SHAPES:
            for method in args.methods:
                cmd = [sys.executable, __file__, "--child", method, shape, grid]
                cmd += ["--tokens", str(args.tokens), "--threads", str(args.threads)]
                res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                rows.append({"grid": grid, "shape": shape, "method": method, **res})
                print(
                    f"{grid:16s} {shape:22s} {method:12s} {res['seconds']:8.1f}s "
                    f"{res['peak_extra_mb']:8.0f} MB  rel out err {res['rel_out_err']:.4f}",
                    flush=True,
                )
    if args.out:
        args.out.write_text(json.dumps({"tokens": args.tokens, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
