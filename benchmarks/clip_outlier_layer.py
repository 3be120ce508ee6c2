"""Where the W4A8-clip alpha matters: one MoE layer with massive down-proj input channels.

    python benchmarks/clip_outlier_layer.py --out results/clip_outlier_layer.json

DeepSeek-like layer (scaled down: H = 1024, I = 512, E = 8, top-2): Student-t expert weights,
hidden states with outlier channels, and a few intermediate channels per expert whose up-proj rows
are scaled and their w2 columns shrunk by the same factor (quantfw.eval.synthetic.
inject_down_proj_outliers: the float layer is unchanged, only the w2 input's range grows), so
SwiGLU output rows carry a few values far above the rest. --uncompensated keeps w2 as drawn. Alphas are learned exactly as `quantfw quantize
calibration.source=model` learns them (ExpertCapture on the float layer + learn_expert_alphas) on
calibration tokens, and every variant is measured on disjoint held-out tokens and routing: layer
output rel_l2 / cosine / max_abs vs float for W8A8, W4A8-clip alpha = 1, W4A8-clip learned alphas.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantfw import ops  # noqa: E402
from quantfw.api import components  # noqa: E402
from quantfw.calibrate.experts import ExpertCapture, learn_expert_alphas  # noqa: E402
from quantfw.config.compose import compose  # noqa: E402
from quantfw.eval import synthetic  # noqa: E402
from quantfw.eval.metrics import compare  # noqa: E402
from quantfw.layout.spec import Dims  # noqa: E402
from quantfw.moe.layer import MoELayer  # noqa: E402
from quantfw.moe.reference import FloatMoE  # noqa: E402
from quantfw.quantize.experts import quantize_experts  # noqa: E402

VARIANTS = {
    "w8a8": ["scheme=w8a8", "format=msmodelslim"],
    "w4a8_clip_alpha1": ["scheme=w4a8_clip", "format=compressed_tensors"],
    "w4a8_clip_learned": ["scheme=w4a8_clip", "format=compressed_tensors"],
}


def w2_input_error(w13, w2, x, ids, alpha) -> float:
    """rel_l2 of sum_e Q_alpha(y_e) @ w2[e].T vs y_e @ w2[e].T with FLOAT w2: the error the clip
    controls (int8 w2 input), without the int4 weight error that dominates the layer error."""
    num = den = 0.0
    for e in range(w13.shape[0]):
        tok = (ids == e).any(-1)
        if not tok.any():
            continue
        h = x[tok] @ w13[e].T
        q, s = ops.swiglu_clip_quant(h, torch.tensor([h.shape[0]]), alpha[e : e + 1].float())
        ref = ops.swiglu(h) @ w2[e].T
        num += ((q.float() * s[:, None]) @ w2[e].T - ref).pow(2).sum().item()
        den += ref.pow(2).sum().item()
    return (num / den) ** 0.5


def run(scale: float, args) -> dict:
    dims = Dims(E=args.experts, H=args.hidden, I=args.inter)
    w13, w2 = synthetic.expert_weights(dims.E, dims.H, dims.I, seed=args.seed, df=args.weight_df)
    if scale != 1:
        w13, w2 = synthetic.inject_down_proj_outliers(
            w13, w2, args.channels, scale, seed=args.seed, compensate=not args.uncompensated
        )
    xs = dict(channel_seed=args.seed, outlier_scale=args.input_outlier_scale)
    x_cal = synthetic.hidden_states(args.tokens, dims.H, seed=args.seed + 1, **xs)
    x = synthetic.hidden_states(args.tokens, dims.H, seed=args.seed + 4, **xs)
    w_cal, ids_cal = synthetic.random_routing(args.tokens, dims.E, args.top_k, seed=args.seed + 2, skew=2.0)
    w, ids = synthetic.random_routing(args.tokens, dims.E, args.top_k, seed=args.seed + 3, skew=2.0)
    float_moe = FloatMoE(w13, w2)
    ref = float_moe(x, w, ids)
    out = {"outlier_scale": scale}
    for label, overrides in VARIANTS.items():
        scheme, fmt, backend = components(compose("default", overrides))
        alpha, info = None, {}
        if scheme.flags.get("activation_use_clip"):
            alpha = torch.ones(dims.E)
        if label.endswith("learned"):
            t0 = time.perf_counter()
            cap = ExpertCapture({0: (float_moe, w13)}, max_rows=args.max_rows)
            with cap.attached():
                float_moe(x_cal, w_cal, ids_cal)
            alpha, rows = learn_expert_alphas(scheme, w13, w2, cap.layers[0], min_tokens=16, policy="ones")
            info = {
                "alphas": [round(float(a), 4) for a in alpha],
                "calibration_error_at_one": [r.get("error_at_one") for r in rows],
                "calibration_error": [r.get("error") for r in rows],
                "calibration_seconds": time.perf_counter() - t0,
            }
        layer = MoELayer(scheme, fmt, backend, dims).load(quantize_experts(scheme, fmt, w13, w2, alpha=alpha))
        out[label] = {**compare(layer(x, w, ids), ref), **info}
        if alpha is not None:
            out[label]["w2_input_error"] = w2_input_error(w13, w2, x, ids, alpha)
    a1, lr, w8 = (out[k]["rel_l2"] for k in ("w4a8_clip_alpha1", "w4a8_clip_learned", "w8a8"))
    out["gap_closed"] = (a1 - lr) / (a1 - w8) if a1 != w8 else 0.0
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON results path")
    p.add_argument("--scales", type=float, nargs="*", default=[1.0, 8.0, 32.0, 64.0])
    p.add_argument("--channels", type=int, default=4, help="massive intermediate channels per expert")
    p.add_argument("--tokens", type=int, default=2048, help="calibration tokens = held-out tokens")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=512)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--max-rows", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--uncompensated", action="store_true", help="do not shrink the massive channels' w2 columns"
    )
    p.add_argument("--weight-df", type=float, default=30.0, help="Student-t dof of the expert weights")
    p.add_argument("--input-outlier-scale", type=float, default=1.0, help="hidden-state outlier channels")
    args = p.parse_args(argv)
    results = {"args": vars(args), "runs": []}
    print(
        f"{'scale':>6} {'W8A8':>8} {'clip a=1':>9} {'learned':>8} {'gap closed':>11} {'mean alpha':>11}"
        f" {'w2-in err a=1':>14} {'learned':>8}"
    )
    for scale in args.scales:
        r = run(scale, args)
        results["runs"].append(r)
        a = r["w4a8_clip_learned"]["alphas"]
        print(
            f"{scale:>6g} {r['w8a8']['rel_l2']:>8.4f} {r['w4a8_clip_alpha1']['rel_l2']:>9.4f} "
            f"{r['w4a8_clip_learned']['rel_l2']:>8.4f} {r['gap_closed']:>10.1%} {sum(a) / len(a):>11.3f}"
            f" {r['w4a8_clip_alpha1']['w2_input_error']:>14.4f} {r['w4a8_clip_learned']['w2_input_error']:>8.4f}",
            flush=True,
        )
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
