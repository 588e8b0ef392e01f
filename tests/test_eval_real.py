"""The evaluator on real LaMP dev predictions, checked against a computation written here.

The check is independent of LaMP/utils: it reads the files with ``json``, pairs by id, and
averages ``rouge_score``'s F-measures itself.
"""
from __future__ import annotations

import json
import zipfile

import pytest

from conftest import LAMP_REAL, load_script, requires_real_data

eval_task = load_script("eval/eval_task.py")
eval_all = load_script("eval/eval_all.py")

# task: (golds, predictions, number of dev examples)
REAL = {
    "LaMP_7": (LAMP_REAL / "LaMP_7" / "dev" / "dev_outputs.json",
               LAMP_REAL / "predictions" / "LaMP_7_dev_flant5_preds.json", 1500),
    "LaMP_4": (LAMP_REAL / "LaMP_4" / "dev" / "dev_outputs.json",
               LAMP_REAL / "predictions" / "LaMP_4_dev_flant5_preds.json", 1925),
}

pytestmark = [
    requires_real_data,
    pytest.mark.real_data,
    pytest.mark.skipif(not all(path.exists() for golds, preds, _ in REAL.values()
                               for path in (golds, preds)),
                       reason=f"LaMP-4/LaMP-7 dev golds or predictions missing in {LAMP_REAL}"),
]


def independent_rouge(golds_path, preds_path) -> dict:
    from rouge_score.rouge_scorer import RougeScorer

    golds = {str(e["id"]): e["output"] for e in json.loads(golds_path.read_bytes())["golds"]}
    preds = {str(e["id"]): e["output"] for e in json.loads(preds_path.read_bytes())["golds"]}
    assert set(golds) == set(preds)
    scorer = RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    scores = [scorer.score(golds[qid], preds[qid]) for qid in sorted(golds)]
    return {"rouge-1": sum(s["rouge1"].fmeasure for s in scores) / len(scores),
            "rouge-L": sum(s["rougeL"].fmeasure for s in scores) / len(scores),
            "count": len(scores)}


@pytest.fixture(scope="module")
def expected():
    return {task: independent_rouge(golds, preds) for task, (golds, preds, _) in REAL.items()}


@pytest.mark.parametrize("task", list(REAL))
def test_eval_task_on_real_predictions(tmp_path, expected, task):
    golds, preds, size = REAL[task]
    output = tmp_path / "results.json"
    result = eval_task.main(["--golds_json", str(golds), "--preds_json", str(preds),
                             "--task_name", task, "--output_file", str(output)])
    assert result["count"] == size == expected[task]["count"]
    for name in ("rouge-1", "rouge-L"):
        assert result[name] == pytest.approx(expected[task][name], abs=1e-9)
    # a weak model: far from 0 and from 1
    assert 0.1 < result["rouge-L"] <= result["rouge-1"] < 0.6
    assert json.loads(output.read_text(encoding="utf-8")) == result


def test_eval_all_on_a_zip_of_both(tmp_path, expected):
    golds_zip, preds_zip = tmp_path / "golds.zip", tmp_path / "preds.zip"
    with zipfile.ZipFile(golds_zip, "w", zipfile.ZIP_DEFLATED) as golds, \
            zipfile.ZipFile(preds_zip, "w", zipfile.ZIP_DEFLATED) as preds:
        for task, (golds_path, preds_path, _) in REAL.items():
            golds.write(golds_path, f"LaMP/{task}/dev/dev_outputs.json")
            preds.write(preds_path, f"predictions/{preds_path.name}")
    output = tmp_path / "results.json"
    results = eval_all.main(["--golds_zip", str(golds_zip), "--preds_zip", str(preds_zip),
                             "--temp_dir", str(tmp_path / "unused"), "--output_file", str(output)])
    assert list(results) == ["LaMP_4", "LaMP_7"]
    for task in REAL:
        assert results[task]["count"] == expected[task]["count"]
        for name in ("rouge-1", "rouge-L"):
            assert results[task][name] == pytest.approx(expected[task][name], abs=1e-9)
    assert json.loads(output.read_text(encoding="utf-8")) == results
