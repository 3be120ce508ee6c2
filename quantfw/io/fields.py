"""Typed reads of JSON found in a checkpoint (config.json, indexes, descriptions).

A checkpoint is data from a stranger: every value is checked for its JSON type before use, and
every error is one line naming the file and the dotted key, expected vs found. JSON booleans are
not integers here (Python's bool is an int), and strings are never read as booleans.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import Any

from quantfw.errors import CheckpointError

_MISSING = object()


def kind(value: Any) -> str:
    """The JSON type name of a parsed value, with a short rendering of it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {value[:40]!r}"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


class Fields:
    """One JSON object of `file` at dotted path `path` ('' = the top level)."""

    def __init__(self, data: Any, file: object, path: str = ""):
        if not isinstance(data, dict):
            raise CheckpointError(f"{file}: {path or 'top level'} must be a JSON object, found {kind(data)}")
        self.data, self.file, self.path = data, file, path

    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, expected: str, value: Any = _MISSING) -> CheckpointError:
        found = "nothing" if value is _MISSING else kind(value)
        return CheckpointError(f"{self.file}: {self.where(key)} must be {expected}, found {found}")

    def __contains__(self, key: str) -> bool:
        return self.data.get(key) is not None

    def raw(self, key: str, default: Any = None) -> Any:
        value = self.data.get(key)
        return default if value is None else value

    def obj(self, key: str, required: bool = False) -> Fields | None:
        value = self.data.get(key)
        if value is None:
            if required:
                raise self.fail(key, "a JSON object")
            return None
        if not isinstance(value, dict):
            raise self.fail(key, "a JSON object", value)
        return Fields(value, self.file, self.where(key))

    def objects(self) -> Iterator[tuple[str, Fields]]:
        """Every member, each of which must be an object (config_groups)."""
        for key, value in self.data.items():
            if not isinstance(value, dict):
                raise self.fail(key, "a JSON object", value)
            yield key, Fields(value, self.file, self.where(key))

    def string(self, key: str, allowed: Collection[str] | None = None, default: Any = _MISSING) -> Any:
        value = self.data.get(key)
        if value is None and default is not _MISSING:
            return default
        if not isinstance(value, str) or (allowed is not None and value not in allowed):
            expected = f"one of {sorted(allowed)}" if allowed is not None else "a string"
            raise self.fail(key, expected, _MISSING if value is None else value)
        return value

    def integer(
        self, key: str, lo: int, hi: int, allowed: Collection[int] | None = None, default: Any = _MISSING
    ) -> Any:
        value = self.data.get(key)
        if value is None and default is not _MISSING:
            return default
        ok = isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi
        if not ok or (allowed is not None and value not in allowed):
            expected = f"one of {sorted(allowed)}" if allowed is not None else f"an integer in [{lo}, {hi}]"
            raise self.fail(key, expected, _MISSING if value is None else value)
        return value

    def boolean(self, key: str, default: Any = _MISSING) -> Any:
        value = self.data.get(key)
        if value is None and default is not _MISSING:
            return default
        if not isinstance(value, bool):
            raise self.fail(key, "a JSON boolean (true or false)", _MISSING if value is None else value)
        return value

    def strings(self, key: str, default: Any = _MISSING) -> Any:
        """A list of strings (or one string, as compressed-tensors allows for `targets`)."""
        value = self.data.get(key)
        if value is None and default is not _MISSING:
            return default
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(key, "an array of strings", _MISSING if value is None else value)
        return value
