"""Calibrating W4A8-clip alphas from a float HF checkpoint folder (what `quantfw quantize` runs).

By default the float model runs one decoder layer at a time (quantfw.calibrate.layerwise), each
layer's experts streamed a block at a time, so memory does not grow with the model. With
`calibration.layerwise=false` the whole float model is loaded with transformers (offline, fp32),
its MoE blocks swapped for `FloatMoE` (the same float experts, so the model output is unchanged)
and `ExpertCapture` hooks record every expert's pre-SwiGLU rows; the model-level guard needs this
path. Either way `learn_expert_alphas` (or its blocked parts) turns each layer's rows into alpha [E]
and both give the same results. Tokens: `tokens` (+ `guard_tokens`) in windows spread over the calibration split of
`quantfw.eval.text` tokenised with the checkpoint's tokenizer when it has one, else deterministic
pseudo-random ids from the seed (tiny test models ship no tokenizer); which one ran is recorded.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from quantfw.calibrate.equalize import EqualizedInputs, declared, equalize_metadata
from quantfw.calibrate.experts import (
    POLICIES,
    ExpertCapture,
    alpha_metadata,
    learn_expert_alphas,
)
from quantfw.calibrate.guard import guard_alphas, split_guard_windows
from quantfw.calibrate.result import CalibrationResult
from quantfw.errors import CheckpointError, ConfigError
from quantfw.schemes.scheme import Scheme

__all__ = ["CalibrationResult", "calibration_tokens", "calibrate_checkpoint", "load_float_model"]

SOURCES = ("none", "model")


def load_float_model(folder: str | Path):
    """The float causal LM of a HF checkpoint folder, fp32, eval mode, never touching the network."""
    from quantfw.integrations.hf import require_transformers

    tf = require_transformers()
    try:
        # use_safetensors: a pytorch_model.bin beside the shards is never unpickled
        model = tf.AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, local_files_only=True, use_safetensors=True
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
    from quantfw.integrations.hf import require_transformers

    return require_transformers().AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


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

    return scheme.clips or observers.needs_data(scheme.flags)


def calibrate_checkpoint(
    folder: str | Path,
    scheme: Scheme,
    calib,
    seed: int = 0,
    fmt=None,
    backend=None,
    work_dir: str | Path | None = None,
    mtp: str = "drop",
    share=None,
) -> CalibrationResult:
    """Capture every MoE layer's expert inputs from the float model in `folder`; alphas are learned
    only when the scheme clips. The captures are returned as `inputs` for the data-driven weight
    observers.

    `calib` is the recipe's `calibration` node (tokens, seq_len, batch_size, min_tokens, policy,
    max_rows, guard_tokens, layerwise, all_experts, ...). By default the model runs one decoder
    layer at a time (quantfw.calibrate.layerwise), spilling to `work_dir` (a temporary dir when
    None; an existing one resumes); `layerwise=false` loads the whole float model instead, which
    the model-level guard needs: with `guard_tokens` > 0 and the checkpoint format and backend
    given, learned alphas then pass the guard (quantfw.calibrate.guard) on that many extra tokens.
    The layerwise path skips the guard, says so on stderr and records it. `mtp` is the recipe's
    quantize.mtp: with `quantize` the layerwise path also learns the MTP layer's alphas. `share`
    (quantfw.parallel.calibration.ExpertShare) splits the routed experts over torch.distributed
    ranks on the layerwise path."""
    if calib.policy not in POLICIES:
        raise ConfigError(f"calibration.policy={calib.policy} (allowed: {', '.join(POLICIES)})")
    clips = scheme.clips
    guard_tokens = int(calib.get("guard_tokens", 0) or 0) if clips and fmt is not None else 0
    if guard_tokens < 0:
        raise ConfigError(f"calibration.guard_tokens={guard_tokens} (must be >= 0)")
    if not calib.get("layerwise", True):
        if declared(calib):
            raise ConfigError(
                "calibration.equalize runs in the layer-by-layer calibration only "
                "(found calibration.layerwise=false)"
            )
        return _calibrate_whole_model(folder, scheme, calib, seed, fmt, backend, guard_tokens)
    from quantfw.calibrate.decoder import check_model_type
    from quantfw.calibrate.layerwise import calibrate_layers
    from quantfw.io.reader import CheckpointReader

    config = CheckpointReader(folder).config()
    check_model_type(config, str(Path(folder) / "config.json"))
    ids, data = calibration_tokens(
        folder, int(config["vocab_size"]), calib.tokens, seed, seq_len=calib.seq_len
    )
    windows = _windows(ids, calib.seq_len, "calibration.tokens")
    guard = None
    if guard_tokens:
        guard = {"skipped": GUARD_SKIPPED}
        if share is None or share.lead:  # once, not once per torchrun rank
            print(
                f"quantfw calibrate: model-level guard skipped: {GUARD_SKIPPED}", file=sys.stderr, flush=True
            )
    results, inputs, owner = calibrate_layers(
        folder,
        scheme,
        calib,
        windows,
        work_dir,
        bool(calib.get("progress", True)),
        fmt,
        backend,
        mtp == "quantize",
        share=share,
    )
    alphas = {i: r.alphas for i, r in results.items() if r.alphas is not None}
    report = [row for r in results.values() for row in r.report]
    result = _result(
        alphas,
        report,
        {i: r.counts for i, r in results.items()},
        {i: r.kept for i, r in results.items()},
        data,
        seed,
        calib,
        int(windows.numel()),
        guard,
        inputs,
    )
    result.work_dir = owner
    scales = {i: r.scales for i, r in results.items() if r.scales is not None}
    if scales:
        result.scales = scales
        result.inputs = {i: EqualizedInputs(x, scales[i]) if i in scales else x for i, x in inputs.items()}
        result.equalization = equalize_metadata(declared(calib), scales)
    return result


GUARD_SKIPPED = (
    "it compares the quantized model's next-token loss with and without each layer's alphas, which "
    "needs the whole model in memory; calibration ran layer by layer (calibration.layerwise=false runs it)"
)


def _result(alphas, report, counts, kept, data, seed, calib, tokens, guard, inputs) -> CalibrationResult:
    """The CalibrationResult both paths return: counts[layer][e] routed tokens, kept[layer][e] rows."""
    common = dict(
        data=data,
        token_source="tokenizer" if data.startswith("pydoc") else "pseudo_random",
        seed=seed,
        seq_len=calib.seq_len,
        calibration_tokens=tokens,
        max_rows=calib.max_rows,
        # coverage[layer][e] = routed calibration tokens of expert e (including rows beyond max_rows)
        coverage={str(layer): list(c) for layer, c in counts.items()},
        # rows[layer][e] = captured rows kept (what the observers and the alpha search see)
        rows={str(layer): list(k) for layer, k in kept.items()},
    )
    if calib.get("all_experts", False):
        common["all_experts"] = True  # every expert's rows are every token (observers only)
    meta = {}
    if alphas:
        meta = alpha_metadata(report, data, calib.min_tokens, calib.policy)
        meta.update({k: v for k, v in common.items() if k not in ("seed", "rows")})
        meta["alphas"] = {str(layer): [round(float(a), 6) for a in alphas[layer]] for layer in alphas}
        meta["guard"] = guard
    return CalibrationResult(alphas, report, meta, inputs, common)


def _calibrate_whole_model(folder, scheme, calib, seed, fmt, backend, guard_tokens) -> CalibrationResult:
    """The whole float model in memory (transformers, fp32), experts captured by forward hooks."""
    from quantfw.integrations.hf import swap_moe_experts
    from quantfw.moe.reference import FloatMoE

    model = load_float_model(folder)
    weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def factory(w13, w2, layer):
        weights[layer] = (w13, w2)
        return FloatMoE(w13, w2)

    swap = swap_moe_experts(model, factory)
    experts = {
        e.layer_index: (model.get_submodule(e.path).experts, weights[e.layer_index][0]) for e in swap.entries
    }
    capture = ExpertCapture(
        experts, max_rows=calib.max_rows, all_experts=bool(calib.get("all_experts", False))
    )
    clips = scheme.clips
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
    layers = capture.layers
    return _result(
        alphas,
        report,
        {layer: cap.counts.tolist() for layer, cap in layers.items()},
        {layer: [cap.kept(e) for e in range(cap.num_experts)] for layer, cap in layers.items()},
        data,
        seed,
        calib,
        int(windows.numel()),
        guard,
        dict(layers),
    )
