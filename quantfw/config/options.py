"""Where the options of a config group live: quantfw's conf/, the conf folders of installed plugin
packages, and the user folders of a command.

A plugin package contributes options (format/, scheme/, backend/, engine/, ...) by naming one of
its packages under the entry-point group `quantfw.conf`; that package's folder is a conf root
beside conf/ (on Hydra's search path, read by detection and the loader). The entry names a
package, never a path, and no YAML can add a root. An option a plugin declares that quantfw or an
earlier plugin already declares is refused: a name means one file.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from quantfw.config.paths import CONF_DIR, RECIPES_DIR
from quantfw.errors import ConfigError

CONF_GROUP = "quantfw.conf"  # entry-point group of plugin conf folders


def _package_folders(ep: metadata.EntryPoint) -> list[Path]:
    where = f"plugin '{ep.name}' ({ep.value}, entry point group {CONF_GROUP})"
    try:
        spec = importlib.util.find_spec(ep.value)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"{where}: its package cannot be found ({exc})") from None
    if spec is None:
        raise ConfigError(f"{where}: no installed package '{ep.value}'")
    if spec.submodule_search_locations is None:
        raise ConfigError(
            f"{where}: '{ep.value}' is a module; expected a package whose folder holds conf groups"
        )
    return [Path(p).resolve() for p in spec.submodule_search_locations if Path(p).is_dir()]


def _options(root: Path) -> dict[str, Path]:
    """'group/name' -> file of every option under a conf root."""
    return {
        f"{group.name}/{f.stem}": f
        for group in sorted(root.iterdir())
        if group.is_dir() and not group.name.startswith((".", "_"))
        for f in sorted(group.glob("*.yaml"))
    }


@functools.cache
def plugin_roots() -> tuple[Path, ...]:
    """The conf folders of installed plugins (entry-point group `quantfw.conf`), in entry order."""
    owner = {key: "quantfw" for key in _options(CONF_DIR)}
    roots: list[Path] = []
    for ep in sorted(metadata.entry_points(group=CONF_GROUP), key=lambda e: e.name):
        for root in _package_folders(ep):
            if root in roots or root == CONF_DIR.resolve():
                continue
            for key in _options(root):
                if key in owner:
                    raise ConfigError(
                        f"plugin '{ep.name}' (entry point group {CONF_GROUP}): {root / key}.yaml "
                        f"declares '{key}', already declared by {owner[key]}; a name is declared once"
                    )
                owner[key] = f"plugin '{ep.name}'"
            roots.append(root)
    return tuple(roots)


def conf_roots() -> list[Path]:
    """conf/ and the plugin conf folders: every place a group option is read from, besides a
    command's user folders."""
    return [CONF_DIR, *plugin_roots()]


def available(group: str, extra_dirs: Sequence[str | Path] = ()) -> list[str]:
    """Option names of a config group (or 'recipe') found in conf/, plugin conf folders,
    recipes/ and user folders."""
    if group == "recipe":
        dirs = [RECIPES_DIR, *map(Path, extra_dirs)]
        return sorted({p.stem for d in dirs for p in Path(d).glob("*.yaml") if p.stem != "quantfw"})
    dirs = [*(root / group for root in conf_roots()), *(Path(d) / group for d in extra_dirs)]
    return sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.yaml")})


def option_file(group: str, name: str) -> Path | None:
    """The file of option `group/name` in conf/ or a plugin conf folder (None: neither has it)."""
    for root in conf_roots():
        path = root / group / f"{name}.yaml"
        if path.is_file():
            return path
    return None
