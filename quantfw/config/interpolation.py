"""Interpolations in recipes and overrides: plain `${a.b}` references only, no resolvers.

Resolvers run at resolution time and bring in values from outside the recipe (`oc.env` reads the
environment, `now` the clock, custom ones anything), which could then be written into a
checkpoint's metadata. The trusted hydra node (conf/quantfw.yaml's `quantfw_tmp`) is checked by
hydra_guard against the package's own value instead.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import GrammarParseError
from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser
from omegaconf.grammar_parser import parse

from quantfw.errors import ConfigError


def _resolver_names(tree) -> list[str]:
    """Names of the resolvers a parse tree calls, at any nesting depth."""
    found = []
    if isinstance(tree, OmegaConfGrammarParser.InterpolationResolverContext):
        found.append(tree.resolverName().getText())
    for i in range(tree.getChildCount() if hasattr(tree, "getChildCount") else 0):
        found += _resolver_names(tree.getChild(i))
    return found


def check_value(key: str, value: str) -> None:
    if "${" not in value:
        return
    try:
        tree = parse(value)
    except GrammarParseError as e:
        raise ConfigError(f"{key}: malformed interpolation '{value}' ({str(e).splitlines()[0]})") from None
    names = _resolver_names(tree)
    if names:
        raise ConfigError(
            f"{key}={value}: recipes and overrides may not call resolvers (${{{names[0]}:...}} brings in "
            "values from outside the recipe); only plain ${a.b} references are allowed"
        )


def _walk(tree: Any, prefix: str) -> None:
    if isinstance(tree, dict):
        for k, v in tree.items():
            _walk(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            _walk(v, f"{prefix}[{i}]")
    elif isinstance(tree, str):
        check_value(prefix, tree)


def check_no_resolvers(cfg: DictConfig) -> None:
    """Refuse any resolver call outside the hydra node (which hydra_guard compares to the trusted one)."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)
    _walk(plain, "")
