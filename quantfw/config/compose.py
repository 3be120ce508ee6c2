"""Composing recipes with Hydra, and validating what Hydra lets through.

Recipes (recipes/*.yaml and any user --config-dir) are primary configs that include
conf/quantfw.yaml and override its groups; conf/ holds the groups (scheme, format, model, backend).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from quantfw.config.schema import QuantfwConfig, register_configs
from quantfw.errors import ConfigError

# The system temp folder, for Hydra's sweep records (conf/quantfw.yaml hydra.sweep.dir).
OmegaConf.register_new_resolver("quantfw_tmp", tempfile.gettempdir, replace=True)

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "conf"
RECIPES_DIR = ROOT / "recipes"
GROUPS = ("scheme", "format", "model", "backend")


def searchpath_override(extra: Sequence[str] = ()) -> str:
    """The `hydra.searchpath` override that makes conf/, the shipped recipes (so user recipes can
    build on them) and user folders visible."""
    paths = [f"file://{CONF_DIR}", f"file://{RECIPES_DIR}"] + [
        p if "://" in p else f"file://{Path(p).resolve()}" for p in extra
    ]
    return "hydra.searchpath=[" + ",".join(paths) + "]"


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


def compose(
    recipe: str = "default", overrides: Sequence[str] = (), config_dirs: Sequence[str | Path] = ()
) -> DictConfig:
    """Compose a recipe with overrides, as the CLI does, and validate it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    dirs = [RECIPES_DIR, *map(Path, config_dirs)]
    primary = next((d for d in reversed(dirs) if (Path(d) / f"{recipe}.yaml").is_file()), None)
    if primary is None:
        raise ConfigError(
            f"unknown recipe '{recipe}' (available: {', '.join(available('recipe', config_dirs))})"
        )
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(Path(primary).resolve()), version_base="1.3"):
            cfg = hydra_compose(
                config_name=recipe,
                overrides=[*overrides, searchpath_override([str(d) for d in config_dirs])],
                return_hydra_config=True,
            )
            check_hydra_safety(cfg.hydra)
            with open_dict(cfg):
                del cfg["hydra"]
    except ConfigError:
        raise
    except Exception as e:  # Hydra's own errors: unknown option, bad type, bad override syntax
        raise ConfigError(describe_compose_error(e, config_dirs)) from None
    finally:
        GlobalHydra.instance().clear()
    validate(cfg)
    return cfg


_SAFE_TARGETS = {
    "launcher": "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
    "sweeper": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
}


def check_hydra_safety(hydra_cfg: DictConfig) -> None:
    """Refuse Hydra settings that would import and run code named in a recipe.

    Hydra instantiates callbacks, launchers and sweepers from `_target_` paths, and Python's
    logging config builds handlers from `class`/`()` paths. Recipes are data from strangers, so
    only Hydra's basic launcher/sweeper and the standard logging classes are allowed.
    """
    why = "recipes may not name code to run (it would be imported and called)"
    if hydra_cfg.get("callbacks"):
        raise ConfigError(f"hydra.callbacks: {why}; remove it")
    for node, target in _SAFE_TARGETS.items():
        found = (hydra_cfg.get(node) or {}).get("_target_")
        if found != target:
            raise ConfigError(f"hydra.{node}._target_={found}: {why}; only Hydra's basic {node} is allowed")
    for node in ("job_logging", "hydra_logging"):
        _check_logging(OmegaConf.to_container(hydra_cfg.get(node) or {}, resolve=False), f"hydra.{node}", why)


def _check_logging(tree, path: str, why: str) -> None:
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == "()" or (k == "class" and not (isinstance(v, str) and v.startswith("logging."))):
                raise ConfigError(f"{path}.{k}={v}: {why}; use the standard logging classes")
            _check_logging(v, f"{path}.{k}", why)
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            _check_logging(v, f"{path}[{i}]", why)


def describe_compose_error(e: BaseException, config_dirs: Sequence[str | Path] = ()) -> str:
    text = error_line(e)
    for group in GROUPS:
        if f"Could not find '{group}/" in str(e) or f"'{group}/" in str(e) and "not found" in str(e).lower():
            return f"{text.split(';')[0]} (available {group}: {', '.join(available(group, config_dirs))})"
    return text


def validate(cfg: DictConfig) -> None:
    """Re-check the composed config against the schema (catches `+key=` additions) and build the
    scheme and format objects so a malformed declaration fails now, naming file and key."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    try:
        OmegaConf.merge(OmegaConf.structured(QuantfwConfig), plain)
    except OmegaConfBaseException as e:
        raise ConfigError(error_line(e)) from None
    from quantfw.formats.format import Format
    from quantfw.schemes.scheme import Scheme

    scheme = Scheme.from_config(cfg.scheme)
    fmt = Format.from_config(cfg.format)
    fmt.check_compatible(scheme)
    from quantfw.api import layer_dims

    scheme.check_dims(layer_dims(cfg))
