"""Weight-quantization quality on real weights: SmolLM2-135M MLPs as 8-expert MoE layers.

Every MLP is split into 8 experts of 192 neurons (all active, top_k=None: exact in float), each
layer's experts are quantized by quantfw's core (compose + build_layer + quantize_experts +
layer.load, the exact torch backend runs the forward) under W8A8, W4A8 per-channel and W4A8
per-group-64 with each weight observer, and perplexity is measured on held-out pydoc text.
Calibration inputs of the data-driven observers are the float model's MLP inputs on the
calibration split (captured once, float model; not the sequentially-quantized model's inputs).

    HF_HUB_OFFLINE=1 python benchmarks/smollm2_weight_quality.py --out smollm2_wq.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantfw.api import build_layer  # noqa: E402
from quantfw.config.compose import compose  # noqa: E402
from quantfw.eval.perplexity import perplexity_details  # noqa: E402
from quantfw.eval.text import token_splits  # noqa: E402
from quantfw.integrations.smollm2 import load_smollm2, mlp_to_moe  # noqa: E402
from quantfw.quantize.experts import QuantReport, RoutedInputs, quantize_experts  # noqa: E402

EXPERTS = 8
OBSERVERS = ["minmax", "mse", "ssz", "learned_clip", "gptq"]
GRIDS = {
    "w4a8_pc": ["scheme=w4a8", "scheme.group_size=0"],
    "w4a8_g64": ["scheme=w4a8", "scheme.group_size=64"],
}


def capture_mlp_inputs(model, ids: torch.Tensor, seq_len: int) -> dict[int, torch.Tensor]:
    """Float MLP inputs [tokens, H] of every layer on the calibration windows."""
    layers = model.model.layers
    store: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    hooks = [
        layer.mlp.register_forward_pre_hook(
            lambda _m, args, i=i: store[i].append(args[0].detach().reshape(-1, args[0].shape[-1]).float())
        )
        for i, layer in enumerate(layers)
    ]
    windows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    with torch.no_grad():
        for w in windows.split(4):
            model(input_ids=w, use_cache=False)
    for h in hooks:
        h.remove()
    return {i: torch.cat(v) for i, v in store.items()}


def variant_overrides(model) -> list[str]:
    c = model.config
    return [
        f"model.hidden_size={c.hidden_size}",
        f"model.moe_intermediate_size={c.intermediate_size // EXPERTS}",
        f"model.num_experts={EXPERTS}",
        f"model.top_k={EXPERTS}",
    ]


def run_variant(model, dense, overrides, calib, heldout, args, log) -> dict:
    cfg = compose("default", overrides)
    report = QuantReport()
    start = time.perf_counter()

    def factory(w13, w2, layer_index):
        layer = build_layer(cfg)
        x = calib[layer_index]
        ids = torch.arange(EXPERTS).expand(x.shape[0], EXPERTS)
        tensors = quantize_experts(
            layer.scheme,
            layer.format,
            w13,
            w2,
            calib=RoutedInputs(x, ids, w13),
            report=report,
            label=f"layer {layer_index}",
            log=log,
        )
        return layer.load(tensors, source=f"layer {layer_index}")

    for i, mlp in dense.items():  # back to the float dense MLPs before each variant
        model.model.layers[i].mlp = mlp
    mlp_to_moe(model, num_experts=EXPERTS, top_k=None, factory=factory)
    quant_s = time.perf_counter() - start
    res = perplexity_details(model, heldout, seq_len=args.seq_len, max_tokens=args.max_tokens)
    for i, mlp in dense.items():
        model.model.layers[i].mlp = mlp
    return {
        "overrides": overrides,
        "ppl": res.perplexity,
        "tokens": res.predicted_tokens,
        "quantize_s": round(quant_s, 1),
        "eval_s": round(res.seconds, 1),
        "fallback_experts": len(report.fallbacks),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-tokens", type=int, default=8192, help="held-out tokens for perplexity")
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--observers", nargs="+", default=OBSERVERS)
    ap.add_argument("--grids", nargs="+", default=list(GRIDS))
    ap.add_argument("--no-w8a8", action="store_true", help="skip the W8A8 reference row")
    ap.add_argument("--quiet", action="store_true", help="no per-expert progress lines")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids OpenMP contention)")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))

    model, tokenizer = load_smollm2()
    splits = token_splits(tokenizer)
    dense = {i: layer.mlp for i, layer in enumerate(model.model.layers)}
    base = variant_overrides(model)
    results: dict = {"setup": {k: v for k, v in vars(args).items() if k != "out"}}
    results["setup"].update(out=args.out.name, experts=EXPERTS, routing="all experts (top_k=None)")

    t = time.perf_counter()
    calib = capture_mlp_inputs(model, splits.calibration[: args.calib_tokens], args.seq_len)
    print(f"calibration inputs captured ({time.perf_counter() - t:.0f}s)", file=sys.stderr)

    f = perplexity_details(model, splits.heldout, seq_len=args.seq_len, max_tokens=args.max_tokens)
    results["float"] = {"ppl": f.perplexity, "tokens": f.predicted_tokens, "eval_s": round(f.seconds, 1)}
    print(f"float ppl {f.perplexity:.3f}", file=sys.stderr, flush=True)

    def record(name, overrides):
        r = run_variant(model, dense, [*base, *overrides], calib, splits.heldout, args, log)
        r["delta_pct"] = round(100 * (r["ppl"] / f.perplexity - 1), 2)
        results[name] = r
        print(f"{name}: ppl {r['ppl']:.3f} ({r['delta_pct']:+.1f}%)", file=sys.stderr, flush=True)
        args.out.write_text(json.dumps(results, indent=2))

    if not args.no_w8a8:
        record("w8a8_minmax", ["scheme=w8a8"])
    for grid in args.grids:
        for obs in args.observers:
            record(f"{grid}_{obs}", [*GRIDS[grid], f"scheme.weight_observer={obs}"])
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
