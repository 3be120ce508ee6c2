"""`quantfw quantize input=DIR output=DIR [scheme/format overrides] [overwrite=true]`."""

from __future__ import annotations

from omegaconf import DictConfig

from quantfw.api import components
from quantfw.errors import ConfigError
from quantfw.quantize.checkpoint import Dist, quantize_checkpoint


def run(cfg: DictConfig) -> str:
    if not cfg.input or not cfg.output:
        raise ConfigError("quantize needs input=DIR (float HF checkpoint) and output=DIR")
    scheme, fmt, _ = components(cfg)
    out = quantize_checkpoint(
        cfg.input,
        cfg.output,
        scheme,
        fmt,
        overwrite=cfg.overwrite,
        proj_names=dict(cfg.model.proj_names),
        dist=Dist.from_env(),
        targets=list(cfg.quantize.targets),
        ignore=list(cfg.quantize.ignore),
    )
    return str(out)
