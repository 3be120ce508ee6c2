"""Quantize one set of float experts with several schemes and measure each against float."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from quantfw.backends import Backend
from quantfw.calibrate.experts import ExpertCapture, learn_expert_alphas
from quantfw.eval import synthetic
from quantfw.eval.metrics import compare
from quantfw.formats.format import Format
from quantfw.layout.spec import Dims
from quantfw.moe.layer import MoELayer
from quantfw.moe.reference import FloatMoE
from quantfw.progress import bar
from quantfw.quantize.experts import quantize_experts
from quantfw.schemes.scheme import Scheme


@dataclass
class Variant:
    label: str
    scheme: Scheme
    format: Format
    learn_alpha: bool = False


def learn_alphas(scheme: Scheme, w13, w2, x, topk_weights, topk_ids) -> tuple[torch.Tensor, list[dict]]:
    """Per-expert alpha the way `quantfw quantize calibration.source=model` learns it: capture the
    float layer's routed rows, then `learn_expert_alphas` (coverage policy "ones")."""
    moe = FloatMoE(w13, w2)
    capture = ExpertCapture({0: (moe, w13)})
    with torch.no_grad(), capture.attached():
        moe(x, topk_weights, topk_ids)
    return learn_expert_alphas(scheme, w13, w2, capture.layers[0])


def evaluate_schemes(
    variants: Sequence[Variant],
    backend: Backend,
    dims: Dims,
    top_k: int,
    tokens: int,
    seed: int = 0,
    calibration_tokens: int = 2048,
    progress: bool = True,
) -> list[dict]:
    """Float experts, `tokens` held-out tokens to measure on and a disjoint calibration set for the
    learned alphas (the held-out test inside the search needs a few thousand tokens to confirm a clip)."""
    w13, w2 = synthetic.expert_weights(dims.E, dims.H, dims.I, seed=seed)
    x_cal = synthetic.hidden_states(calibration_tokens, dims.H, seed=seed + 1, channel_seed=seed)
    x = synthetic.hidden_states(tokens, dims.H, seed=seed + 4, channel_seed=seed)  # held-out tokens
    w_cal, ids_cal = synthetic.random_routing(calibration_tokens, dims.E, top_k, seed=seed + 2, skew=2.0)
    w, ids = synthetic.random_routing(tokens, dims.E, top_k, seed=seed + 3, skew=2.0)
    x_bf16 = x.to(torch.bfloat16)
    ref = FloatMoE(w13, w2)(x_bf16.float(), w, ids)
    rows = [
        {
            "scheme": "bf16 (float)",
            "bytes": (w13.numel() + w2.numel()) * 2,
            "rel_l2": 0.0,
            "cosine": 1.0,
            "max_abs": 0.0,
            "norm_ratio": 1.0,
        }
    ]
    for v in bar(variants, progress=progress, desc="schemes", unit="scheme"):
        alpha = None
        if v.learn_alpha:
            alpha, _ = learn_alphas(v.scheme, w13, w2, x_cal.to(torch.bfloat16).float(), w_cal, ids_cal)
        tensors = quantize_experts(v.scheme, v.format, w13, w2, alpha=alpha)
        layer = MoELayer(v.scheme, v.format, backend, dims).load(tensors, source=f"in-memory {v.label}")
        out = layer(x_bf16, w, ids)
        row = {"scheme": v.label, "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
        row.update(compare(out, ref))
        # rel_l2^2 = 1 + s^2 - 2 s cos with s this ratio: rel_l2 and cosine disagree when s moves
        row["norm_ratio"] = out.double().norm().item() / ref.double().norm().item()
        if alpha is not None:
            row["alpha_mean"] = alpha.mean().item()
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'scheme':<58} {'bytes':>10} {'rel_l2':>9} {'cosine':>9} {'max_abs':>9} {'|out|/|ref|':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        extra = f"  (mean alpha {r['alpha_mean']:.3f})" if "alpha_mean" in r else ""
        lines.append(
            f"{r['scheme']:<58} {r['bytes']:>10,d} {r['rel_l2']:>9.4f} {r['cosine']:>9.5f} {r['max_abs']:>9.4f} {r['norm_ratio']:>11.4f}{extra}"
        )
    return "\n".join(lines)
