"""Error of a quantized output against its float reference."""

from __future__ import annotations

import torch


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Relative L2, cosine similarity and max absolute error (computed in fp64)."""
    a, b = out.double().flatten(), ref.double().flatten()
    diff = a - b
    ref_norm = b.norm().item()
    return {
        "rel_l2": diff.norm().item() / ref_norm if ref_norm else float(diff.norm().item()),
        "cosine": torch.nn.functional.cosine_similarity(a, b, dim=0).item(),
        "max_abs": diff.abs().max().item() if diff.numel() else 0.0,
    }


def peer_check(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float | bool]:
    """Spec 1.4 peer criterion between two implementations: an element fails when its relative diff
    exceeds 0.01 (an absolute diff below 0.01 counts as 0); pass = at most 5 % fail and none >= 0.1."""
    a, b = out.double().flatten(), ref.double().flatten()
    d = (a - b).abs()
    d[d < 0.01] = 0
    rel = torch.where(d == 0, torch.zeros_like(d), d / b.abs())
    frac = (rel > 0.01).double().mean().item() if rel.numel() else 0.0
    worst = rel.max().item() if rel.numel() else 0.0
    return {"ok": frac <= 0.05 and worst < 0.1, "frac_over_1pct": frac, "worst_rel": worst}
