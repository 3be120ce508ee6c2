"""The declared options of a config group (conf/<group>/*.yaml and the plugin conf folders) as
plain data, without composing a recipe: each option merged over its `defaults` bases (same group)
and the group's schema defaults. Detection uses it to compare a checkpoint's facts with every
declared scheme and format."""

from __future__ import annotations

import functools
from typing import Any

from omegaconf import OmegaConf

from quantfw.config import schema
from quantfw.config.options import available, option_file
from quantfw.errors import ConfigError

GROUP_SCHEMAS = {"scheme": "SchemeConfig", "format": "FormatConfig"}


def _load(group: str, name: str, seen: tuple[str, ...]) -> Any:
    path = option_file(group, name)
    if name in seen or path is None:
        raise ConfigError(
            f"{group}/{name}.yaml: option '{name}' missing or its defaults form a cycle ({' -> '.join(seen)})"
        )
    data = OmegaConf.load(path)
    bases = [d for d in data.pop("defaults", []) if isinstance(d, str) and d != "_self_"]
    return OmegaConf.merge(*(_load(group, b, (*seen, name)) for b in bases), data)


@functools.cache
def declarations(group: str) -> dict[str, dict[str, Any]]:
    """name -> the option's data with schema defaults filled in, for every option of the group in
    conf/ and the installed plugins' conf folders."""
    base = OmegaConf.structured(getattr(schema, GROUP_SCHEMAS[group])) if group in GROUP_SCHEMAS else {}
    out = {}
    for name in available(group):
        merged = OmegaConf.merge(OmegaConf.to_container(base), _load(group, name, ()))
        out[name] = OmegaConf.to_container(merged, resolve=True)
    return out
