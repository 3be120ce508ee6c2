"""Offline rotation of the residual stream (QuaRot-style, nothing online).

With an orthogonal Q [H, H], x' = x Q everywhere in the residual stream: every weight that reads or
writes it (quantfw.calibrate.residual) is multiplied by Q along its hidden dim, the embedding too.
RMSNorm commutes with Q once its weight is 1 (||x Q|| = ||x||), so every norm weight is first
folded into the readers after it (and the final norm into lm_head, which is untied from the
embedding). Router logits and the model's logits are unchanged in float.

Q = D · (H_{2^k} ⊗ R_m) / 2^{k/2}: a random ±1 diagonal D, the Sylvester Hadamard matrix of the
largest power-of-two factor of H and a seeded random orthogonal R_m for the rest (H = 576 = 64 · 9).
"""

from __future__ import annotations

import torch
from torch import nn

from quantfw.calibrate.residual import decoder_sides, scale_dim

__all__ = ["fold_norms", "random_hadamard", "rotate_model"]


def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def random_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """An orthogonal [n, n] float64 matrix, Hadamard-like (see module doc), reproducible by seed."""
    pow2 = n & -n
    rest = n // pow2
    g = torch.Generator().manual_seed(seed)
    q = _hadamard(pow2) / pow2**0.5
    if rest > 1:
        r, _ = torch.linalg.qr(torch.randn(rest, rest, generator=g, dtype=torch.float64))
        q = torch.kron(q.contiguous(), r.contiguous())
    signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    return signs.unsqueeze(1) * q


def _rotate(p: torch.Tensor, dim: int, q: torch.Tensor) -> None:
    moved = p.data.movedim(dim, -1)
    p.data = (moved.double() @ q).to(p.dtype).movedim(-1, dim).contiguous()


def fold_norms(model: nn.Module) -> None:
    """Every RMSNorm weight of the residual stream into the readers after it; the norm weights
    become 1. Exact in float."""
    sides = decoder_sides(model)
    head = model.lm_head
    if head.weight is sides.embed:  # tied: lm_head gets its own copy (it changes, the embedding not)
        head.weight = nn.Parameter(sides.embed.detach().clone())
        sides = decoder_sides(model)
    with torch.no_grad():
        for norm, ar, _, post, mr, _ in sides.layers:
            for w, readers in ((norm, ar), (post, mr)):
                for p, dim in readers:
                    scale_dim(p, dim, w)
                w.fill_(1.0)
        scale_dim(sides.head, 1, sides.final_norm)
        sides.final_norm.fill_(1.0)


def rotate_model(model: nn.Module, seed: int = 0) -> torch.Tensor:
    """Fold the norms and rotate the residual stream by `random_hadamard(H, seed)`, in place.
    Returns Q."""
    fold_norms(model)
    sides = decoder_sides(model)
    q = random_hadamard(sides.embed.shape[1], seed)
    with torch.no_grad():
        _rotate(sides.embed, 1, q)
        _rotate(sides.head, 1, q)
        for _, ar, aw, _, mr, mw in sides.layers:
            for p, dim in (*ar, *aw, *mr, *mw):
                _rotate(p, dim, q)
    return q
