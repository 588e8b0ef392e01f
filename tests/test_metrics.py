"""Metric values computed by hand (the arithmetic is in the comments), plus the odd inputs
models produce: whitespace, labels outside the set, unicode, empty strings, ratings that are
not numbers or that overflow; and which golds the evaluator refuses (evaluation/scoring.py)."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from conftest import lamp3_files, load_script, outputs_doc, run_cli
from LaMP.utils.data.outputs import parse_outputs
from LaMP.utils.evaluation.metrics import (ClassificationMetric, InvalidGold, RatingMetric,
                                           RougeMetric, bootstrap_intervals, metric_for,
                                           paired_bootstrap, parse_rating)
from LaMP.utils.evaluation.scoring import invalid_gold_ids
from LaMP.utils.tasks import MOVIE_TAGS, TASKS, get_task

eval_task = load_script("eval/eval_task.py")


def compute(metric, golds, preds) -> dict:
    """A whole set's metrics with its counts, as eval_task.py reports them (no bootstrap)."""
    prepared = metric.prepare(golds, preds)
    return {**metric.aggregate(prepared), "count": len(golds), **prepared.counts}


# --- classification -------------------------------------------------------------------------


def test_accuracy_and_macro_f1_with_a_label_never_predicted():
    metric = ClassificationMetric(["a", "b", "c"])
    golds = ["a", "a", "b", "b", "c"]
    preds = ["a", "b", "b", " a\n", "zzz"]
    # correct: rows 0 and 2 -> accuracy 2/5.
    # a: TP 1, predicted 2 (rows 0, 3), actual 2 -> F1 = 2*1 / (2+2) = 1/2
    # b: TP 1, predicted 2 (rows 1, 2), actual 2 -> F1 = 1/2
    # c: never predicted, actual 1            -> F1 = 0
    # macro = (1/2 + 1/2 + 0) / 3 = 1/3. Were "zzz" a class of its own the mean would run over
    # four classes and give 1/4.
    result = compute(metric, golds, preds)
    assert result["accuracy"] == pytest.approx(0.4, abs=1e-12)
    assert result["f1"] == pytest.approx(1 / 3, abs=1e-12)
    assert result["count"] == 5
    assert result["invalid"] == 1


def test_lamp2_whitespace_unicode_and_empty_predictions():
    metric = metric_for(TASKS["LaMP-2"])
    golds = ["comedy", "comedy", "action", "sci-fi", " classic\n"]
    preds = [
        " comedy\n",   # right once stripped
        "",            # empty: wrong
        "action",      # right
        "sci\u2010fi",  # a Unicode hyphen: not the label, wrong
        "clässic",     # not the label, wrong
    ]
    # correct: rows 0 and 2 -> accuracy 2/5.
    # comedy:  TP 1, predicted 1, actual 2 -> 2/3
    # action:  TP 1, predicted 1, actual 1 -> 1
    # sci-fi:  TP 0, predicted 0, actual 1 -> 0
    # classic: TP 0, predicted 0, actual 1 -> 0
    # the other 11 tags occur nowhere and score 0 but stay in the mean (as the official
    # evaluator, which passes the label list) -> macro = (2/3 + 1) / 15 = 1/9.
    # With the three invalid predictions as classes of their own it would be (5/3) / 18.
    result = compute(metric, golds, preds)
    assert result["accuracy"] == pytest.approx(2 / 5, abs=1e-12)
    assert result["f1"] == pytest.approx(1 / 9, abs=1e-12)
    assert result["invalid"] == 3


def test_lamp1_all_right_and_all_wrong():
    metric = metric_for(TASKS["LaMP-1"])
    assert compute(metric, ["[1]", "[2]"], ["[1]", "[2]"])["f1"] == 1.0
    # every prediction is the other label: both F1 are 0
    assert compute(metric, ["[1]", "[2]"], ["[2]", "[1]"]) == {
        "accuracy": 0.0, "f1": 0.0, "count": 2, "invalid": 0}
    # "1" is not "[1]"
    assert compute(metric, ["[1]"], ["1"])["accuracy"] == 0.0


def test_gold_outside_the_label_set_is_reported_by_position():
    metric = metric_for(TASKS["LaMP-1"])
    with pytest.raises(InvalidGold) as caught:
        metric.prepare(["[1]", "3", "[2]", ""], ["[1]"] * 4)
    assert caught.value.positions == [1, 3]


def test_macro_f1_agrees_with_scikit_learn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(7)
    junk = ["", "none", "Comedy", "sci fi", "  ", "コメディ"]
    # golds use 12 of the 15 tags, so three tags never occur in golds
    golds = [MOVIE_TAGS[i] for i in rng.integers(0, 12, size=300)]
    preds = []
    for gold in golds:
        roll = rng.random()
        if roll < 0.4:
            preds.append(f" {gold} ")
        elif roll < 0.8:
            preds.append(MOVIE_TAGS[rng.integers(0, 15)])
        else:
            preds.append(junk[rng.integers(0, len(junk))])
    ours = compute(metric_for(TASKS["LaMP-2"]), golds, preds)
    stripped = [p.strip() for p in preds]
    theirs = sklearn_metrics.f1_score(golds, stripped, labels=list(MOVIE_TAGS), average="macro",
                                      zero_division=0)
    assert ours["f1"] == pytest.approx(theirs, abs=1e-12)
    assert ours["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(golds, stripped),
                                             abs=1e-12)


# --- rating ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text, value", [
    ("4.5", 4.5), (" 3 ", 3.0), ("3\n", 3.0), ("1", 1.0), ("-2", -2.0), ("5.0", 5.0),
    ("nan", None), ("NaN", None), ("inf", None), ("-inf", None), ("Infinity", None),
    ("five", None), ("", None), ("   ", None), ("4 stars", None), ("3/5", None),
])
def test_parse_rating(text, value):
    assert parse_rating(text) == value


@pytest.mark.parametrize("gold, fallback", [(1, 5), (2, 5), (3, 5), (4, 1), (5, 1)])
def test_invalid_rating_scores_as_the_farther_end_and_5_on_the_tie(gold, fallback):
    assert RatingMetric().fallback(float(gold)) == fallback


def test_mae_rmse_and_invalid_count():
    metric = metric_for(TASKS["LaMP-3"])
    golds = ["3", "3", "1", "5", "4", "2", "3", "5"]
    preds = ["4.5", " 3 ", "nan", "inf", "-inf", "five", "", "1"]
    # pred used: 4.5, 3, 5 (far end from 1), 1 (from 5), 1 (from 4), 5 (from 2), 5 (tie at 3), 1
    # errors:    1.5, 0, 4, -4, -3, 3, 2, -4
    # |errors| sum to 21.5 -> MAE = 21.5 / 8 = 2.6875
    # squares: 2.25 + 0 + 16 + 16 + 9 + 9 + 4 + 16 = 72.25 -> RMSE = sqrt(72.25 / 8) = 8.5 / sqrt(8)
    result = compute(metric, golds, preds)
    assert result["MAE"] == pytest.approx(2.6875, abs=1e-12)
    assert result["RMSE"] == pytest.approx(8.5 / math.sqrt(8), abs=1e-12)
    assert result["invalid"] == 5
    assert result["count"] == 8


def test_non_numeric_rating_gold_is_reported_by_position():
    with pytest.raises(InvalidGold) as caught:
        metric_for(TASKS["LaMP-3"]).prepare(["3", "three", "nan"], ["3", "3", "3"])
    assert caught.value.positions == [1, 2]


def test_an_overflowing_rating_gives_null_rmse_without_a_runtime_warning(tmp_path, capsys):
    golds, preds = lamp3_files(tmp_path, prediction="1e200")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's overflow RuntimeWarning would raise here
        status, lines = run_cli(eval_task.main, [
            "--golds_json", golds, "--preds_json", preds, "--task_name", "LaMP_3",
            "--output_file", tmp_path / "r.json"], capsys)
    assert status == 0
    assert not [line for line in lines if "RuntimeWarning" in line or "np.sqrt" in line]
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["RMSE"] is None and results["MAE"] > 1e199
    metric = RatingMetric()
    assert metric.aggregate(metric.prepare(["1"], ["1e300"]))["RMSE"] == float("inf")


# --- ROUGE ----------------------------------------------------------------------------------

# (gold, prediction, ROUGE-1 F, ROUGE-L F). rouge_score lowercases and replaces everything
# outside [a-z0-9] by a space before splitting; F = 2PR / (P + R).
ROUGE_CASES = [
    # overlap the, cat, on, mat = 4 (clipped: "the" once); P = 4/4, R = 4/6 -> F = 0.8;
    # the whole prediction is a subsequence of the gold, so LCS = 4 and ROUGE-L is 0.8 too
    ("the cat sat on the mat", "the cat on mat", 0.8, 0.8),
    # same bag of words -> ROUGE-1 = 1; reversed order -> LCS 1, P = R = 1/4 -> 0.25
    ("a b c d", "d c b a", 1.0, 0.25),
    # case and punctuation vanish in tokenization
    ("Hello, World!", "hello world", 1.0, 1.0),
    ("Route 66", "ROUTE-66", 1.0, 1.0),
    # "café" -> "caf", so it does not match "cafe"; overlap au, lait: P = R = 2/3
    ("café au lait", "cafe au lait", 2 / 3, 2 / 3),
    # clipping: gold the×3, prediction the×1 -> overlap 1, P = 1, R = 1/3 -> F = 1/2
    ("the the the", "the", 0.5, 0.5),
    # prediction the×4, gold "the cat" -> overlap 1, P = 1/4, R = 1/2 -> F = 1/3
    ("the cat", "the the the the", 1 / 3, 1 / 3),
    # no stemmer: "running"/"run" and "dogs"/"dog" are different words (a Porter stemmer
    # would make this pair 1.0)
    ("running dogs", "run dog", 0.0, 0.0),
    # a Unicode-only text has no tokens at all: 0 even against itself
    ("日本語のツイート", "日本語のツイート", 0.0, 0.0),
    # an empty prediction scores 0
    ("a real headline", "", 0.0, 0.0),
    ("a real headline", "   ", 0.0, 0.0),
]


@pytest.fixture(scope="module")
def rouge():
    return RougeMetric()


@pytest.mark.parametrize("gold, pred, rouge1, rougeL", ROUGE_CASES)
def test_rouge_single_pairs(rouge, gold, pred, rouge1, rougeL):
    result = compute(rouge, [gold], [pred])
    assert result["rouge-1"] == pytest.approx(rouge1, abs=1e-12)
    assert result["rouge-L"] == pytest.approx(rougeL, abs=1e-12)
    assert result["count"] == 1


def test_rouge_is_the_plain_mean_over_examples(rouge):
    golds, preds, rouge1, rougeL = zip(*ROUGE_CASES)
    result = compute(rouge, list(golds), list(preds))
    # R1: (0.8 + 1 + 1 + 1 + 2/3 + 0.5 + 1/3 + 0 + 0 + 0 + 0) / 11 = 5.3 / 11
    # RL: (0.8 + 0.25 + 1 + 1 + 2/3 + 0.5 + 1/3 + 0 + 0 + 0 + 0) / 11 = 4.55 / 11
    assert result["rouge-1"] == pytest.approx(5.3 / 11, abs=1e-12)
    assert result["rouge-L"] == pytest.approx(4.55 / 11, abs=1e-12)
    assert set(result) == {"rouge-1", "rouge-L", "count"}


def test_metric_for_each_kind():
    assert isinstance(metric_for(TASKS["LaMP-1"]), ClassificationMetric)
    assert isinstance(metric_for(TASKS["LaMP-3"]), RatingMetric)
    for n in (4, 5, 6, 7):
        metric = metric_for(TASKS[f"LaMP-{n}"])
        assert isinstance(metric, RougeMetric)
        assert metric.names == TASKS[f"LaMP-{n}"].metrics


def test_invalid_gold_ids_uses_the_evaluator_rules():
    lamp2 = parse_outputs(outputs_doc("LaMP_2", [("110", "x"), ("111", " comedy "),
                                                 ("112", "romcom")]), "golds")
    assert invalid_gold_ids(lamp2) == ["110", "112"]
    lamp3 = parse_outputs(outputs_doc("LaMP_3", [("1", "4"), ("2", "five")]), "golds")
    assert invalid_gold_ids(lamp3) == ["2"]
    lamp7 = parse_outputs(outputs_doc("LaMP_7", [("1", "")]), "golds")
    assert invalid_gold_ids(lamp7) == []


# --- bootstrap ------------------------------------------------------------------------------


def _rating_prepared():
    rng = np.random.default_rng(1)
    golds = [str(g) for g in rng.integers(1, 6, size=60)]
    preds = [str(p) for p in rng.integers(1, 6, size=60)]
    metric = metric_for(TASKS["LaMP-3"])
    return metric, metric.prepare(golds, preds)


def test_bootstrap_intervals_repeat_for_a_seed_and_contain_the_estimate():
    metric, prepared = _rating_prepared()
    point = metric.aggregate(prepared)
    first = bootstrap_intervals(metric, prepared, 300, seed=5)
    assert first == bootstrap_intervals(metric, prepared, 300, seed=5)
    assert first != bootstrap_intervals(metric, prepared, 300, seed=6)
    assert set(first) == {"MAE", "RMSE"}
    for name, (low, high) in first.items():
        assert low < point[name] < high


def test_bootstrap_of_a_constant_metric_is_a_point():
    metric = metric_for(TASKS["LaMP-1"])
    prepared = metric.prepare(["[1]", "[2]"] * 10, ["[1]", "[2]"] * 10)
    assert bootstrap_intervals(metric, prepared, 50) == {"accuracy": [1.0, 1.0], "f1": [1.0, 1.0]}


def test_paired_bootstrap_of_identical_systems():
    metric, prepared = _rating_prepared()
    result = paired_bootstrap(metric, prepared, prepared, 200, seed=0)
    for name in ("MAE", "RMSE"):
        assert result[name]["difference"] == 0.0
        assert result[name]["first"] == result[name]["second"]
        assert result[name]["ci95"] == [0.0, 0.0]
        assert result[name]["p_value"] == 1.0


def test_paired_bootstrap_of_a_clearly_better_system():
    metric = ClassificationMetric(["a", "b"])
    golds = ["a", "b"] * 20
    worse = metric.prepare(golds, ["a", "a"] * 20)  # right on the 20 "a" rows only
    better = metric.prepare(golds, golds)
    n_samples = 500
    result = paired_bootstrap(metric, worse, better, n_samples, seed=0)
    accuracy = result["accuracy"]
    assert accuracy["first"] == 0.5 and accuracy["second"] == 1.0
    assert accuracy["difference"] == 0.5
    # a resample as extreme as "no difference" needs every drawn row to be an "a" row
    # (chance 2^-40), so only the +1 correction remains
    assert accuracy["p_value"] == pytest.approx(1 / (n_samples + 1))
    low, high = accuracy["ci95"]
    assert 0 < low <= 0.5 <= high
    assert result["f1"]["ci95"][0] > 0
    # repeatable for a seed
    assert paired_bootstrap(metric, worse, better, n_samples, seed=0) == result


def test_paired_bootstrap_difference_is_second_minus_first_for_errors_too():
    metric = metric_for(TASKS["LaMP-3"])
    golds = ["1", "2", "3", "4", "5"] * 8
    exact = metric.prepare(golds, golds)
    off_by_two = metric.prepare(golds, ["3", "4", "5", "2", "3"] * 8)
    # the worse system is off by 2 everywhere: MAE 2 -> 0 is a difference of -2
    result = paired_bootstrap(metric, off_by_two, exact, 200, seed=1)
    assert result["MAE"]["difference"] == pytest.approx(-2.0)
    assert result["MAE"]["ci95"] == [pytest.approx(-2.0), pytest.approx(-2.0)]
    assert result["MAE"]["p_value"] == pytest.approx(1 / 201)


# -- per-example utilities (ROPG and RSPG feedback) --------------------------------------

def test_rating_utilities_are_normalised_negative_absolute_errors():
    metric = metric_for(get_task("LaMP-3"))
    # gold 2: the farther end is 5 (3 away); gold 5: 1 is 4 away; "five" scores as 1 (farther)
    prepared = metric.prepare(["2", "2", "5", "5", "3"], ["2", "4", "4", "five", "3.5"])
    values = metric.utilities(prepared, "MAE")
    assert values.tolist() == pytest.approx([1.0, 1 - 2 / 3, 0.75, 0.0, 0.75])


def test_classification_and_rouge_utilities_are_per_example_scores():
    accuracy = metric_for(get_task("LaMP-2"))
    prepared = accuracy.prepare(["comedy", "action"], ["comedy", "drama"])
    assert accuracy.utilities(prepared, "accuracy").tolist() == [1.0, 0.0]
    rouge = metric_for(get_task("LaMP-7"))
    prepared = rouge.prepare(["a b c d", "x y"], ["a b", "z"])
    # rouge-1 F: precision 1, recall 1/2 -> 2/3; no overlap -> 0
    assert rouge.utilities(prepared, "rouge-1") == pytest.approx(np.array([2 / 3, 0.0]))
    assert math.isclose(float(np.mean(rouge.utilities(prepared, "rouge-1"))),
                        rouge.aggregate(prepared)["rouge-1"])


def test_utilities_name_the_ids_of_golds_the_metric_cannot_use():
    from LaMP.utils.errors import LampError
    from LaMP.utils.evaluation.scoring import utilities

    assert utilities(get_task("LaMP-3"), ["a", "b"], ["4", "1"], ["4", "3"], "golds") == \
        pytest.approx([1.0, 0.5])
    with pytest.raises(LampError, match=r"golds: gold outputs that are not numbers for 1 "
                                        r"\(first: b\)"):
        utilities(get_task("LaMP-3"), ["a", "b"], ["4", "four"], ["4", "3"], "golds")
