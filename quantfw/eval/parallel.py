"""`eval` under torchrun: the expert/tensor-parallel quantized layers against the float reference.

Every rank draws the same synthetic tokens and routing; each feeds its share of the tokens to the
parallel layer (quantfw.moe.parallel) and the outputs are all-gathered. The float reference is
expert parallel too: each rank reads the float weights of its primary experts only and one fp32
all_reduce sums their contributions, so no rank holds a whole layer in either precision.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from quantfw.errors import ConfigError
from quantfw.eval.checkpoint import _reference
from quantfw.eval.metrics import compare
from quantfw.eval.synthetic import hidden_states, random_routing
from quantfw.io.experts import PROJS, key_of, read_float_experts
from quantfw.io.fields import Fields
from quantfw.moe.layer import local_id_table, local_ids
from quantfw.moe.parallel import load_parallel, open_parallel
from quantfw.moe.reference import FloatMoE
from quantfw.progress import bar


def float_experts_of(ref, model, layer: int, experts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Float w13 [n, 2I, H] and w2 [n, H, I] of `experts` only (per-expert keys); a fused
    transformers-5 layout is read whole and sliced."""
    from quantfw.io.experts import expert_prefixes
    from quantfw.io.fp8 import read_float

    prefix = expert_prefixes(ref.keys(), model).get(layer)
    keys = [key_of(prefix, e, model, p, "weight") for e in experts for p in PROJS] if prefix else []
    if not keys or any(k not in ref for k in keys):
        w13, w2 = read_float_experts(ref, model, layer)  # raises the one-line error when absent
        idx = torch.tensor(list(experts), dtype=torch.int64)
        return w13[idx], w2[idx]
    w = {
        (e, p): read_float(ref, key_of(prefix, e, model, p, "weight")).float() for e in experts for p in PROJS
    }
    w13 = torch.stack([torch.cat([w[e, "gate"], w[e, "up"]]) for e in experts])
    return w13, torch.stack([w[e, "down"] for e in experts])


def _share(n: int, rank: int, world: int) -> slice:
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return slice(lo, lo + base + (1 if rank < extra else 0))


def _gather_rows(y: torch.Tensor, n: int, world: int, group) -> torch.Tensor:
    """The ranks' consecutive row shares of an [n, H] result, on every rank."""
    parts = [
        torch.empty((_share(n, r, world).stop - _share(n, r, world).start, y.shape[1]), dtype=y.dtype)
        for r in range(world)
    ]
    dist.all_gather(parts, y.contiguous(), group=group)
    return torch.cat(parts)


def evaluate_parallel(
    checkpoint: str | Path,
    reference: str | Path,
    tokens: int,
    seed: int,
    recipe: str,
    recipe_overrides: Sequence[str],
    tp_size: int,
    group,
    progress: bool = True,
) -> list[dict]:
    """One row per MoE layer, as quantfw.eval.checkpoint.evaluate_checkpoint, on every rank."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    op = open_parallel(checkpoint, group, tp_size, recipe_overrides, recipe, backend=None)
    ref, ref_model = _reference(reference, op)
    E, H = op.model.num_experts, op.model.hidden_size
    top_k = Fields(ref.config(), ref.folder / "config.json").integer("num_experts_per_tok", 1, E, default=2)
    x = hidden_states(tokens, H, seed=seed + 1)
    weights, ids = random_routing(tokens, E, top_k, seed=seed + 2)
    mine = _share(tokens, rank, world)
    rows = []
    for layer in bar(op.prefixes, progress=progress and rank == 0, desc="eval", unit="layer"):
        quant = load_parallel(op, group, layer)
        y = _gather_rows(quant(x[mine], weights[mine], ids[mine]), tokens, world, group)
        # Float reference: this rank's primary experts once per TP group (tp rank 0), summed.
        primaries = quant.placement.primaries(quant.ep_rank) if op.cfg.tp_rank == 0 else ()
        ref_y = torch.zeros(tokens, H, dtype=torch.float32)
        if primaries:
            w13, w2 = float_experts_of(ref, ref_model, layer, primaries)
            ref_y = FloatMoE(w13, w2)(x.float(), weights, local_ids(local_id_table(primaries), ids))
        dist.all_reduce(ref_y, group=group)
        m = compare(y, ref_y.to(x.dtype))
        row = {"layer": layer, "scheme": op.scheme.name, "format": op.fmt.name, "tokens": tokens, **m}
        row.update(ep_size=int(op.cfg.ep_size), tp_size=int(op.cfg.tp_size))
        rows.append(row)
    return rows


def run_parallel_eval(cfg: DictConfig, recipe: str, overrides: list[str], provenance: dict) -> dict:
    """`torchrun --nproc-per-node P -m quantfw eval ... [tp_size=T]`: the expert/tensor-parallel
    layers (ep_size = P*nodes / T) vs the float reference; rank 0 prints and writes `out`."""
    from quantfw.eval import report
    from quantfw.eval.checkpoint import format_rows
    from quantfw.moe.parallel import init_world

    e = cfg.eval
    if e.perplexity or e.table or e.plot:
        raise ConfigError("eval under torchrun measures the layers only: drop eval.perplexity/table/plot")
    # The world's layout comes from torchrun; ep/tp rank overrides would contradict it.
    layout_keys = ("ep_size", "ep_rank", "tp_size", "tp_rank")
    overrides = [o for o in overrides if o.split("=", 1)[0] not in layout_keys]
    created = init_world()
    try:
        group = dist.group.WORLD
        rows = evaluate_parallel(
            cfg.checkpoint,
            cfg.reference,
            cfg.tokens,
            cfg.seed,
            recipe,
            overrides,
            cfg.tp_size,
            group,
            cfg.progress,
        )
        doc = {
            "schema": report.SCHEMA,
            "checkpoint": str(cfg.checkpoint),
            "reference": str(cfg.reference),
            "recipe_overrides": list(overrides),
            "tokens": int(cfg.tokens),
            "seed": int(cfg.seed),
            "layers": rows,
            "perplexity": None,
            "alpha_calibration": provenance.get("alpha_calibration"),
        }
        if dist.get_rank() == 0:
            if e.per_expert:
                print(
                    "eval under torchrun: per-layer rows only (eval.per_expert is single-process)",
                    file=sys.stderr,
                )
            print(format_rows(rows))
            if cfg.out:
                doc = report.write_results(cfg.out, doc)
        return doc
    finally:
        if created:
            dist.destroy_process_group()
