"""Building the generic MoE layer's parts from a composed config (below api, loader and compose,
which all need it)."""

from __future__ import annotations

from omegaconf import DictConfig, ListConfig, OmegaConf

from quantfw.backends import Backend, get_backend
from quantfw.errors import ConfigError
from quantfw.formats.format import Format
from quantfw.layout.spec import Dims
from quantfw.moe.layer import MoELayer
from quantfw.parallel.placement import Placement
from quantfw.schemes.scheme import Scheme


def components(cfg: DictConfig) -> tuple[Scheme, Format, Backend]:
    return Scheme.from_config(cfg.scheme), Format.from_config(cfg.format), get_backend(cfg.backend)


def placement(cfg: DictConfig) -> Placement:
    """The recipe's expert placement over the ep_size expert-parallel ranks (`placement` key)."""
    declared = cfg.get("placement")
    if cfg.ep_size == 1:
        # One process holds every expert: a placement declared for a torchrun world (the
        # quantize that wrote this checkpoint, say) does not apply to a lone reader.
        return Placement.contiguous(cfg.model.num_experts, 1)
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
