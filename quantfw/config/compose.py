"""Composing recipes with Hydra, and validating what Hydra lets through.

Recipes (recipes/*.yaml and any user --config-dir) are primary configs that include
conf/quantfw.yaml and override its groups; conf/ (and installed plugins' conf folders,
config/options.py) holds the groups (scheme, format, model, backend). Hydra itself runs in
hydra_session.py; the checks of one config in validation.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from quantfw.config import layer_choice
from quantfw.config.hydra_guard import check_hydra
from quantfw.config.hydra_session import (
    GROUPS,
    check_sources,
    compose_node,
    describe_compose_error,
    error_line,
    hydra_args,
    primary_dir,
    session,
)
from quantfw.config.options import available
from quantfw.config.paths import CONF_DIR, RECIPES_DIR, ROOT, searchpath_override
from quantfw.config.sweep import split_overrides, sweep_jobs
from quantfw.config.validation import check_config
from quantfw.engines.profile import from_config

__all__ = [
    "CONF_DIR",
    "GROUPS",
    "RECIPES_DIR",
    "ROOT",
    "available",
    "check_run",
    "check_sources",
    "compose",
    "describe_compose_error",
    "error_line",
    "hydra_args",
    "primary_dir",
    "searchpath_override",
    "validate",
]


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

    with session(recipe, overrides, config_dirs) as (passed, task, hydra_lines):
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
    cfg = compose_node(recipe, overrides, config_dirs)
    validate(cfg, config_dirs)
    return cfg


def validate(cfg: DictConfig, config_dirs: Sequence[str | Path] | None = None) -> None:
    """Re-check the composed config against the schema (catches `+key=` additions) and its bounds,
    and build the scheme and format objects so a malformed declaration fails now, naming file and key."""
    check_config(cfg)
    layer_choice.check(cfg, config_dirs)  # per-layer scheme choices: keys and names
    from_config(cfg.get("engine"))  # an engine profile is checked when composed, not when used
