"""PNG plots of a grid's results (matplotlib, Agg backend: no display needed).

``metric_vs_k.png``: each task's own metric against k, a line per retriever (k = 0 is the
bare input, the same point for every retriever). ``methods.png``: a bar per column of the
table for each task. Both use the task's selection metric, one panel per task (and split).
"""
from __future__ import annotations

import math
from pathlib import Path

from LaMP.utils.data.fileio import open_output
from LaMP.utils.grid.schema import NO_RETRIEVER, Grid
from LaMP.utils.grid.tables import Table


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; a cluster node has no display
    import matplotlib.pyplot as plt

    return plt


def _panels(plt, count: int):
    columns = min(count, 3)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(max(4.2 * columns, 6.4), 3.4 * rows),
                                squeeze=False)
    flat = [axis for line in axes for axis in line]
    for axis in flat[count:]:
        axis.set_visible(False)
    return figure, flat


def _selection_rows(grid: Grid, table: Table) -> list:
    """The row of each task's selection metric, in table order."""
    chosen = {task.name: task.selection_metric for task in grid.tasks}
    return [row for row in table.rows if chosen[row.task.split(" ")[0]] == row.metric]


def plot_metric_vs_k(grid: Grid, cells: list, results: dict, path: Path) -> Path | None:
    """``results``: {(task name, split, cell axes without task/split as a tuple): value}."""
    if len(set(grid.k)) < 2:
        return None
    plt = _pyplot()
    places = [(task, split) for task in grid.tasks for split in grid.splits
              if any((task.name, split) == key[:2] for key in results)]
    if not places:
        return None
    figure, axes = _panels(plt, len(places))
    k_values = sorted(set(grid.k) | {0})
    for axis, (task, split) in zip(axes, places):
        for model in grid.models:
            for method in grid.methods:
                for retriever in grid.retrievers:
                    if retriever == NO_RETRIEVER:
                        continue
                    points = []
                    for k in k_values:
                        name = (NO_RETRIEVER, 0) if k == 0 else (retriever, k)
                        value = results.get((task.name, split, (model, method, *name)))
                        if value is not None:
                            points.append((k, value))
                    if not any(k for k, _ in points):
                        continue  # only the shared k = 0 point: this retriever has not run
                    label = " ".join([*([model] if len(grid.models) > 1 else []),
                                      *([method] if len(grid.methods) > 1 else []), retriever])
                    axis.plot([k for k, _ in points], [v for _, v in points], marker="o",
                              label=label)
        title = task.name if len(grid.splits) == 1 else f"{task.name} ({split})"
        axis.set_title(title)
        axis.set_xlabel("k (retrieved profile items)")
        axis.set_ylabel(task.selection_metric)
        axis.set_xticks(k_values)
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:  # no line yet: only k = 0 is complete
            axis.legend(fontsize="small")
    figure.suptitle(f"{grid.name}: {', '.join(sorted({t.selection_metric for t in grid.tasks}))}"
                    " against k")
    figure.tight_layout()
    _save(figure, path)
    plt.close(figure)
    return path


def plot_methods(grid: Grid, table: Table, path: Path) -> Path | None:
    rows = [row for row in _selection_rows(grid, table)
            if any(value is not None for value in row.values.values())]
    if not rows:
        return None
    plt = _pyplot()
    figure, axes = _panels(plt, len(rows))
    for axis, row in zip(axes, rows):
        columns = [column for column in table.columns if row.values.get(column) is not None]
        values = [row.values[column] for column in columns]
        best = row.best()
        colors = ["tab:orange" if column in best else "tab:blue" for column in columns]
        bars = axis.bar(range(len(columns)), values, color=colors)
        axis.bar_label(bars, fmt="%.3f", fontsize="x-small")
        axis.margins(y=0.12)  # room for the labels above the tallest bar
        axis.set_xticks(range(len(columns)), columns, rotation=45, ha="right",
                        fontsize="small")
        axis.set_title(row.task)
        axis.set_ylabel(row.metric + (" (lower is better)" if row.lower_is_better else ""))
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle(f"{grid.name}: each task's metric by column (best in orange)")
    figure.tight_layout()
    _save(figure, path)
    plt.close(figure)
    return path


def _save(figure, path: Path) -> None:
    """A PNG through the output policy like every other file: a kill mid-save leaves no
    half-written picture, and the file gets the umask's mode."""
    with open_output(path, binary=True) as handle:
        figure.savefig(handle, format="png", dpi=110)
