"""The Python API: build the generic MoE layer from a recipe or a composed config."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from quantfw.backends import Backend, get_backend
from quantfw.config.compose import compose
from quantfw.errors import ConfigError
from quantfw.formats.format import Format
from quantfw.io.loader import from_checkpoint as _load_one
from quantfw.layout.spec import Dims
from quantfw.moe.layer import MoELayer
from quantfw.parallel.placement import Placement
from quantfw.schemes.scheme import Scheme


def components(cfg: DictConfig) -> tuple[Scheme, Format, Backend]:
    return Scheme.from_config(cfg.scheme), Format.from_config(cfg.format), get_backend(cfg.backend)


def placement(cfg: DictConfig) -> Placement:
    """The recipe's expert placement over the ep_size expert-parallel ranks (`placement` key)."""
    declared = cfg.get("placement")
    if isinstance(declared, DictConfig | ListConfig):
        declared = OmegaConf.to_container(declared, resolve=True)
    return Placement.from_config(declared, cfg.model.num_experts, cfg.ep_size)


def local_experts(cfg: DictConfig) -> tuple[int, ...]:
    """Global ids of the routed experts this expert-parallel rank holds, in local order."""
    experts = placement(cfg).local(cfg.ep_rank)
    if not experts:
        raise ConfigError(
            f"placement: ep_rank={cfg.ep_rank} holds no experts (every rank needs at least one)"
        )
    return experts


def layer_dims(cfg: DictConfig) -> Dims:
    """This rank's dims: its placed experts, the intermediate size split over tp_size."""
    m = cfg.model
    return Dims(E=len(local_experts(cfg)), H=m.hidden_size, I=m.moe_intermediate_size, tp=cfg.tp_size)


def build_layer(cfg: DictConfig) -> MoELayer:
    """An unloaded layer for the recipe's model, scheme, format and backend at this rank."""
    scheme, fmt, backend = components(cfg)
    return MoELayer(scheme, fmt, backend, layer_dims(cfg), experts=local_experts(cfg))


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
