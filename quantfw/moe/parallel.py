"""Expert- and tensor-parallel MoE layer over a torch.distributed process group (gloo on CPU).

Rank r of a world of W = ep_size * tp_size processes is expert-parallel rank r // tp_size and
tensor-parallel rank r % tp_size. It holds the experts the recipe's placement gives its EP rank
(quantfw/parallel/placement.py), each sliced for its TP rank as the format's shard rules declare.

Forward (all-gather dispatch, reduce-scatter combine):
1. all-gather every rank's tokens (padded to the largest rank's count) and routing;
2. each rank runs its experts on the token-expert pairs whose expert's PRIMARY copy it holds (a
   redundant copy computes nothing, so no pair counts twice) and writes each pair's unweighted
   output row into a zero [W * T_max * k, H] fp32 slot buffer;
3. reduce-scatter (sum) gives each rank the rows of its own tokens' slots. Under pure EP exactly
   one rank wrote each slot, so the sum adds zeros only: exact in any reduction order. Under TP
   the slot is the fp32 sum of the TP ranks' K-slice partials;
4. each rank weights and sums its tokens' slots in the single-process order (combine_tokens).
Under TP a token's SwiGLU output row is split over the TP ranks; its int8 quantization (the w2
input) takes the per-token amax of the whole row, one MAX all_reduce over the TP group
(quantfw.ops.rowmax), so every TP rank quantizes its slice with the scale TP 1 uses.
Hence EP output equals the single-process layer bit for bit whatever the placement, token loads
or reduction order. The price is k slot rows per token on the wire instead of one partial sum;
summing partials per token would make the result depend on which experts share a rank.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from quantfw.errors import CheckpointError, ConfigError, QuantfwError
from quantfw.moe.layer import MoELayer, combine_tokens, local_id_table, local_ids, slot_order
from quantfw.ops.rowmax import rows_split
from quantfw.parallel.dist import init_gloo
from quantfw.parallel.placement import Placement

# Bound on every collective of a process group this module creates (seconds; env override).
TIMEOUT_ENV = "QUANTFW_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0


def timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return timedelta(seconds=seconds)


def init_world() -> bool:
    """Join the torchrun world (gloo, bounded collectives) when launched with WORLD_SIZE > 1 and no
    group exists yet. True when this call created the group (the caller destroys it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    init_gloo(timeout())
    return True


def group_or_world(process_group=None):
    """The group to run expert parallel on: the given one, else an initialized world of several
    processes, else None (single process)."""
    if process_group is not None:
        return process_group
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def mesh(group, tp_size: int) -> tuple[int, int, int, int]:
    """(ep_rank, ep_size, tp_rank, tp_size) of this process in `group`."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if tp_size < 1 or world % tp_size:
        raise ConfigError(f"tp_size={tp_size} does not divide the {world} processes of the group")
    return rank // tp_size, world // tp_size, rank % tp_size, tp_size


def tp_group(group, tp_size: int):
    """This rank's tensor-parallel group (the tp_size consecutive ranks of `group` sharing its EP
    rank), or None at tp_size 1. Only its members take part in creating it."""
    if tp_size <= 1:
        return None
    first = dist.get_rank(group) // tp_size * tp_size
    ranks = [dist.get_global_rank(group, r) for r in range(first, first + tp_size)]
    return dist.new_group(ranks, timeout=timeout(), use_local_synchronization=True)


def agree(group, error: str | None, what: str) -> None:
    """Every rank learns whether any rank failed `what`; all then raise the same one-line error
    naming the first failed rank (a dead rank ends the exchange by the group's timeout)."""
    reports: list[str | None] = [None] * dist.get_world_size(group)
    try:
        dist.all_gather_object(reports, error, group=group)
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{what}: a rank stopped before reporting ({first})") from None
    failed = [(r, m) for r, m in enumerate(reports) if m is not None]
    if failed:
        r, msg = failed[0]
        more = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
        raise CheckpointError(f"{what}: rank {r} of {len(reports)}: {msg}{more}")


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else ""
    return line if isinstance(e, QuantfwError) else f"{type(e).__name__}: {line}"


class ParallelMoE(torch.nn.Module):
    """forward(hidden [T, H], topk_weights [T, k], topk_ids [T, k]) of THIS rank's tokens (global
    expert ids) -> [T, H]; every rank of the group calls it (collective), with any T >= 0."""

    def __init__(self, local: MoELayer, placement: Placement, ep_rank: int, tp_size: int, group):
        super().__init__()
        self.local, self.placement, self.group = local, placement, group
        self.ep_rank, self.tp_size = ep_rank, tp_size
        self.num_experts = placement.num_experts
        if tuple(local.experts) != placement.local(ep_rank):
            raise ConfigError(
                f"placement: ep_rank {ep_rank} holds {placement.local(ep_rank)} but its layer has {local.experts}"
            )
        # Pairs this rank computes: its primary copies, as local expert indices.
        primaries = set(placement.primaries(ep_rank))
        table = local_id_table(local.experts)
        table[[e for e in local.experts if e not in primaries]] = -1
        self._compute_of = table
        self._tp_group = tp_group(group, tp_size)

    @property
    def dims(self):
        return self.local.dims

    @torch.no_grad()
    def forward(
        self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        T, H = hidden_states.shape
        k = topk_ids.shape[1]
        world = dist.get_world_size(self.group)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([T], dtype=torch.int64), group=self.group)
        t_max = max(int(s) for s in sizes)
        x_all = self._gather(_pad(hidden_states, t_max, 0), world)
        ids_all = self._gather(_pad(topk_ids.long(), t_max, -1), world)
        order = slot_order(local_ids(self._compute_of, ids_all), 0, self.local.dims.E)
        slots = torch.zeros(world * t_max * k, H, dtype=torch.float32)
        if order.numel():
            counts = torch.bincount(self._compute_of[ids_all.reshape(-1)[order]], minlength=self.local.dims.E)
            with rows_split(self._row_max) if self._tp_group is not None else nullcontext():
                rows = self.local.expert_rows(x_all[order // k], counts.to(torch.int64))
            slots[order] = rows.float()
        mine = torch.empty(t_max * k, H, dtype=torch.float32)
        dist.reduce_scatter_single(mine, slots, op=dist.ReduceOp.SUM, group=self.group)
        home = slot_order(topk_ids, 0, self.num_experts)
        return combine_tokens(mine[home], topk_weights, home, hidden_states)

    def _row_max(self, amax: torch.Tensor) -> torch.Tensor:
        """The whole row's amax from this TP rank's slice amax (TP ranks of one EP rank compute
        the same rows, so they make the same calls in the same order)."""
        out = amax.float().contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self._tp_group)
        return out.to(amax.dtype)

    def _gather(self, t: torch.Tensor, world: int) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts)


def _pad(t: torch.Tensor, rows: int, value) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, torch.full((rows - t.shape[0], *t.shape[1:]), value, dtype=t.dtype)])


def open_parallel(
    path: str | Path,
    group,
    tp_size: int = 1,
    recipe_overrides: Sequence[str] = (),
    recipe: str = "default",
    backend: str | None = "torch",
):
    """This rank's view of a quantized checkpoint (quantfw.io.loader.Opened for its EP/TP rank);
    a failure on any rank is raised on every rank as one line naming it."""
    from quantfw.io.loader import open_checkpoint

    ep_rank, ep_size, tp_rank, tp_size = mesh(group, tp_size)
    op, error = None, None
    try:
        op = open_checkpoint(path, recipe, recipe_overrides, ep_rank, ep_size, tp_rank, tp_size, backend)
    except Exception as e:  # reported to every rank below, then raised there as one line
        error = one_line(e)
    agree(group, error, f"opening {path} (ep_size={ep_size}, tp_size={tp_size})")
    return op


def load_parallel(op, group, layer: int = -1) -> ParallelMoE:
    """Each rank reads only its experts (its TP slices) of MoE layer `layer` (-1: the first)."""
    from quantfw.build import placement
    from quantfw.io.loader import load_layer

    cfg = op.cfg
    local, error = None, None
    try:
        local = load_layer(op, op.layer_index(layer))
    except Exception as e:  # reported to every rank below, then raised there as one line
        error = one_line(e)
    agree(
        group,
        error,
        f"loading {op.reader.folder} layer {layer} (ep_size={cfg.ep_size}, tp_size={cfg.tp_size})",
    )
    return ParallelMoE(local, placement(cfg), cfg.ep_rank, cfg.tp_size, group)


def from_checkpoint(
    path: str | Path,
    group,
    layer: int = -1,
    backend: str = "torch",
    tp_size: int = 1,
    recipe_overrides: Sequence[str] = (),
    recipe: str = "default",
) -> ParallelMoE:
    return load_parallel(open_parallel(path, group, tp_size, recipe_overrides, recipe, backend), group, layer)
