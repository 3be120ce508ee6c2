"""SmolLM2-135M with its MLPs as 8-expert MoE layers, quantized per scheme: held-out perplexity.

    HF_HUB_OFFLINE=1 python benchmarks/smollm2_accuracy.py --out results/smollm2_accuracy.json

Every quantized model runs quantfw's generic MoELayer on the exact torch backend (the NPU kernel
semantics). The "float" baseline is SmolLM2 dequantized from GGUF Q4_1 (spec sections 9 and 11).
Learned alphas come from the float model's own activations on the calibration split.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantfw.api import components  # noqa: E402
from quantfw.calibrate.experts import ExpertCapture, alpha_metadata, learn_expert_alphas  # noqa: E402
from quantfw.calibrate.guard import guard_alphas, split_guard_windows  # noqa: E402
from quantfw.config.compose import compose  # noqa: E402
from quantfw.eval.perplexity import paired_delta, perplexity_details  # noqa: E402
from quantfw.eval.text import spread_windows, token_splits  # noqa: E402
from quantfw.integrations.smollm2 import load_smollm2, mlp_to_moe  # noqa: E402
from quantfw.layout.spec import Dims  # noqa: E402
from quantfw.moe.layer import MoELayer  # noqa: E402
from quantfw.moe.reference import FloatMoE  # noqa: E402
from quantfw.quantize.experts import quantize_experts  # noqa: E402

E = 8
# (label, recipe overrides, learned alpha?)
CONFIGS = {
    "w8a8": (["scheme=w8a8", "format=msmodelslim"], False),
    "w4a8_g64": (["scheme=w4a8", "scheme.group_size=64", "format=msmodelslim"], False),
    "w4a8_per_channel": (["scheme=w4a8", "scheme.group_size=0", "format=msmodelslim"], False),
    "w4a8_clip_alpha1": (["scheme=w4a8_clip", "format=compressed_tensors"], False),
    "w4a8_clip_learned": (["scheme=w4a8_clip", "format=compressed_tensors"], True),
}
TOPK_CONFIGS = ("w4a8_clip_alpha1", "w4a8_clip_learned")


def quant_factory(overrides, alphas=None):
    cfg = compose("default", overrides)
    scheme, fmt, backend = components(cfg)

    def factory(w13, w2, layer):
        dims = Dims(E=w13.shape[0], H=w13.shape[2], I=w13.shape[1] // 2)
        alpha = None if alphas is None else alphas[layer]
        if alpha is None and scheme.flags.get("activation_use_clip"):
            alpha = torch.ones(dims.E)  # the explicit "alpha = 1" configuration
        tensors = quantize_experts(scheme, fmt, w13, w2, alpha=alpha)
        return MoELayer(scheme, fmt, backend, dims).load(tensors, source=f"SmolLM2 layer {layer}")

    return factory, scheme


def calibrate(base, top_k, calib_ids, scheme, args):
    """Float MoE model on calibration windows -> alphas {layer: [E]}, report, metadata."""
    model = copy.deepcopy(base)
    weights = {}

    def factory(w13, w2, layer):
        weights[layer] = (w13, w2)
        return FloatMoE(w13, w2)

    report = mlp_to_moe(model, num_experts=E, top_k=top_k, factory=factory)
    experts = {
        en.layer_index: (model.get_submodule(en.path).experts, weights[en.layer_index][0])
        for en in report.entries
    }
    capture = ExpertCapture(experts, max_rows=args.max_rows or None)
    windows = spread_windows(calib_ids, args.calib_tokens + args.guard_tokens, args.seq_len)
    data, guard = split_guard_windows(windows, args.guard_tokens // args.seq_len)
    n = data.shape[0]
    with torch.no_grad(), capture.attached():
        for i in range(0, n, 4):
            model(input_ids=data[i : i + 4], use_cache=False)
    alphas, rows = {}, []
    for layer, cap in capture.layers.items():
        w13, w2 = weights[layer]
        alphas[layer], r = learn_expert_alphas(
            scheme, w13, w2, cap, min_tokens=args.min_tokens, policy="ones"
        )
        rows += r
    source = (
        f"pydoc_data.topics calibration split, {n} windows of {args.seq_len} tokens spread evenly over "
        f"its first {len(calib_ids)} tokens"
    )
    meta = alpha_metadata(rows, source, args.min_tokens, "ones")
    if guard.shape[0]:
        _, fmt, backend = components(compose("default", CONFIGS["w4a8_clip_learned"][0]))
        alphas, meta["guard"] = guard_alphas(model, report, weights, alphas, guard, scheme, fmt, backend)
        kept = meta["guard"]["kept_layers"]
        print(
            f"  guard kept {len(kept)} of {len(meta['guard']['layers'])} clipped layers: {kept}", flush=True
        )
    return alphas, rows, meta


def run_config(base, top_k, label, overrides, alphas, heldout, args):
    model = copy.deepcopy(base)
    if overrides is None:
        mlp_to_moe(model, num_experts=E, top_k=top_k)
    else:
        factory, _ = quant_factory(overrides, alphas)
        mlp_to_moe(model, num_experts=E, top_k=top_k, factory=factory)
    r = perplexity_details(model, heldout, seq_len=args.seq_len, max_tokens=args.max_tokens)
    print(f"  top_k={top_k or E} {label:<20} ppl {r.perplexity:8.3f}  ({r.seconds:.0f}s)", flush=True)
    return r


def summary(label, r, runs):
    """JSON row of one run: perplexity and its paired change vs float (and vs alpha = 1 for learned)."""
    if label == "alphas":
        return r
    row = {"perplexity": r.perplexity, "tokens": r.predicted_tokens, "seconds": r.seconds}
    row["window_nll"] = list(r.window_nll)
    if label != "float":
        row["vs_float"] = paired_delta(runs["float"], r)
    if label == "w4a8_clip_learned" and "w4a8_clip_alpha1" in runs:
        row["vs_alpha1"] = paired_delta(runs["w4a8_clip_alpha1"], r)
    return row


def stats(alphas):
    a = torch.cat([v for v in alphas.values()])
    return {
        "min": a.min().item(),
        "mean": a.mean().item(),
        "max": a.max().item(),
        "below_one": int((a < 1).sum()),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON results path")
    p.add_argument("--max-tokens", type=int, default=16384, help="held-out tokens for perplexity")
    p.add_argument("--calib-tokens", type=int, default=2048)
    p.add_argument(
        "--guard-tokens",
        type=int,
        default=2048,
        help="calibration tokens for the model-level guard (0: none)",
    )
    p.add_argument("--max-rows", type=int, default=1024, help="calibration rows kept per expert (0: all)")
    p.add_argument("--min-tokens", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--topk", type=int, default=6, help="active experts of the second configuration")
    p.add_argument(
        "--eval-split",
        default="heldout",
        choices=["heldout", "validation"],
        help="heldout = the second half of the text; validation = calibration-half tokens after the ones "
        "calibration uses (for design choices, so the held-out numbers stay untouched)",
    )
    p.add_argument("--only", nargs="*", default=None, help="subset of configs (labels) to run")
    p.add_argument(
        "--routing",
        nargs="*",
        default=["all", "topk"],
        choices=["all", "topk"],
        help="routing configurations: all = every token to all experts, topk = the --topk router",
    )
    args = p.parse_args(argv)
    torch.manual_seed(0)
    base, tokenizer = load_smollm2()
    splits = token_splits(tokenizer)
    # Calibration windows come from the first 3/4 of the calibration half; its last 1/4 is a
    # validation text for design choices, so the held-out half is only read for the final table.
    cut = len(splits.calibration) * 3 // 4
    calibration = splits.calibration[:cut]
    evaluate = splits.heldout if args.eval_split == "heldout" else splits.calibration[cut:]
    results = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized)",
        "experts": E,
        "args": vars(args),
        "runs": {},
    }
    for top_k in [None] * ("all" in args.routing) + [args.topk] * ("topk" in args.routing):
        key = f"top{top_k or E}"
        runs, labels = {}, CONFIGS if top_k is None else {k: CONFIGS[k] for k in TOPK_CONFIGS}
        if args.only is not None:
            labels = {k: v for k, v in labels.items() if k in args.only}
        runs["float"] = run_config(base, top_k, "float", None, None, evaluate, args)
        for label, (overrides, learned) in labels.items():
            alphas = None
            if learned:
                t = time.perf_counter()
                _, scheme = quant_factory(overrides)
                alphas, rows, meta = calibrate(base, top_k, calibration, scheme, args)
                meta["seconds"] = time.perf_counter() - t
                runs["alphas"] = {"stats": stats(alphas), "metadata": meta, "per_expert": rows}
                print(f"  alphas {stats(alphas)} ({meta['seconds']:.0f}s)", flush=True)
            runs[label] = run_config(base, top_k, label, overrides, alphas, evaluate, args)
        results["runs"][key] = {label: summary(label, r, runs) for label, r in runs.items()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(table(results))


def table(results):
    lines = [f"{'config':<8} {'scheme':<20} {'ppl':>8} {'vs float (95% CI)':>28} {'vs alpha=1 (95% CI)':>28}"]

    def ci(d):
        return f"{d['delta']:+.2%} [{d['ci95'][0]:+.2%}, {d['ci95'][1]:+.2%}]" if d and d["ci95"] else ""

    for key, runs in results["runs"].items():
        for label, r in runs.items():
            if label == "alphas":
                s = r["stats"]
                lines.append(
                    f"{key:<8} {'alphas':<20} min {s['min']:.3f} mean {s['mean']:.3f} max {s['max']:.3f}"
                    f" below 1: {s['below_one']}"
                )
                continue
            lines.append(
                f"{key:<8} {label:<20} {r['perplexity']:8.3f} {ci(r.get('vs_float')):>28} {ci(r.get('vs_alpha1')):>28}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
