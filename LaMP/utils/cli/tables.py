"""Plain-text tables for the terminal: any rows, and a results file's metrics."""
from __future__ import annotations

from typing import Iterable, Mapping


def format_table(header: Iterable[str], rows: Iterable[Iterable]) -> str:
    """A plain-text table for the terminal: left-aligned columns under a dashed rule."""
    rows = [tuple(str(cell) for cell in row) for row in [header, *rows]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_results_table(results: Mapping[str, Mapping]) -> str:
    """A plain-text table of ``{task file name: result}`` for the terminal."""
    header = ("task", "metric", "value", "95% CI", "n", "invalid")
    rows = []
    for task_name, result in results.items():
        metric_names = [key for key in result
                        if key not in ("count", "invalid", "ci95", "bootstrap", "aggregation")]
        for name in metric_names:
            interval = result.get("ci95", {}).get(name)
            rows.append((task_name, name, f"{result[name]:.4f}",
                         f"[{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "",
                         str(result.get("count", "")), str(result.get("invalid", ""))))
    return format_table(header, rows)
