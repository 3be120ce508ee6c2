"""The comparison rows of demo and plan (conf/compare/rows.yaml), each built from its own
declaration and fitted to the model's dims: adapted (said in the label) or skipped with a note."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from quantfw.config.compose import CONF_DIR
from quantfw.errors import ConfigError
from quantfw.formats.format import Format
from quantfw.layout.spec import Dims
from quantfw.schemes.scheme import Scheme

ROWS_FILE = CONF_DIR / "compare" / "rows.yaml"


@dataclass
class Row:
    label: str
    scheme: Scheme
    format: Format
    learn_alpha: bool = False


def label(scheme: Scheme, fmt: Format, note: str = "") -> str:
    """What a row really is: scheme, weight granularity, on-disk format."""
    gs = scheme.flags.get("group_size", 0)
    text = f"{scheme.name} {f'g{gs}' if gs else 'per-channel'} [{fmt.name}]"
    return f"{text} {note}" if note else text


def _user_dirs() -> list[str]:
    """The running command's config folders (--config-dir, hydra.searchpath), if inside one."""
    from quantfw.config.variants import running_config_dirs

    return running_config_dirs()


def rows_file() -> Path:
    """conf/compare/rows.yaml, or the running command's user folder's own compare/rows.yaml."""
    for d in _user_dirs():
        own = Path(d) / "compare" / "rows.yaml"
        if own.is_file() and own.resolve() != ROWS_FILE.resolve():
            return own
    return ROWS_FILE


def declared_rows(section: str):
    return OmegaConf.to_container(OmegaConf.load(rows_file())).get(section) or []


def _compose(scheme: str, fmt: str, flags: dict):
    """The base recipe with the row's scheme, format and flags (the running recipe's scheme body
    must not leak into a comparison row). Hydra's own state is kept for the running command."""
    from hydra.core.global_hydra import GlobalHydra

    from quantfw.config.compose import compose

    overrides = [f"scheme={scheme}", f"format={fmt}", *(f"scheme.{k}={v}" for k, v in flags.items())]
    dirs = _user_dirs()
    gh = GlobalHydra.instance()
    running = gh.hydra if gh.is_initialized() else None
    try:
        return compose("default", overrides, config_dirs=dirs)
    finally:
        if running is not None:
            GlobalHydra.instance().initialize(running)


def _build(scheme: str, fmt: str, flags: dict, dims: Dims) -> tuple[Scheme, Format]:
    cfg = _compose(scheme, fmt, flags)
    s, f = Scheme.from_config(cfg.scheme), Format.from_config(cfg.format)
    f.check_compatible(s)
    s.check_dims(dims)
    return s, f


def comparison_rows(section: str, dims: Dims) -> tuple[list[Row], list[str]]:
    """The rows of `section` that apply to `dims`, and one note per adapted or skipped row."""
    rows, notes = [], []
    for entry in declared_rows(section):
        flags, note = dict(entry.get("flags", {})), entry.get("note", "")
        tries = [(flags, "")] + [
            ({**flags, k: v}, f"{k}={v}") for k, vs in entry.get("adapt", {}).items() for v in vs
        ]
        first_error = None
        for attempt, adapted in tries:
            try:
                s, f = _build(entry["scheme"], entry["format"], attempt, dims)
            except ConfigError as e:
                first_error = first_error or str(e)
                continue
            text = label(s, f, note) + (" (adapted)" if adapted else "")
            if adapted:
                why = first_error.split(": ", 1)[-1].split(";")[0]
                notes.append(f"{text}: {why}; {adapted} is the largest listed value that fits")
            rows.append(Row(text, s, f, learn_alpha=bool(entry.get("learn_alpha", False))))
            break
        else:
            notes.append(
                f"skipped {entry['scheme']} [{entry['format']}] {note}".rstrip() + f": {first_error}"
            )
    return rows, notes
