"""Building the generic MoE layer's parts from a composed config (below api, loader and compose,
which all need it)."""

from __future__ import annotations

from omegaconf import DictConfig

from quantfw.backends import Backend, get_backend
from quantfw.errors import ConfigError
from quantfw.formats.format import Format
from quantfw.layout.spec import Dims
from quantfw.moe.layer import MoELayer
from quantfw.schemes.scheme import Scheme


def components(cfg: DictConfig) -> tuple[Scheme, Format, Backend]:
    return Scheme.from_config(cfg.scheme), Format.from_config(cfg.format), get_backend(cfg.backend)


def layer_dims(cfg: DictConfig) -> Dims:
    """This rank's dims: experts split over ep_size ranks, the intermediate size over tp_size."""
    m = cfg.model
    if m.num_experts % cfg.ep_size:
        raise ConfigError(f"model.num_experts={m.num_experts} is not divisible by ep_size={cfg.ep_size}")
    return Dims(E=m.num_experts // cfg.ep_size, H=m.hidden_size, I=m.moe_intermediate_size, tp=cfg.tp_size)


def build_layer(cfg: DictConfig) -> MoELayer:
    """An unloaded layer for the recipe's model, scheme, format and backend at this rank."""
    scheme, fmt, backend = components(cfg)
    dims = layer_dims(cfg)
    return MoELayer(scheme, fmt, backend, dims, expert_offset=cfg.ep_rank * dims.E)
