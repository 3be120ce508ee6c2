"""Learning the per-expert activation clip alpha of W4A8-clip (spec 1.4 / section 4).

For expert e the clip acts on the down-projection input. Given the expert's pre-SwiGLU rows h
captured from calibration tokens, alpha minimises || Q_alpha(h) @ W2q^T - swiglu(h) @ W2^T ||^2:
the expert's output error with the clip and the int4 down-projection exactly as deployed,
against float. A coarse grid over (0, 1] is refined around its best point.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantfw import ops


@dataclass
class AlphaResult:
    alpha: float
    error: float  # relative L2 of the expert output at alpha
    error_at_one: float  # the same at alpha = 1 (no clip)
    tokens: int


def _error(h: torch.Tensor, alpha: float, w2_deq: torch.Tensor, ref: torch.Tensor) -> float:
    counts = torch.tensor([h.shape[0]], dtype=torch.int64)
    q, s = ops.swiglu_clip_quant(h, counts, torch.tensor([alpha], dtype=torch.float32))
    out = (q.float() * s.unsqueeze(1)) @ w2_deq.T
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def search_alpha(
    h: torch.Tensor,
    w2: torch.Tensor,
    w2_deq: torch.Tensor,
    lo: float = 0.05,
    steps: int = 20,
    refine: int = 10,
    holdout: int = 4,
    h_ref: torch.Tensor | None = None,
) -> AlphaResult:
    """h [M, 2I] pre-SwiGLU rows of one expert as the deployed clip sees them; w2 [H, I] float and
    its dequantized int4 copy; h_ref the same rows in float (default: h), the reference output.

    Every `holdout`-th row is kept out of the search; the alpha found on the other rows is kept
    only if it also beats alpha = 1 on those held-out rows (0 disables the check). A clip that only
    fits the calibration tokens would make held-out text worse, which is the one thing it must not do.
    """
    h = h.float()
    h_ref = h if h_ref is None else h_ref.float()
    fit, val, fit_ref, val_ref_rows = h, None, h_ref, None
    if holdout and h.shape[0] >= 2 * holdout:
        keep = torch.ones(h.shape[0], dtype=torch.bool)
        keep[::holdout] = False
        fit, val, fit_ref, val_ref_rows = h[keep], h[~keep], h_ref[keep], h_ref[~keep]
    ref = ops.swiglu(fit_ref) @ w2.float().T
    grid = torch.linspace(lo, 1.0, steps).tolist()
    errs = {a: _error(fit, a, w2_deq, ref) for a in grid}
    best = min(errs, key=errs.get)
    step = (1.0 - lo) / (steps - 1)
    for a in torch.linspace(max(lo, best - step), min(1.0, best + step), refine).tolist():
        errs[a] = _error(fit, a, w2_deq, ref)
    best = min(errs, key=errs.get)
    one = errs.get(1.0, _error(fit, 1.0, w2_deq, ref))
    if one <= errs[best]:  # never worse than no clip on the calibration data
        best = 1.0
    if val is None:
        return AlphaResult(
            alpha=best, error=errs[best] if best != 1.0 else one, error_at_one=one, tokens=h.shape[0]
        )
    val_ref = ops.swiglu(val_ref_rows) @ w2.float().T
    if best != 1.0 and _error(val, best, w2_deq, val_ref) >= _error(val, 1.0, w2_deq, val_ref):
        best = 1.0  # did not generalise to the held-out rows
    # Report on all rows: better on both parts means better on the whole.
    ref_all = ops.swiglu(h_ref) @ w2.float().T
    one_all = _error(h, 1.0, w2_deq, ref_all)
    err_all = one_all if best == 1.0 else _error(h, best, w2_deq, ref_all)
    return AlphaResult(alpha=best, error=err_all, error_at_one=one_all, tokens=h.shape[0])
