"""One registry type for everything a recipe names (transforms, encoders, observers, backends,
plan ops, metadata styles), and plugin discovery through Python entry points.

Recipes only ever name an entry; code is registered by quantfw itself or by an installed package
declaring an entry point in group `quantfw.<kind>` (e.g. `quantfw.observers`). Loading an entry
point imports that package's module, whose import registers its entries. Nothing is ever
imported from a recipe folder or from a path written in YAML.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from typing import Generic, TypeVar

from quantfw.errors import ConfigError

T = TypeVar("T")

ENTRY_POINT_PREFIX = "quantfw."


class Registry(Generic[T]):
    """Named entries of one kind; a name is registered once (a second registration is a bug in
    quantfw or a plugin clash, refused with both names)."""

    def __init__(self, kind: str, plural: str | None = None, builtin: Sequence[str] = ()):
        self.kind = kind  # "observer": used in messages
        self.group = ENTRY_POINT_PREFIX + (plural or kind + "s")  # entry-point group
        # quantfw's own modules that register entries, imported like plugins on first lookup
        # (so the module defining the registry need not import the modules that fill it)
        self.builtin = tuple(builtin)
        self._items: dict[str, T] = {}
        self._plugins_loaded = False

    def add(self, name: str, item: T) -> T:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._items:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self._items[name] = item
        return item

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of add()."""

        def deco(item: T) -> T:
            self.add(name, item)
            return item

        return deco

    def get(self, name: str, where: str = "") -> T:
        self.load_plugins()
        if name not in self._items:
            at = f"{where}: " if where else ""
            raise ConfigError(f"{at}unknown {self.kind} '{name}' (available: {', '.join(self.names())})")
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        self.load_plugins()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def names(self) -> list[str]:
        self.load_plugins()
        return sorted(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        self.load_plugins()
        return iter(sorted(self._items.items()))

    def load_plugins(self) -> None:
        """Import the built-in modules, then every installed module declared under this
        registry's entry-point group, once."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for name in self.builtin:
            importlib.import_module(name)
        for ep in metadata.entry_points(group=self.group):
            try:
                ep.load()
            except Exception as exc:  # a broken plugin must name itself, not crash a later lookup
                raise ConfigError(
                    f"plugin '{ep.name}' ({ep.value}, entry point group {self.group}) failed to load: {exc}"
                ) from None
