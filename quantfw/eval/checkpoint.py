"""Per-layer error of a quantized checkpoint against its float reference checkpoint (first version).

Every MoE layer is loaded from the quantized checkpoint (scheme detected from its metadata) and
compared with the float experts (FloatMoE) of the reference on the same synthetic tokens (outlier
channels) and routing. Rows are plain dicts so later evaluations (per expert, perplexity) can add
columns without changing this one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from quantfw.errors import CheckpointError
from quantfw.eval.metrics import compare
from quantfw.eval.synthetic import hidden_states, random_routing
from quantfw.io.experts import MoEModel, read_float_experts
from quantfw.io.fields import Fields
from quantfw.io.loader import load_layer, open_checkpoint
from quantfw.io.reader import CheckpointReader
from quantfw.moe.reference import FloatMoE
from quantfw.progress import bar


def evaluate_checkpoint(
    checkpoint: str | Path,
    reference: str | Path,
    tokens: int = 256,
    seed: int = 0,
    recipe: str = "default",
    recipe_overrides: Sequence[str] = (),
    per_expert: bool = False,
    progress: bool = True,
    layer_plan=None,
) -> list[dict]:
    """One row per MoE layer; with per_expert each row gets `experts`: the same metrics per expert
    on the tokens routed to it (that expert alone, weight 1), plus the values of the scheme's
    optional parameters in use (`alphas` per layer, `alpha` per expert, when it clips)."""
    op = open_checkpoint(checkpoint, recipe, recipe_overrides, layer_plan=layer_plan)
    ref, ref_model = _reference(reference, op)
    E, H = op.model.num_experts, op.model.hidden_size
    top_k = Fields(ref.config(), ref.folder / "config.json").integer("num_experts_per_tok", 1, E, default=2)
    x = hidden_states(tokens, H, seed=seed + 1)
    weights, ids = random_routing(tokens, E, top_k, seed=seed + 2)
    rows = []
    for layer in bar(op.prefixes, progress=progress, desc="eval", unit="layer"):
        quant = load_layer(op, layer)
        w13, w2 = read_float_experts(ref, ref_model, layer)
        ref_moe = FloatMoE(w13, w2)
        m = compare(quant(x, weights, ids), ref_moe(x, weights, ids))
        row = {"layer": layer, "scheme": op.at(layer).scheme.name, "format": op.fmt.name, "tokens": tokens, **m}
        learned = _learned(op.at(layer), quant)
        row.update({f"{name}s": values for name, values in learned.items()})
        if per_expert:
            row["experts"] = _per_expert(quant, ref_moe, x, ids, learned)
        rows.append(row)
    return rows


def _reference(reference: str | Path, op) -> tuple[CheckpointReader, MoEModel]:
    """The float reference, its dims checked against its tensors and equal to the checkpoint's."""
    ref = CheckpointReader(reference)
    model = MoEModel.from_reader(ref)
    mine, theirs = ((m.num_experts, m.hidden_size, m.moe_intermediate_size) for m in (op.model, model))
    if mine != theirs:
        raise CheckpointError(
            f"{ref.folder / 'config.json'}: reference dims (E, H, I) = {theirs} differ from "
            f"{op.reader.folder}'s {mine}"
        )
    return ref, model


def _learned(op, quant) -> dict[str, list[float]]:
    """Per-expert values of the scheme's optional parameters in use (its clip factors), by name."""
    out = {}
    for name, p in op.scheme.optional_in_use().items():
        for role in p.roles:
            t = getattr(quant, f"{role}_{name}", None)
            if t is not None:
                out[name] = [float(a) for a in t.reshape(-1)]
    return out


def _per_expert(quant, ref_moe, x, ids, learned: dict[str, list[float]]) -> list[dict]:
    out = []
    for e in range(ref_moe.num_experts):
        tok = (ids == e).any(-1)
        n = int(tok.sum())
        row = {"expert": e, "tokens": n, **{name: values[e] for name, values in learned.items()}}
        if n:
            xe, one = x[tok], torch.ones(n, 1)
            ide = torch.full((n, 1), e, dtype=torch.int64)
            row.update(compare(quant(xe, one, ide), ref_moe(xe, one, ide)))
        else:  # no token routed here: nothing measured (null, not NaN, in JSON)
            row.update(rel_l2=None, cosine=None, max_abs=None)
        out.append(row)
    return out


def checkpoint_perplexity(
    checkpoint: str | Path,
    reference: str | Path,
    tokens: int = 2048,
    seq_len: int = 256,
    seed: int = 0,
    recipe: str = "default",
    recipe_overrides: Sequence[str] = (),
    layer_plan=None,
) -> dict:
    """Held-out perplexity of the float causal LM in `reference`, and of the same model with every
    MoE block's experts replaced by the quantized layers of `checkpoint` (router, shared experts,
    attention stay float). Text of quantfw.eval.text with the reference's tokenizer, else
    pseudo-random ids (recorded in `token_source`)."""
    from quantfw.calibrate.model import calibration_tokens, load_float_model
    from quantfw.eval.perplexity import paired_delta, perplexity_details
    from quantfw.integrations.hf import swap_moe_experts

    op = open_checkpoint(checkpoint, recipe, recipe_overrides, layer_plan=layer_plan)
    _reference(reference, op)  # dims agree with the tensors before transformers sizes the model
    model = load_float_model(reference)
    ids, data = calibration_tokens(reference, model.config.vocab_size, tokens, seed, split="heldout")
    base = perplexity_details(model, ids, seq_len=seq_len, max_tokens=tokens)

    def factory(w13, w2, layer):
        if layer not in op.prefixes:
            raise CheckpointError(
                f"{op.reader.folder}: no quantized experts for MoE layer {layer} of {reference}"
            )
        return load_layer(op, layer)

    swap_moe_experts(model, factory)
    quant = perplexity_details(model, ids, seq_len=seq_len, max_tokens=tokens)
    return {
        "float": base.perplexity,
        "quantized": quant.perplexity,
        "delta": quant.perplexity / base.perplexity - 1,
        # 95% interval of the delta from the window-to-window spread (same windows for both models)
        "delta_ci95": paired_delta(base, quant)["ci95"],
        "windows": quant.windows,
        "predicted_tokens": quant.predicted_tokens,
        "seq_len": seq_len,
        "token_source": "tokenizer" if data.startswith("pydoc") else "pseudo_random",
        "data": data,
    }


WORST_EXPERTS = 3  # experts named per layer in the table, worst rel_l2 first


def worst_experts(row: dict, n: int = WORST_EXPERTS) -> str:
    """`e5 0.312, e1 0.297`: the n experts of a layer with the largest rel_l2 (tokens routed > 0)."""
    experts = [e for e in row.get("experts", []) if e.get("rel_l2") is not None]
    worst = sorted(experts, key=lambda e: -e["rel_l2"])[:n]
    return ", ".join(f"e{e['expert']} {e['rel_l2']:.3f}" for e in worst) or "-"


def format_rows(rows: list[dict]) -> str:
    head = f"{'layer':>5}  {'scheme':<10} {'format':<18} {'rel_l2':>8} {'cosine':>8} {'max_abs':>9}  worst experts (rel_l2)"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['layer']:>5}  {r['scheme']:<10} {r['format']:<18} {r['rel_l2']:>8.4f} {r['cosine']:>8.5f} {r['max_abs']:>9.4f}"
            f"  {worst_experts(r)}"
        )
    return "\n".join(lines)
