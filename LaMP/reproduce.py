"""Run a grid of LaMP experiments (tasks × splits × models × methods × retrievers × k) from
one YAML file, resumably, and build the paper's tables and plots from it.

Example:
    python LaMP/reproduce.py --grid LaMP/configs/demo.yaml --data_root data/sample

Each cell runs the stages through their scripts' ``main()`` (subset -> rank -> merge ->
evaluate or train -> score) into ``runs/<grid>/stages/<stage>-<key>/``, where the key hashes
the stage's arguments and inputs: a ranking is computed once and shared by every cell that
needs it, and a complete stage is never run again (a killed grid resumes at the first
incomplete stage). ``runs/<grid>/<cell>/`` links each cell's stages. ``--dry_run`` prints the
shell commands instead; ``--num_shards N --shard_id i`` runs a slice of the cells (a SLURM
array); ``--collect`` only builds ``runs/<grid>/tables/`` from the complete cells.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import logging
import os
import shlex
import shutil
import sys
from pathlib import Path

if importlib.util.find_spec("LaMP") is None:
    # Run from a checkout without `pip install -e .`: make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm

from LaMP.utils.cli.program import ArgumentParser, run, setup_logging
from LaMP.utils.data.fileio import (atomic_write_json, atomic_write_text, check_output_dir,
                                    check_readable)
from LaMP.utils.errors import LampError, preview
from LaMP.utils.grid.plan import Cell, Planner, Runner, expand_cells, load_stage, make_folder
from LaMP.utils.grid.schema import Grid, load_grid

logger = logging.getLogger("reproduce")


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", required=True, help="the grid file (YAML), e.g. "
                        "LaMP/configs/cpu_lamp7.yaml")
    parser.add_argument("--data_root", default=None,
                        help="folder the grid's data paths are relative to (default: the "
                             "grid's data_root, relative to the current folder)")
    parser.add_argument("--runs_dir", default="runs",
                        help="outputs go to RUNS_DIR/<grid name>/ (default runs)")
    parser.add_argument("--dry_run", action="store_true",
                        help="print every cell's stage commands (shell) and run nothing")
    parser.add_argument("--num_shards", type=int, default=1,
                        help="split the cells into N deterministic slices (default 1)")
    parser.add_argument("--shard_id", type=int, default=0,
                        help="the slice to run, 0 … N-1 (e.g. $SLURM_ARRAY_TASK_ID)")
    parser.add_argument("--launcher", default=None,
                        help='run the evaluate/train stages under this command, e.g. '
                             '"accelerate launch --num_processes 4" (default: in this process)')
    parser.add_argument("--collect", action="store_true",
                        help="run nothing; build the tables and plots from the complete cells")
    parser.add_argument("--fail_fast", action="store_true",
                        help="stop at the first failed stage (default: record it, finish the "
                             "other cells, exit 2 at the end)")
    parser.add_argument("--limit", type=int, default=None,
                        help="only the first N questions of every evaluated and training set "
                             "(after the grid's subset): a quick check of a big grid")
    args = parser.parse_args(argv)
    if args.num_shards < 1:
        parser.error("--num_shards must be at least 1")
    if not 0 <= args.shard_id < args.num_shards:
        parser.error(f"--shard_id must be in 0 … {args.num_shards - 1}")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    if args.collect and args.dry_run:
        parser.error("--collect and --dry_run exclude each other")
    if args.launcher is not None:
        problem = launcher_problem(args.launcher)
        if problem:
            parser.error(f"--launcher {args.launcher!r}: {problem}")
    return args


def launcher_problem(launcher: str) -> str | None:
    """Why ``launcher`` cannot start the model stages, or None: checked before anything
    runs (a dry run prints it too), as a shell would split it."""
    try:
        words = shlex.split(launcher)
    except ValueError as error:  # an unbalanced quote, a lone trailing backslash
        return f"does not split as a shell would split it ({error})"
    if not words:
        return "names no command"
    if shutil.which(words[0]) is None:
        where = "is not an executable file" if os.sep in words[0] else \
            "is not a command on PATH"
        return f"{words[0]} {where}"
    return None


def shard(cells: list, num_shards: int, shard_id: int) -> list:
    """Cells in a fixed order (by name), every num_shards-th from shard_id: each cell in
    exactly one shard, and neighbours (which share rankings) spread over the shards."""
    ordered = sorted(cells, key=lambda cell: cell.name)
    return ordered[shard_id::num_shards]


def check_stage_flags(grid: Grid, cells: list[Cell], runner: Runner) -> None:
    """Parse every stage's argv with the stage's own parser before anything runs, so that a
    flag the stage does not know fails at once and names the grid, not after an hour."""
    seen = set()
    for cell in cells:
        for stage_run in cell.runs:
            if stage_run.key in seen:
                continue
            seen.add(stage_run.key)
            module = load_stage(stage_run.stage)
            captured = io.StringIO()
            try:
                with contextlib.redirect_stderr(captured):
                    module.parse_args(runner.argv(stage_run))
            except SystemExit as done:
                if done.code:
                    message = (captured.getvalue().strip().splitlines() or ["bad arguments"])
                    raise LampError(f"{grid.source}: the {stage_run.stage.name} stage of cell "
                                    f"{cell.name} refuses its flags: "
                                    f"{message[-1].removeprefix('error: ')}") from None


def dry_run(cells: list[Cell], runner: Runner) -> None:
    printed = set()
    print("# run from the repository root; each stage once, in order")
    for cell in cells:
        print(f"\n# cell {cell.name}")
        for stage_run in cell.runs:
            if stage_run.key in printed:
                print(f"# {stage_run.folder_name}: shared, above")
                continue
            printed.add(stage_run.key)
            # Quoted like the command: a folder name may hold spaces, quotes or $(...).
            print(shlex.join(["mkdir", "-p", str(runner.folder(stage_run))]))
            print(runner.command(stage_run))


def link_cell(cell: Cell, runner: Runner) -> None:
    """``runs/<grid>/<cell>/<stage>`` -> the stage's folder (relative, so runs/ can move)."""
    folder = make_folder(runner.root / cell.name)
    for stage_run in cell.runs:
        link = folder / stage_run.stage.name
        target = os.path.relpath(runner.folder(stage_run), folder)
        try:
            if link.is_symlink():
                if os.readlink(link) == target:
                    continue
                link.unlink()  # a link to an older run of the stage: ours to replace
            elif os.path.lexists(link):
                raise LampError(f"{link} is in the way of the cell's link to its "
                                f"{stage_run.stage.name} stage; it is not a link the runner "
                                "made: move it away")
            link.symlink_to(target, target_is_directory=True)
        except OSError as error:
            raise LampError(f"{link}: cannot link ({error.strerror or error})") from None
    atomic_write_json(folder / "cell.json", {
        "cell": cell.name,
        "axes": {**cell.axes, "task": cell.axes["task"].name},
        "stages": {stage_run.stage.name: stage_run.folder_name for stage_run in cell.runs}},
        indent=2)


def collect(grid: Grid, cells: list[Cell], runner: Runner) -> dict:
    """Write tables (Markdown, CSV, LaTeX) and plots of the complete cells; return paths."""
    from LaMP.utils.grid import plots, tables

    results, damaged = tables.cell_results(cells, runner)
    table = tables.build_table(grid, cells, runner, results)
    out = make_folder(runner.root / "tables")
    written = {"markdown": atomic_write_text(out / "results.md", tables.to_markdown(table)),
               "csv": atomic_write_text(out / "results.csv", tables.to_csv(table)),
               "latex": atomic_write_text(out / "results.tex", tables.to_latex(table))}
    by_axes = {}
    for cell in cells:
        if results[cell.name] is not None:
            axes = cell.axes
            by_axes[(axes["task"].name, axes["split"],
                     (axes["model"], axes["method"], axes["retriever"], axes["k"]))] = \
                results[cell.name][axes["task"].selection_metric]
    for name, path in (("plot_k", plots.plot_metric_vs_k(grid, cells, by_axes,
                                                         out / "metric_vs_k.png")),
                       ("plot_methods", plots.plot_methods(grid, table, out / "methods.png"))):
        if path is not None:
            written[name] = path
    complete = sum(metrics is not None for metrics in results.values())
    left_out = f"; {len(damaged)} damaged, left out (see the warnings)" if damaged else ""
    print(f"\n== {grid.name}: {complete} of {len(cells)} cells complete{left_out} ==\n")
    print(tables.to_markdown(table))
    logger.info("tables and plots in %s", out)
    return {"table": table, "files": {name: str(path) for name, path in written.items()},
            "complete": complete, "damaged": damaged}


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging()
    check_output_dir(args.runs_dir, "--runs_dir")
    grid = load_grid(args.grid)
    data_root = args.data_root or grid.data_root
    if data_root is None:
        raise LampError(f"{args.grid}: no data_root in the grid; pass --data_root")
    check_readable(data_root, "--data_root" if args.data_root else f"{args.grid}: data_root",
                   folder=True)
    planner = Planner(grid, Path(data_root).resolve(), limit=args.limit)
    cells = [planner.plan(cell) for cell in expand_cells(grid)]
    # Checked before anything runs (and before a dry run, whose stage keys hash these files).
    missing = [path for path in planner.data_files if not Path(path).is_file()]
    if missing:
        raise LampError(f"{preview(missing, 3)} data files of the grid are missing under "
                        f"--data_root {data_root} (layout {grid.layout['questions']})")
    runner = Runner(Path(args.runs_dir).resolve() / grid.name, launcher=args.launcher)
    mine = shard(cells, args.num_shards, args.shard_id)
    if args.collect:
        return collect(grid, cells, runner)
    check_stage_flags(grid, mine, runner)
    if args.dry_run:
        dry_run(mine, runner)
        return {"cells": [cell.name for cell in mine]}

    failures = {}
    for cell in tqdm(mine, unit="cell", desc=f"grid {grid.name}"):
        link_cell(cell, runner)
        for stage_run in cell.runs:
            if not runner.execute(stage_run):
                failures[cell.name] = runner.failed[stage_run.key]
                logger.error("cell %s failed: %s", cell.name, failures[cell.name])
                if args.fail_fast:
                    raise LampError(f"cell {cell.name}: {failures[cell.name]}")
                break
    result = collect(grid, cells, runner)
    result.update(cells=[cell.name for cell in mine], executed=list(runner.executed),
                  failures=failures)
    if failures:
        first = next(iter(failures.items()))
        raise LampError(f"{len(failures)} of {len(mine)} cells failed (first: {first[0]}: "
                        f"{first[1]}); the others are complete; rerun to retry")
    return result


if __name__ == "__main__":
    sys.exit(run(main))
