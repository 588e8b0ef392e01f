"""Compare two prediction files for the same gold labels, with a paired bootstrap test.

Example:
    python eval/compare.py --golds_json dev_outputs.json --preds_a baseline.json \
        --preds_b lora.json --task_name LaMP_7 --output_file comparison.json

For every metric of the task it prints A, B, the difference B − A, a 95% percentile interval
of that difference from paired bootstrap resamples, and a two-sided p-value (seeded, so the
numbers repeat).
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

from LaMP.utils.cli.arguments import (add_bootstrap_arguments, add_task_argument,
                                      check_bootstrap_arguments)
from LaMP.utils.cli.program import ArgumentParser, run, setup_logging
from LaMP.utils.cli.tables import format_table
from LaMP.utils.data.fileio import atomic_write_json, check_outputs
from LaMP.utils.data.outputs import load_outputs
from LaMP.utils.evaluation.metrics import metric_for, paired_bootstrap
from LaMP.utils.evaluation.scoring import paired_outputs, prepare

logger = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--golds_json", required=True, help="gold labels, a LaMP outputs file")
    parser.add_argument("--preds_a", required=True, help="predictions of system A (baseline)")
    parser.add_argument("--preds_b", required=True, help="predictions of system B")
    add_task_argument(parser, "--task_name")
    parser.add_argument("--output_file", default=None,
                        help="optional path for the comparison as JSON")
    add_bootstrap_arguments(parser, default=1000, help="number of paired bootstrap resamples "
                                                      "(1000 is the usual choice)")
    args = parser.parse_args(argv)
    check_bootstrap_arguments(parser, args, minimum=1)
    return args


def format_comparison(metric, comparison: dict) -> str:
    header = ("metric", "A", "B", "B - A", "95% CI of B - A", "p", "better")
    rows = []
    for name, values in comparison.items():
        difference = values["difference"]
        if difference == 0:
            better = "tie"
        else:
            higher_is_better = name not in metric.lower_is_better
            better = "B" if (difference > 0) == higher_is_better else "A"
        low, high = values["ci95"]
        rows.append((name, f"{values['first']:.4f}", f"{values['second']:.4f}",
                     f"{difference:+.4f}", f"[{low:+.4f}, {high:+.4f}]",
                     f"{values['p_value']:.4f}", better))
    return format_table(header, rows)


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging()
    check_outputs(files={"--output_file": args.output_file},
                  inputs={"--golds_json": args.golds_json, "--preds_a": args.preds_a,
                          "--preds_b": args.preds_b})
    task = args.task_name
    golds = load_outputs(args.golds_json, what="gold file")
    preds_a = load_outputs(args.preds_a, what="predictions file")
    preds_b = load_outputs(args.preds_b, what="predictions file")
    metric = metric_for(task)
    _, ids, gold_texts, texts_a = paired_outputs(golds, preds_a, task)
    _, _, _, texts_b = paired_outputs(golds, preds_b, task)
    prepared_a = prepare(metric, ids, gold_texts, texts_a, golds.source)
    prepared_b = prepare(metric, ids, gold_texts, texts_b, golds.source)
    comparison = paired_bootstrap(metric, prepared_a, prepared_b, args.bootstrap, args.seed)
    if args.output_file:
        atomic_write_json(args.output_file, {
            "task": task.file_name, "count": len(ids), "bootstrap": args.bootstrap,
            "seed": args.seed, "metrics": comparison}, indent=2)
        logger.info("wrote %s", args.output_file)
    print(format_comparison(metric, comparison))
    return comparison


if __name__ == "__main__":
    sys.exit(run(main))
