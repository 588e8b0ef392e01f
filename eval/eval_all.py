"""Score every LaMP task found in a zip of predictions against a zip of gold labels.

Example:
    python eval/eval_all.py --golds_zip golds.zip --preds_zip preds.zip \
        --temp_dir /tmp/unused --output_file results.json

JSON members are read straight out of both archives (any folder depth; ``__MACOSX/`` and
non-JSON members are skipped); each file's task comes from its ``task`` field. Nothing is
extracted, deleted or written except ``--output_file``.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

if importlib.util.find_spec("LaMP") is None:
    # Run from a checkout without `pip install -e .` (as the original README's steps
    # do): make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from LaMP.utils.cli.arguments import add_bootstrap_arguments, check_bootstrap_arguments
from LaMP.utils.cli.program import ArgumentParser, run, setup_logging
from LaMP.utils.cli.tables import format_results_table
from LaMP.utils.data.fileio import atomic_write_json, check_outputs
from LaMP.utils.data.outputs import read_outputs_zip
from LaMP.utils.errors import LampError
from LaMP.utils.evaluation.scoring import pair_with_golds, score_files
from LaMP.utils.tasks import BENCHMARK_TASK_NAMES, TASKS

logger = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--golds_zip", required=True,
                        help="zip holding one gold outputs JSON per task")
    parser.add_argument("--preds_zip", required=True,
                        help="zip holding one predictions JSON per task, same format as golds")
    parser.add_argument("--temp_dir", default=None,
                        help="accepted for compatibility with the original script and never "
                             "touched: members are read from the zips in memory")
    parser.add_argument("--output_file", required=True,
                        help="where to write the results JSON ({task: metrics})")
    parser.add_argument("--require_all", action="store_true",
                        help="fail unless every benchmark task "
                             f"({', '.join(BENCHMARK_TASK_NAMES)}) has both golds and "
                             "predictions")
    add_bootstrap_arguments(parser)
    args = parser.parse_args(argv)
    check_bootstrap_arguments(parser, args)
    return args


def _task_list(by_task) -> str:
    return ", ".join(sorted(task.file_name for task in by_task)) or "no LaMP outputs file"


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging()
    check_outputs(files={"--output_file": args.output_file},
                  inputs={"--golds_zip": args.golds_zip, "--preds_zip": args.preds_zip})
    golds = read_outputs_zip(args.golds_zip, what="golds zip")
    preds = pair_with_golds(golds, read_outputs_zip(args.preds_zip, what="predictions zip"))
    lacking = {}
    for task in TASKS.values():  # a task outside the benchmark (LaMP-2N) only when present
        if not task.benchmark and task not in golds and task not in preds:
            continue
        if task not in golds and task not in preds:
            lacking[task] = "no golds and no predictions"
        elif task not in golds:
            lacking[task] = "no golds"
        elif task not in preds:
            lacking[task] = "no predictions"
    required = {task: why for task, why in lacking.items() if task.benchmark}
    if args.require_all and required:
        raise LampError("--require_all: tasks not scored: "
                        + ", ".join(f"{task.file_name} ({why})" for task, why in required.items()))
    if not any(task in preds for task in golds):
        # Name both archives and what each holds: either one may be the wrong file.
        raise LampError("no task has both golds and predictions: "
                        f"{args.golds_zip} holds {_task_list(golds)}, "
                        f"{args.preds_zip} holds {_task_list(preds)}")
    results = {}
    for task in TASKS.values():
        if task in golds and task in preds:
            results[task.file_name] = score_files(golds[task], preds[task], task,
                                                  bootstrap=args.bootstrap, seed=args.seed)
    atomic_write_json(args.output_file, results, indent=2)
    print(format_results_table(results))
    for task, why in lacking.items():
        print(f"not scored: {task.file_name} ({why})")
    logger.info("wrote %s", args.output_file)
    return results


if __name__ == "__main__":
    sys.exit(run(main))
