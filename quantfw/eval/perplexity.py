"""Perplexity of a causal LM over non-overlapping windows (fp32 loss, no grad)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quantfw.errors import ConfigError

__all__ = ["PerplexityResult", "paired_delta", "perplexity", "perplexity_details"]


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float
    predicted_tokens: int  # windows * (seq_len - 1)
    windows: int
    seconds: float
    window_nll: tuple[float, ...] = ()  # mean NLL of each window, for paired comparisons


def paired_delta(base: PerplexityResult, other: PerplexityResult) -> dict:
    """Perplexity change of `other` vs `base` on the same windows, with a 95% interval from the
    window-to-window spread of the NLL difference (the same text, so most text noise cancels)."""
    if len(base.window_nll) != len(other.window_nll) or not base.window_nll:
        raise ConfigError("paired_delta needs per-window NLLs of the same windows")
    d = torch.tensor(other.window_nll, dtype=torch.float64) - torch.tensor(
        base.window_nll, dtype=torch.float64
    )
    mean = d.mean().item()
    ci = None  # one window: no spread to estimate the interval from
    if d.numel() > 1:
        se = d.std().item() / math.sqrt(d.numel())
        ci = [math.exp(mean - 1.96 * se) - 1, math.exp(mean + 1.96 * se) - 1]
    return {
        "delta": math.exp(mean) - 1,
        "ci95": ci,
        "windows": d.numel(),
    }


def perplexity_details(
    model, token_ids: torch.Tensor, seq_len: int = 512, max_tokens: int = 16384, batch_size: int = 4
) -> PerplexityResult:
    """Cut the first min(len, max_tokens) tokens into floor(n / seq_len) independent windows (no
    context carried across windows), predict tokens 1..seq_len-1 of each; exp(mean NLL)."""
    ids = torch.as_tensor(token_ids, dtype=torch.int64).reshape(-1)
    windows = min(len(ids), max_tokens) // seq_len
    if seq_len < 2 or windows < 1:
        raise ConfigError(f"need at least one window of seq_len={seq_len} >= 2 tokens, got {len(ids)} tokens")
    device = next(model.parameters()).device
    data = ids[: windows * seq_len].view(windows, seq_len)
    per_window: list[float] = []
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, windows, batch_size):
                batch = data[i : i + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits.float()
                nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch[:, 1:], reduction="none")
                per_window += nll.mean(-1).tolist()
    finally:
        model.train(was_training)
    count = windows * (seq_len - 1)
    nll = sum(per_window) / windows  # equal-length windows: the mean of means is the token mean
    return PerplexityResult(
        math.exp(nll), nll, count, windows, time.perf_counter() - start, tuple(per_window)
    )


def perplexity(model, token_ids: torch.Tensor, seq_len: int = 512, max_tokens: int = 16384) -> float:
    """exp(mean next-token NLL) over non-overlapping seq_len windows of the first max_tokens tokens."""
    return perplexity_details(model, token_ids, seq_len=seq_len, max_tokens=max_tokens).perplexity
