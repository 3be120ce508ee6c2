"""Alternatives in step lists (format `load`, backend `post_load`, scheme `compute`).

Two branch forms replace complementary `when: X` / `when: not X` pairs:

    - if: activation_use_clip          - choose: weight_bits
      then: [steps...]                   cases: {4: [steps...], 8: [steps...]}
      else: [steps...]                   default: [steps...]   # optional

A branch is flattened into its steps, each carrying the guards of the branches it sits in, so the
consumers keep evaluating one step at a time with the environment of the moment (per role for
transform steps). A `choose` whose value matches no case and has no `default` is an error: a new
flag value must not silently skip a pipeline.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from quantfw.errors import ConfigError
from quantfw.layout import expr

IF_KEYS = frozenset({"if", "then", "else"})
CHOOSE_KEYS = frozenset({"choose", "cases", "default"})
_DEFAULT = object()  # the case value of a choose's default branch


@dataclass(frozen=True)
class Guard:
    """One branch a step sits in: `if` (case True/False) or one case of a `choose`."""

    expr: Any
    case: Any
    cases: tuple[Any, ...] = ()  # choose: every declared case value
    has_default: bool = False
    label: str = ""

    def holds(self, env: Mapping[str, Any]) -> bool:
        value = expr.evaluate(self.expr, env, f"{self.label}")
        if not self.cases:  # if / else
            return bool(value) is self.case
        if value not in self.cases and not self.has_default:
            cases = ", ".join(str(c) for c in self.cases)
            raise ConfigError(
                f"{self.label}: {self.expr}={value!r} matches no case (cases: {cases}) and there is no default"
            )
        return value not in self.cases if self.case is _DEFAULT else value == self.case


def holds(guards: Sequence[Guard], when: Any, env: Mapping[str, Any], where: str) -> bool:
    """Whether a flattened step applies: every enclosing branch, then its own `when:`."""
    return all(g.holds(env) for g in guards) and expr.holds(when, env, f"{where}.when")


def is_branch(item: Any) -> bool:
    return isinstance(item, Mapping) and ("if" in item or "choose" in item)


def flatten(
    raw: Sequence[Any] | None, where: str, guards: tuple[Guard, ...] = (), indexed: bool = False
) -> Iterator[tuple[Any, tuple[Guard, ...], str]]:
    """(step, guards, label) of every leaf step. Labels number steps from 1 (`load step 2.then.1`),
    or index them from 0 when `indexed` (`compute[2].then[0]`)."""
    for i, item in enumerate(raw or []):
        if indexed:
            label = f"{where}[{i}]"
        else:
            label = f"{where}.{i + 1}" if guards else f"{where} step {i + 1}"
        if not is_branch(item):
            yield item, guards, label
            continue
        if "if" in item:
            _check_keys(item, IF_KEYS, label, "then")
            then, other = (Guard(item["if"], case, label=f"{label} (if)") for case in (True, False))
            yield from flatten(_steps(item, "then", label), f"{label}.then", (*guards, then), indexed)
            yield from flatten(_steps(item, "else", label), f"{label}.else", (*guards, other), indexed)
            continue
        _check_keys(item, CHOOSE_KEYS, label, "cases")
        cases = item["cases"]
        if not isinstance(cases, Mapping) or not cases:
            raise ConfigError(f"{label} (choose): 'cases' must map values to step lists, found {cases!r}")
        values = tuple(cases)
        has_default = "default" in item
        for value in values:
            g = Guard(item["choose"], value, values, has_default, f"{label} (choose {item['choose']})")
            yield from flatten(_steps(cases, value, label), f"{label}.case {value}", (*guards, g), indexed)
        if has_default:
            g = Guard(item["choose"], _DEFAULT, values, True, f"{label} (choose {item['choose']})")
            yield from flatten(_steps(item, "default", label), f"{label}.default", (*guards, g), indexed)


def _check_keys(item: Mapping[str, Any], allowed: frozenset[str], label: str, required: str) -> None:
    unknown = set(item) - allowed
    if unknown:
        raise ConfigError(
            f"{label}: unknown key(s) {sorted(unknown)} in a branch (allowed: {sorted(allowed)})"
        )
    if required not in item:
        raise ConfigError(f"{label}: a branch needs '{required}'")


def _steps(item: Mapping[Any, Any], key: Any, label: str) -> list[Any]:
    steps = item.get(key) or []
    if not isinstance(steps, Sequence) or isinstance(steps, str):
        raise ConfigError(f"{label}: '{key}' must be a list of steps, found {steps!r}")
    return list(steps)
