"""Output conventions: humans read stderr (rich), scripts read stdout (`--json`).

- `console` is a rich console on stderr for tables, messages and progress bars.
- `emit(data, render)` prints `data` as JSON on stdout under `--json`, else calls `render`.
- `progress(...)` is the one progress bar every long command uses (rate and ETA).
- `REPORTER` hands `progress`, `info` and `warn` to core code (`core/report.py`).
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from rich.console import Console

from llmctl.runtime import options

console = Console(stderr=True, highlight=False)


def info(message: str) -> None:
    """A human message on stderr (silenced by `--quiet`)."""
    if not options.quiet:
        console.print(message)


def warn(message: str) -> None:
    """A warning on stderr (never silenced)."""
    from rich.markup import escape

    console.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True)


def print_json(data: Any) -> None:
    """One strict JSON document on stdout, newline-terminated and flushed: NaN and ±inf become null
    (Python's NaN / Infinity tokens are not JSON; jq and most parsers reject them)."""
    try:
        text = json.dumps(data, ensure_ascii=False, default=_json_default, allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(data), ensure_ascii=False, default=_json_default, allow_nan=False)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _finite(value: Any) -> Any:
    """`value` with every non-finite float (also inside arrays and tensors) replaced by None."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def emit(data: Any, render: Callable[[], None] | None = None, *, report: bool = False) -> None:
    """Machine output under `--json`, otherwise the human rendering (on stderr).

    `report=True` marks a summary of outputs the command wrote (not its result): `--quiet`
    silences it, like every other human message.
    """
    if options.json:
        print_json(data)
    elif report and options.quiet:
        return
    elif render is not None:
        render()
    else:
        console.print_json(json.dumps(data, default=_json_default))


def table(title: str | None, columns: list[str], rows: list[list[Any]]):
    """A rich table with the given columns and rows (values are str()-ed)."""
    from rich.table import Table

    t = Table(title=title, title_justify="left", header_style="bold")
    for column in columns:
        t.add_column(column)
    for row in rows:
        t.add_row(*("" if v is None else str(v) for v in row))
    return t


class Progress:
    """A handle on one progress task: `advance(n)`, `update(**fields)`."""

    def __init__(self, bar, task_id):
        self._bar, self._task = bar, task_id

    def advance(self, amount: float = 1) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, amount)

    def update(self, *, total: float | None = None, completed: float | None = None, **fields: Any) -> None:
        """Change the total, position or the extra fields shown after the bar (e.g. loss)."""
        if self._bar is not None:
            status = "  ".join(f"{k} {_fmt(v)}" for k, v in fields.items())
            kwargs: dict[str, Any] = {"status": status} if fields else {}
            self._bar.update(self._task, total=total, completed=completed, **kwargs)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@contextmanager
def progress(description: str, total: float | None = None, unit: str = "it") -> Iterator[Progress]:
    """A progress bar on stderr with count, rate (`unit`/s) and ETA; silent under `--quiet`.

    `unit="B"` shows byte sizes and transfer speed.
    """
    if options.quiet:
        yield Progress(None, None)
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.progress import Progress as RichProgress

    if unit == "B":
        counters = [DownloadColumn(), TransferSpeedColumn()]
    else:
        counters = [MofNCompleteColumn(), _rate_column(unit)]
    bar = RichProgress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        *counters,
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=False,
    )
    with bar:
        task = bar.add_task(description, total=total, status="")
        yield Progress(bar, task)


class _Reporter:
    """The `core.report.Reporter` that commands pass to the core: these functions."""

    progress = staticmethod(progress)
    info = staticmethod(info)
    warn = staticmethod(warn)


REPORTER = _Reporter()


def _rate_column(unit: str):
    from rich.progress import ProgressColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text("-" if speed is None else f"{speed:,.1f} {unit}/s", style="cyan")

    return RateColumn()


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "__fspath__"):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
