"""`llmctl plot OUTDIR`: loss, val-loss and learning-rate curves of a training run (or another metric's)."""

from pathlib import Path
from typing import Annotated, Optional

import typer


def plot(
    outdir: Annotated[Path, typer.Argument(help="A training output directory (with metrics.jsonl).")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write a PNG (needs matplotlib: pip install 'llmctl\\[plot]').")] = None,
    width: Annotated[Optional[int], typer.Option(help="Terminal chart width in characters (default: fit the terminal).")] = None,
    height: Annotated[int, typer.Option(help="Terminal chart height in lines.")] = 14,
    metric: Annotated[str, typer.Option("--metric", help="The metrics.jsonl key to draw instead of the loss (e.g. reward).")] = "loss",
) -> None:
    """Draw the curves to a PNG with -o, else as a compact terminal chart."""
    from llmctl.console import console, emit, info
    from llmctl.core.train.plot import load_curves, render_png, render_terminal

    from llmctl.errors import UsageError
    from llmctl.runtime import options

    for flag, value, least in (("--width", width, 20), ("--height", height, 4)):
        if value is not None and value < least:
            raise UsageError(f"{flag} {value}: a chart needs at least 20 columns and 4 lines")
    curves = load_curves(outdir, metric)
    if output is not None:
        from llmctl.core.outputs import claim_output

        with claim_output(output, "png", force=options.force, inputs=[outdir]):
            render_png(curves, output)
        emit({"output": str(output)}, lambda: info(f"wrote {output}"))
    else:
        columns = width or max(30, min(100, console.width - 12))
        emit(curves, lambda: console.print(render_terminal(curves, columns, height), highlight=False, markup=False))
