"""merge_with_rank.py: train/dev/test shapes, every mismatch error, and the README command."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from LaMP.utils import merge_with_rank
from LaMP.utils.data.outputs import load_outputs
from LaMP.utils.errors import LampError
from conftest import LAMP_REAL, REPO, outputs_doc, requires_real_data, write_json

QUESTIONS = [
    {"id": "70", "input": "Paraphrase: a", "profile": [{"id": "701", "text": "x"},
                                                       {"id": "702", "text": "y"},
                                                       {"id": "703", "text": "z"}]},
    {"id": "71", "input": "Paraphrase: b", "profile": [{"id": "711", "text": "u"}]},
    {"id": "72", "input": "Paraphrase: c", "profile": []},
]
RANKING = {"70": ["703", "701", "702"], "71": ["711"], "72": []}
OUTPUTS = [("70", "out a"), ("71", "out b"), ("72", "out c")]


@pytest.fixture
def files(tmp_path):
    return {
        "questions": write_json(tmp_path / "questions.json", QUESTIONS),
        "ranking": write_json(tmp_path / "ranking.json", RANKING),
        "outputs": write_json(tmp_path / "outputs.json", outputs_doc("LaMP_7", OUTPUTS)),
        "merged": tmp_path / "merged.json",
    }


def merge(files, *, ranking=True, outputs=True, rankings=None):
    argv = ["--lamp_questions_addr", str(files["questions"]),
            "--merged_output_addr", str(files["merged"])]
    if outputs:
        argv += ["--lamp_output_addr", str(files["outputs"])]
    if ranking:
        argv += ["--profile_ranking_addr", *(rankings or [str(files["ranking"])])]
    return merge_with_rank.main(argv)


def profile_ids(question):
    return [item["id"] for item in question["profile"]]


def test_train_or_dev_shape_ranked_with_outputs(files):
    summary = merge(files)
    merged = json.loads(files["merged"].read_text())
    assert summary["questions"] == 3 and summary["ranked"] and summary["with_outputs"]
    assert [q["id"] for q in merged] == ["70", "71", "72"]
    assert [profile_ids(q) for q in merged] == [RANKING["70"], ["711"], []]
    assert merged[0]["profile"][0] == {"id": "703", "text": "z"}
    assert [q["output"] for q in merged] == ["out a", "out b", "out c"]
    assert list(merged[0]) == ["id", "input", "profile", "output"]
    assert files["merged"].with_name("merged.args.json").exists()


def test_test_shape_has_no_outputs(files):
    merge(files, outputs=False)
    merged = json.loads(files["merged"].read_text())
    assert all("output" not in q for q in merged)
    assert [profile_ids(q) for q in merged] == [RANKING["70"], ["711"], []]


def test_without_ranking_profiles_keep_their_order(files):
    merge(files, ranking=False)
    merged = json.loads(files["merged"].read_text())
    assert [profile_ids(q) for q in merged] == [profile_ids(q) for q in QUESTIONS]


def test_several_shard_files_are_combined(files, tmp_path):
    first = write_json(tmp_path / "s0.json", {"70": RANKING["70"]})
    second = write_json(tmp_path / "s1.json", {"71": ["711"], "72": []})
    merge(files, rankings=[str(first), str(second)])
    assert [profile_ids(q) for q in json.loads(files["merged"].read_text())][0] == RANKING["70"]


def test_extra_ranking_and_outputs_entries_are_only_a_warning(files, tmp_path, capsys):
    # A subset of a split's questions (a smoke test, a shard) is a legitimate input.
    write_json(files["ranking"], {**RANKING, "99": ["1"]})
    write_json(files["outputs"], outputs_doc("LaMP_7", OUTPUTS + [("99", "x")]))
    merge(files)
    logged = capsys.readouterr().err  # main configures logging to stderr
    assert "WARNING" in logged
    assert "the ranking has entries for 1 (first: 99) questions not in the" in logged
    assert "the outputs file has entries for 1 (first: 99) questions not in the" in logged
    assert len(json.loads(files["merged"].read_text())) == 3


@pytest.mark.parametrize("ranking, message", [
    ({"70": RANKING["70"], "72": []}, r"lacks questions of .*questions.json: 1 \(first: 71\)"),
    ({**RANKING, "70": ["703", "701", "799"]},
     r"ranking of question 70 does not order its profile: ids not in its profile: "
     r"1 \(first: 799\); profile items left out: 1 \(first: 702\)"),
    ({**RANKING, "70": ["703", "701"]}, r"question 70 .* profile items left out: 1 \(first: 702\)"),
    ({**RANKING, "70": ["703", "701", "702", "701"]},
     r"question 70 .* ids ranked more than once: 1 \(first: 701\)"),
    ({**RANKING, "70": ["799"], "71": []},
     r"question 70 .*799.* \(and 1 more questions\)"),
])
def test_ranking_mismatches_name_the_ids_and_write_nothing(files, ranking, message):
    write_json(files["ranking"], ranking)
    with pytest.raises(LampError, match=message):
        merge(files)
    assert not files["merged"].exists()
    assert list(files["merged"].parent.glob(".merged.json*")) == []


def test_missing_outputs_name_the_questions(files):
    write_json(files["outputs"], outputs_doc("LaMP_7", OUTPUTS[:1]))
    with pytest.raises(LampError, match=r"outputs.json has no output for questions: "
                                        r"2 \(first: 71, 72\)"):
        merge(files)
    assert not files["merged"].exists()


def test_every_problem_is_reported_at_once(files):
    write_json(files["ranking"], {"70": RANKING["70"]})
    write_json(files["outputs"], outputs_doc("LaMP_7", OUTPUTS[1:]))
    with pytest.raises(LampError, match=r"lacks questions .*2 \(first: 71, 72\); .*no output "
                                        r"for questions: 1 \(first: 70\)"):
        merge(files)


def test_duplicate_question_ids_and_overlapping_shards(files, tmp_path):
    write_json(files["questions"], QUESTIONS + [QUESTIONS[1]])
    with pytest.raises(LampError, match="question id 71 occurs twice"):
        merge(files)
    write_json(files["questions"], QUESTIONS)
    overlap = write_json(tmp_path / "other.json", {"71": ["711"]})
    with pytest.raises(LampError, match=r"question 71 is ranked in .*ranking.json and "
                                        r".*other.json"):
        merge(files, rankings=[str(files["ranking"]), str(overlap)])


def test_bad_outputs_file_is_reported_before_work(files):
    files["outputs"].write_text("{", encoding="utf-8")
    with pytest.raises(LampError, match="outputs.json: malformed JSON"):
        merge(files)
    assert not files["merged"].exists()


@requires_real_data
def test_real_lamp_7_dev_merge_matches_outputs(tmp_path):
    questions = LAMP_REAL / "LaMP_7" / "dev" / "dev_questions.json"
    outputs = LAMP_REAL / "LaMP_7" / "dev" / "dev_outputs.json"
    merged_path = tmp_path / "merged.json"
    merge_with_rank.main(["--lamp_questions_addr", str(questions), "--lamp_output_addr",
                          str(outputs), "--merged_output_addr", str(merged_path)])
    merged = json.loads(merged_path.read_text())
    golds = load_outputs(outputs).outputs
    assert len(merged) == 1500
    assert {q["id"]: q["output"] for q in merged} == golds
    originals = json.loads(questions.read_text())
    assert [q["profile"] for q in merged] == [q["profile"] for q in originals]


def run_script(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          env=env)


def test_readme_command_from_the_lamp_folder(files):
    result = run_script(["utils/merge_with_rank.py",
                         "--lamp_questions_addr", str(files["questions"]),
                         "--lamp_output_addr", str(files["outputs"]), "--profile_ranking_addr",
                         str(files["ranking"]), "--merged_output_addr", str(files["merged"])],
                        cwd=REPO / "LaMP")
    assert result.returncode == 0, result.stderr
    assert [profile_ids(q) for q in json.loads(files["merged"].read_text())][0] == RANKING["70"]

    write_json(files["ranking"], {"70": RANKING["70"]})
    result = run_script(["utils/merge_with_rank.py",
                         "--lamp_questions_addr", str(files["questions"]),
                         "--profile_ranking_addr", str(files["ranking"]),
                         "--merged_output_addr", str(files["merged"])], cwd=REPO / "LaMP")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the ranking") and "71, 72" in lines[0]
    assert "Traceback" not in result.stderr
