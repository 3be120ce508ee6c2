"""Hydra on a recipe: its sources checked, the search path (conf/, plugin conf folders, recipes/,
user folders) set, and Hydra's own errors turned into one line. `compose_node` is one recipe
composed and its hydra node checked, before quantfw's own validation (compose.py)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from quantfw.config.hydra_guard import check_hydra
from quantfw.config.options import available, conf_roots, plugin_roots
from quantfw.config.paths import RECIPES_DIR, searchpath_override
from quantfw.config.schema import register_configs
from quantfw.config.sources import check_group_overrides, check_name, group_names, scan_user_dirs, user_dir
from quantfw.config.sweep import split_overrides
from quantfw.errors import ConfigError

# The system temp folder, for Hydra's sweep records (conf/quantfw.yaml hydra.sweep.dir).
OmegaConf.register_new_resolver("quantfw_tmp", tempfile.gettempdir, replace=True)

GROUPS = ("scheme", "format", "model", "backend")


def error_line(e: BaseException) -> str:
    """One line from a Hydra/OmegaConf error: the message plus the key it names."""
    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        msg = str(cause).splitlines()[0]
        head = str(e).splitlines()[0] if cause is not e else ""
        return f"{head + ': ' if head.startswith('Error merging') else ''}{msg} (key: {cause.full_key})"
    skip = ("full_key", "object_type", "reference_type", "Config search path", "provider=")
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith(skip)]
    return "; ".join(lines[:2]) or type(e).__name__


def primary_dir(recipe: str, config_dirs: Sequence[str | Path] = ()) -> Path:
    """The folder whose `<recipe>.yaml` is the primary config: the first user folder that has it,
    else recipes/. The CLI's pre-check and the Hydra app both use this one answer."""
    for d in [*map(Path, config_dirs), RECIPES_DIR]:
        if (d / f"{recipe}.yaml").is_file():
            return d.resolve()
    raise ConfigError(f"unknown recipe '{recipe}' (available: {', '.join(available('recipe', config_dirs))})")


def check_sources(recipe: str, overrides: Sequence[str], config_dirs: Sequence[str | Path]) -> list[Path]:
    """The user folders, each checked before Hydra reads any file from them (see sources.py).
    Plugin conf folders are installed packages, trusted like their code, and are not scanned."""
    dirs = [user_dir(str(d)) for d in config_dirs]
    scan_user_dirs(dirs)
    check_name(recipe, "recipe")
    check_group_overrides(overrides, set(GROUPS) | group_names([*conf_roots(), *dirs]))
    return dirs


def hydra_args(
    recipe: str, overrides: Sequence[str], config_dirs: Sequence[str | Path]
) -> tuple[Path, list[str]]:
    """(primary config folder, overrides) to hand Hydra, after checking the sources. compose()
    and the CLI's Hydra app both call this, so what is checked is what runs."""
    dirs = check_sources(recipe, overrides, config_dirs)
    plugins = list(plugin_roots())
    # A running command's folders (read back from Hydra's config sources) include the plugins'.
    users = [d for d in dirs if d not in plugins]
    return primary_dir(recipe, dirs), [*overrides, searchpath_override([str(d) for d in [*plugins, *users]])]


def describe_compose_error(e: BaseException, config_dirs: Sequence[str | Path] = ()) -> str:
    text = error_line(e)
    for group in GROUPS:
        if f"Could not find '{group}/" in str(e) or f"'{group}/" in str(e) and "not found" in str(e).lower():
            return f"{text.split(';')[0]} (available {group}: {', '.join(available(group, config_dirs))})"
    return text


@contextmanager
def session(
    recipe: str, overrides: Sequence[str], config_dirs: Sequence[str | Path]
) -> Iterator[tuple[list[str], list[str], list[str]]]:
    """Hydra initialised on the primary folder with the CLI's search path; yields the overrides
    passed and their task/hydra split. Hydra's own errors become one-line ConfigErrors."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    primary, passed = hydra_args(recipe, overrides, config_dirs)
    GlobalHydra.instance().clear()
    try:
        task, hydra_lines = split_overrides(passed)
        with initialize_config_dir(config_dir=str(primary), version_base="1.3"):
            yield passed, task, hydra_lines
    except ConfigError:
        raise
    except Exception as e:  # Hydra's own errors: unknown option, bad type, bad override syntax
        raise ConfigError(describe_compose_error(e, config_dirs)) from None
    finally:
        GlobalHydra.instance().clear()


def compose_node(recipe: str, overrides: Sequence[str], config_dirs: Sequence[str | Path]) -> DictConfig:
    """The recipe composed with overrides exactly as the CLI's Hydra app will, its hydra node
    checked against the trusted one and then removed (not yet validated)."""
    from hydra import compose as hydra_compose

    with session(recipe, overrides, config_dirs) as (passed, task, hydra_lines):
        cfg = hydra_compose(config_name=recipe, overrides=passed, return_hydra_config=True)
        check_hydra(cfg.hydra, task, hydra_lines)
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg
