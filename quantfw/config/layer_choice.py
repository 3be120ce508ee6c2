"""Per-layer scheme choices, recipe key `layers`: `{"0-2": w8a8, "61": w8a8}` maps decoder layers
(one index or an inclusive range) to a scheme of the `scheme` config group. The routed experts of
those layers use that scheme; every other layer uses the recipe's `scheme`. A layer without routed
experts (a dense layer) has its MLP linears written with the choice instead (quantize/routing.py).

Keys and names are checked when a recipe is composed: a bad range, an overlap or an unknown scheme
is one line naming the key. Schemes are resolved by composing the base recipe with `scheme=NAME`,
so a choice is the scheme file as declared (the recipe's own scheme keys never leak into it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from quantfw.config.hydra_session import compose_node
from quantfw.config.options import available
from quantfw.config.validation import check_config
from quantfw.errors import ConfigError
from quantfw.formats.format import Format
from quantfw.schemes.scheme import Scheme

RANGE_RE = re.compile(r"^(\d+)(?:-(\d+))?$")
MAX_LAYER = 1 << 16


def parse_key(key: object) -> range:
    """`"61"` or `"0-2"` (inclusive) -> the layer indices it names."""
    m = RANGE_RE.match(str(key).strip())
    if m is None:
        raise ConfigError(
            f"layers.{key}: expected a layer index or an inclusive range 'A-B' (e.g. '0-2', '61')"
        )
    lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
    if hi < lo or hi >= MAX_LAYER:
        raise ConfigError(f"layers.{key}: range {lo}-{hi} is empty or beyond {MAX_LAYER - 1}")
    return range(lo, hi + 1)


def parse_choices(node: Mapping | DictConfig | None) -> dict[int, str]:
    """layer -> scheme name; an index named by two keys is refused naming both."""
    if not node:
        return {}
    if not isinstance(node, (Mapping, DictConfig)):
        raise ConfigError(f"layers: expected a mapping like {{'0-2': w8a8}}, found {node!r}")
    items = node.items_ex(resolve=True) if isinstance(node, DictConfig) else node.items()
    out: dict[int, str] = {}
    owner: dict[int, str] = {}
    for key, name in items:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"layers.{key}: expected a scheme name, found {name!r}")
        for layer in parse_key(key):
            if layer in out:
                raise ConfigError(
                    f"layers.{key}: layer {layer} is also chosen by layers.{owner[layer]} (overlap)"
                )
            out[layer], owner[layer] = name, str(key)
    return out


def ranges_text(layers: Sequence[int]) -> str:
    """[0, 1, 2, 61] -> '0-2, 61'."""
    out, run = [], []
    for layer in sorted(layers):
        if run and layer != run[-1] + 1:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(layer)
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)


def by_scheme(choices: Mapping[int, str]) -> dict[str, list[int]]:
    """scheme name -> its layers, in first-layer order."""
    out: dict[str, list[int]] = {}
    for layer, name in sorted(choices.items()):
        out.setdefault(name, []).append(layer)
    return out


def _user_dirs() -> list[str]:
    """The running command's config folders (--config-dir), when inside the Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    sources = HydraConfig.get().runtime.config_sources
    return sorted({s.path for s in sources if s.schema == "file" and s.provider != "hydra"})


def resolve(names: Mapping[str, str], fmt_name: str, config_dirs: Sequence[str | Path] | None = None) -> dict:
    """scheme name -> its composed scheme node (the base recipe with `scheme=NAME format=FMT`);
    `names`: scheme name -> the `layers` key naming it (for messages). Hydra's state is kept for
    a running command."""
    from hydra.core.global_hydra import GlobalHydra

    dirs = list(config_dirs) if config_dirs is not None else _user_dirs()
    known = available("scheme", dirs)
    out = {}
    gh = GlobalHydra.instance()
    running = gh.hydra if gh.is_initialized() else None
    try:
        for name, key in names.items():
            if name not in known:
                raise ConfigError(f"layers.{key}: unknown scheme '{name}' (available: {', '.join(known)})")
            try:
                # the base recipe's own checks only: its `layers` (if any) are not this choice's
                cfg = compose_node("default", [f"scheme={name}", f"format={fmt_name}"], dirs)
                check_config(cfg)
            except ConfigError as e:
                raise ConfigError(f"layers.{key}: {e}") from None
            out[name] = cfg.scheme
    finally:
        if running is not None and not GlobalHydra.instance().is_initialized():
            GlobalHydra.instance().initialize(running)
    return out


def layer_schemes(cfg: DictConfig, config_dirs: Sequence[str | Path] | None = None) -> dict[int, Scheme]:
    """layer -> Scheme of every chosen layer (the recipe's format must hold each)."""
    choices = parse_choices(cfg.get("layers"))
    if not choices:
        return {}
    fmt = Format.from_config(cfg.format)
    keys = {name: ranges_text(layers) for name, layers in by_scheme(choices).items()}
    nodes = resolve(keys, cfg.format.name, config_dirs)
    schemes = {}
    for name, node in nodes.items():
        s = Scheme.from_config(node)
        try:
            fmt.check_compatible(s)
        except ConfigError as e:
            raise ConfigError(f"layers ({name}): {e}") from None
        schemes[name] = s
    return {layer: schemes[name] for layer, name in choices.items()}


def check(cfg: DictConfig, config_dirs: Sequence[str | Path] | None = None) -> None:
    """Compose-time check of `layers` (syntax, overlap, names, format), nothing when it is empty."""
    if cfg.get("layers"):
        layer_schemes(cfg, config_dirs)


def as_data(cfg: DictConfig) -> dict[str, str]:
    node = cfg.get("layers")
    return {} if not node else {str(k): str(v) for k, v in OmegaConf.to_container(node).items()}
