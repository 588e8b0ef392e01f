"""The LaMP metrics, as plain functions of gold and predicted strings.

One module serves the evaluator, ``compare.py`` and training. Each metric family first turns
the strings into per-example arrays (``prepare``), then aggregates any subset of examples
(``aggregate``), so bootstrap resampling re-aggregates without re-scoring text.

- Classification (LaMP-1, LaMP-2): accuracy and macro-F1 over the task's label set. A
  prediction that is not a label after stripping whitespace is wrong and is not a class of
  its own: it adds a false negative for the gold label and a false positive for no label.
  Labels that never occur in golds or predictions score F1 = 0 and stay in the average (as
  scikit-learn does when given the label list, which the official evaluator does).
- Rating (LaMP-3): MAE and RMSE. A prediction that is not a finite number is scored as
  whichever of 1 and 5 is farther from the gold (5 on a tie), the official rule.
- Generation (LaMP-4…7): ROUGE-1 and ROUGE-L F-measure from ``rouge_score`` (its default
  tokenizer, no stemmer), the plain mean over examples.

No metric fetches anything at run time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from LaMP.utils.tasks import CLASSIFICATION, GENERATION, LOWER_IS_BETTER, RATING, Task

DEFAULT_BOOTSTRAP_SEED = 0  # fixed so that confidence intervals are the same on every run


class InvalidGold(ValueError):
    """Gold outputs that the metric cannot use; ``positions`` index the offending examples."""

    def __init__(self, message: str, positions: Sequence[int]):
        super().__init__(message)
        self.positions = list(positions)


@dataclass
class Prepared:
    """Per-example arrays (one row per example) plus counts that do not resample."""

    arrays: dict[str, np.ndarray]
    counts: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))


class Metric:
    """A metric family: ``prepare`` scores strings once, ``aggregate`` summarises rows."""

    names: tuple[str, ...] = ()
    lower_is_better: tuple[str, ...] = ()  # metrics that are errors rather than scores

    def prepare(self, golds: Sequence[str], preds: Sequence[str]) -> Prepared:
        raise NotImplementedError

    def aggregate(self, prepared: Prepared, rows: np.ndarray | None = None) -> dict[str, float]:
        raise NotImplementedError

    def utilities(self, prepared: Prepared, name: str) -> np.ndarray:
        """Per example, how good its prediction is by the metric ``name``, higher better:
        the feedback that trains retrievers (ROPG) and selectors (RSPG)."""
        raise NotImplementedError


class ClassificationMetric(Metric):
    names = ("accuracy", "f1")

    def __init__(self, labels: Sequence[str]):
        self.labels = tuple(labels)
        self._index = {label: i for i, label in enumerate(self.labels)}

    def label_index(self, text: str) -> int:
        """The label's position in the label set, or -1 for anything else."""
        return self._index.get(text.strip(), -1)

    def prepare(self, golds, preds):
        gold = np.fromiter((self.label_index(g) for g in golds), dtype=np.int64, count=len(golds))
        bad = np.flatnonzero(gold < 0)
        if bad.size:
            raise InvalidGold(f"gold outputs that are not labels ({', '.join(self.labels)})", bad)
        pred = np.fromiter((self.label_index(p) for p in preds), dtype=np.int64, count=len(preds))
        return Prepared({"gold": gold, "pred": pred}, {"invalid": int((pred < 0).sum())})

    def aggregate(self, prepared, rows=None):
        gold, pred = prepared.arrays["gold"], prepared.arrays["pred"]
        if rows is not None:
            gold, pred = gold[rows], pred[rows]
        n_labels = len(self.labels)
        correct = gold == pred
        true_positives = np.bincount(gold[correct], minlength=n_labels)
        predicted = np.bincount(pred[pred >= 0], minlength=n_labels)
        actual = np.bincount(gold, minlength=n_labels)
        denominator = predicted + actual  # 2TP + FP + FN
        f1 = np.divide(2.0 * true_positives, denominator,
                       out=np.zeros(n_labels), where=denominator > 0)
        return {"accuracy": float(correct.mean()), "f1": float(f1.mean())}

    def utilities(self, prepared, name):
        # Per example only accuracy exists (F1 is a property of a set of predictions).
        _check_per_example(self, name, ("accuracy",))
        return (prepared.arrays["gold"] == prepared.arrays["pred"]).astype(np.float64)


def parse_rating(text: str) -> float | None:
    """The number in a rating prediction, or ``None`` when it is not a finite number."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class RatingMetric(Metric):
    names = ("MAE", "RMSE")
    lower_is_better = tuple(name for name in names if name in LOWER_IS_BETTER)

    def __init__(self, lowest: float = 1.0, highest: float = 5.0):
        self.lowest, self.highest = lowest, highest

    def fallback(self, gold: float) -> float:
        """The official score for an invalid prediction: the end of the scale farther away."""
        return self.lowest if abs(self.lowest - gold) > abs(self.highest - gold) else self.highest

    def prepare(self, golds, preds):
        gold_values = [parse_rating(g) for g in golds]
        bad = [i for i, value in enumerate(gold_values) if value is None]
        if bad:
            raise InvalidGold("gold outputs that are not numbers", bad)
        pred_values, invalid = [], 0
        for gold, pred in zip(gold_values, preds):
            value = parse_rating(pred)
            if value is None:
                invalid += 1
                value = self.fallback(gold)
            pred_values.append(value)
        arrays = {"gold": np.asarray(gold_values, dtype=np.float64),
                  "pred": np.asarray(pred_values, dtype=np.float64)}
        return Prepared(arrays, {"invalid": invalid})

    def aggregate(self, prepared, rows=None):
        error = prepared.arrays["pred"] - prepared.arrays["gold"]
        if rows is not None:
            error = error[rows]
        # A rating such as 1e200 overflows the square: RMSE is then infinite (written as null,
        # see fileio), which is the answer; numpy's RuntimeWarning on stderr would only be noise.
        with np.errstate(over="ignore"):
            return {"MAE": float(np.abs(error).mean()),
                    "RMSE": float(np.sqrt((error ** 2).mean()))}

    def utilities(self, prepared, name):
        """The normalised negative absolute error of ROPG and RSPG: 1 at the gold, 0 at
        the end of the scale farther from it (the score an invalid prediction gets);
        ``MAE`` and ``RMSE`` agree on one example."""
        _check_per_example(self, name, self.names)
        gold = prepared.arrays["gold"]
        worst = np.maximum(np.abs(gold - self.lowest), np.abs(self.highest - gold))
        return 1.0 - np.abs(prepared.arrays["pred"] - gold) / worst


class RougeMetric(Metric):
    names = ("rouge-1", "rouge-L")
    _rouge_types = ("rouge1", "rougeL")  # rouge_score's names for self.names, in order

    def __init__(self):
        # Imported here: rouge_score pulls in nltk, which is slow to import and only
        # generation tasks need it.
        from rouge_score import rouge_scorer

        self._scorer = rouge_scorer.RougeScorer(list(self._rouge_types), use_stemmer=False)

    def prepare(self, golds, preds):
        scores = np.zeros((len(golds), len(self.names)))
        for row, (gold, pred) in enumerate(zip(golds, preds)):
            result = self._scorer.score(gold, pred)
            scores[row] = [result[kind].fmeasure for kind in self._rouge_types]
        return Prepared({"scores": scores})

    def aggregate(self, prepared, rows=None):
        scores = prepared.arrays["scores"]
        if rows is not None:
            scores = scores[rows]
        means = scores.mean(axis=0)
        return {name: float(value) for name, value in zip(self.names, means)}

    def utilities(self, prepared, name):
        _check_per_example(self, name, self.names)
        return prepared.arrays["scores"][:, self.names.index(name)].copy()


def _check_per_example(metric: Metric, name: str, allowed: Sequence[str]) -> None:
    if name not in allowed:
        raise AssertionError(f"{type(metric).__name__} has no per-example {name!r} "
                             f"(it has {', '.join(allowed)})")


def metric_for(task: Task) -> Metric:
    """The metric family that scores ``task``."""
    if task.kind == CLASSIFICATION:
        return ClassificationMetric(task.labels)
    if task.kind == RATING:
        return RatingMetric(float(task.labels[0]), float(task.labels[-1]))
    if task.kind == GENERATION:
        return RougeMetric()
    raise AssertionError(f"task {task.name} has unknown kind {task.kind!r}")


def bootstrap_rows(n_examples: int, n_samples: int, seed: int):
    """Yield ``n_samples`` resamples (with replacement) of ``range(n_examples)``, seeded."""
    rng = np.random.default_rng(seed)
    for _ in range(n_samples):
        yield rng.integers(0, n_examples, size=n_examples)


# The official evaluator's ROUGE (``evaluate``'s rouge with its bootstrap aggregator): the
# median of this many bootstrap means of the per-example F-measures.
OFFICIAL_ROUGE_SAMPLES = 1000


def bootstrap_medians(metric: Metric, prepared: Prepared,
                      n_samples: int = OFFICIAL_ROUGE_SAMPLES,
                      seed: int = DEFAULT_BOOTSTRAP_SEED) -> dict[str, float]:
    """The median over ``n_samples`` seeded resamples of every metric: the official ROUGE
    aggregation, repeatable here because the resamples are seeded."""
    samples = _resampled(metric, prepared, n_samples, seed)
    return {name: float(np.median(values)) for name, values in samples.items()}


def _resampled(metric: Metric, prepared: Prepared, n_samples: int, seed: int
               ) -> dict[str, list[float]]:
    """Every metric on each of ``n_samples`` seeded resamples: ``{name: [value, ...]}``."""
    samples = {name: [] for name in metric.names}
    for rows in bootstrap_rows(len(prepared), n_samples, seed):
        for name, value in metric.aggregate(prepared, rows).items():
            samples[name].append(value)
    return samples


def bootstrap_intervals(metric: Metric, prepared: Prepared, n_samples: int,
                        seed: int = DEFAULT_BOOTSTRAP_SEED, confidence: float = 0.95
                        ) -> dict[str, list[float]]:
    """Percentile bootstrap confidence intervals for every metric: ``{name: [low, high]}``."""
    samples = _resampled(metric, prepared, n_samples, seed)
    tail = (1.0 - confidence) / 2 * 100
    return {name: [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]
            for name, values in samples.items()}


def paired_bootstrap(metric: Metric, first: Prepared, second: Prepared, n_samples: int,
                     seed: int = DEFAULT_BOOTSTRAP_SEED, confidence: float = 0.95
                     ) -> dict[str, dict[str, float]]:
    """Paired bootstrap of ``second − first`` on the same examples, for every metric.

    Both systems are re-aggregated on the same resampled rows. The interval is the percentile
    interval of the resampled differences; the two-sided p-value tests "no difference" by
    centring those differences on zero (the shift method): the share of resamples whose
    distance from the observed difference is at least the observed difference, with the usual
    +1 correction so that it is never 0.
    """
    observed_first, observed_second = metric.aggregate(first), metric.aggregate(second)
    observed = {name: observed_second[name] - observed_first[name] for name in metric.names}
    deltas = {name: [] for name in metric.names}
    for rows in bootstrap_rows(len(first), n_samples, seed):
        a, b = metric.aggregate(first, rows), metric.aggregate(second, rows)
        for name in metric.names:
            deltas[name].append(b[name] - a[name])
    tail = (1.0 - confidence) / 2 * 100
    result = {}
    for name in metric.names:
        values = np.asarray(deltas[name])
        extreme = np.count_nonzero(np.abs(values - observed[name]) >= abs(observed[name]) - 1e-12)
        result[name] = {
            "first": observed_first[name],
            "second": observed_second[name],
            "difference": observed[name],
            "ci95": [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))],
            "p_value": float((extreme + 1) / (n_samples + 1)),
        }
    return result
