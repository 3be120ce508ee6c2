"""Time and peak memory of the W4A8-clip alpha search and the data-driven weight observers at
DeepSeek-V3 MoE dims (H 7168, I 2048, 256 routed experts), per expert and extrapolated per layer.

Alpha search: a synthetic layer of --experts experts with `rows` routed rows each, drawn from a
pool of 2 x rows tokens (so experts share tokens and the layer objective couples them), random
routing weights, w2 drawn at bf16 scale and quantized int4 per channel, SwiGLU rows with a few
outlier channels (so clipping has something to win); search_layer_alphas with its defaults (the
grid learn_expert_alphas uses), per mode. Observers: gptq and learned_clip (int4 per channel) on
w13 [4096, 7168] and w2 [7168, 2048] with `rows` calibration rows. Per layer = per expert x 256.

Each measurement runs in a fresh subprocess (peak RSS = its ru_maxrss minus the RSS once its inputs
are built) with one torch thread. --src runs the same measurements against another checkout's
quantfw (e.g. an export of main) for the "before" numbers:

    git archive main | tar -x -C ../before
    python benchmarks/alpha_observer_cost.py --src ../before --label before --out before.json
    python benchmarks/alpha_observer_cost.py --label after --merge before.json \
        --out docs/bench/alpha_observer_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
H, I, EXPERTS = 7168, 2048, 256
SHAPES = {"w13 [4096, 7168]": (2 * I, H), "w2 [7168, 2048]": (H, I)}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _alpha_layer(experts: int, rows: int, seed: int = 0):
    import torch

    from quantfw import ops
    from quantfw.calibrate.alpha import ExpertRows
    from quantfw.quantize import primitives as P

    g = torch.Generator().manual_seed(seed)
    layer = []
    for _ in range(experts):
        w2 = (torch.randn(H, I, generator=g) * 0.02).bfloat16().float()
        w2_deq = P.dequantize(*P.quantize_per_channel(w2, 4))
        h = torch.randn(rows, 2 * I, generator=g)
        out = torch.randint(0, I, (4,), generator=g)  # outlier SwiGLU channels
        h[:, out] = h[:, out + I] = 6.0 + 4 * torch.rand(rows, 4, generator=g)
        tokens = torch.randperm(2 * rows, generator=g)[:rows].sort().values
        weight = 0.05 + 0.15 * torch.rand(rows, generator=g)
        layer.append(ExpertRows(h, ops.swiglu(h) @ w2.T, w2_deq, tokens, weight))
    return layer


def child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    if spec["kind"] == "alpha":
        from quantfw.calibrate.alpha import search_layer_alphas

        layer = _alpha_layer(spec["experts"], spec["rows"])
        kw = {} if spec["mode"] == "reference" else {"mode": spec["mode"]}
        before = _rss_mb()
        start = time.perf_counter()
        found = search_layer_alphas(layer, **kw)
        seconds = time.perf_counter() - start
        per_expert = seconds / spec["experts"]
        return {
            "seconds_per_expert": per_expert,
            "seconds_per_layer": per_expert * EXPERTS,
            "peak_extra_mb": _rss_mb() - before,
            "alphas": found.alphas.tolist(),
            "layer_error": found.error,
        }
    from quantfw.quantize import observers

    n, k = SHAPES[spec["shape"]]
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=g) * 0.02).bfloat16().float()
    x = torch.randn(spec["rows"], k, generator=g)
    x_eval = torch.randn(512, k, generator=g)
    flags = {"weight_bits": 4, "group_size": 0, "weight_observer": spec["method"]}
    before = _rss_mb()
    start = time.perf_counter()
    qw = observers.get_observer(spec["method"]).fn(w, flags, x)
    seconds = time.perf_counter() - start
    err = lambda xs: ((xs @ (w - qw.dequantize()).T).norm() / (xs @ w.T).norm()).item()  # noqa: E731
    return {
        "seconds": seconds,
        "peak_extra_mb": _rss_mb() - before,
        "rel_out_err_calib": err(x),
        "rel_out_err_heldout": err(x_eval),
    }


def specs(args) -> list[dict]:
    out = []
    for rows in args.rows:
        for mode in args.modes:
            out.append({"kind": "alpha", "mode": mode, "rows": rows, "experts": args.experts})
    for rows in args.observer_rows:
        for shape in SHAPES:
            for method in args.methods:
                out.append({"kind": "observer", "method": method, "shape": shape, "rows": rows})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--src", type=Path, default=ROOT, help="checkout whose quantfw is measured")
    ap.add_argument("--label", default="after")
    ap.add_argument("--merge", type=Path, help="earlier JSON whose rows are kept in --out")
    ap.add_argument("--rows", type=int, nargs="*", default=[16, 128, 512])
    ap.add_argument("--modes", nargs="+", default=["auto", "direct", "gram"])
    ap.add_argument("--experts", type=int, default=4, help="experts measured per alpha layer")
    ap.add_argument("--observer-rows", type=int, nargs="+", default=[16, 128, 512, 2048])
    ap.add_argument("--methods", nargs="+", default=["gptq", "learned_clip"])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, str(args.src.resolve()))
        print(json.dumps(child(json.loads(args.child))))
        return
    rows = json.loads(args.merge.read_text())["rows"] if args.merge else []
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    for spec in specs(args):
        cmd = [sys.executable, __file__, "--src", str(args.src), "--child", json.dumps(spec)]
        res = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd="/")
        rec = {"label": args.label, **spec, **json.loads(res.stdout)}
        rows.append(rec)
        t = rec.get("seconds_per_expert", rec.get("seconds"))
        name = spec.get("mode") or f"{spec['method']} {spec['shape']}"
        print(
            f"{args.label:7s} {spec['kind']:8s} {name:28s} rows {spec['rows']:5d} {t:9.3f} s "
            f"{rec['peak_extra_mb']:7.0f} MB",
            flush=True,
        )
    if args.out:
        meta = {
            "dims": {"H": H, "I": I, "experts": EXPERTS},
            "threads": 1,
            "note": "one torch thread on a shared 2-core machine (other jobs running): times are indicative",
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
