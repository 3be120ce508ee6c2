"""Safe evaluation of the small expressions that declarations use for shapes and conditions.

Recipes are data from strangers, so this is a whitelist interpreter over Python's AST: names,
int/float/bool literals, lists, arithmetic, comparisons, `and`/`or`/`not` (short-circuit and
returning an operand, as in Python) and `a if c else b`. No attribute access, calls, subscripts
or comprehensions: nothing in a YAML file can run code.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Mapping
from typing import Any

from quantfw.errors import ConfigError

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_CMPOPS = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}


class _Eval:
    def __init__(self, text: str, env: Mapping[str, Any], where: str):
        self.text, self.env, self.where = text, env, where

    def fail(self, why: str) -> ConfigError:
        return ConfigError(f"{self.where}: cannot evaluate '{self.text}': {why}")

    def __call__(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return self(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, bool, str)):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in self.env:
                raise self.fail(f"unknown name '{node.id}' (known: {', '.join(sorted(self.env))})")
            return self.env[node.id]
        if isinstance(node, ast.List):
            return [self(e) for e in node.elts]
        if isinstance(node, ast.UnaryOp):
            v = self(node.operand)
            if isinstance(node.op, ast.Not):
                return not v
            if isinstance(node.op, ast.USub):
                return -v
            if isinstance(node.op, ast.UAdd):
                return +v
        if isinstance(node, ast.BinOp):
            a, b = self(node.left), self(node.right)
            if isinstance(node.op, ast.Div):
                # Shapes are integers: "/" must divide exactly, so a bad dim surfaces here.
                if b == 0 or a % b:
                    raise self.fail(f"{a} is not divisible by {b}")
                return a // b
            if type(node.op) in _BINOPS:
                return _BINOPS[type(node.op)](a, b)
        if isinstance(node, ast.BoolOp):
            # As in Python: stop at the first operand that decides and return it, so
            # `group_size and K/group_size` never divides by a zero group size.
            stop_if = not isinstance(node.op, ast.And)
            for v in node.values:
                value = self(v)
                if bool(value) is stop_if:
                    return value
            return value
        if isinstance(node, ast.Compare):
            left = self(node.left)
            for op, right_node in zip(node.ops, node.comparators):
                right = self(right_node)
                if type(op) not in _CMPOPS or not _CMPOPS[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.IfExp):
            return self(node.body) if self(node.test) else self(node.orelse)
        raise self.fail(f"'{type(node).__name__}' is not allowed in declarations")


def evaluate(expr: Any, env: Mapping[str, Any], where: str = "declaration") -> Any:
    """Evaluate an int/bool literal, a string expression, or a list of them.

    Strings inside expressions are literals (`'uint64' if weight_bits == 4 else 'float32'`).
    """
    if isinstance(expr, bool) or isinstance(expr, (int, float)):
        return expr
    if isinstance(expr, (list, tuple)):
        return [evaluate(e, env, where) for e in expr]
    if not isinstance(expr, str):
        raise ConfigError(f"{where}: expected an expression, found {type(expr).__name__} {expr!r}")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as e:
        raise ConfigError(f"{where}: '{expr}' is not a valid expression ({e.msg})") from None
    return _Eval(expr, env, where)(tree)


def holds(condition: Any, env: Mapping[str, Any], where: str) -> bool:
    """A `when:` condition; absent means always."""
    if condition is None:
        return True
    return bool(evaluate(condition, env, where))


def shape(expr: Any, env: Mapping[str, Any], where: str) -> tuple[int, ...]:
    """A declared shape: a list of dim expressions, or one expression that yields a list."""
    value = evaluate(expr, env, where)
    if not isinstance(value, list):
        value = [value]
    flat: list[int] = []
    for v in value:
        if isinstance(v, list):  # "[E] + dims" style is not supported; a nested list is a mistake
            raise ConfigError(f"{where}: shape '{expr}' nests lists")
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"{where}: shape '{expr}' gives {v!r}, not a non-negative integer")
        flat.append(v)
    return tuple(flat)
