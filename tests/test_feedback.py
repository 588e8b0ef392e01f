"""ROPG feedback (collect_feedback.py): per-item utilities, the file, resuming, sharding.

The utilities are checked against evaluate_llm.py itself: a question whose profile holds only
one candidate item, answered by evaluate_llm.py, must score what the feedback says that item
is worth.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_json
from test_evaluate_llm import REVIEWS, TWEETS
from LaMP import collect_feedback, evaluate_llm
from LaMP.utils.data.feedback import FeedbackAppender, read_feedback
from LaMP.utils.errors import LampError
from LaMP.utils.evaluation.metrics import metric_for
from LaMP.utils.tasks import get_task

pytestmark = pytest.mark.usefixtures("torch_single_thread")

def lamp3_questions(count: int = 4, items: int = 4) -> list[dict]:
    return [{"id": f"3{i}", "input": "What is the score of the following review on a scale of "
                                     "1 to 5? just answer with 1, 2, 3, 4, or 5 without further "
                                     f"explanation. review: {REVIEWS[i % 5][0]}",
             "profile": [{"id": f"3{i}{j}", "text": REVIEWS[(i + j + 1) % 5][0],
                          "score": REVIEWS[(i + j + 1) % 5][1]} for j in range(items)],
             "output": REVIEWS[i % 5][1]}
            for i in range(count)]


def lamp7_questions(count: int = 3) -> list[dict]:
    return [{"id": f"7{i}", "input": "Paraphrase the following tweet without any explanation "
                                     f"before or after it: {TWEETS[i]}",
             "profile": [{"id": f"7{i}{j}", "text": TWEETS[(i + j + 1) % 5]} for j in range(3)],
             "output": TWEETS[(i + 2) % 5]}
            for i in range(count)]


GENERATION = ["--max_length", "128", "--generation_max_length", "4", "--generation_num_beams",
              "1", "--device", "cpu"]


def collect(data: Path, model: Path, task: str, output: Path, *extra: str) -> dict:
    return collect_feedback.main(["--train_data", str(data), "--task", task, "--model_addr",
                                  str(model), "--output_file", str(output), *GENERATION,
                                  *extra])


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("task, questions, extra", [
    ("LaMP-3", lamp3_questions(), ["--label_scoring"]),
    ("LaMP-7", lamp7_questions(), []),
])
def test_each_utility_is_the_metric_of_evaluate_llm_with_that_item_alone(
        tmp_path, tiny_model, task, questions, extra):
    data = write_json(tmp_path / "train.json", questions)
    out = tmp_path / "feedback.jsonl"
    summary = collect(data, tiny_model, task, out, "--num_candidates", "3",
                      "--first_stage", "bm25", "--per_device_batch_size", "1", *extra)
    assert summary["answered"] == len(questions) and summary["generations"] == 3 * len(questions)
    written = records(out)
    assert [r["id"] for r in written] == [q["id"] for q in questions]
    # One question per profile item: evaluate_llm.py answers it with that item alone.
    singles, expected_ids = [], []
    for record, question in zip(written, questions):
        assert len(record["candidates"]) == len(record["utilities"]) == 3
        profile = {item["id"]: item for item in question["profile"]}
        for item_id in record["candidates"]:
            singles.append({**question, "id": f"{question['id']}-{item_id}",
                            "profile": [profile[item_id]]})
            expected_ids.append((record["id"], item_id))
    single_data = write_json(tmp_path / "singles.json", singles)
    result = evaluate_llm.main(["--validation_data", str(single_data), "--model_addr",
                                str(tiny_model), "--task", task, "--output_dir",
                                str(tmp_path / "eval"), "--use_profile", "--is_ranked",
                                "--num_retrieved", "1", "--per_device_batch_size", "1",
                                *GENERATION, *extra])
    metric = metric_for(get_task(task))
    golds = [q["output"] for q in singles]
    prepared = metric.prepare(golds, result["predictions"])
    expected = metric.utilities(prepared, get_task(task).selection_metric)
    got = [u for record in written for u in record["utilities"]]
    assert got == pytest.approx(expected.tolist(), abs=1e-12)
    assert [o for record in written for o in record["outputs"]] == result["predictions"]


def test_candidates_are_the_first_stages_top_items(tmp_path, tiny_t5):
    from LaMP.utils.retrieval import build_ranker

    questions = lamp3_questions(count=2, items=5)
    data = write_json(tmp_path / "train.json", questions)
    out = tmp_path / "feedback.jsonl"
    collect(data, tiny_t5, "LaMP-3", out, "--num_candidates", "2", "--first_stage", "recency")
    ranker = build_ranker("recency", get_task("LaMP-3"))
    for record, (_, ranking) in zip(records(out), ranker.rank(questions)):
        assert record["candidates"] == ranking[:2]


def test_a_rerun_skips_done_questions_and_finishes_a_cut_line(tmp_path, tiny_t5):
    data = write_json(tmp_path / "train.json", lamp3_questions(count=4))
    out = tmp_path / "feedback.jsonl"
    first = collect(data, tiny_t5, "LaMP-3", out, "--num_candidates", "2", "--limit", "2")
    assert first["answered"] == 2
    lines = out.read_bytes().splitlines(keepends=True)
    # As a run stopped in the middle of writing the second record leaves it.
    out.write_bytes(lines[0] + lines[1][:25])
    second = collect(data, tiny_t5, "LaMP-3", out, "--num_candidates", "2")
    assert second["answered"] == 3 and second["skipped"] == 1
    assert [r["id"] for r in records(out)] == ["30", "31", "32", "33"]
    again = collect(data, tiny_t5, "LaMP-3", out, "--num_candidates", "2")
    assert again["answered"] == 0 and again["skipped"] == 4


def test_a_rerun_with_other_settings_is_refused(tmp_path, tiny_t5):
    data = write_json(tmp_path / "train.json", lamp3_questions(count=2))
    out = tmp_path / "feedback.jsonl"
    collect(data, tiny_t5, "LaMP-3", out, "--num_candidates", "2")
    before = out.read_bytes()
    with pytest.raises(LampError, match=r"--num_candidates 2 \(now 3\)"):
        collect(data, tiny_t5, "LaMP-3", out, "--num_candidates", "3")
    assert out.read_bytes() == before


def test_a_file_this_script_did_not_start_is_refused(tmp_path, tiny_t5):
    data = write_json(tmp_path / "train.json", lamp3_questions(count=2))
    out = tmp_path / "notes.jsonl"
    out.write_text('{"hello": 1}\n', encoding="utf-8")
    with pytest.raises(LampError, match="not a feedback file this script started"):
        collect(data, tiny_t5, "LaMP-3", out)
    assert out.read_text(encoding="utf-8") == '{"hello": 1}\n'


def test_shards_together_cover_every_question_once(tmp_path, tiny_t5):
    questions = lamp3_questions(count=5)
    data = write_json(tmp_path / "train.json", questions)
    outs = [tmp_path / f"shard{i}.jsonl" for i in range(2)]
    for i, out in enumerate(outs):
        collect(data, tiny_t5, "LaMP-3", out, "--num_candidates", "2", "--num_shards", "2",
                "--shard_id", str(i))
    merged = read_feedback(outs)
    assert sorted(merged) == sorted(q["id"] for q in questions)
    assert [r["id"] for r in records(outs[0])] == ["30", "31"]


def test_questions_without_golds_are_refused_before_the_model_loads(tmp_path):
    questions = lamp3_questions(count=2)
    del questions[1]["output"]
    data = write_json(tmp_path / "train.json", questions)
    with pytest.raises(LampError, match="output"):
        collect(data, tmp_path / "no-model-here", "LaMP-3", tmp_path / "f.jsonl")
    assert not (tmp_path / "f.jsonl").exists()


# -- the feedback file ------------------------------------------------------------------

RECORD = {"id": "7", "candidates": ["a"], "utilities": [1.0], "outputs": ["x"]}


def test_appender_refuses_a_second_writer(tmp_path):
    path = tmp_path / "f.jsonl"
    with FeedbackAppender(path) as first:
        assert not path.exists()  # created by the first record, not before
        first.write(RECORD)
        with pytest.raises(LampError, match="another run is writing"):
            FeedbackAppender(path)
    with FeedbackAppender(path) as again:
        assert again.done == {"7"}


def test_appender_refuses_a_file_another_run_started_meanwhile(tmp_path):
    path = tmp_path / "f.jsonl"
    with FeedbackAppender(path) as late:
        with FeedbackAppender(path) as early:
            early.write(RECORD)
        with pytest.raises(LampError, match="written by another run since this one started"):
            late.write({**RECORD, "id": "8"})
    assert read_feedback([path]) == {"7": RECORD}


def test_a_run_that_fails_before_its_first_record_leaves_no_file(tmp_path):
    data = write_json(tmp_path / "train.json", lamp3_questions(count=2))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    out = tmp_path / "f.jsonl"
    with pytest.raises(LampError):
        collect(data, model, "LaMP-3", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "train.json"]


@pytest.mark.parametrize("line, message", [
    ('{"id": "1", "candidates": ["a"], "utilities": [0.5]}', '"outputs"'),
    ('{"id": "1", "candidates": ["a", "b"], "utilities": [0.5], "outputs": ["x"]}',
     "differ in length"),
    ('{"id": "1", "candidates": ["a"], "utilities": [NaN], "outputs": ["x"]}',
     "NaN is not a JSON number"),
    ('{"id": "1", "candidates": ["a", "a"], "utilities": [1, 0], "outputs": ["x", "y"]}',
     "listed twice"),
    ("[1, 2]", "expected a JSON object"),
    ("{not json", "malformed JSON"),
    # Each line is held to the checks of every JSON reader.
    ('{"id": "1", "candidates": ["a"], "utilities": [1], "outputs": ["x"], "id": "2"}',
     'the key "id" occurs twice in the top-level object'),
    ('{"id": "1", "candidates": ["a"], "utilities": [1], "outputs": ["x"], '
     '"extra": {"k": 1, "k": 2}}', r'the key "k" occurs twice in the object at extra'),
    ('{"id": "1", "candidates": ["a"], "utilities": [1e999], "outputs": ["x"]}', "infinity"),
])
def test_malformed_records_are_named_by_file_and_line(tmp_path, line, message):
    path = tmp_path / "f.jsonl"
    path.write_text('{"id": "0", "candidates": [], "utilities": [], "outputs": []}\n'
                    + line + "\n", encoding="utf-8")
    with pytest.raises(LampError, match=rf"f.jsonl: line 2.*{message}"):
        read_feedback([path])
    with pytest.raises(LampError, match=rf"line 2.*{message}"):
        FeedbackAppender(path)


def test_a_question_in_two_shard_files_is_an_error(tmp_path):
    line = '{"id": "7", "candidates": ["a"], "utilities": [1.0], "outputs": ["x"]}\n'
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text(line, encoding="utf-8")
    second.write_text(line, encoding="utf-8")
    with pytest.raises(LampError, match="question 7 has feedback twice"):
        read_feedback([first, second])


def test_reading_a_cut_file_says_how_to_finish_it(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text('{"id": "7", "candidates": ["a"], "utilities": [1.0], "outp',
                    encoding="utf-8")
    with pytest.raises(LampError, match="cut short"):
        read_feedback([path])


def test_a_rerun_may_name_the_data_by_another_path(tmp_path, tiny_t5, monkeypatch):
    data = write_json(tmp_path / "train.json", lamp3_questions(count=3))
    out = tmp_path / "feedback.jsonl"
    collect(data, tiny_t5, "LaMP-3", out, "--num_candidates", "2", "--limit", "1")
    monkeypatch.chdir(tmp_path)
    again = collect(Path("train.json"), tiny_t5, "LaMP-3", out, "--num_candidates", "2")
    assert again["answered"] == 2 and again["skipped"] == 1


def test_a_last_record_missing_only_its_newline_is_kept(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps(RECORD), encoding="utf-8")
    with FeedbackAppender(path) as appender:
        assert appender.done == {"7"} and appender.cut == 0
        appender.write({**RECORD, "id": "8"})
    assert sorted(read_feedback([path])) == ["7", "8"]


def test_a_line_nested_too_deeply_is_one_error(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text("[" * 100_000 + "\n", encoding="utf-8")
    with pytest.raises(LampError, match="line 1: nesting deeper than 64 levels"):
        read_feedback([path])
