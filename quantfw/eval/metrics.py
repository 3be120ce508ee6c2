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
