"""Registered rule checks of engine profiles. Each check takes its rule's parameters and the
checkpoint facts and returns what is wrong (empty: the rule holds). Profiles name checks by their
registered name; nothing here knows an engine or a scheme."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from quantfw.errors import ConfigError
from quantfw.layout.expr import evaluate

_NAME = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def fill(text: str, env: dict[str, Any]) -> str:
    """`{name}` placeholders of a rule's `why` replaced by checkpoint facts (nothing else)."""
    return _NAME.sub(lambda m: str(env[m[1]]) if m[1] in env else m[0], text)


@dataclass(frozen=True)
class Check:
    params: tuple[str, ...]
    run: Callable[..., list[str]]  # run(rule, facts) -> problems
    validate: Callable[..., None] = lambda rule, where: None


CHECKS: dict[str, Check] = {}


def check(name: str, params: tuple[str, ...], validate=None):
    def deco(fn):
        CHECKS[name] = Check(params, fn, validate or (lambda rule, where: None))
        return fn

    return deco


def _is_expr(rule, where: str) -> None:
    if not isinstance(rule.params["expr"], str):
        raise ConfigError(f"{where}.expr: expected an expression string, found {rule.params['expr']!r}")


@check("holds", ("expr",), _is_expr)
def _holds(rule, facts) -> list[str]:
    """A condition over the checkpoint facts (names of quantfw.engines.facts `env`)."""
    ok = evaluate(rule.params["expr"], facts.env, f"rule {rule.id}.expr")
    return [] if ok else [""]  # the rule's `why` says it all


def _is_group(rule, where: str) -> None:
    bits = rule.params["num_bits"]
    bits = bits if isinstance(bits, list) else [bits]
    if not isinstance(rule.params["target"], str) or not all(isinstance(b, int) for b in bits):
        raise ConfigError(f"{where}: target must be a string and num_bits an int or a list of ints")


@check("config_group", ("target", "num_bits"), _is_group)
def _config_group(rule, facts) -> list[str]:
    """quantization_config.config_groups has a group targeting `target` with `num_bits` weights."""
    target, bits = rule.params["target"], rule.params["num_bits"]
    bits = bits if isinstance(bits, list) else [bits]
    found = {
        name: (g.get("weights") or {}).get("num_bits")
        for name, g in facts.config_groups.items()
        if isinstance(g, dict) and target in (g.get("targets") or [])
    }
    if any(b in bits for b in found.values()):
        return []
    have = {n: g.get("targets") for n, g in facts.config_groups.items() if isinstance(g, dict)}
    return [f"no config group targets {target} with {'/'.join(map(str, bits))}-bit weights (groups: {have or 'none'})"]


def _are_patterns(rule, where: str) -> None:
    for p in ("quantized", "float"):
        v = rule.params[p]
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise ConfigError(f"{where}.{p}: expected a list of regexes, found {v!r}")
        for s in v:
            try:
                re.compile(s)
            except re.error as e:
                raise ConfigError(f"{where}.{p}: invalid regex {s!r} ({e})") from None


def _names(mods: list[str]) -> str:
    return ", ".join(mods[:3]) + (f" and {len(mods) - 3} more" if len(mods) > 3 else "")


@check("modules", ("quantized", "float"), _are_patterns)
def _modules(rule, facts) -> list[str]:
    """Non-expert linears matching `quantized` must be stored W8A8 (int8), those matching `float`
    must stay float."""
    out = []
    for param, want in (("quantized", True), ("float", False)):
        bad = sorted(
            m for m, q in facts.modules.items() if q != want and any(re.search(p, m) for p in rule.params[param])
        )
        if bad:
            out.append(f"{len(bad)} module(s) {'not W8A8' if want else 'quantized'}: {_names(bad)}")
    return out


@check("ignore_consistent", ())
def _ignore_consistent(rule, facts) -> list[str]:
    """Every non-expert linear is W8A8 unless quantization_config.ignore names it, then it is float
    (a compressed-tensors consumer builds each module from that list)."""
    listed = set(facts.ignore)
    bad_float = sorted(m for m, q in facts.modules.items() if not q and m not in listed)
    bad_quant = sorted(m for m, q in facts.modules.items() if q and m in listed)
    out = []
    if bad_float:
        out.append(f"{len(bad_float)} float module(s) missing from ignore: {_names(bad_float)}")
    if bad_quant:
        out.append(f"{len(bad_quant)} quantized module(s) listed in ignore: {_names(bad_quant)}")
    return out
