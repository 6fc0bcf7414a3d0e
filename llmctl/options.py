"""Helpers the commands share for their options and human-readable figures.

    flag: Annotated[int, option("--top-k", help="…", panel="Sampling")] = 0
    human_bytes(3 * 2**20)  →  "3.00 MiB";  human_bytes(3e6, decimal=True)  →  "3.0 MB"
"""

from __future__ import annotations

from typing import Any


def option(*names: str, help: str, panel: str | None = None, **kw: Any) -> Any:
    """A typer option without a shown default, in the `panel` section of --help."""
    import typer

    return typer.Option(*names, help=help, rich_help_panel=panel, show_default=False, **kw)


def human_bytes(n: float, decimal: bool = False) -> str:
    """A size in binary units (KiB, MiB, GiB), or decimal ones (KB, MB, GB) beside MB/s rates."""
    base, units = (1000, ("KB", "MB", "GB")) if decimal else (1024, ("KiB", "MiB", "GiB"))
    if n < base:
        return f"{n:,.0f} B"
    for i, unit in enumerate(units, start=1):
        if n < base ** (i + 1) or unit == units[-1]:
            return f"{n / base**i:,.1f} {unit}" if decimal else f"{n / base**i:.2f} {unit}"
    raise AssertionError("unreachable")


def human_count(n: int) -> str:
    """1234567 → "1.23M"."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
