"""Scoring prediction files against gold files: pairing, checks and metrics."""
from __future__ import annotations

from LaMP.utils.data.outputs import OutputsFile
from LaMP.utils.errors import LampError, preview
from LaMP.utils.evaluation.metrics import (DEFAULT_BOOTSTRAP_SEED, OFFICIAL_ROUGE_SAMPLES,
                                           InvalidGold, Metric, Prepared, RougeMetric,
                                           bootstrap_intervals, bootstrap_medians, metric_for)
from LaMP.utils.tasks import Task, could_be

# How ROUGE is summarised over examples: "mean" (ours: exact), "bootstrap_median" (the official
# evaluator's median of 1,000 bootstrap means, seeded here). Other metrics are plain in both.
ROUGE_AGGREGATIONS = ("mean", "bootstrap_median")


def paired_outputs(golds: OutputsFile, preds: OutputsFile, task: Task | None = None
                   ) -> tuple[Task, list[str], list[str], list[str]]:
    """Check that two files describe the same task and ids; return (task, ids, golds, preds)."""
    task = task or golds.task
    for side in (golds, preds):  # the golds' own task must match; predictions may defer
        if side.task is not task and not (side is preds and _could_be(side, task)):
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
    """A file read as another task whose "task" field still allows ``task`` (LaMP-2N
    predictions saying "LaMP_2" whose outputs are no news category): the golds decide."""
    return could_be(side.declared, task) if side.declared else False


def pair_with_golds(golds: dict[Task, OutputsFile], preds: dict[Task, OutputsFile]
                    ) -> dict[Task, OutputsFile]:
    """``preds`` keyed so that each golds task finds its predictions: a predictions file read
    as a task without golds moves to the one golds task its "task" field allows."""
    paired = dict(preds)
    for task in golds:
        if task in paired:
            continue
        movable = [other for other, side in paired.items()
                   if other not in golds and _could_be(side, task)]
        if len(movable) == 1:
            paired[task] = paired.pop(movable[0])
    return paired


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


def utilities(task: Task, ids: list[str], golds: list[str], preds: list[str], source: str
              ) -> list[float]:
    """Per example, the task's selection metric of its prediction, higher better (LaMP-3:
    the normalised negative absolute error): the utility ROPG and RSPG learn from."""
    metric = metric_for(task)
    prepared = prepare(metric, ids, golds, preds, source)
    return metric.utilities(prepared, task.selection_metric).tolist()


def score_files(golds: OutputsFile, preds: OutputsFile, task: Task | None = None,
                bootstrap: int = 0, seed: int = DEFAULT_BOOTSTRAP_SEED,
                rouge_aggregation: str = "mean") -> dict:
    """Metrics of ``preds`` against ``golds`` (see ``score_outputs``)."""
    task, ids, gold_texts, pred_texts = paired_outputs(golds, preds, task)
    return score_outputs(task, ids, gold_texts, pred_texts, golds.source, bootstrap, seed,
                         rouge_aggregation)


def invalid_gold_ids(outputs: OutputsFile) -> list[str]:
    """Ids whose output the evaluator would refuse as a gold (e.g. a LaMP-2 output that is
    not one of the 15 tags); generation tasks accept any text."""
    if outputs.task.labels is None:
        return []
    ids, texts = list(outputs.outputs), list(outputs.outputs.values())
    try:
        metric_for(outputs.task).prepare(texts, texts)
    except InvalidGold as error:
        return [ids[i] for i in error.positions]
    return []
