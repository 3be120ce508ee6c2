"""What a recipe may set under `hydra.`: nothing but a short allow-list.

Hydra imports and calls code named in its own config (logging `class`/`()`, `ext://` streams,
callbacks, launcher, sweeper), creates folders and files where it says (run/sweep dirs,
`output_subdir`, file handlers), changes the working folder and the environment. Recipes are data
from strangers, so the composed `hydra` node must equal the one the package's own conf/quantfw.yaml
composes to, key by key, except for the keys Hydra fills in itself and the harmless allow-list.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from omegaconf import DictConfig, OmegaConf

from quantfw.errors import ConfigError

# Keys a recipe or an override may change: debug logging of the named loggers (no import, no file).
HARMLESS = ("hydra.verbose",)

# Keys Hydra assigns after merging the recipe (its values are overwritten, never used as written).
ASSIGNED = (
    "hydra.runtime.version",
    "hydra.runtime.version_base",
    "hydra.runtime.cwd",
    "hydra.runtime.config_sources",
    "hydra.runtime.output_dir",
    "hydra.job.override_dirname",
    "hydra.job.config_name",
)

_CODE = "recipes may not name code to run: Hydra imports and calls"
_WRITE = "recipes may not choose where Hydra writes: it creates folders and files there"
# The first matching prefix says why a key is refused.
REASONS = (
    (
        "hydra.job_logging",
        "recipes may not configure Hydra's logging: it can import and run code and write files",
    ),
    (
        "hydra.hydra_logging",
        "recipes may not configure Hydra's logging: it can import and run code and write files",
    ),
    ("hydra.callbacks", f"{_CODE} callbacks"),
    ("hydra.launcher", f"{_CODE} the launcher"),
    ("hydra.sweeper.params", "recipes may not declare sweeps; pass -m key=a,b on the command line"),
    ("hydra.sweeper", f"{_CODE} the sweeper"),
    ("hydra.run", _WRITE),
    ("hydra.sweep", _WRITE),
    ("hydra.output_subdir", _WRITE),
    ("hydra.job.chdir", "recipes may not change the working folder (outputs would land elsewhere)"),
    ("hydra.job.env_copy", "recipes may not read environment variables"),
    ("hydra.job.env_set", "recipes may not set environment variables"),
    ("hydra.mode", "recipes may not switch Hydra to multirun; pass --multirun on the command line"),
    (
        "hydra.searchpath",
        "recipes may not extend the config search path; pass --config-dir on the command line",
    ),
    ("hydra.runtime.choices.hydra/", "recipes may not pick Hydra's own config groups"),
)
_OTHER = "recipes may not configure Hydra"
# Nodes whose mere presence is the problem: report the node, not one of its leaves.
_NODE_KEYS = ("hydra.callbacks",)


Key = tuple[str, ...]  # a path of keys: a key may itself contain dots, so paths are not joined


def _flatten(tree: Any, prefix: Key, out: dict[Key, Any]) -> dict[Key, Any]:
    if isinstance(tree, dict) and tree:
        for k, v in tree.items():
            _flatten(v, (*prefix, str(k)), out)
    else:
        out[prefix] = tree
    return out


def flat_hydra(hydra_cfg: DictConfig) -> dict[Key, Any]:
    """Every leaf of the hydra node, unresolved (interpolations compare as written)."""
    return _flatten(OmegaConf.to_container(hydra_cfg, resolve=False), ("hydra",), {})


def _under(key: Key, prefix: str) -> bool:
    """key lies at or below the dotted prefix; a last component ending in '/' matches group names."""
    p = tuple(prefix.split("."))
    if p[-1].endswith("/"):
        return key[: len(p) - 1] == p[:-1] and len(key) >= len(p) and key[len(p) - 1].startswith(p[-1])
    return key[: len(p)] == p


def _dotted(key: Key) -> str:
    return ".".join(key)


@lru_cache(maxsize=1)
def trusted_hydra() -> dict[Key, Any]:
    """The hydra node of the package's own base config, composed with no recipe and no override."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from quantfw.config.paths import CONF_DIR, searchpath_override
    from quantfw.config.schema import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose("quantfw", overrides=[searchpath_override()], return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    return flat_hydra(cfg.hydra)


def _reason(key: Key) -> str:
    return next((why for prefix, why in REASONS if _under(key, prefix)), _OTHER)


def _shown(key: Key, value: Any) -> str:
    node = next((n for n in _NODE_KEYS if _under(key, n)), None)
    if node:
        return node
    text = "<unset>" if value is _ABSENT else str(value)
    return f"{_dotted(key)}={text[:80]}"


_ABSENT = object()


def check_hydra(hydra_cfg: DictConfig, task_overrides: Sequence[str], hydra_overrides: Sequence[str]) -> None:
    """Refuse the first hydra key (by REASONS order) whose value is not the trusted one.

    task_overrides/hydra_overrides are the override lines passed to Hydra: it records them in
    hydra.overrides, and a recipe must not add to those lists (commands re-compose from them).
    """
    found = flat_hydra(hydra_cfg)
    trusted = trusted_hydra()
    expected = {
        ("hydra", "overrides", "task"): list(task_overrides),
        ("hydra", "overrides", "hydra"): list(hydra_overrides),
        ("hydra", "searchpath"): _searchpath_of(hydra_overrides),
    }
    assigned = {tuple(k.split(".")) for k in ASSIGNED}
    bad: list[tuple[Key, Any]] = []
    for key in sorted(set(found) | set(trusted)):
        value = found.get(key, _ABSENT)
        if key in assigned:
            continue
        if any(_under(key, h) for h in HARMLESS):
            ok = _plain_names(value)
        elif key in expected:
            ok = value == expected[key]
        elif _under(key, "hydra.runtime.choices") and not _under(key, "hydra.runtime.choices.hydra/"):
            ok = (
                value is None or value is _ABSENT or isinstance(value, str)
            )  # group choices: names (or removed)
        else:
            ok = value == trusted.get(key, _ABSENT)
        if not ok:
            bad.append((key, value))
    if bad:
        rank = {
            k: next((i for i, (p, _) in enumerate(REASONS) if _under(k, p)), len(REASONS)) for k, _ in bad
        }
        names_code = {"class", "()", "_target_", "stream"}  # report the key that names code, if any
        key, value = min(bad, key=lambda kv: (kv[0][-1] not in names_code, rank[kv[0]], kv[1] is _ABSENT))
        others = {_shown(k, v).split("=", 1)[0] for k, v in bad} - {_shown(key, value).split("=", 1)[0]}
        more = f" (and {len(others)} more hydra key(s))" if others else ""
        raise ConfigError(
            f"{_shown(key, value)}: {_reason(key)}{more}; only {', '.join(HARMLESS)} may be set"
        )


def _plain_names(value: Any) -> bool:
    """hydra.verbose: true/false or logger names, never an interpolation (it is resolved at run)."""
    names = value if isinstance(value, list) else [value]
    return isinstance(value, bool) or all(isinstance(n, str) and "${" not in n for n in names)


def _searchpath_of(hydra_overrides: Sequence[str]) -> list[str] | None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for o in OverridesParser.create().parse_overrides(list(hydra_overrides)):
        if o.get_key_element() == "hydra.searchpath":
            return list(o.value())
    return trusted_hydra().get(("hydra", "searchpath"))
