"""Engine profiles as data: conf/engine/NAME.yaml, resolved by registered name only.

A profile declares, each with the public `source:` it was read from:
- `quantize`: what `quantfw quantize ... engine=NAME` writes by default (format, the non-expert
  linears written W8A8 as `targets` / `ignore` regexes);
- `plan`: the compute plan the engine runs, as scheme-flag overrides applied `when` the
  checkpoint's flags match (so quantfw's generic layer computes what the engine computes);
- `rules`: what the engine refuses (`level: refuse`) or silently computes differently
  (`level: differs`), each a registered check (quantfw/engines/checks.py) with its parameters.
Unknown keys are refused with one line naming the file and key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from quantfw.config import options
from quantfw.config.paths import CONF_DIR
from quantfw.config.schema import SchemeConfig
from quantfw.engines import checks
from quantfw.errors import ConfigError

NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
LEVELS = ("refuse", "differs")
TOP_KEYS = ("name", "doc", "quantize", "plan", "rules")
QUANTIZE_KEYS = ("format", "targets", "ignore", "source", "doc")
PLAN_KEYS = ("when", "flags", "why", "source")
RULE_KEYS = ("id", "check", "level", "when", "why", "source")
SCHEME_FLAGS = tuple(f.name for f in fields(SchemeConfig) if f.name not in ("name", "runtime", "compute", "doc"))


@dataclass(frozen=True)
class QuantizeDefaults:
    format: str
    targets: tuple[str, ...]
    ignore: tuple[str, ...]
    source: str


@dataclass(frozen=True)
class PlanStep:
    when: str | None
    flags: dict[str, Any]
    why: str
    source: str


@dataclass(frozen=True)
class Rule:
    id: str
    check: str
    level: str
    when: str | None
    why: str
    source: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineProfile:
    name: str
    doc: str
    where: str  # file, for messages
    quantize: QuantizeDefaults | None
    plan: tuple[PlanStep, ...]
    rules: tuple[Rule, ...]


def available() -> list[str]:
    """Profile names in conf/engine/ and the installed plugins' conf folders."""
    return options.available("engine")


def _where(path: Path) -> str:
    try:
        return str(path.relative_to(CONF_DIR.parent))
    except ValueError:
        return str(path)


def _mapping(node: Any, where: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
    if not isinstance(node, dict):
        raise ConfigError(f"{where}: expected a mapping, found {type(node).__name__}")
    for key in node:
        if key not in allowed:
            raise ConfigError(f"{where}.{key}: unknown key (allowed: {', '.join(allowed)})")
    for key in required:
        if key not in node:
            raise ConfigError(f"{where}.{key}: missing (required: {', '.join(required)})")
    return node


def _strings(node: Any, where: str) -> tuple[str, ...]:
    if not isinstance(node, list) or not all(isinstance(s, str) for s in node):
        raise ConfigError(f"{where}: expected a list of strings, found {node!r}")
    for pat in node:
        try:
            re.compile(pat)
        except re.error as e:
            raise ConfigError(f"{where}: invalid regex {pat!r} ({e})") from None
    return tuple(node)


def _source(node: dict, where: str) -> str:
    src = node.get("source")
    if not isinstance(src, str) or ":" not in src:
        raise ConfigError(f"{where}.source: expected 'owner/repo:path' of the public code it was read from, found {src!r}")
    return src


def parse_profile(data: Any, where: str) -> EngineProfile:
    top = _mapping(data, where, TOP_KEYS, ("name", "rules"))
    q = None
    if top.get("quantize") is not None:
        node = _mapping(top["quantize"], f"{where}: quantize", QUANTIZE_KEYS, ("format", "targets", "ignore"))
        q = QuantizeDefaults(
            str(node["format"]),
            _strings(node["targets"], f"{where}: quantize.targets"),
            _strings(node["ignore"], f"{where}: quantize.ignore"),
            _source(node, f"{where}: quantize"),
        )
    plan = []
    for i, step in enumerate(top.get("plan") or []):
        w = f"{where}: plan[{i}]"
        node = _mapping(step, w, PLAN_KEYS, ("flags", "why", "source"))
        flags = _mapping(node["flags"], f"{w}.flags", SCHEME_FLAGS)
        plan.append(PlanStep(node.get("when"), dict(flags), str(node["why"]), _source(node, w)))
    rules = []
    seen = set()
    for i, rule in enumerate(top["rules"] or []):
        w = f"{where}: rules[{i}]"
        if not isinstance(rule, dict) or rule.get("check") not in checks.CHECKS:
            found = rule.get("check") if isinstance(rule, dict) else rule
            raise ConfigError(f"{w}.check: {found!r} is not a registered check (available: {', '.join(sorted(checks.CHECKS))})")
        params = checks.CHECKS[rule["check"]].params
        node = _mapping(rule, w, (*RULE_KEYS, *params), ("id", "check", "level", "why", "source", *params))
        if node["level"] not in LEVELS:
            raise ConfigError(f"{w}.level: {node['level']!r} (allowed: {', '.join(LEVELS)})")
        if node["id"] in seen:
            raise ConfigError(f"{w}.id: '{node['id']}' is used twice")
        seen.add(node["id"])
        rules.append(
            Rule(
                str(node["id"]),
                node["check"],
                node["level"],
                node.get("when"),
                str(node["why"]),
                _source(node, w),
                {p: node[p] for p in params},
            )
        )
        checks.CHECKS[node["check"]].validate(rules[-1], w)
    return EngineProfile(str(top["name"]), str(top.get("doc", "")), where, q, tuple(plan), tuple(rules))


def load_profile(name: str) -> EngineProfile:
    """The profile registered as `name` (a file stem of conf/engine/; never a path or import)."""
    names = available()
    if not isinstance(name, str) or not NAME_RE.match(name) or name not in names:
        raise ConfigError(f"engine={name!r} is unknown (available: {', '.join(names)})")
    path = options.option_file("engine", name)
    where = _where(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    profile = parse_profile(data, where)
    if profile.name != name:
        raise ConfigError(f"{where}: name '{profile.name}' differs from the file name '{name}'")
    return profile


def from_config(node: Any) -> EngineProfile | None:
    """The profile a composed recipe selected (`engine` config group; None when unset),
    validated here: Hydra merges the file's keys without knowing what a profile may hold."""
    if node is None:
        return None
    if isinstance(node, str):
        return load_profile(node)
    from omegaconf import DictConfig, OmegaConf

    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    name = data.get("name") if isinstance(data, dict) else None
    where = _where(options.option_file("engine", name)) if name in available() else f"engine {name}"
    return parse_profile(data, where)
