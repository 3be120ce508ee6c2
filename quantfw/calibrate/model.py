"""Calibrating W4A8-clip alphas from a float HF checkpoint folder (what `quantfw quantize` runs).

The float model is loaded with transformers (offline, fp32), its MoE blocks are swapped for
`FloatMoE` (the same float experts, so the model output is unchanged), calibration tokens are run
through it while `ExpertCapture` records every expert's pre-SwiGLU rows, and `learn_expert_alphas`
turns each layer's rows into alpha [E]. Tokens: `tokens` (+ `guard_tokens`) in windows spread over the calibration split of
`quantfw.eval.text` tokenised with the checkpoint's tokenizer when it has one, else deterministic
pseudo-random ids from the seed (tiny test models ship no tokenizer); which one ran is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quantfw.calibrate.experts import (
    POLICIES,
    ExpertCapture,
    LayerCapture,
    alpha_metadata,
    learn_expert_alphas,
)
from quantfw.calibrate.guard import guard_alphas, split_guard_windows
from quantfw.errors import CheckpointError, ConfigError
from quantfw.schemes.scheme import Scheme

__all__ = ["CalibrationResult", "calibration_tokens", "calibrate_checkpoint", "load_float_model"]

SOURCES = ("none", "model")


@dataclass
class CalibrationResult:
    alphas: dict[int, torch.Tensor]  # MoE layer index -> alpha [E] fp32 (empty: scheme does not clip)
    report: list[dict]  # one row per (layer, expert): tokens, rows, alpha, status, errors
    metadata: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable provenance
    # MoE layer index -> per-expert weight-observer inputs, `inputs[layer](role, e)` (see LayerCapture)
    inputs: dict[int, LayerCapture] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)  # token source and coverage, alpha-independent

    @property
    def alpha_metadata(self) -> dict[str, Any] | None:
        return self.metadata if self.alphas else None


def load_float_model(folder: str | Path):
    """The float causal LM of a HF checkpoint folder, fp32, eval mode, never touching the network."""
    from quantfw.integrations.hf import _transformers

    tf = _transformers()
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, local_files_only=True
        )
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{folder}: transformers cannot load the float model ({first})") from None
    return model.eval()


def _tokenizer(folder: str | Path):
    """The checkpoint's tokenizer, or None when the folder has no tokenizer files."""
    folder = Path(folder)
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    from quantfw.integrations.hf import _transformers

    return _transformers().AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def calibration_tokens(
    folder: str | Path,
    vocab_size: int,
    count: int,
    seed: int,
    split: str = "calibration",
    seq_len: int | None = None,
):
    """(token ids int64 [count], description). Text split of pydoc topics when a tokenizer exists
    (the first `count` tokens, or with `seq_len` windows spread over the whole split), else
    pseudo-random ids in [0, vocab_size) from `seed` (calibration and held-out use disjoint seeds so
    they never coincide)."""
    tok = _tokenizer(folder)
    if tok is not None:
        from quantfw.eval.text import spread_windows, token_splits

        ids = getattr(token_splits(tok), split)
        name = Path(folder).name
        if seq_len is None:
            ids = ids[:count]
            return ids, f"pydoc_data.topics {split} split, first {len(ids)} tokens, tokenizer of {name}"
        n = len(ids)
        ids = spread_windows(ids, count, seq_len).reshape(-1)
        desc = (
            f"pydoc_data.topics {split} split, {len(ids) // seq_len} windows of {seq_len} tokens spread "
            f"over its {n} tokens, tokenizer of {name}"
        )
        return ids, desc
    g = torch.Generator().manual_seed(seed + (0 if split == "calibration" else 7919))
    ids = torch.randint(0, vocab_size, (count,), generator=g, dtype=torch.int64)
    return ids, f"pseudo-random token ids (seed {seed}, {split}, no tokenizer in checkpoint), {count} tokens"


def _windows(ids: torch.Tensor, seq_len: int, what: str) -> torch.Tensor:
    n = len(ids) // seq_len
    if seq_len < 1 or n < 1:
        raise ConfigError(f"{what}: {len(ids)} tokens do not fill one window of seq_len={seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


def needs_calibration(scheme: Scheme) -> bool:
    """Whether calibration data changes what `quantize` writes: clip alphas or a data-driven
    weight observer (asked from the observer registry)."""
    from quantfw.quantize import observers

    return bool(scheme.flags.get("activation_use_clip")) or observers.needs_data(scheme.flags)


def calibrate_checkpoint(
    folder: str | Path, scheme: Scheme, calib, seed: int = 0, fmt=None, backend=None
) -> CalibrationResult:
    """Capture every MoE layer's expert inputs from the float model in `folder` (see module doc);
    alphas are learned only when the scheme clips. The captures are returned as `inputs` for the
    data-driven weight observers.

    `calib` is the recipe's `calibration` node (tokens, seq_len, batch_size, min_tokens, policy,
    max_rows, guard_tokens). With `guard_tokens` > 0 and the checkpoint format and backend given,
    learned alphas pass the model-level guard (quantfw.calibrate.guard) on that many extra tokens."""
    from quantfw.integrations.hf import swap_moe_experts
    from quantfw.moe.reference import FloatMoE

    if calib.policy not in POLICIES:
        raise ConfigError(f"calibration.policy={calib.policy} (allowed: {', '.join(POLICIES)})")
    model = load_float_model(folder)
    weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def factory(w13, w2, layer):
        weights[layer] = (w13, w2)
        return FloatMoE(w13, w2)

    swap = swap_moe_experts(model, factory)
    experts = {
        e.layer_index: (model.get_submodule(e.path).experts, weights[e.layer_index][0]) for e in swap.entries
    }
    capture = ExpertCapture(experts, max_rows=calib.max_rows)
    clips = bool(scheme.flags.get("activation_use_clip"))
    guard_tokens = int(calib.get("guard_tokens", 0) or 0) if clips and fmt is not None else 0
    if guard_tokens < 0:
        raise ConfigError(f"calibration.guard_tokens={guard_tokens} (must be >= 0)")
    ids, data = calibration_tokens(
        folder, model.config.vocab_size, calib.tokens + guard_tokens, seed, seq_len=calib.seq_len
    )
    windows = _windows(ids, calib.seq_len, "calibration.tokens")
    windows, guard_windows = split_guard_windows(windows, guard_tokens // calib.seq_len)
    with torch.no_grad(), capture.attached():
        for i in range(0, len(windows), calib.batch_size):
            model(input_ids=windows[i : i + calib.batch_size], use_cache=False)
    alphas, report, guard = {}, [], None
    if clips:
        for layer, cap in capture.layers.items():
            w13, w2 = weights[layer]
            alphas[layer], rows = learn_expert_alphas(scheme, w13, w2, cap, calib.min_tokens, calib.policy)
            report += rows
        if guard_windows.shape[0]:
            alphas, guard = guard_alphas(
                model, swap, weights, alphas, guard_windows, scheme, fmt, backend, calib.batch_size
            )
    common = dict(
        data=data,
        token_source="tokenizer" if data.startswith("pydoc") else "pseudo_random",
        seed=seed,
        seq_len=calib.seq_len,
        calibration_tokens=int(windows.numel()),
        max_rows=calib.max_rows,
        # coverage[layer][e] = routed calibration tokens of expert e (including rows beyond max_rows)
        coverage={str(layer): cap.counts.tolist() for layer, cap in capture.layers.items()},
        # rows[layer][e] = captured rows kept (what the observers and the alpha search see)
        rows={
            str(layer): [cap.kept(e) for e in range(cap.num_experts)] for layer, cap in capture.layers.items()
        },
    )
    meta = {}
    if alphas:
        meta = alpha_metadata(report, data, calib.min_tokens, calib.policy)
        meta.update({k: v for k, v in common.items() if k not in ("seed", "rows")})
        meta["alphas"] = {str(layer): [round(float(a), 6) for a in alphas[layer]] for layer in alphas}
        meta["guard"] = guard
    return CalibrationResult(alphas, report, meta, dict(capture.layers), common)
