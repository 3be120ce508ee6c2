"""The Python API: build the generic MoE layer from a recipe or a composed config."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from quantfw.build import build_layer, components, layer_dims, local_experts, placement
from quantfw.config.compose import compose
from quantfw.io.loader import from_checkpoint as _load_one
from quantfw.moe.layer import MoELayer

__all__ = [
    "build_from_recipe",
    "build_layer",
    "components",
    "from_checkpoint",
    "layer_dims",
    "local_experts",
    "placement",
]


def from_checkpoint(
    path: str | Path,
    layer: int = -1,
    backend: str = "torch",
    ep_rank: int = 0,
    ep_size: int = 1,
    tp_rank: int = 0,
    tp_size: int = 1,
    recipe_overrides: Sequence[str] | None = None,
    recipe: str = "default",
    process_group=None,
):
    """The loaded MoE layer `layer` (-1: the first MoE layer) of a quantized checkpoint.

    With `process_group` (or an initialized torch.distributed world of several processes) every
    process loads only its experts / TP slices and the result is the expert- and tensor-parallel
    layer (quantfw.moe.parallel.ParallelMoE; tp_size from the argument, ep_size = world / tp_size).
    Otherwise the single-process layer of rank (ep_rank, tp_rank)."""
    from quantfw.moe import parallel

    explicit_rank = (ep_rank, ep_size, tp_rank) != (0, 1, 0)  # one rank's layer, as asked
    group = None if explicit_rank and process_group is None else parallel.group_or_world(process_group)
    if group is None:
        return _load_one(path, layer, backend, ep_rank, ep_size, tp_rank, tp_size, recipe_overrides, recipe)
    return parallel.from_checkpoint(path, group, layer, backend, tp_size, recipe_overrides or (), recipe)


def build_from_recipe(recipe: str = "default", overrides: Sequence[str] = ()) -> MoELayer:
    return build_layer(compose(recipe, overrides))
