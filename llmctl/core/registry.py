"""Named registries for strategies (positional encodings, schedules, merge methods, …).

    POSITIONS = Registry("positional encoding")

    @POSITIONS.register("rope")
    class RoPE: ...

    POSITIONS.get("rope")  # → RoPE; an unknown name raises UsageError with a suggestion

A registry may also name an entry-point group; third-party packages then add strategies by
declaring entry points in that group, loaded the first time the registry is queried. Built-in
strategies that live in modules of their own (`modules=`) are imported at that moment too, so
those modules may import the registry's module without a cycle. With `base=`, a plugin must be
an instance or subclass of it; one that is not is skipped with a warning.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, TypeVar

from llmctl.errors import UsageError

T = TypeVar("T")


def did_you_mean(name: str, choices) -> str:
    """' (did you mean X?)' for the closest of `choices`, or ''."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry(Generic[T]):
    """A mapping name → strategy, filled by the `register` decorator."""

    def __init__(self, kind: str, entry_point_group: str | None = None, modules: tuple[str, ...] = (),
                 base: type | None = None):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self.modules = modules  # built-in modules that register on import
        self.base = base  # what a plugin must be an instance or subclass of
        self._items: dict[str, T] = {}
        self._plugins_loaded = entry_point_group is None and not modules

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator adding the decorated class or function under `name`."""

        def add(item: T) -> T:
            if name in self._items and self._items[name] is not item:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = item
            return item

        return add

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        import importlib

        for module in self.modules:
            importlib.import_module(module)
        if self.entry_point_group is None:
            return
        from importlib.metadata import entry_points

        from llmctl.console import warn

        for ep in entry_points(group=self.entry_point_group):
            if ep.name in self._items:
                warn(f"plugin {ep.value} may not replace built-in {self.kind} '{ep.name}'; ignored")
                continue
            try:
                item = ep.load()
            except Exception as exc:  # a broken plugin must not break the registry
                warn(f"{self.kind} plugin '{ep.name}' ({ep.value}) failed to load: {exc}")
                continue
            if self.base is not None and not (isinstance(item, self.base) or
                                              (isinstance(item, type) and issubclass(item, self.base))):
                warn(f"{self.kind} plugin '{ep.name}' ({ep.value}) is not a {self.base.__name__}; ignored")
                continue
            self._items[ep.name] = item

    def get(self, name: str) -> T:
        """The strategy called `name`; UsageError naming the choices otherwise."""
        self._load_plugins()
        try:
            return self._items[name]
        except (KeyError, TypeError):  # TypeError: a list or mapping where a name belongs
            raise UsageError(
                f"unknown {self.kind} '{name}'{did_you_mean(name, self._items)}; "
                f"choose from: {', '.join(sorted(self._items))}"
            ) from None

    def name_of(self, item: Any) -> str:
        """The name `item` is registered under (KeyError if it is not)."""
        self._load_plugins()
        for name, registered in self._items.items():
            if registered is item:
                return name
        raise KeyError(f"{item!r} is not a registered {self.kind}")

    def items(self) -> list[tuple[str, T]]:
        self._load_plugins()
        return sorted(self._items.items())

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._items)

    def __contains__(self, name: Any) -> bool:
        self._load_plugins()
        return isinstance(name, str) and name in self._items
