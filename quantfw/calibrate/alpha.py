"""Learning the per-expert activation clip alpha of W4A8-clip (spec 1.4 / section 4).

The clip acts on each expert's down-projection input. The objective is the error of the layer
output a token actually receives, sum_e w_te * expert_e(t), with the clip and the int4
down-projection exactly as deployed, against float. Summing per-expert errors is not enough: on
SmolLM2's last layer the clips of several experts all shave the same massive output direction, so
every expert's own error drops while the layer's rises (measured: -3.0% vs +2.6%). Alphas are
therefore found by coordinate descent over experts on the layer error (a grid over (0, 1], refined
around its best point), each grid point going through one call of the reference clip op (rows
repeated once per alpha, one alpha per group).

A clip is kept only when it wins on tokens the search never saw (every `holdout`-th token), by a
margin the token-to-token noise cannot explain (a paired test on per-token layer errors): a clip
that merely fits the calibration tokens would make held-out text worse, the one thing it must not do.
With one expert, or rows that share no token, the objective is that expert's own output error.

Two evaluations of the same objective (`mode`). "direct" builds each candidate's layer output
error [rows, H] (the search's reference arithmetic). "gram" expands it around the expert's current
alpha: with r_t the current layer residual of token t, w_t its routing weight, W = w2_deq [H, I],
G = W^T W and d_t(a) = u_t(a) - u_t(cur) the change of the dequantized clipped row,
||r_t + w_t W d_t||^2 = ||r_t||^2 + 2 w_t (W^T r_t) . d_t + w_t^2 d_t^T G d_t: one [rows, I] x [I, I]
product per candidate instead of [rows, I] x [I, H], and no cancellation (every term is of the size
of the error, not of the output). Changing expert e changes only its own term of r, so the update
after each expert is r_t += w_t W d_t(best). Building G costs H x I^2 per expert and sweep, so it
pays only with many rows; "auto" picks per expert the cheaper one by that count. The grid search and
its tie rule are shared, and the acceptance test and the report are computed directly in both.

Direct products of the clipped int8 rows with an int4 down-projection held as codes and per-channel
scales (IntWeight) are integer GEMMs: exact, the accumulation the deployed kernel does, and about 5x
faster than the fp32 GEMM of the dequantized operands on this project's CPUs (AMX / VNNI).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from quantfw import ops
from quantfw.errors import ConfigError
from quantfw.quantize import primitives

# Elements of the largest intermediate ([grid points x rows, max(H, 2I)]) one batched call builds.
_BATCH_ELEMENTS = 1 << 25
MODES = ("auto", "direct", "gram")


@dataclass(frozen=True)
class IntWeight:
    """A down-projection as its integer codes int8 [H, I] and per-channel scale fp32 [H]. The
    search's products with the int8 clipped rows are then integer GEMMs, exact (int32 accumulation,
    as the deployed int8 x int4 kernel does), scaled per token and per channel after; an fp32 GEMM
    of the dequantized operands rounds every product and partial sum."""

    codes: torch.Tensor
    scale: torch.Tensor

    def dense(self) -> torch.Tensor:
        """The dequantized weight fp32 [H, I]."""
        return primitives.dequantize(self.codes, self.scale)


@dataclass
class ExpertRows:
    """One expert's calibration rows: h [M, 2I] as the deployed clip sees them, ref [M, H] the float
    expert output, w2_deq [H, I] the int4 down-projection, tokens [M] the layer token each row
    belongs to, weight [M] its routing weight (the expert output's factor in the layer)."""

    h: torch.Tensor
    ref: torch.Tensor
    # The dequantized fp32 tensor, or a compact form whose operand() gives the IntWeight (or the
    # fp32 tensor) when asked: a 256-expert layer then holds one expert's unpacked down-projection
    # at a time (the last one asked for), not all of them.
    w2_deq: torch.Tensor | Any
    tokens: torch.Tensor
    weight: torch.Tensor

    def load(self) -> ExpertRows:
        return self  # held in memory (quantfw.calibrate.row_store.SpilledRows reads its file)

    def operand(self) -> torch.Tensor | IntWeight:
        """w2 as the candidate products take it."""
        if isinstance(self.w2_deq, torch.Tensor):
            return self.w2_deq
        if _LAST_W2[0] is not self:
            _LAST_W2[:] = [None, None]  # free the previous expert's before building this one
            _LAST_W2[:] = [self, self.w2_deq.operand()]
        return _LAST_W2[1]

    def w2(self) -> torch.Tensor:
        """The dequantized w2 fp32 [H, I]."""
        w = self.operand()
        return w.dense() if isinstance(w, IntWeight) else w


_LAST_W2: list = [None, None]  # (rows, operand) of the expert whose unpacked down-projection is held


@dataclass
class AlphaResult:
    alpha: float
    error: float  # relative L2 of the expert's own output at alpha, on all rows
    error_at_one: float  # the same at alpha = 1 (no clip)
    tokens: int
    z: float | None = None  # held-out paired statistic of the clip vs alpha = 1 (None: not tested)


@dataclass
class LayerAlphas:
    alphas: torch.Tensor  # [E]
    experts: list[AlphaResult | None]  # None for experts without rows
    error: float  # relative L2 of the layer output at alphas, all captured tokens
    error_at_one: float


def _clipped_int(h: torch.Tensor, alphas: list[float], width: int):
    """Yield (alphas chunk, clipped int8 w2 inputs [len(chunk) * M, I], their scales [len(chunk) * M]),
    chunks sized so that an intermediate of `width` columns stays under _BATCH_ELEMENTS."""
    m = h.shape[0]
    per_call = max(1, _BATCH_ELEMENTS // max(1, m * max(h.shape[1], width)))
    for i in range(0, len(alphas), per_call):
        chunk = alphas[i : i + per_call]
        counts = torch.full((len(chunk),), m, dtype=torch.int64)
        q, s = ops.swiglu_clip_quant(
            h.repeat(len(chunk), 1), counts, torch.tensor(chunk, dtype=torch.float32)
        )
        yield chunk, q, s


def _clipped(h: torch.Tensor, alphas: list[float], width: int):
    """Yield (alphas chunk, dequantized clipped-int8 w2 inputs [len(chunk) * M, I])."""
    for chunk, q, s in _clipped_int(h, alphas, width):
        yield chunk, q.float() * s.unsqueeze(1)


def _outputs(h: torch.Tensor, alphas: list[float], w2: torch.Tensor | IntWeight):
    """Yield (alphas chunk, clipped-int8 x int4 expert outputs [len(chunk), M, H])."""
    exact = isinstance(w2, IntWeight)
    for chunk, q, s in _clipped_int(h, alphas, (w2.codes if exact else w2).shape[0]):
        if exact:
            y = torch._int_mm(q, w2.codes.T).float().mul_(s.unsqueeze(1)).mul_(w2.scale)
        else:
            y = (q.float() * s.unsqueeze(1)) @ w2.T
        yield chunk, y.view(len(chunk), h.shape[0], -1)


def _clipped_rows(h: torch.Tensor, alpha: float) -> torch.Tensor:
    """Dequantized clipped w2 input [M, I] at one alpha."""
    return next(_clipped(h, [alpha], h.shape[1] // 2))[1]


def _expert_error(h, alpha, w2_deq, ref) -> torch.Tensor:
    """Output error rows [M, H] of one expert at one alpha."""
    return next(_outputs(h, [alpha], w2_deq))[1][0] - ref


def _rel(sse: torch.Tensor, ref: torch.Tensor) -> float:
    return math.sqrt(max(sse.sum().item(), 0.0)) / max(ref.norm().item(), 1e-30)


def paired_z(loss_one: torch.Tensor, loss_alpha: torch.Tensor) -> float:
    """How many standard errors the mean per-token gain of a clip over alpha = 1 lies above zero."""
    d = (loss_one - loss_alpha).double()
    if d.numel() < 2:
        return -math.inf  # nothing to confirm the clip with
    mean, sd = d.mean().item(), d.std().item()
    if sd == 0:
        return math.inf if mean > 0 else (0.0 if mean == 0 else -math.inf)
    return mean / (sd / math.sqrt(d.numel()))


def _best_alpha(loss, grid: list[float], lo: float, step: float, refine: int) -> float:
    """Grid search refined around its best point; ties with and losses to alpha = 1 keep 1."""
    cost = loss(grid)
    best = min(cost, key=cost.get)
    fine = torch.linspace(max(lo, best - step), min(1.0, best + step), refine).tolist()
    cost.update(loss([a for a in fine if a not in cost]))
    best = min(cost, key=cost.get)
    return 1.0 if cost[best] >= cost[1.0] else best


def _use_gram(mode: str, rows: int, fit: int, points: int, H: int, I: int) -> bool:
    """Whether the Gram form costs fewer multiply-adds for one expert in one sweep (module doc)."""
    if mode != "auto":
        return mode == "gram"
    direct = (points * fit + 2 * rows) * I * H  # candidates, the current and the chosen alpha
    gram = H * I * I + points * fit * I * I + (fit + rows) * I * H  # G, candidates, W^T r, update
    return gram < direct


def _direct_step(x: ExpertRows, cur: float, resid_e, rows_fit, search) -> tuple[float, torch.Tensor]:
    """(best alpha, new layer residual rows of x's tokens), candidates scored on [rows, H] errors."""
    w = x.weight.float().unsqueeze(-1)
    others = resid_e - w * _expert_error(x.h, cur, x.operand(), x.ref)
    # Score the fit rows only (a GEMM row does not depend on the other rows, except for a
    # single-row product, which takes another kernel).
    sub = rows_fit.nonzero().squeeze(1) if int(rows_fit.sum()) >= 2 else None
    h, ref, ws, os = (x.h, x.ref, w, others) if sub is None else (x.h[sub], x.ref[sub], w[sub], others[sub])

    def loss(cands):
        out = {}
        for chunk, y in _outputs(h, cands, x.operand()):
            d = os + ws * (y - ref)
            tot = (d if sub is not None else d[:, rows_fit]).square().sum((-1, -2))
            out.update(zip(chunk, tot.tolist(), strict=True))
        return out

    best = search(loss)
    return best, others + w * _expert_error(x.h, best, x.operand(), x.ref)


def _gram_step(x: ExpertRows, cur: float, resid_e, rows_fit, search) -> tuple[float, torch.Tensor]:
    """_direct_step's result through W2's Gram matrix (module doc)."""
    W = x.w2()
    I = W.shape[1]
    G = W.T @ W
    fit = rows_fit.nonzero().squeeze(1)
    h, r, w = x.h[fit], resid_e[fit], x.weight.float()[fit]
    c2 = 2 * (r @ W)  # [Mf, I]
    base = r.double().square().sum().item()
    u_cur = _clipped_rows(h, cur)

    def loss(cands):
        out = {}
        for chunk, u in _clipped(h, cands, I):
            d = u.view(len(chunk), h.shape[0], I) - u_cur
            dg = (d.reshape(-1, I) @ G).view_as(d)
            per_row = ((c2 + w.unsqueeze(-1) * dg) * d).sum(-1)  # [chunk, Mf]
            tot = base + (per_row * w).double().sum(-1)
            out.update(zip(chunk, tot.tolist(), strict=True))
        return out

    best = search(loss)
    if best == cur:
        return best, resid_e
    d = _clipped_rows(x.h, best) - _clipped_rows(x.h, cur)
    return best, resid_e + x.weight.float().unsqueeze(-1) * (d @ W.T)


def search_layer_alphas(
    experts: list[ExpertRows | None],
    lo: float = 0.05,
    steps: int = 20,
    refine: int = 10,
    holdout: int = 4,
    min_z: float = 2.0,
    sweeps: int = 2,
    mode: str = "auto",
) -> LayerAlphas:
    """Per-expert alpha minimising the layer output error (module doc). Experts given as None keep
    alpha = 1. Tokens with `token % holdout == 0` are held out of the search (0: no check); each
    clip must then beat alpha = 1 on the held-out tokens routed to its expert by `min_z` standard
    errors of the paired per-token gain, the other experts at their learned alphas. `mode` chooses
    how candidates are scored: direct, gram, or auto (the cheaper per expert; module doc)."""
    if mode not in MODES:
        raise ConfigError(f"alpha search mode '{mode}' (allowed: {', '.join(MODES)})")
    E = len(experts)
    live = [e for e in range(E) if experts[e] is not None and experts[e].tokens.shape[0]]
    alphas = torch.ones(E, dtype=torch.float32)
    results: list[AlphaResult | None] = [None] * E
    if not live:
        return LayerAlphas(alphas, results, 0.0, 0.0)
    ids = torch.unique(torch.cat([experts[e].tokens for e in live]))
    slot = {e: torch.searchsorted(ids, experts[e].tokens) for e in live}
    held = (ids % holdout == 0) if holdout else torch.zeros(ids.shape[0], dtype=torch.bool)
    fit = ~held
    resid = ref = None  # layer output error per token at the current alphas; the float output
    at_one = {}  # each expert's own relative error at alpha = 1
    for e in live:
        x = experts[e].load()
        if resid is None:
            resid, ref = torch.zeros(ids.shape[0], x.ref.shape[1]), torch.zeros(ids.shape[0], x.ref.shape[1])
        w = x.weight.float().unsqueeze(-1)
        err_one = _expert_error(x.h, 1.0, x.operand(), x.ref)
        resid.index_add_(0, slot[e], w * err_one)
        ref.index_add_(0, slot[e], w * x.ref)
        at_one[e] = _rel(err_one.square().sum(), x.ref)
    one = resid.clone()  # the layer error with every expert at alpha = 1, for the report

    grid = sorted(set(torch.linspace(lo, 1.0, steps).tolist()) | {1.0})
    step = (1.0 - lo) / (steps - 1)

    def search(loss):
        return _best_alpha(loss, grid, lo, step, refine)

    for _ in range(sweeps):
        for e in live:
            x = experts[e].load()
            rows_fit = fit[slot[e]]
            gram = _use_gram(
                mode, x.h.shape[0], int(rows_fit.sum()), len(grid) + refine, x.ref.shape[1], x.h.shape[1] // 2
            )
            best, resid[slot[e]] = (_gram_step if gram else _direct_step)(
                x, alphas[e].item(), resid[slot[e]], rows_fit, search
            )
            alphas[e] = best

    z_of, err_of = {}, {}  # per clipped expert: held-out z, own relative error at its alpha
    for e in live:
        if alphas[e] == 1.0:
            continue
        x = experts[e].load()
        err = _expert_error(x.h, alphas[e].item(), x.operand(), x.ref)
        err_of[e] = _rel(err.square().sum(), x.ref)
        if not holdout:
            continue
        rows_held = held[slot[e]]
        w = x.weight.float().unsqueeze(-1)
        cur = resid[slot[e]]
        without = cur - w * err
        without = without + w * _expert_error(x.h, 1.0, x.operand(), x.ref)
        z = paired_z(without[rows_held].square().sum(-1), cur[rows_held].square().sum(-1))
        z_of[e] = z
        if z < min_z:  # did not carry over to tokens the search never saw
            alphas[e] = 1.0
            resid[slot[e]] = without

    for e in live:
        err = at_one[e] if alphas[e] == 1.0 else err_of[e]
        results[e] = AlphaResult(alphas[e].item(), err, at_one[e], experts[e].tokens.shape[0], z_of.get(e))
    _LAST_W2[:] = [None, None]  # the last expert's rebuilt down-projection is not needed any more
    return LayerAlphas(alphas, results, _rel(resid.square().sum(), ref), _rel(one.square().sum(), ref))


def search_alpha(
    h: torch.Tensor,
    w2: torch.Tensor,
    w2_deq: torch.Tensor,
    lo: float = 0.05,
    steps: int = 20,
    refine: int = 10,
    holdout: int = 4,
    h_ref: torch.Tensor | None = None,
    min_z: float = 2.0,
    mode: str = "auto",
) -> AlphaResult:
    """One expert on its own: h [M, 2I] pre-SwiGLU rows as the deployed clip sees them; w2 [H, I]
    float and its dequantized int4 copy; h_ref the same rows in float (default: h) for the reference
    output. Every `holdout`-th row is held out for the acceptance test (see search_layer_alphas)."""
    h = h.float()
    h_ref = h if h_ref is None else h_ref.float()
    rows = ExpertRows(
        h=h,
        ref=ops.swiglu(h_ref) @ w2.float().T,
        w2_deq=w2_deq.float(),
        tokens=torch.arange(h.shape[0]),
        weight=torch.ones(h.shape[0]),
    )
    return search_layer_alphas([rows], lo, steps, refine, holdout, min_z, sweeps=1, mode=mode).experts[0]
