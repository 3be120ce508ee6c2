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
from quantfw.calibrate import sensitivity  # noqa: E402
from quantfw.calibrate.equalize import EqualizeReport, equalize_experts  # noqa: E402
from quantfw.calibrate.experts import ExpertCapture, alpha_metadata, learn_expert_alphas  # noqa: E402
from quantfw.calibrate.guard import guard_alphas, split_guard_windows  # noqa: E402
from quantfw.calibrate.rotate import rotate_model  # noqa: E402
from quantfw.calibrate.smooth import smooth_layer  # noqa: E402
from quantfw.config.compose import compose  # noqa: E402
from quantfw.eval.perplexity import (  # noqa: E402
    PerplexityResult,  # noqa: E402
    paired_delta,
    perplexity_details,
)
from quantfw.eval.text import spread_windows, token_splits  # noqa: E402
from quantfw.integrations.smollm2 import _split_dense, load_smollm2, mlp_to_moe  # noqa: E402
from quantfw.layout.spec import Dims  # noqa: E402
from quantfw.moe.layer import MoELayer  # noqa: E402
from quantfw.moe.reference import FloatMoE  # noqa: E402
from quantfw.quantize.experts import RoutedInputs, quantize_experts  # noqa: E402

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


def calibrate(base, top_k, calib_ids, scheme, args, prepare=None):
    """Float MoE model on calibration windows -> alphas {layer: [E]}, report, metadata.
    prepare(w13, w2, layer) -> (w13, w2): a float-exact expert transform applied first."""
    model = copy.deepcopy(base)
    weights = {}

    def factory(w13, w2, layer):
        if prepare is not None:
            w13, w2 = prepare(w13, w2, layer)
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
    p.add_argument(
        "--variants",
        nargs="*",
        default=None,
        help="transform study instead of the scheme table: per-channel W4A8 variants, each "
        "'observer[+rotate][+smooth][+equalize][+clip|+alphas][+mixed]' (top8 routing; clip: the "
        "W4A8-clip scheme at alpha = 1, alphas: its learned alphas)",
    )
    p.add_argument(
        "--budget", type=float, default=0.1, help="mixed: extra expert bytes vs all-W4A8 (fraction)"
    )
    p.add_argument(
        "--backend-mode", default="exact", choices=["exact", "fast"], help="study: torch backend mode"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--skip-float", action="store_true", help="study: leave the float run to another process")
    p.add_argument(
        "--merge",
        nargs="*",
        default=None,
        help="merge these study JSONs into --out (paired deltas recomputed)",
    )
    args = p.parse_args(argv)
    if args.merge is not None:
        return merge_studies(args.merge, Path(args.out))
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    base, tokenizer = load_smollm2()
    if args.variants is not None:
        return run_study(base, tokenizer, args)
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


PC = ["scheme=w4a8", "scheme.group_size=0", "format=msmodelslim"]
CLIP = ["scheme=w4a8_clip", "format=compressed_tensors"]
W8 = ["scheme=w8a8", "format=msmodelslim"]
TRANSFORMS = ("rotate", "smooth", "equalize", "clip", "alphas", "mixed")


def parse_variant(name):
    """'gptq+rotate+equalize' -> (observer, {transforms})."""
    parts = name.split("+")
    bad = [t for t in parts[1:] if t not in TRANSFORMS]
    if bad:
        raise SystemExit(f"--variants {name}: unknown transform(s) {bad} (known: {', '.join(TRANSFORMS)})")
    return parts[0], set(parts[1:])


def capture_mlp_inputs(model, windows):
    """Float MLP inputs [tokens, H] of every layer on the calibration windows."""
    layers = model.model.layers
    store = {i: [] for i in range(len(layers))}
    hooks = [
        layer.mlp.register_forward_pre_hook(
            lambda _m, a, i=i: store[i].append(a[0].detach().reshape(-1, a[0].shape[-1]).float())
        )
        for i, layer in enumerate(layers)
    ]
    with torch.no_grad():
        for i in range(0, windows.shape[0], 4):
            model(input_ids=windows[i : i + 4], use_cache=False)
    for h in hooks:
        h.remove()
    return {i: torch.cat(v) for i, v in store.items()}


def spread_rows(x, n):
    """At most n rows of x, evenly spread (calibration windows change topic as they go)."""
    if n is None or x.shape[0] <= n:
        return x
    return x[torch.linspace(0, x.shape[0] - 1, n).long()]


def prepare_model(base, tf, flags):
    model = copy.deepcopy(base)
    meta = {}
    if "rotate" in tf:
        rotate_model(model, seed=0)
        meta["rotate"] = "random Hadamard (H_64 x orthogonal 9), seed 0, norms folded"
    return model, meta


def smooth_model(model, x, flags, experts):
    """Smoothing of every layer's MLP input, folded into its post-attention norm."""
    rows = []
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        w13 = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach().float()
        r = smooth_layer(layer, x[i], w13, flags)
        rows.append({"layer": i, **r})
    return rows


def expert_prepare(x, flags, equalize, max_rows):
    """prepare(w13, w2, layer) -> equalized (or unchanged) experts, cached per layer."""
    cache, meta = {}, {}

    def prepare(w13, w2, layer):
        if not equalize:
            return w13, w2
        if layer not in cache:
            rows = spread_rows(x[layer], max_rows)
            rep = EqualizeReport()
            cache[layer] = equalize_experts(w13, w2, lambda e: rows, flags, report=rep)
            meta[layer] = {"ratio": rep.ratio, "before": rep.error_before, "after": rep.error_after}
        return cache[layer]

    return prepare, meta


def sensitivity_plan(model, x, scheme, wide, prepare, experts, budget):
    """Per-layer expert output error of the base and wide scheme on calibration rows -> mixed plan."""
    fmt_base, backend = components(compose("default", PC))[1:]
    fmt_wide = components(compose("default", W8))[1]
    costs = []
    for i, layer in enumerate(model.model.layers):
        w13, w2 = prepare(*_split_dense(layer.mlp, experts), i)
        rows = spread_rows(x[i], 1024)  # top8: every expert sees every row
        dims = Dims(E=experts, H=w13.shape[2], I=w13.shape[1] // 2)
        costs.append(
            sensitivity.measure_layer(
                i, lambda e, a=w13, b=w2, r=rows: (a[e], b[e], r), experts, dims,
                (scheme, fmt_base, backend), (wide, fmt_wide, backend),
            )
        )  # fmt: skip
    base_bytes = sum(c.bytes_base for c in costs)
    plan = sensitivity.plan_fragment(costs, int(budget * base_bytes), "w8a8")
    plan["w8a8_layers"] = plan["wide_layers"]
    print(f"  mixed: {plan['fragment']} (+{plan['extra_bytes']} of {plan['base_bytes']} bytes)", flush=True)
    return plan


def result_of(row):
    nll = tuple(row["window_nll"])
    return PerplexityResult(row["perplexity"], sum(nll) / len(nll), row["tokens"], len(nll), 0.0, nll)


def study_table(runs):
    lines = [f"{'variant':<40} {'ppl':>8} {'vs float (95% CI)':>28}"]
    for name, r in runs.items():
        d = r.get("vs_float")
        ci = f"{d['delta']:+.2%} [{d['ci95'][0]:+.2%}, {d['ci95'][1]:+.2%}]" if d else ""
        lines.append(f"{name:<40} {r['perplexity']:8.3f} {ci:>28}")
    return "\n".join(lines)


def run_variant(base, name, calibration, evaluate, args):
    """One transform-study variant: the prepared float model and its quantized perplexity."""
    observer, tf = parse_variant(name)
    overrides = [*(CLIP if tf & {"alphas", "clip"} else PC), f"scheme.weight_observer={observer}"]
    overrides += [f"backend.mode={args.backend_mode}"]
    cfg = compose("default", overrides)
    scheme, fmt, backend = components(cfg)
    t0 = time.perf_counter()
    model, meta = prepare_model(base, tf, scheme.flags)
    windows = spread_windows(calibration, args.calib_tokens, args.seq_len)
    x = capture_mlp_inputs(model, windows)
    if "smooth" in tf:
        meta["smooth"] = smooth_model(model, x, scheme.flags, E)
        x = capture_mlp_inputs(model, windows)
    prepare, eq_meta = expert_prepare(x, scheme.flags, "equalize" in tf, args.max_rows or None)
    alphas = None
    if "alphas" in tf:
        alphas, _, meta["alphas"] = calibrate(model, None, calibration, scheme, args, prepare=prepare)
    w8_layers = set()
    if "mixed" in tf:
        w8 = components(compose("default", W8))[0]
        plan = sensitivity_plan(model, x, scheme, w8, prepare, E, args.budget)
        w8_layers = set(plan["w8a8_layers"])
        meta["mixed"] = plan
    w8_factory, _ = quant_factory([*W8, f"backend.mode={args.backend_mode}"])

    def factory(w13, w2, layer):
        w13, w2 = prepare(w13, w2, layer)
        if layer in w8_layers:
            return w8_factory(w13, w2, layer)
        alpha = None if alphas is None else alphas[layer]
        if alpha is None and scheme.flags.get("activation_use_clip"):
            alpha = torch.ones(E)
        rows = spread_rows(x[layer], args.max_rows or None)
        ids = torch.arange(E).expand(rows.shape[0], E)
        tensors = quantize_experts(
            scheme, fmt, w13, w2, alpha=alpha, calib=RoutedInputs(rows, ids, w13), log=None
        )
        dims = Dims(E=E, H=w13.shape[2], I=w13.shape[1] // 2)
        return MoELayer(scheme, fmt, backend, dims).load(tensors, source=f"SmolLM2 layer {layer}")

    mlp_to_moe(model, num_experts=E, top_k=None, factory=factory)
    meta["equalize"] = eq_meta
    meta["prepare_quantize_s"] = time.perf_counter() - t0
    r = perplexity_details(model, evaluate, seq_len=args.seq_len, max_tokens=args.max_tokens)
    print(
        f"  {name:<40} ppl {r.perplexity:8.3f}  ({meta['prepare_quantize_s']:.0f}s + {r.seconds:.0f}s)",
        flush=True,
    )
    return r, meta


def run_study(base, tokenizer, args):
    splits = token_splits(tokenizer)
    cut = len(splits.calibration) * 3 // 4
    calibration = splits.calibration[:cut]
    evaluate = splits.heldout if args.eval_split == "heldout" else splits.calibration[cut:]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized)", "experts": E, "args": vars(args)}
    if out.exists():  # resume: keep finished variants (same setup assumed)
        results = json.loads(out.read_text())
    runs = results.setdefault("runs", {})
    if "float" in runs:
        fl = result_of(runs["float"])
    elif args.skip_float:  # another run of the same setup measures float; --merge pairs them
        fl = None
    else:
        fl = run_config(base, None, "float", None, None, evaluate, args)
        runs["float"] = {
            "perplexity": fl.perplexity,
            "tokens": fl.predicted_tokens,
            "window_nll": list(fl.window_nll),
        }
        out.write_text(json.dumps(results, indent=1, default=str))
    for name in args.variants:
        if name in runs:
            continue
        r, meta = run_variant(base, name, calibration, evaluate, args)
        runs[name] = {
            "perplexity": r.perplexity,
            "tokens": r.predicted_tokens,
            "seconds": r.seconds,
            "window_nll": list(r.window_nll),
            "vs_float": None if fl is None else paired_delta(fl, r),
            "meta": meta,
        }
        out.write_text(json.dumps(results, indent=1, default=str))
    print(study_table(runs))


def merge_studies(paths, out):
    """One study JSON from several runs of the same setup: every variant paired against the float
    run, and each `+alphas` variant against its `+clip` (alpha = 1) twin."""
    merged = None
    for path in paths:
        data = json.loads(Path(path).read_text())
        if merged is None:
            # file names only: the runs' folders are the machine's, not the results'
            merged = {**data, "runs": {}, "merged_from": [Path(p).name for p in paths]}
            merged["args"] = {**data["args"], "out": Path(data["args"]["out"]).name}
        merged["runs"].update(data["runs"])
    runs = merged["runs"]
    fl = result_of(runs["float"])
    for name, row in runs.items():
        if name == "float":
            continue
        row["vs_float"] = paired_delta(fl, result_of(row))
        twin = name.replace("+alphas", "+clip")
        if twin != name and twin in runs:
            row["vs_alpha1"] = paired_delta(result_of(runs[twin]), result_of(row))
    out.write_text(json.dumps(merged, indent=1, default=str))
    print(study_table(runs))
    print(markdown_table(runs))


def markdown_table(runs):
    """The docs table: perplexity, paired change vs float and (learned alphas) vs alpha = 1."""

    def ci(d):
        return f"{d['delta']:+.1%} [{d['ci95'][0]:+.1%}, {d['ci95'][1]:+.1%}]" if d else "—"

    lines = ["| variant | ppl | vs float [95% CI] | vs alpha = 1 [95% CI] |", "|---|---|---|---|"]
    for name, r in runs.items():
        label = "float (GGUF Q4_1 dequantized)" if name == "float" else f"`{name}`"
        vs_a1 = ci(r.get("vs_alpha1")) if "vs_alpha1" in r else ""
        lines.append(f"| {label} | {r['perplexity']:.3f} | {ci(r.get('vs_float'))} | {vs_a1} |")
    return "\n".join(lines)


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
