"""Per-layer error of a quantized checkpoint against its float reference checkpoint (first version).

Every MoE layer is loaded from the quantized checkpoint (scheme detected from its metadata) and
compared with the float experts (FloatMoE) of the reference on the same synthetic tokens (outlier
channels) and routing. Rows are plain dicts so later evaluations (per expert, perplexity) can add
columns without changing this one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from quantfw.eval.metrics import compare
from quantfw.eval.synthetic import hidden_states, random_routing
from quantfw.io.experts import MoEModel, read_float_experts
from quantfw.io.loader import load_layer, open_checkpoint
from quantfw.io.reader import CheckpointReader
from quantfw.moe.reference import FloatMoE


def evaluate_checkpoint(
    checkpoint: str | Path,
    reference: str | Path,
    tokens: int = 256,
    seed: int = 0,
    recipe: str = "default",
    recipe_overrides: Sequence[str] = (),
) -> list[dict]:
    op = open_checkpoint(checkpoint, recipe, recipe_overrides)
    ref = CheckpointReader(reference)
    ref_config = ref.config()
    ref_model = MoEModel.from_config(ref_config, str(ref.folder / "config.json"))
    top_k = int(ref_config.get("num_experts_per_tok", 2))
    E, H = op.model.num_experts, op.model.hidden_size
    x = hidden_states(tokens, H, seed=seed + 1)
    weights, ids = random_routing(tokens, E, top_k, seed=seed + 2)
    rows = []
    for layer in op.prefixes:
        quant = load_layer(op, layer)
        w13, w2 = read_float_experts(ref, ref_model, layer)
        m = compare(quant(x, weights, ids), FloatMoE(w13, w2)(x, weights, ids))
        rows.append({"layer": layer, "scheme": op.scheme.name, "format": op.fmt.name, "tokens": tokens, **m})
    return rows


def format_rows(rows: list[dict]) -> str:
    head = f"{'layer':>5}  {'scheme':<10} {'format':<18} {'rel_l2':>8} {'cosine':>8} {'max_abs':>9}"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['layer']:>5}  {r['scheme']:<10} {r['format']:<18} {r['rel_l2']:>8.4f} {r['cosine']:>8.5f} {r['max_abs']:>9.4f}"
        )
    return "\n".join(lines)
