"""The checks of one composed recipe that need no other composition: no resolvers, the schema
(catches `+key=` additions), bounds, and the scheme and format built once so a malformed
declaration fails now, naming file and key. compose.validate adds the checks that compose more
(per-layer schemes) or read more files (engine profiles)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from quantfw.build import layer_dims
from quantfw.config.bounds import check_values
from quantfw.config.hydra_session import error_line
from quantfw.config.interpolation import check_no_resolvers
from quantfw.config.schema import QuantfwConfig
from quantfw.errors import ConfigError
from quantfw.formats.format import Format
from quantfw.schemes.scheme import Scheme


def check_config(cfg: DictConfig) -> None:
    check_no_resolvers(cfg)
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)  # a missing key or a cycle: one line
        plain.pop("hydra", None)
        OmegaConf.merge(OmegaConf.structured(QuantfwConfig), plain)
    except OmegaConfBaseException as e:
        raise ConfigError(error_line(e)) from None
    check_values(cfg)
    scheme = Scheme.from_config(cfg.scheme)
    fmt = Format.from_config(cfg.format)
    fmt.check_compatible(scheme)
    scheme.check_dims(layer_dims(cfg))
