"""Round 10 edges: training curves (`core/train/plot.py`): which records make a curve, the
character chart cell by cell, and the PNG's series."""

from __future__ import annotations

import json
import sys

import pytest

from llmctl.core.train.plot import load_curves, render_png, render_terminal
from llmctl.errors import DataError, UsageError


def _metrics(tmp_path, records, tail=""):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return tmp_path


def test_curves_keep_finite_numeric_points_of_metrics_records(tmp_path):
    out = _metrics(tmp_path, [
        {"step": 1, "loss": 3.0, "lr": 1e-3},
        {"step": 2, "loss": float("nan"), "lr": 2e-3, "val_loss": 2.5},
        {"step": 3, "loss": True, "val_loss": "x"},  # a bool and a string are not values
        {"step": True, "loss": 9.0}, {"step": float("inf"), "loss": 9.0}, {"step": "4", "loss": 9.0},
        {"loss": 9.0}, [1, 2], {"step": 4.0, "loss": 1, "reward": 0.5, "lr": 3e-3},
    ], tail='{"step": 5, "loss": 0.')  # a torn last line
    assert load_curves(out) == {"loss": [[1, 3.0], [4.0, 1]], "val_loss": [[2, 2.5]],
                                "lr": [[1, 1e-3], [2, 2e-3], [4.0, 3e-3]]}
    assert load_curves(out, "reward") == {"reward": [[4.0, 0.5]], "lr": [[1, 1e-3], [2, 2e-3], [4.0, 3e-3]]}
    assert list(load_curves(out, "reward")) == ["reward", "lr"]  # the chosen metric first
    with pytest.raises(DataError) as e:
        load_curves(out, "kl")
    assert str(e.value) == f"{out}/metrics.jsonl has no kl records yet"
    with pytest.raises(UsageError) as e:
        load_curves(tmp_path / "nothing")
    assert str(e.value) == f"{tmp_path / 'nothing'}: no metrics.jsonl (is it an llmctl train output?)"


def test_the_terminal_chart_cell_by_cell():
    curves = {"loss": [[0, 4.0], [2, 2.0], [4, 1.0], [4, 1.1]], "val_loss": [[4, 1.5], [0, 4.0], [1, 3.9]],
              "lr": [[0, 1e-3], [4, 5e-4]]}
    # x: steps 0…4 on columns 0…4; y: 4.0…1.0 on rows 0…3 (row = round((4 - y) / 3 · 3));
    # a val point ('o') takes the cell of a train point ('·'), never the other way round
    assert render_terminal(curves, width=5, height=4).split("\n") == [
        "   4.000 ┤oo   ",
        "         │     ",
        "         │  · o",
        "   1.000 ┤    ·",
        "         └─────",
        "          step 0step 4",
        "          · train loss (last 1.1000)   o val loss (last 3.9000)",
        "          lr 5.00e-04 … 1.00e-03",
    ]


def test_chart_columns_rows_and_labels_on_other_sizes():
    chart = render_terminal({"loss": [[1, 2.0], [2, 1.0]], "lr": []}, width=11, height=6).split("\n")
    assert chart[:6] == ["   2.000 ┤·          ", "         │           ", "         │           ",
                         "   1.400 ┤           ", "         │           ", "   1.000 ┤          ·"]  # the last row labelled
    default = render_terminal({"loss": [[0, 1.0], [100, 0.5]], "lr": [[0, 1.0]]}).split("\n")
    assert len(default) == 14 + 4 and {len(line) for line in default[:14]} == {10 + 72}  # 72 x 14 by default
    assert default[0].endswith("·" + " " * 71) and default[13].endswith(" " * 71 + "·")


def test_a_flat_single_metric_chart_with_labels_every_third_row():
    chart = render_terminal({"reward": [[10, 0.5], [30, 0.5]], "lr": []}, width=40, height=7).split("\n")
    assert [line[:10] for line in chart[:7]] == ["   0.500 ┤", "         │", "         │", "   0.500 ┤",
                                                 "         │", "         │", "   0.500 ┤"]
    assert chart[6][10:] == "·" + " " * 38 + "·"  # flat: on the bottom row (y1 = y0 + 1e-9)
    assert chart[7] == "         └" + "─" * 40
    assert chart[8] == "          step 10" + "step 30".rjust(40 - len("step 10") - 5)
    assert chart[9] == "          · reward (last 0.5000)" and len(chart) == 10  # no val loss, no lr line


def test_the_png_plots_each_series(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig) or close(fig))
    curves = {"loss": [[1, 3.0], [2, 2.0]], "val_loss": [[2, 2.5]], "lr": [[1, 1e-3], [2, 2e-3]]}
    render_png(curves, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    ax, lr_ax = figures[0].axes
    assert [(line.get_label(), list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()] == [
        ("train loss", [1, 2], [3.0, 2.0]), ("val loss", [2], [2.5])]
    assert [(line.get_label(), list(line.get_ydata())) for line in lr_ax.get_lines()] == [("lr", [1e-3, 2e-3])]
    assert (ax.get_xlabel(), ax.get_ylabel(), lr_ax.get_ylabel()) == ("step", "loss", "learning rate")
    assert tuple(figures[0].get_size_inches()) == (8, 4.5) and figures[0].dpi == 120  # 960 x 540 pixels
    train, val = ax.get_lines()
    assert (train.get_marker(), val.get_marker(), val.get_linestyle()) == ("None", "o", "-")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train loss", "val loss", "lr"]
    render_png({"reward": [[1, 0.5]], "lr": []}, tmp_path / "r.png")
    [ax] = figures[1].axes
    assert [line.get_label() for line in ax.get_lines()] == ["reward"] and ax.get_ylabel() == "reward"


def test_the_png_needs_matplotlib_and_replaces_an_earlier_png(tmp_path, monkeypatch):
    curves = {"loss": [[1, 3.0], [2, 2.0]], "lr": []}
    png = tmp_path / "c.png"
    png.write_bytes(b"old")
    render_png(curves, png)  # the command decided it may be written
    assert png.read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UsageError) as e:
        render_png(curves, tmp_path / "again.png")
    assert str(e.value) == "-o PNG needs matplotlib: pip install 'llmctl[plot]' (or omit -o for a terminal chart)"
    assert not (tmp_path / "again.png").exists()


@pytest.mark.parametrize("flag, value", [("--width", "19"), ("--height", "3")])
def test_a_too_small_chart_names_only_the_flag_given(llmctl, tmp_path, flag, value):
    _metrics(tmp_path, [{"step": 1, "loss": 2.0}])
    r = llmctl("plot", tmp_path, flag, value)
    assert r.code == 2 and r.stderr.strip() == f"error: {flag} {value}: a chart needs at least 20 columns and 4 lines"


def test_charting_a_companion_curve_draws_it_once_with_readable_labels(tmp_path):
    """--metric val_loss drew val loss twice (as the curve and again as 'o'); --metric lr labelled
    its axis with three decimals, so every learning rate below 5e-4 read 0.000."""
    out = _metrics(tmp_path, [{"step": s, "loss": 3.0 - s / 10, "val_loss": 3.1 - s / 10, "lr": 3e-4 - s * 2e-5}
                              for s in range(1, 11)])
    assert list(load_curves(out, "val_loss")) == ["val_loss", "lr"]
    chart = render_terminal(load_curves(out, "val_loss"), width=30, height=8)
    assert "o" not in "".join(line.split("┤")[-1].split("│")[-1] for line in chart.splitlines()[:8])
    assert "o val loss" not in chart and chart.count("val_loss (last 2.1000)") == 1
    lr = render_terminal(load_curves(out, "lr"), width=30, height=8)
    labels = [line.split("┤")[0].strip() for line in lr.splitlines() if "┤" in line]
    assert len(set(labels)) == len(labels) and "2.80e-04" in labels and "(last 1.00e-04)" in lr
