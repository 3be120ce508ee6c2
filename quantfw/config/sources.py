"""Where configs may come from: conf/, recipes/ and the user folders named on the command line.

Hydra joins a defaults entry or a group override to each search-path folder and follows `..`,
absolute paths and symlinks, so a recipe could load (and print, or write into metadata) any file.
Before Hydra reads anything, every user folder is scanned: its config files must be regular files
inside it, no file may set `hydra.searchpath`, and every defaults entry must be a plain name.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from quantfw.errors import ConfigError

MAX_ENTRIES = 5000  # a recipe folder, not a home directory: scanning stays cheap
MAX_FILE_BYTES = 1 << 20  # a recipe is a few hundred bytes; refuse a huge file before parsing it


def user_dir(path: str) -> Path:
    """A folder named by --config-dir or hydra.searchpath=, which must exist."""
    if "://" in path:
        scheme, rest = path.split("://", 1)
        if scheme != "file":
            raise ConfigError(f"config folder '{path}': only folders (file://) are allowed, not {scheme}://")
        path = rest
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"config folder '{path}' {'is not a folder' if p.exists() else 'does not exist'}")
    return p.resolve()


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def scan_user_dirs(dirs: Sequence[str | Path]) -> None:
    for d in dirs:
        root = Path(d).resolve()
        for n, (path, is_dir) in enumerate(_entries(root)):
            if n >= MAX_ENTRIES:
                raise ConfigError(
                    f"config folder '{d}' holds more than {MAX_ENTRIES} entries; point it at the recipe folder"
                )
            where = path.relative_to(root)
            real = path.resolve()
            if not _inside(real, root):
                raise ConfigError(
                    f"{d}/{where}: links outside the config folder (to {real}); copy the file in"
                )
            if not is_dir and path.suffix in (".yaml", ".yml"):
                _check_file(path, f"{d}/{where}")


def _entries(root: Path) -> Iterable[tuple[Path, bool]]:
    """Every entry under root, hidden folders (.git) skipped: Hydra never loads from them since
    defaults entries may not name a hidden component."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        for n in dirnames:
            yield Path(dirpath) / n, True
        for n in sorted(filenames):
            yield Path(dirpath) / n, False


def _check_file(path: Path, shown: str) -> None:
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{shown}: not a regular file")
    if st.st_size > MAX_FILE_BYTES:
        raise ConfigError(f"{shown}: {st.st_size} bytes, more than a recipe can need ({MAX_FILE_BYTES})")
    try:
        cfg = OmegaConf.load(path)
    except (OmegaConfBaseException, ValueError, OSError) as e:
        raise ConfigError(f"{shown}: not a YAML config ({str(e).splitlines()[0]})") from None
    except Exception as e:  # yaml.YAMLError: say what and where
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{shown}: not a YAML config ({getattr(e, 'problem', None) or e}{where})") from None
    if not OmegaConf.is_dict(cfg):
        return  # Hydra refuses it itself, with the file named
    if OmegaConf.select(cfg, "hydra.searchpath", throw_on_missing=False) is not None:
        raise ConfigError(
            f"{shown}: hydra.searchpath: recipes may not extend the config search path; "
            "pass --config-dir on the command line"
        )
    defaults = OmegaConf.to_container(cfg, resolve=False).get("defaults", [])
    for entry in defaults if isinstance(defaults, list) else [defaults]:
        check_defaults_entry(entry, shown)


def check_name(name: str, what: str) -> None:
    """A config or group name: plain components, nothing that could leave the search-path folder.
    Hydra's own groups (hydra/launcher, ...) keep their slash: hydra_guard refuses what they change."""
    plain = name[len("hydra/") :] if name.startswith("hydra/") else name
    bad = (
        "contains an interpolation"
        if "${" in name
        else "is an absolute path"
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":")
        else "contains a path separator"
        if "/" in plain or "\\" in plain
        else "starts with '.' (a parent or hidden folder)"
        if plain.startswith(".")
        else None
    )
    if bad:
        raise ConfigError(
            f"{what}: '{name}' {bad}; only names of configs in the recipe folder or conf/ are allowed"
        )


def check_defaults_entry(entry, shown: str) -> None:
    if isinstance(entry, str):
        check_name(entry.split("@", 1)[0].strip(), f"{shown}: defaults entry '{entry}'")
        return
    if not isinstance(entry, dict):
        raise ConfigError(f"{shown}: defaults entry {entry!r} is not a name or a 'group: option' pair")
    for key, value in entry.items():
        group = str(key)
        for word in ("override ", "optional "):
            group = group.strip()
            group = group[len(word) :] if group.startswith(word) else group
        group = group.strip()
        label = f"{shown}: defaults entry '{key}: {value}'"
        check_name(group.split("@", 1)[0].strip(), label)
        for option in value if isinstance(value, list) else [value]:
            if option is not None:
                check_name(str(option), label)


def check_group_overrides(overrides: Sequence[str], groups: set[str]) -> None:
    """Command-line group choices (model=..., scheme=...), each value of a sweep included."""
    from hydra.core.override_parser.types import ValueType

    from quantfw.config.sweep import parse_overrides

    for o in parse_overrides(overrides):
        group = o.key_or_group
        if group not in groups and "/" not in group:
            continue
        check_name(group, f"override '{o.input_line}'")
        if (o.is_delete() and o.value() is None) or o.value_type in (
            ValueType.GLOB_CHOICE_SWEEP,
            ValueType.INTERVAL_SWEEP,
        ):
            continue  # a glob lists options Hydra found in the folders; each job is checked expanded
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        for v in values:
            if v not in ("null", ""):
                check_name(v, f"override '{o.input_line}'")


def group_names(dirs: Sequence[str | Path]) -> set[str]:
    """Folders that can be config groups: any first-level folder of conf/ or a user folder."""
    return {p.name for d in dirs if Path(d).is_dir() for p in Path(d).iterdir() if p.is_dir()}
