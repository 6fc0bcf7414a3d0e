"""Training curves from metrics.jsonl: a matplotlib PNG, or a compact character chart."""

from __future__ import annotations

import math
from pathlib import Path

from llmctl.errors import DataError, UsageError


def load_curves(outdir: Path, metric: str = "loss") -> dict[str, list[list[float]]]:
    """{"loss": [[step, value], …], "val_loss": …, "lr": …} from OUTDIR/metrics.jsonl; another
    `metric` (e.g. GRPO's `reward`) takes the place of "loss", first, without "val_loss"."""
    from llmctl.core.train.metrics import METRICS_FILE, read_metrics

    if not (Path(outdir) / METRICS_FILE).is_file():
        raise UsageError(f"{outdir}: no {METRICS_FILE} (is it an llmctl train output?)")
    companions = ("val_loss", "lr") if metric == "loss" else ("lr",)
    curves: dict[str, list[list[float]]] = {key: [] for key in (metric, *companions)}  # `metric` first, once
    for record in read_metrics(outdir):
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, (int, float)) or isinstance(step, bool) or not math.isfinite(step):
            continue  # not a metrics record (a torn or foreign line)
        for key, points in curves.items():
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                points.append([step, value])
    if not curves[metric]:
        raise DataError(f"{outdir}/{METRICS_FILE} has no {metric} records yet")
    return curves


def metric_has(curves: dict, companion: str) -> bool:
    """Whether `curves` has points of `companion` (val_loss, lr) beside its first curve, not as it."""
    return companion != next(iter(curves)) and bool(curves.get(companion))


def render_png(curves: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("-o PNG needs matplotlib: pip install 'llmctl[plot]' (or omit -o for a terminal chart)") from None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    main = next(iter(curves))
    ax.plot(*zip(*curves[main]), label="train loss" if main == "loss" else main, linewidth=1)
    if metric_has(curves, "val_loss"):
        ax.plot(*zip(*curves["val_loss"]), "o-", label="val loss", linewidth=1.5, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(main)
    ax.grid(alpha=0.3)
    handles = ax.get_lines()
    if metric_has(curves, "lr"):
        lr_ax = ax.twinx()
        handles += lr_ax.plot(*zip(*curves["lr"]), color="gray", alpha=0.5, linewidth=1, label="lr")
        lr_ax.set_ylabel("learning rate")
    ax.legend(handles=handles, loc="upper right")
    fig.tight_layout()
    from llmctl.core.io import atomic_file

    with atomic_file(path, "wb", force=True) as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def render_terminal(curves: dict, width: int = 72, height: int = 14) -> str:
    """Train loss (or the chosen metric) as '·', val loss as 'o' on one grid with a y axis; lr
    range in the footer."""
    main = next(iter(curves))
    series = [(curves[main], "·"), (curves["val_loss"] if metric_has(curves, "val_loss") else [], "o")]
    points = [p for s, _ in series for p in s]
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    y1 = y1 if y1 > y0 else y0 + 1e-9
    scale = max(abs(y0), abs(y1))
    grid = [[" "] * width for _ in range(height)]
    for data, mark in series:
        for x, y in data:
            col = round((x - x0) / max(x1 - x0, 1) * (width - 1))
            row = round((y1 - y) / (y1 - y0) * (height - 1))
            if mark == "o" or grid[row][col] == " ":
                grid[row][col] = mark
    lines = []
    for i, row in enumerate(grid):
        labelled = i % 3 == 0 or i == height - 1
        label = f"{_number(y1 - (y1 - y0) * i / (height - 1), scale, 8)} ┤" if labelled else "         │"
        lines.append(label + "".join(row))
    lines.append("         └" + "─" * width)
    lines.append(f"          step {x0:g}" + f"step {x1:g}".rjust(width - len(f"step {x0:g}") - 5))
    footer = f"          · {'train loss' if main == 'loss' else main} (last {_number(curves[main][-1][1])})"
    if metric_has(curves, "val_loss"):
        footer += f"   o val loss (last {_number(curves['val_loss'][-1][1])})"
    lines.append(footer)
    if metric_has(curves, "lr"):
        lrs = [v for _, v in curves["lr"]]
        lines.append(f"          lr {min(lrs):.2e} … {max(lrs):.2e}")
    return "\n".join(lines)


def _number(value: float, scale: float | None = None, width: int = 0) -> str:
    """Fixed-point for values of 0.01 and up (losses), scientific below (learning rates), so that
    small values do not all read 0.000; `scale` (the axis's largest |value|) keeps one axis in one form."""
    scale = abs(value) if scale is None else scale
    fixed = scale >= 0.01 or scale == 0
    return f"{value:{width}.{3 if width else 4}f}" if fixed else f"{value:{width}.2e}"
