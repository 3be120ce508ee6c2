"""Real English text available in every CPython: the pydoc topic help (`pydoc_data.topics`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantfw.errors import ConfigError

__all__ = ["TokenSplits", "english_text", "spread_windows", "token_splits"]


def english_text() -> str:
    """The values of `pydoc_data.topics.topics`, in sorted key order, joined by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


@dataclass(frozen=True)
class TokenSplits:
    calibration: torch.Tensor  # int64 [Nc]
    heldout: torch.Tensor  # int64 [Nh]


def token_splits(tokenizer, calibration_fraction: float = 0.5) -> TokenSplits:
    """Tokenise `english_text()` once (no special tokens) and cut it: the first
    `calibration_fraction` of the tokens is calibration, the rest held out (disjoint, deterministic)."""
    if not 0.0 < calibration_fraction < 1.0:
        raise ConfigError(f"calibration_fraction must be in (0, 1), got {calibration_fraction}")
    ids = tokenizer(english_text(), add_special_tokens=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.int64)
    cut = int(len(ids) * calibration_fraction)
    return TokenSplits(calibration=ids[:cut], heldout=ids[cut:])


def spread_windows(ids: torch.Tensor, count: int, seq_len: int) -> torch.Tensor:
    """count // seq_len windows [n, seq_len] spread evenly from the start to the end of `ids`
    (the topic help changes subject every few hundred tokens: a prefix would cover a few topics)."""
    n = min(len(ids), count) // seq_len
    if seq_len < 1 or n < 1:
        raise ConfigError(f"{len(ids)} tokens (of {count} asked) do not fill one window of seq_len={seq_len}")
    starts = torch.linspace(0, len(ids) - seq_len, n).long().tolist()
    return torch.stack([ids[s : s + seq_len] for s in starts])
