"""How core code reports progress and messages without knowing about the CLI.

Core functions take a `Reporter` (default `SILENT`); the CLI passes `llmctl.console.REPORTER`,
which prints through rich on stderr and honours `--quiet`.

    with report.progress("train", total=steps, unit="step") as bar:
        bar.advance(); bar.update(loss=0.5)
    report.info("resuming from …"); report.warn("lr never reaches …")
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from typing import Any, Iterator, Protocol


class Bar(Protocol):
    """One progress task: `advance(n)`, `update(total=, completed=, **fields shown after the bar)`."""

    def advance(self, amount: float = 1) -> None: ...

    def update(self, *, total: float | None = None, completed: float | None = None, **fields: Any) -> None: ...


class Reporter(Protocol):
    def progress(self, description: str, total: float | None = None,
                 unit: str = "it") -> AbstractContextManager[Bar]: ...

    def info(self, message: str) -> None: ...

    def warn(self, message: str) -> None: ...


class _NoBar:
    def advance(self, amount: float = 1) -> None:
        pass

    def update(self, *, total: float | None = None, completed: float | None = None, **fields: Any) -> None:
        pass


class Silent:
    """Reports nothing: the default for library use and for non-main ranks."""

    @contextmanager
    def progress(self, description: str, total: float | None = None, unit: str = "it") -> Iterator[Bar]:
        yield _NoBar()

    def info(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        pass


SILENT = Silent()
