"""Discovery of command plugins in the `llmctl.commands` entry-point group.

Built-in commands are entry points of the `llmctl` distribution itself, registered exactly
like a third party's. Rules, applied per command name:
- a built-in always wins: a third-party plugin claiming its name is refused with a warning;
- two third-party plugins claiming one name are both refused, naming each distribution;
- a plugin that fails to import is reported by name and skipped; the rest keep working.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

GROUP = "llmctl.commands"
BUILTIN_DIST = "llmctl"


@dataclass
class CommandPlugin:
    """One entry point of the `llmctl.commands` group and what became of it."""

    name: str
    target: str
    dist: str
    version: str
    status: str = "ok"  # ok | broken | refused | conflict
    problem: str | None = None
    obj: Any = None

    @property
    def builtin(self) -> bool:
        return self.dist == BUILTIN_DIST

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "target": self.target,
            "distribution": self.dist,
            "version": self.version,
            "builtin": self.builtin,
            "status": self.status,
            "problem": self.problem,
        }


def _describe(ep: EntryPoint) -> CommandPlugin:
    dist = ep.dist
    name = dist.metadata["Name"] if dist is not None else "unknown"
    version = dist.version if dist is not None else "unknown"
    return CommandPlugin(ep.name, ep.value, _normalize(name), version)


def _normalize(dist_name: str) -> str:
    return dist_name.lower().replace("_", "-")


@cache
def discover(group: str = GROUP) -> list[CommandPlugin]:
    """Every command plugin of `group`, loaded when allowed, sorted by name.

    Cached per process: the CLI host marks plugins it could not build as broken on these same
    objects, so `llmctl plugins` reports what the host really registered."""
    claims: dict[str, list[CommandPlugin]] = {}
    seen: set[tuple[str, str, str]] = set()
    for ep in entry_points(group=group):
        plugin = _describe(ep)
        key = (plugin.name, plugin.target, plugin.dist)
        if key not in seen:  # the same distribution found twice on sys.path
            seen.add(key)
            claims.setdefault(plugin.name, []).append(plugin)

    result: list[CommandPlugin] = []
    for name in sorted(claims):
        candidates = claims[name]
        builtins = [p for p in candidates if p.builtin]
        others = [p for p in candidates if not p.builtin]
        if builtins:
            chosen = builtins[:1]
            for p in others:
                p.status, p.problem = "refused", f"may not replace the built-in command '{name}'"
        elif len(others) > 1:
            chosen = []
            dists = " and ".join(f"{p.dist} {p.version}" for p in others)
            for p in others:
                p.status, p.problem = "conflict", f"command '{name}' is claimed by {dists}; neither is used"
        else:
            chosen = others
        for p in chosen:
            try:
                p.obj = _load(p)
            except Exception as exc:  # any import-time failure of a plugin
                p.status, p.problem = "broken", f"failed to load: {type(exc).__name__}: {exc}"
        result.extend(candidates)
    return result


def _load(plugin: CommandPlugin) -> Any:
    import importlib

    module_name, _, attr = plugin.target.partition(":")
    obj = importlib.import_module(module_name)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj
