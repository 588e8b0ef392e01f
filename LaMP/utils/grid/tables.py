"""The grid's results as the paper lays them out: rows task × metric, columns the grid's
methods / retrievers / k, in Markdown, CSV and LaTeX (booktabs).

The best value of a row is bold (by the metric's direction), a dagger marks a column whose
difference from the named baseline column is significant under the paired bootstrap of
``LaMP.utils.evaluation.metrics.paired_bootstrap`` (what eval/compare.py reports), '—' is a
cell that is not complete, and reference numbers from a paper sit beside ours with the difference.
"""
from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass, field

from LaMP.utils.data.fileio import read_json
from LaMP.utils.errors import LampError
from LaMP.utils.evaluation.metrics import metric_for, paired_bootstrap
from LaMP.utils.grid.plan import Cell, Runner, StageRun
from LaMP.utils.grid.schema import NO_RETRIEVER, Grid

logger = logging.getLogger(__name__)
MISSING = "—"
MARK = "†"
# eval_task.py's results are a few kB (metrics, counts, intervals): a file far larger is
# not one of them.
MAX_RESULTS_BYTES = 16 * 2**20


def column_label(grid: Grid, axes: dict) -> str:
    """A column's name: the values of the axes the grid varies ("bm25 k=4", "lora")."""
    parts = {"model": axes["model"], "method": axes["method"],
             "retriever": axes["retriever"], "k": f"k={axes['k']}"}
    return " ".join(parts[axis] for axis in grid.varying)


def baseline_label(grid: Grid, axes: dict) -> str | None:
    """The column a cell is tested against: its own axes with the baseline's values."""
    if not grid.baseline:
        return None
    axes = {**axes, **grid.baseline}
    if axes["retriever"] == NO_RETRIEVER or axes["k"] == 0:
        axes["retriever"], axes["k"] = NO_RETRIEVER, 0
    return column_label(grid, axes)


@dataclass
class Row:
    task: str  # "LaMP-3", or "LaMP-3 (time)" when the grid has several splits
    metric: str
    values: dict = field(default_factory=dict)  # column -> float | None
    p_values: dict = field(default_factory=dict)  # column -> p against the baseline column
    reference: dict = field(default_factory=dict)  # column -> the paper's number
    lower_is_better: bool = False

    def best(self) -> set:
        present = {column: value for column, value in self.values.items() if value is not None}
        if not present:
            return set()
        target = (min if self.lower_is_better else max)(present.values())
        return {column for column, value in present.items() if value == target}


@dataclass
class Table:
    columns: list
    rows: list
    reference_columns: list  # columns that have a paper number in some row
    baseline: str  # a description of the baseline, for the legend
    alpha: float
    reference_source: str | None


def _argument(run: StageRun, flag: str):
    return run.argv[run.argv.index(flag) + 1]


def read_results(runner: Runner, cell: Cell) -> dict | None:
    """The task's metrics from a complete cell's results.json (a number, or None where the
    scorer wrote null for a non-finite value); None if the cell is not complete. A damaged
    file (unreadable, not JSON, not an object of numbers) is a LampError naming it."""
    if not runner.is_complete(cell.score):
        return None
    path = runner.folder(cell.score) / "results.json"
    document = read_json(path, "results file", max_bytes=MAX_RESULTS_BYTES)
    if not isinstance(document, dict):
        raise LampError(f"{path}: expected an object of metrics, found "
                        f"{type(document).__name__}")
    metrics = {}
    for metric in cell.axes["task"].metrics:
        if metric not in document:
            raise LampError(f"{path}: no {metric!r}")
        value = document[metric]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise LampError(f"{path}: {metric} is {str(value)[:40]!r}, not a finite number")
        metrics[metric] = None if value is None else float(value)
    return metrics


def cell_results(cells: list[Cell], runner: Runner) -> tuple[dict, dict]:
    """``({cell name: metrics or None}, {cell name: why it is left out})``: a complete cell
    whose results are damaged is warned about and left out, like one not complete."""
    results, damaged = {}, {}
    for cell in cells:
        try:
            results[cell.name] = read_results(runner, cell)
        except LampError as error:
            results[cell.name], damaged[cell.name] = None, str(error)
            logger.warning("cell %s is left out of the tables: %s (remove %s to score it "
                           "again)", cell.name, error, runner.folder(cell.score))
    return results, damaged


def _prepared(runner: Runner, cell: Cell, cache: dict):
    """Per-example scores of a complete cell, for the paired bootstrap; None (warned once)
    where its gold or predictions file cannot be read or paired."""
    if cell.name not in cache:
        from LaMP.utils.data.outputs import load_outputs
        from LaMP.utils.evaluation.scoring import paired_outputs, prepare

        score = cell.score
        task = cell.axes["task"]
        metric = metric_for(task)
        try:
            golds = load_outputs(runner.path(_argument(score, "--golds_json"), score),
                                 "gold file")
            preds = load_outputs(runner.path(_argument(score, "--preds_json"), score),
                                 "predictions file")
            _, ids, gold_texts, pred_texts = paired_outputs(golds, preds, task)
            cache[cell.name] = (metric, prepare(metric, ids, gold_texts, pred_texts,
                                                golds.source))
        except LampError as error:
            logger.warning("cell %s: no significance test against it: %s", cell.name, error)
            cache[cell.name] = None
    return cache[cell.name]


def build_table(grid: Grid, cells: list[Cell], runner: Runner,
                results: dict | None = None) -> Table:
    """The table of ``cells``; ``results`` as ``cell_results`` returns them (read here if
    not given)."""
    if results is None:
        results = cell_results(cells, runner)[0]
    columns = list(dict.fromkeys(column_label(grid, cell.axes) for cell in cells))
    by_place = {(cell.axes["task"].name, cell.axes["split"], column_label(grid, cell.axes)): cell
                for cell in cells}
    reference = (grid.reference or {}).get("values", {})
    rows, cache = [], {}
    for task in grid.tasks:
        for split in grid.splits:
            place = [(column, by_place.get((task.name, split, column))) for column in columns]
            if all(cell is None for _, cell in place):
                continue  # every cell of this task and split is excluded
            found = {column: results.get(cell.name) if cell else None for column, cell in place}
            p_values = {}
            for column, cell in place:
                base = baseline_label(grid, cell.axes) if cell else None
                base_cell = by_place.get((task.name, split, base))
                if base_cell is None or base == column or found[column] is None \
                        or found.get(base) is None:
                    continue
                first = _prepared(runner, base_cell, cache)
                second = _prepared(runner, cell, cache)
                if first is None or second is None:
                    continue
                comparison = paired_bootstrap(first[0], first[1], second[1],
                                              grid.bootstrap["samples"], grid.bootstrap["seed"])
                p_values[column] = {name: value["p_value"] for name, value in comparison.items()}
            metric_family = metric_for(task)
            label = task.name if len(grid.splits) == 1 else f"{task.name} ({split})"
            for metric in task.metrics:
                rows.append(Row(
                    label, metric,
                    values={column: (found[column] or {}).get(metric) for column in columns},
                    p_values={column: p[metric] for column, p in p_values.items()},
                    reference=dict(reference.get(task.name, {}).get(metric, {})),
                    lower_is_better=metric in metric_family.lower_is_better))
    reference_columns = [column for column in columns
                         if any(column in row.reference for row in rows)]
    baseline = ", ".join(f"{axis} {value}" for axis, value in grid.baseline.items())
    return Table(columns, rows, reference_columns, baseline, grid.bootstrap["alpha"],
                 (grid.reference or {}).get("source"))


def _header(table: Table) -> list[str]:
    header = ["task", "metric"]
    for column in table.columns:
        header.append(column)
        if column in table.reference_columns:
            header += [f"{column} (paper)", f"{column} Δ"]
    return header


def _cells(table: Table, row: Row, bold, mark, escape=lambda text: text) -> list[str]:
    """One row's texts; ``bold`` and ``mark`` wrap a value in the output format's markup,
    ``escape`` quotes plain text for it (before the markup is added)."""
    missing = escape(MISSING)
    texts = [escape(row.task), escape(row.metric)]
    best = row.best()
    for column in table.columns:
        value = row.values.get(column)
        if value is None:
            text = missing
        else:
            text = f"{value:.4f}"
            if column in best:
                text = bold(text)
            if row.p_values.get(column, 1.0) < table.alpha:
                text = mark(text)
        texts.append(text)
        if column in table.reference_columns:
            paper = row.reference.get(column)
            texts.append(missing if paper is None else f"{paper:.3f}")
            texts.append(missing if paper is None or value is None else f"{value - paper:+.4f}")
    return texts


def legend(table: Table) -> str:
    parts = ["Bold: the best value of the row (lower is better for MAE and RMSE)."]
    if table.baseline:
        parts.append(f"{MARK}: differs from the baseline column ({table.baseline}) with "
                     f"p < {table.alpha} (paired bootstrap).")
    parts.append(f"{MISSING}: not run or not complete.")
    if table.reference_columns:
        parts.append(f"(paper): {table.reference_source}; Δ = ours − paper.")
    return " ".join(parts)


def to_markdown(table: Table) -> str:
    header = _header(table)
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|"]
    for row in table.rows:
        lines.append("| " + " | ".join(_cells(table, row, lambda t: f"**{t}**",
                                              lambda t: t + MARK)) + " |")
    return "\n".join(lines) + "\n\n" + legend(table) + "\n"


def _latex_escape(text: str) -> str:
    for char, escaped in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"),
                          ("&", r"\&"), ("#", r"\#"), ("$", r"\$"), ("Δ", r"$\Delta$"),
                          ("—", "---")):
        text = text.replace(char, escaped)
    return text


def to_latex(table: Table) -> str:
    header = _header(table)
    lines = [r"% needs \usepackage{booktabs}",
             r"\begin{tabular}{ll" + "r" * (len(header) - 2) + "}", r"\toprule",
             " & ".join(_latex_escape(text) for text in header) + r" \\", r"\midrule"]
    previous = None
    for row in table.rows:
        if previous is not None and row.task != previous:
            lines.append(r"\midrule")
        previous = row.task
        texts = _cells(table, row, lambda t: rf"\textbf{{{t}}}", lambda t: t + r"$^\dagger$",
                       _latex_escape)
        lines.append(" & ".join(texts) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


def to_csv(table: Table) -> str:
    """Plain numbers for other tools: a value, its p against the baseline, the paper's."""
    header = ["task", "metric"]
    for column in table.columns:
        header += [column, f"{column} p"]
        if column in table.reference_columns:
            header += [f"{column} (paper)", f"{column} Δ"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in table.rows:
        line = [row.task, row.metric]
        for column in table.columns:
            value = row.values.get(column)
            line += ["" if value is None else repr(value),
                     "" if column not in row.p_values else repr(row.p_values[column])]
            if column in table.reference_columns:
                paper = row.reference.get(column)
                line += ["" if paper is None else repr(paper),
                         "" if paper is None or value is None else repr(value - paper)]
        writer.writerow(line)
    return buffer.getvalue()

