"""Model-level guard on learned alphas: keep a layer's clips only if the quantized model predicts
text better with them.

The alpha search minimises each layer's output error, and that need not lower the model's loss: on
SmolLM2 (MLPs split into experts) layer-error gains of ~1% came with perplexity 0.3% worse on text
the search never saw. The guard measures what the bar is about, next-token NLL, on guard windows
disjoint from the search's tokens: with every layer at alpha = 1 (the baseline), then with one
layer's learned alphas at a time. A layer keeps its alphas only if the paired per-token gain is
`min_z` standard errors above zero, and the kept set together must pass the same test against the
baseline, else every layer goes back to alpha = 1. Costs (layers + 2) forwards of the quantized
model over the guard tokens.

Per-token NLLs inside a window are correlated, so the z here is optimistic; `min_z` is set high.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from quantfw.calibrate.alpha import paired_z

__all__ = ["MIN_Z", "guard_alphas", "guard_layers", "split_guard_windows", "token_nll"]

MIN_Z = 3.0


def split_guard_windows(windows: torch.Tensor, guard_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(search windows, guard windows): `guard_windows` of the [n, seq_len] windows, evenly spaced,
    go to the guard; the rest feed the alpha search."""
    n = windows.shape[0]
    if not 0 < guard_windows < n:
        return windows, windows[:0]
    pick = torch.zeros(n, dtype=torch.bool)
    pick[torch.linspace(0, n - 1, guard_windows + 2)[1:-1].round().long()] = True
    return windows[~pick], windows[pick]


def token_nll(model, windows: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Next-token NLL of every predicted token of `windows` [n, seq_len] -> [n * (seq_len - 1)]."""
    out = []
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch_size):
            batch = windows[i : i + batch_size]
            logits = model(input_ids=batch, use_cache=False).logits.float()
            out.append(
                F.cross_entropy(logits[:, :-1].transpose(1, 2), batch[:, 1:], reduction="none").reshape(-1)
            )
    return torch.cat(out)


def guard_layers(
    model,
    set_learned: Callable[[int, bool], None],
    layers: Sequence[int],
    windows: torch.Tensor,
    min_z: float = MIN_Z,
    batch_size: int = 4,
) -> tuple[set[int], dict]:
    """Layers whose learned alphas are kept, and a JSON-serialisable report.

    `set_learned(layer, True/False)` switches one layer of `model` between its learned alphas and
    alpha = 1; every layer in `layers` must start at alpha = 1 and is left as the result says."""
    base = token_nll(model, windows, batch_size)
    rows, kept = [], set()
    for layer in layers:
        set_learned(layer, True)
        nll = token_nll(model, windows, batch_size)
        set_learned(layer, False)
        z = paired_z(base, nll)
        rows.append(
            {"layer": layer, "nll_gain": (base - nll).mean().item(), "z": _finite(z), "kept": z >= min_z}
        )
        if z >= min_z:
            kept.add(layer)
    for layer in kept:
        set_learned(layer, True)
    combined = None
    if kept:
        nll = token_nll(model, windows, batch_size)
        z = paired_z(base, nll)
        combined = {"nll_gain": (base - nll).mean().item(), "z": _finite(z)}
        if z < min_z:
            for layer in kept:
                set_learned(layer, False)
            kept = set()
    for r in rows:
        r["kept"] = r["layer"] in kept
    report = {
        "method": "per-layer paired test of next-token NLL on guard windows",
        "min_z": min_z,
        "tokens": int(base.numel()),
        "baseline_nll": base.mean().item(),
        "layers": rows,
        "combined": combined,
        "kept_layers": sorted(kept),
    }
    return kept, report


def guard_alphas(model, swap, weights, alphas, windows, scheme, fmt, backend, batch_size: int = 4):
    """Swap quantized experts (alpha = 1) into every MoE block of `model` (swapped before by
    `swap`, a SwapReport), let `guard_layers` decide which layers keep their learned alphas on
    `windows`, and return ({layer: alpha, alpha = 1 where not kept}, report). weights: {layer:
    (w13, w2)} float. The model is left with quantized experts."""
    from quantfw.layout.spec import Dims
    from quantfw.moe.layer import MoELayer
    from quantfw.quantize.experts import quantize_experts

    def build(layer, alpha):
        w13, w2 = weights[layer]
        dims = Dims(E=w13.shape[0], H=w13.shape[2], I=w13.shape[1] // 2)
        tensors = quantize_experts(scheme, fmt, w13, w2, alpha=alpha)
        return MoELayer(scheme, fmt, backend, dims).load(tensors, source=f"calibration guard, layer {layer}")

    path = {e.layer_index: e.path for e in swap.entries}
    ones = {layer: build(layer, torch.ones_like(a)) for layer, a in alphas.items()}
    clipped = sorted(layer for layer, a in alphas.items() if (a < 1).any())
    learned = {layer: build(layer, alphas[layer]) for layer in clipped}
    for layer, module in ones.items():
        model.get_submodule(path[layer]).experts = module

    def set_learned(layer, on):
        model.get_submodule(path[layer]).experts = (learned if on else ones)[layer]

    kept, report = guard_layers(model, set_learned, clipped, windows, batch_size=batch_size)
    report["windows"] = int(windows.shape[0])
    return {layer: a if layer in kept else torch.ones_like(a) for layer, a in alphas.items()}, report


def _finite(z: float) -> float | None:
    return z if math.isfinite(z) else None  # JSON has no infinity
