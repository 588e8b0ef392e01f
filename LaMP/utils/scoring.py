"""Scoring prediction files against gold files: pairing, checks, metrics and tables."""
from __future__ import annotations

from typing import Mapping

from LaMP.utils.cli import format_table, seed_arg
from LaMP.utils.errors import LampError, preview
from LaMP.utils.metrics import (DEFAULT_BOOTSTRAP_SEED, OFFICIAL_ROUGE_SAMPLES, InvalidGold,
                                Metric, Prepared, RougeMetric, bootstrap_intervals,
                                bootstrap_medians, metric_for)

# How ROUGE is summarised over examples: "mean" (ours: exact), "bootstrap_median" (the official
# evaluator's median of 1,000 bootstrap means, seeded here). Other metrics are plain in both.
ROUGE_AGGREGATIONS = ("mean", "bootstrap_median")
from LaMP.utils.outputs import OutputsFile
from LaMP.utils.tasks import Task


def paired_outputs(golds: OutputsFile, preds: OutputsFile, task: Task | None = None
                   ) -> tuple[Task, list[str], list[str], list[str]]:
    """Check that two files describe the same task and ids; return (task, ids, golds, preds)."""
    task = task or golds.task
    for side in (golds, preds):
        if side.task is not task and not _could_be(side, task):
            raise LampError(f"{side.source}: task is {side.task.file_name}, expected {task.file_name}")
    if not golds.outputs:
        raise LampError(f"{golds.source}: the gold set is empty")
    missing = [qid for qid in golds.outputs if qid not in preds.outputs]
    if missing:
        raise LampError(f"{preds.source}: no prediction for {preview(missing)} gold ids")
    extra = [qid for qid in preds.outputs if qid not in golds.outputs]
    if extra:
        raise LampError(f"{preds.source}: predictions for {preview(extra)} ids that have no gold")
    ids = list(golds.outputs)
    return task, ids, [golds.outputs[i] for i in ids], [preds.outputs[i] for i in ids]


def _could_be(side: OutputsFile, task: Task) -> bool:
    """A file that says the name ``task`` was published under ("LaMP_2" for LaMP-2N) and
    holds none of that name's own labels: only its outputs could have told it apart, so it
    is read as ``task`` (predictions that are no label at all, say)."""
    return (task.published_as is not None and side.task.file_name == task.published_as
            and not set(side.outputs.values()) & set(side.task.labels or ()))


def prepare(metric: Metric, ids: list[str], golds: list[str], preds: list[str],
            source: str) -> Prepared:
    """``metric.prepare`` with gold problems reported by id."""
    try:
        return metric.prepare(golds, preds)
    except InvalidGold as error:
        raise LampError(f"{source}: {error} for {preview(ids[i] for i in error.positions)} ids") from None


def score_outputs(task: Task, ids: list[str], golds: list[str], preds: list[str], source: str,
                  bootstrap: int = 0, seed: int = DEFAULT_BOOTSTRAP_SEED,
                  rouge_aggregation: str = "mean") -> dict:
    """Metrics under the official keys, with counts; ``bootstrap`` > 0 adds ``ci95``;
    ``rouge_aggregation`` (one of ``ROUGE_AGGREGATIONS``) says how ROUGE is summarised."""
    metric = metric_for(task)
    prepared = prepare(metric, ids, golds, preds, source)
    official = rouge_aggregation == "bootstrap_median" and isinstance(metric, RougeMetric)
    values = (bootstrap_medians(metric, prepared, OFFICIAL_ROUGE_SAMPLES, seed) if official
              else metric.aggregate(prepared))
    result: dict = {**values, "count": len(ids), **prepared.counts}
    if official:  # recorded only when used, so a default run's results stay as they were
        result["aggregation"] = {"rouge": rouge_aggregation,
                                 "samples": OFFICIAL_ROUGE_SAMPLES, "seed": seed}
    if bootstrap > 0:
        result["ci95"] = bootstrap_intervals(metric, prepared, bootstrap, seed)
        result["bootstrap"] = {"samples": bootstrap, "seed": seed}
    return result


def score_files(golds: OutputsFile, preds: OutputsFile, task: Task | None = None,
                bootstrap: int = 0, seed: int = DEFAULT_BOOTSTRAP_SEED,
                rouge_aggregation: str = "mean") -> dict:
    """Metrics of ``preds`` against ``golds`` (see ``score_outputs``)."""
    task, ids, gold_texts, pred_texts = paired_outputs(golds, preds, task)
    return score_outputs(task, ids, gold_texts, pred_texts, golds.source, bootstrap, seed,
                         rouge_aggregation)


def add_bootstrap_arguments(parser) -> None:
    """The evaluators' ``--bootstrap N`` and ``--seed`` flags."""
    parser.add_argument("--bootstrap", type=int, default=0, metavar="N",
                        help="add 95%% confidence intervals from N bootstrap resamples (0: none)")
    parser.add_argument("--seed", type=seed_arg, default=DEFAULT_BOOTSTRAP_SEED,
                        help="seed of the bootstrap resampling (fixed so intervals repeat)")


def add_rouge_aggregation_argument(parser) -> None:
    """``--rouge_aggregation``: ours (the plain mean) or the official bootstrap median."""
    parser.add_argument("--rouge_aggregation", default="mean", choices=ROUGE_AGGREGATIONS,
                        help="ROUGE over examples: 'mean' (default: exact and repeatable) or "
                             "'bootstrap_median', the official evaluator's median of "
                             f"{OFFICIAL_ROUGE_SAMPLES:,} bootstrap means, seeded by --seed; "
                             "other metrics are the same either way")


# The most bootstrap resamples a run may ask for: 100,000 already resolves a p-value to 1e-5;
# more changes no reported digit, and a mistyped 10**20 would otherwise run for ever.
MAX_BOOTSTRAP = 100_000


def check_bootstrap_arguments(parser, args, minimum: int = 0) -> None:
    """``--bootstrap`` in ``minimum`` … ``MAX_BOOTSTRAP`` (compare.py needs at least one)."""
    if not minimum <= args.bootstrap <= MAX_BOOTSTRAP:
        parser.error(f"--bootstrap must be in {minimum} … {MAX_BOOTSTRAP:,}")


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
