"""A reporter for tests: records progress bars, their updates and steps, and warnings."""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace


class Recorder:
    """Stands in for `llmctl.console.Reporter`; `calls` holds ("progress", description, total,
    unit), ("update", fields), ("advance", n), ("info", message) and ("warn", message) in order."""

    def __init__(self):
        self.calls = []

    @contextmanager
    def progress(self, description, total=None, unit="it"):
        self.calls.append(("progress", description, total, unit))
        yield SimpleNamespace(update=lambda **kw: self.calls.append(("update", kw)),
                              advance=lambda n=1: self.calls.append(("advance", n)))

    def steps(self) -> list:
        """The progress bars and their steps, without updates and warnings."""
        return [c for c in self.calls if c[0] in ("progress", "advance")]

    def messages(self) -> list:
        """The info and warning lines, in order."""
        return [c for c in self.calls if c[0] in ("info", "warn")]

    def info(self, message):
        self.calls.append(("info", message))

    def warn(self, message):
        self.calls.append(("warn", message))
