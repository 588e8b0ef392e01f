"""Score one LaMP task's predictions against its gold labels.

Example:
    python eval/eval_task.py --golds_json dev_outputs.json --preds_json preds.json \
        --task_name LaMP_7 --output_file results.json
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

from LaMP.utils.cli.arguments import (add_bootstrap_arguments, add_rouge_aggregation_argument,
                                      add_task_argument, check_bootstrap_arguments)
from LaMP.utils.cli.program import ArgumentParser, run, setup_logging
from LaMP.utils.cli.tables import format_results_table
from LaMP.utils.data.fileio import atomic_write_json, check_outputs
from LaMP.utils.data.outputs import load_outputs
from LaMP.utils.evaluation.scoring import score_files

logger = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--golds_json", required=True,
                        help="gold labels of the task, a LaMP outputs file")
    parser.add_argument("--preds_json", required=True,
                        help="predictions in the same format as the gold file")
    add_task_argument(parser, "--task_name")
    parser.add_argument("--output_file", required=True,
                        help="where to write the results JSON")
    add_bootstrap_arguments(parser)
    add_rouge_aggregation_argument(parser)
    args = parser.parse_args(argv)
    check_bootstrap_arguments(parser, args)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging()
    check_outputs(files={"--output_file": args.output_file},
                  inputs={"--golds_json": args.golds_json, "--preds_json": args.preds_json})
    golds = load_outputs(args.golds_json, what="gold file")
    preds = load_outputs(args.preds_json, what="predictions file")
    result = score_files(golds, preds, task=args.task_name,
                         bootstrap=args.bootstrap, seed=args.seed,
                         rouge_aggregation=args.rouge_aggregation)
    atomic_write_json(args.output_file, result, indent=2)
    print(format_results_table({args.task_name.file_name: result}))
    logger.info("wrote %s", args.output_file)
    return result


if __name__ == "__main__":
    sys.exit(run(main))
