"""Synthetic but realistic MoE data: heavy-tailed expert weights and activations with outlier
channels, the regime where int8 activations and the down-projection clip matter."""

from __future__ import annotations

import torch


def expert_weights(
    E: int, H: int, I: int, seed: int = 0, df: float = 5.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float experts w13 [E, 2I, H] and w2 [E, H, I] with Student-t entries (LLM weights are heavy-tailed)."""
    g = torch.Generator().manual_seed(seed)

    # Student-t as normal / sqrt(chi2/df), drawn from one seeded generator (reproducible).
    def draw(*shape):
        z = torch.randn(*shape, generator=g)
        chi = torch.randn(*shape, int(df), generator=g).pow(2).sum(-1) / df
        return z / chi.sqrt()

    w13 = draw(E, 2 * I, H) * (1.0 / H**0.5)
    w2 = draw(E, H, I) * (1.0 / I**0.5)
    return w13, w2


def hidden_states(
    T: int,
    H: int,
    seed: int = 1,
    outlier_channels: int = 8,
    outlier_scale: float = 30.0,
    channel_seed: int = 0,
) -> torch.Tensor:
    """Tokens [T, H] ~ N(0, 1) with a few channels scaled up, as in LLM residual streams. The
    outlier channels depend on channel_seed only, so calibration and test tokens share them."""
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(seed))
    idx = torch.randperm(H, generator=torch.Generator().manual_seed(10_000 + channel_seed))[:outlier_channels]
    x[:, idx] *= outlier_scale
    return x


def random_routing(
    T: int, E: int, k: int, seed: int = 2, skew: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing from random logits (skew > 1 makes expert loads uneven); weights renormalised."""
    g = torch.Generator().manual_seed(seed)
    bias = torch.linspace(0, skew, E)
    logits = torch.randn(T, E, generator=g) + bias
    w, ids = torch.softmax(logits, -1).topk(k, dim=-1)
    return w / w.sum(-1, keepdim=True), ids


def inject_down_proj_outliers(
    w13: torch.Tensor,
    w2: torch.Tensor,
    channels: int = 4,
    scale: float = 8.0,
    seed: int = 0,
    compensate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(w13, w2) with `channels` intermediate channels per expert made massive: their up rows are
    scaled by `scale`, so the SwiGLU output (the down-projection input, where the W4A8-clip acts)
    has a few channels far above the rest, as in DeepSeek-class layers. With `compensate` the
    matching w2 columns are divided by `scale`: the float layer is unchanged (the massive channels
    carry an ordinary share of the output), only its activation range is not."""
    E, two_i, _ = w13.shape
    inter = two_i // 2
    w13, w2 = w13.clone(), w2.clone()
    g = torch.Generator().manual_seed(20_000 + seed)
    for e in range(E):
        idx = torch.randperm(inter, generator=g)[:channels]
        w13[e, inter + idx] *= scale
        if compensate:
            w2[e][:, idx] /= scale
    return w13, w2
