"""Composing recipes with Hydra, and validating what Hydra lets through.

Recipes (recipes/*.yaml and any user --config-dir) are primary configs that include
conf/quantfw.yaml and override its groups; conf/ holds the groups (scheme, format, model, backend).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from quantfw.config.bounds import check_values
from quantfw.config.hydra_guard import check_hydra
from quantfw.config.interpolation import check_no_resolvers
from quantfw.config.paths import CONF_DIR, RECIPES_DIR, ROOT, searchpath_override
from quantfw.config.schema import QuantfwConfig, register_configs
from quantfw.config.sources import check_group_overrides, check_name, group_names, scan_user_dirs, user_dir
from quantfw.config.sweep import split_overrides, sweep_jobs
from quantfw.errors import ConfigError

__all__ = ["CONF_DIR", "RECIPES_DIR", "ROOT", "compose", "searchpath_override", "validate"]

# The system temp folder, for Hydra's sweep records (conf/quantfw.yaml hydra.sweep.dir).
OmegaConf.register_new_resolver("quantfw_tmp", tempfile.gettempdir, replace=True)

GROUPS = ("scheme", "format", "model", "backend")


def available(group: str, extra_dirs: Sequence[str | Path] = ()) -> list[str]:
    """Option names of a config group (or 'recipe') found in conf/, recipes/ and user folders."""
    if group == "recipe":
        dirs = [RECIPES_DIR, *map(Path, extra_dirs)]
        return sorted({p.stem for d in dirs for p in Path(d).glob("*.yaml") if p.stem != "quantfw"})
    dirs = [CONF_DIR / group, *(Path(d) / group for d in extra_dirs)]
    return sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.yaml")})


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
    """The user folders, each checked before Hydra reads any file from them (see sources.py)."""
    dirs = [user_dir(str(d)) for d in config_dirs]
    scan_user_dirs(dirs)
    check_name(recipe, "recipe")
    check_group_overrides(overrides, set(GROUPS) | group_names([CONF_DIR, *dirs]))
    return dirs


def hydra_args(
    recipe: str, overrides: Sequence[str], config_dirs: Sequence[str | Path]
) -> tuple[Path, list[str]]:
    """(primary config folder, overrides) to hand Hydra, after checking the sources. compose()
    and the CLI's Hydra app both call this, so what is checked is what runs."""
    dirs = check_sources(recipe, overrides, config_dirs)
    return primary_dir(recipe, dirs), [*overrides, searchpath_override([str(d) for d in dirs])]


@contextmanager
def _hydra_session(recipe: str, overrides: Sequence[str], config_dirs: Sequence[str | Path]):
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


def check_run(
    recipe: str, overrides: Sequence[str], config_dirs: Sequence[str | Path], multirun: bool
) -> list[DictConfig]:
    """Every config a CLI run will hand its jobs, composed and checked before Hydra runs anything
    (Hydra configures logging and creates folders before the task function starts). A multirun is
    the sweep's own config (Hydra takes logging, callbacks, launcher and sweeper from it) and then
    each job, as Hydra's basic sweeper splits the sweep."""
    if not multirun:
        return [compose(recipe, overrides, config_dirs)]
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    with _hydra_session(recipe, overrides, config_dirs) as (passed, task, hydra_lines):
        gh = GlobalHydra.instance()
        master = gh.hydra.compose_config(
            recipe, passed, run_mode=RunMode.MULTIRUN, with_log_configuration=False
        )
        check_hydra(master.hydra, task, hydra_lines)
        jobs = sweep_jobs(task)
    _, user_hydra = split_overrides(overrides)
    return [compose(recipe, [*user_hydra, *job], config_dirs) for job in jobs]


def compose(
    recipe: str = "default", overrides: Sequence[str] = (), config_dirs: Sequence[str | Path] = ()
) -> DictConfig:
    """Compose a recipe with overrides exactly as the CLI's Hydra app will, and check it: sources
    inside their folders, the hydra node against the trusted one, no resolvers, schema and bounds."""
    from hydra import compose as hydra_compose

    with _hydra_session(recipe, overrides, config_dirs) as (passed, task, hydra_lines):
        cfg = hydra_compose(config_name=recipe, overrides=passed, return_hydra_config=True)
        check_hydra(cfg.hydra, task, hydra_lines)
        with open_dict(cfg):
            del cfg["hydra"]
    validate(cfg, config_dirs)
    return cfg


def describe_compose_error(e: BaseException, config_dirs: Sequence[str | Path] = ()) -> str:
    text = error_line(e)
    for group in GROUPS:
        if f"Could not find '{group}/" in str(e) or f"'{group}/" in str(e) and "not found" in str(e).lower():
            return f"{text.split(';')[0]} (available {group}: {', '.join(available(group, config_dirs))})"
    return text


def validate(cfg: DictConfig, config_dirs: Sequence[str | Path] | None = None) -> None:
    """Re-check the composed config against the schema (catches `+key=` additions) and its bounds,
    and build the scheme and format objects so a malformed declaration fails now, naming file and key."""
    check_no_resolvers(cfg)
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)  # a missing key or a cycle: one line
        plain.pop("hydra", None)
        OmegaConf.merge(OmegaConf.structured(QuantfwConfig), plain)
    except OmegaConfBaseException as e:
        raise ConfigError(error_line(e)) from None
    check_values(cfg)
    from quantfw.formats.format import Format
    from quantfw.schemes.scheme import Scheme

    scheme = Scheme.from_config(cfg.scheme)
    fmt = Format.from_config(cfg.format)
    fmt.check_compatible(scheme)
    from quantfw.build import layer_dims

    scheme.check_dims(layer_dims(cfg))
    from quantfw.config import layer_choice
    from quantfw.engines.profile import from_config

    layer_choice.check(cfg, config_dirs)  # per-layer scheme choices: keys and names
    from_config(cfg.get("engine"))  # an engine profile is checked when composed, not when used
