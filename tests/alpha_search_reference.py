"""The direct W4A8-clip alpha search with every candidate scored on all rows by one batched call:
the oracle that quantfw.calibrate.alpha's faster forms are checked against (tests only)."""

import math

import torch

from quantfw import ops
from quantfw.calibrate.alpha import AlphaResult, ExpertRows, IntWeight, LayerAlphas, paired_z

_BATCH_ELEMENTS = 1 << 25


def _rel(sse: torch.Tensor, ref: torch.Tensor) -> float:
    return math.sqrt(max(sse.sum().item(), 0.0)) / max(ref.norm().item(), 1e-30)


def _product(q: torch.Tensor, s: torch.Tensor, w2) -> torch.Tensor:
    """Clipped int8 rows q [n, I] with scales s [n] times w2: the dequantized fp32 GEMM, or for an
    IntWeight the exact integer sums (here in float64) scaled per token, then per channel."""
    if isinstance(w2, IntWeight):
        return (q.double() @ w2.codes.double().T).float() * s.unsqueeze(1) * w2.scale
    return (q.float() * s.unsqueeze(1)) @ w2.T


def _outputs(h: torch.Tensor, alphas: list[float], w2_deq):
    """Yield (alphas chunk, clipped-int8 x int4 expert outputs [len(chunk), M, H])."""
    rows_out = w2_deq.codes.shape[0] if isinstance(w2_deq, IntWeight) else w2_deq.shape[0]
    m, width = h.shape[0], max(h.shape[1], rows_out)
    per_call = max(1, _BATCH_ELEMENTS // max(1, m * width))
    for i in range(0, len(alphas), per_call):
        chunk = alphas[i : i + per_call]
        counts = torch.full((len(chunk),), m, dtype=torch.int64)
        q, s = ops.swiglu_clip_quant(
            h.repeat(len(chunk), 1), counts, torch.tensor(chunk, dtype=torch.float32)
        )
        yield chunk, _product(q, s, w2_deq).view(len(chunk), m, -1)


def _expert_error(h, alpha, w2_deq, ref) -> torch.Tensor:
    """Output error rows [M, H] of one expert at one alpha."""
    return next(_outputs(h, [alpha], w2_deq))[1][0] - ref


def _error(h: torch.Tensor, alpha: float, w2_deq: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 of one expert's output at one alpha."""
    return _rel(_expert_error(h, alpha, w2_deq, ref).square().sum(), ref)


def search_layer_alphas(
    experts: list[ExpertRows | None],
    lo: float = 0.05,
    steps: int = 20,
    refine: int = 10,
    holdout: int = 4,
    min_z: float = 2.0,
    sweeps: int = 2,
) -> LayerAlphas:
    """Per-expert alpha minimising the layer output error (module doc). Experts given as None keep
    alpha = 1. Tokens with `token % holdout == 0` are held out of the search (0: no check); each
    clip must then beat alpha = 1 on the held-out tokens routed to its expert by `min_z` standard
    errors of the paired per-token gain, the other experts at their learned alphas."""
    E = len(experts)
    live = [e for e in range(E) if experts[e] is not None and experts[e].h.shape[0]]
    alphas = torch.ones(E, dtype=torch.float32)
    results: list[AlphaResult | None] = [None] * E
    if not live:
        return LayerAlphas(alphas, results, 0.0, 0.0)
    ids = torch.unique(torch.cat([experts[e].tokens for e in live]))
    slot = {e: torch.searchsorted(ids, experts[e].tokens) for e in live}
    held = (ids % holdout == 0) if holdout else torch.zeros(ids.shape[0], dtype=torch.bool)
    fit = ~held
    H = experts[live[0]].ref.shape[1]
    resid = torch.zeros(ids.shape[0], H)  # layer output error per token at the current alphas
    ref = torch.zeros(ids.shape[0], H)
    for e in live:
        x = experts[e]
        w = x.weight.float().unsqueeze(-1)
        resid.index_add_(0, slot[e], w * _expert_error(x.h, 1.0, x.operand(), x.ref))
        ref.index_add_(0, slot[e], w * x.ref)

    grid = sorted(set(torch.linspace(lo, 1.0, steps).tolist()) | {1.0})
    step = (1.0 - lo) / (steps - 1)
    for _ in range(sweeps):
        for e in live:
            x = experts[e]
            rows_fit = fit[slot[e]]
            w = x.weight.float().unsqueeze(-1)
            others = resid[slot[e]] - w * _expert_error(x.h, alphas[e].item(), x.operand(), x.ref)

            def loss(cands, x=x, w=w, others=others, rows_fit=rows_fit):
                out = {}
                for chunk, y in _outputs(x.h, cands, x.operand()):
                    tot = (others + w * (y - x.ref))[:, rows_fit].square().sum((-1, -2))
                    out.update(zip(chunk, tot.tolist(), strict=True))
                return out

            cost = loss(grid)
            best = min(cost, key=cost.get)
            fine = torch.linspace(max(lo, best - step), min(1.0, best + step), refine).tolist()
            cost.update(loss([a for a in fine if a not in cost]))
            best = min(cost, key=cost.get)
            if cost[best] >= cost[1.0]:
                best = 1.0  # ties and losses keep the unclipped expert
            alphas[e] = best
            resid[slot[e]] = others + w * _expert_error(x.h, best, x.operand(), x.ref)

    z_of = {}
    if holdout:
        for e in live:
            if alphas[e] == 1.0:
                continue
            x = experts[e]
            rows_held = held[slot[e]]
            w = x.weight.float().unsqueeze(-1)
            cur = resid[slot[e]]
            without = cur - w * _expert_error(x.h, alphas[e].item(), x.operand(), x.ref)
            without = without + w * _expert_error(x.h, 1.0, x.operand(), x.ref)
            z = paired_z(without[rows_held].square().sum(-1), cur[rows_held].square().sum(-1))
            z_of[e] = z
            if z < min_z:  # did not carry over to tokens the search never saw
                alphas[e] = 1.0
                resid[slot[e]] = without

    one = torch.zeros_like(resid)  # the layer error with every expert at alpha = 1, for the report
    for e in live:
        x = experts[e]
        err_one = _expert_error(x.h, 1.0, x.operand(), x.ref)
        one.index_add_(0, slot[e], x.weight.float().unsqueeze(-1) * err_one)
        at_one = _rel(err_one.square().sum(), x.ref)
        err = at_one if alphas[e] == 1.0 else _error(x.h, alphas[e].item(), x.operand(), x.ref)
        results[e] = AlphaResult(alphas[e].item(), err, at_one, x.h.shape[0], z_of.get(e))
    return LayerAlphas(alphas, results, _rel(resid.square().sum(), ref), _rel(one.square().sum(), ref))
