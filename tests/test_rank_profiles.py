"""rank_profiles.py: main() on tiny fixtures, sharding, errors, and the README command."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from LaMP import rank_profiles
from LaMP.utils import merge_with_rank
from LaMP.utils.errors import LampError
from conftest import REPO, write_json

REVIEW_INPUT = ("What is the score of the following review on a scale of 1 to 5? just answer "
                "with 1, 2, 3, 4, or 5 without further explanation. review: {}")
REVIEWS = ["great phone battery lasts", "battery died after a week", "the screen is bright",
           "love the camera and the battery", "shipping was slow", "screen cracked in a day"]


def review_questions(count: int = 7) -> list[dict]:
    questions = []
    for number in range(count):
        profile = [{"id": f"{number}{index}", "text": REVIEWS[(number + index) % len(REVIEWS)],
                    "score": str(index % 5 + 1), "date": f"201{index}-0{number % 9 + 1}-01"}
                   for index in range(3 + number % 3)]
        questions.append({"id": str(300 + number),
                          "input": REVIEW_INPUT.format(REVIEWS[number % len(REVIEWS)]),
                          "profile": profile})
    return questions


@pytest.fixture
def questions_file(tmp_path):
    return write_json(tmp_path / "dev_questions.json", review_questions())


def rank(questions_file, output, *extra) -> dict:
    """Run the script's main and return the ranking it wrote."""
    summary = rank_profiles.main(["--input_data_addr", str(questions_file),
                                  "--output_ranking_addr", str(output), "--task", "LaMP-3", *extra])
    ranking = json.loads(output.read_text())
    assert summary == {"questions": len(ranking), "output": str(output)}
    return ranking


@pytest.mark.parametrize("ranker", ["bm25", "recency", "random"])
def test_main_writes_a_ranking_of_every_profile(questions_file, tmp_path, ranker):
    output = tmp_path / "out" / f"{ranker}.json"
    written = rank(questions_file, output, "--ranker", ranker)
    questions = review_questions()
    assert list(written) == [q["id"] for q in questions]
    for q in questions:
        assert sorted(written[q["id"]]) == sorted(item["id"] for item in q["profile"])
    args = json.loads((tmp_path / "out" / f"{ranker}.args.json").read_text())
    assert args["ranker"] == ranker and args["task"] == "LaMP-3"
    assert args["input_data_addr"] == str(questions_file)


def test_bm25_puts_the_matching_review_first(questions_file, tmp_path):
    ranking = rank(questions_file, tmp_path / "r.json", "--ranker", "bm25")
    # Question 301 asks about "battery died after a week", the text of its item 10.
    assert ranking["301"][0] == "10"


def test_recency_uses_dates_and_use_date_is_accepted(questions_file, tmp_path):
    ranking = rank(questions_file, tmp_path / "r.json", "--ranker", "recency", "--use_date")
    # Question 300's items 00, 01, 02 are dated 2010, 2011 and 2012.
    assert ranking["300"] == ["02", "01", "00"]


def test_random_depends_on_seed_only(questions_file, tmp_path):
    first = rank(questions_file, tmp_path / "a.json", "--ranker", "random", "--seed", "5")
    again = rank(questions_file, tmp_path / "b.json", "--ranker", "random", "--seed", "5")
    other = rank(questions_file, tmp_path / "c.json", "--ranker", "random", "--seed", "6")
    assert first == again != other


@pytest.mark.parametrize("ranker", ["bm25", "random"])
def test_shards_combine_to_the_full_ranking(questions_file, tmp_path, ranker):
    full = rank(questions_file, tmp_path / "full.json", "--ranker", ranker)
    shard_files = []
    for shard in range(3):
        path = tmp_path / f"shard{shard}.json"
        part = rank(questions_file, path, "--ranker", ranker, "--num_shards", "3",
                    "--shard_id", str(shard))
        assert len(part) in (2, 3)
        shard_files.append(str(path))
    combined = {}
    for path in shard_files:
        combined.update(json.loads(open(path).read()))
    assert combined == full
    # merge_with_rank takes the shard files together and gives the same merged file.
    for name, rankings in (("from_full", [str(tmp_path / "full.json")]),
                           ("from_shards", shard_files)):
        merge_with_rank.main(["--lamp_questions_addr", str(questions_file),
                              "--profile_ranking_addr", *rankings,
                              "--merged_output_addr", str(tmp_path / f"{name}.json")])
    assert ((tmp_path / "from_full.json").read_text()
            == (tmp_path / "from_shards.json").read_text())


def test_more_shards_than_questions_gives_empty_shards(tmp_path):
    path = write_json(tmp_path / "q.json", review_questions(2))
    sizes = [len(rank(path, tmp_path / f"s{i}.json", "--ranker", "bm25", "--num_shards", "4",
                      "--shard_id", str(i))) for i in range(4)]
    assert sorted(sizes) == [0, 0, 1, 1]


def test_missing_marker_is_an_error_naming_the_question_and_writes_nothing(tmp_path):
    questions = review_questions(3)
    questions[2]["input"] = "What is the score of this?"
    path = write_json(tmp_path / "q.json", questions)
    with pytest.raises(LampError, match="LaMP-3 question 302: input lacks the marker 'review:'"):
        rank(path, tmp_path / "r.json", "--ranker", "bm25")
    assert not (tmp_path / "r.json").exists()


def test_duplicate_question_ids_are_an_error(tmp_path):
    questions = review_questions(3)
    questions[2]["id"] = questions[0]["id"]
    path = write_json(tmp_path / "q.json", questions)
    with pytest.raises(LampError, match="question id 300 occurs twice"):
        rank(path, tmp_path / "r.json", "--ranker", "recency")


@pytest.mark.parametrize("content, message", [
    ("[]", "no questions to rank"),
    ('{"id": 1}', "expected a JSON list of questions"),
    ('[{"id": "1", "input": "x"}]', 'missing "profile" list'),
    ('[{"id": "1", "input": "review: x", "profile": [{"id": "a"}]}]',
     "lacks the LaMP-3 field 'text'"),
])
def test_bad_input_files(tmp_path, content, message):
    path = tmp_path / "q.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(LampError, match=message):
        rank(path, tmp_path / "r.json", "--ranker", "bm25")


def test_missing_input_and_directory_output(tmp_path, questions_file):
    with pytest.raises(LampError, match="does not exist"):
        rank(tmp_path / "nope.json", tmp_path / "r.json", "--ranker", "bm25")
    with pytest.raises(LampError, match="is a folder; give a file name"):
        rank(questions_file, tmp_path, "--ranker", "bm25")


@pytest.mark.parametrize("extra", [
    ["--ranker", "bm25", "--num_shards", "2", "--shard_id", "2"],
    ["--ranker", "bm25", "--batch_size", "0"],
    ["--ranker", "tfidf"],
])
def test_flag_errors_exit_before_work(questions_file, tmp_path, extra):
    with pytest.raises(SystemExit) as exit_info:
        rank(questions_file, tmp_path / "r.json", *extra)
    assert exit_info.value.code == 2


def run_script(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          env=env)


def test_readme_command_from_the_lamp_folder(questions_file, tmp_path):
    output = tmp_path / "ranking.json"
    result = run_script(["rank_profiles.py", "--input_data_addr", str(questions_file),
                         "--output_ranking_addr", str(output), "--task", "LaMP-3",
                         "--ranker", "bm25"], cwd=REPO / "LaMP")
    assert result.returncode == 0, result.stderr
    assert set(json.loads(output.read_text())) == {q["id"] for q in review_questions()}

    result = run_script(["rank_profiles.py", "--input_data_addr", str(tmp_path / "missing.json"),
                         "--output_ranking_addr", str(output), "--task", "LaMP-3",
                         "--ranker", "bm25"], cwd=REPO / "LaMP")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: questions file {tmp_path / 'missing.json'} does not exist"]


@pytest.mark.parametrize("ranker", ["bm25", "recency"])
def test_every_task_ranks_through_the_registry(tmp_path, ranker):
    # The published script crashed on LaMP-2; here no code branches on the task.
    from tests.test_retrieval_tasks import (LAMP_1_INPUT, LAMP_2_INPUT, LAMP_3_INPUT,
                                            LAMP_5_INPUT, LAMP_6_INPUT, PROFILE_ITEMS)

    inputs = {"LaMP-1": LAMP_1_INPUT, "LaMP-2": LAMP_2_INPUT, "LaMP-3": LAMP_3_INPUT,
              "LaMP-4": "Generate a headline for the following article: Stocks rose.",
              "LaMP-5": LAMP_5_INPUT, "LaMP-6": LAMP_6_INPUT,
              "LaMP-7": "Paraphrase the following tweet without any explanation before or "
                        "after it: a tweet"}
    for name, text in inputs.items():
        item, _ = PROFILE_ITEMS[name]
        profile = [{**item, "id": f"{name}-{n}", "date": f"20{10 + n}"} for n in range(3)]
        path = write_json(tmp_path / f"{name}.json", [{"id": "1", "input": text,
                                                       "profile": profile}])
        output = tmp_path / f"{name}-ranking.json"
        rank_profiles.main(["--input_data_addr", str(path), "--output_ranking_addr",
                            str(output), "--task", name.replace("-", "_"), "--ranker", ranker,
                            "--use_date"])
        ranking = json.loads(output.read_text())["1"]
        assert sorted(ranking) == [f"{name}-{n}" for n in range(3)]
        if ranker == "recency":
            assert ranking == [f"{name}-2", f"{name}-1", f"{name}-0"]


def test_a_byte_order_mark_is_accepted_when_sharding_and_merging(questions_file, tmp_path):
    with_bom = tmp_path / "bom_questions.json"
    with_bom.write_bytes(b"\xef\xbb\xbf" + questions_file.read_bytes())
    full = rank(questions_file, tmp_path / "full.json", "--ranker", "bm25")
    shard = rank(with_bom, tmp_path / "shard0.json", "--ranker", "bm25", "--num_shards", "2",
                 "--shard_id", "0")
    assert shard and all(full[qid] == ids for qid, ids in shard.items())
    ranking_with_bom = tmp_path / "bom_ranking.json"
    ranking_with_bom.write_bytes(b"\xef\xbb\xbf" + (tmp_path / "full.json").read_bytes())
    merge_with_rank.main(["--lamp_questions_addr", str(with_bom), "--profile_ranking_addr",
                          str(ranking_with_bom), "--merged_output_addr",
                          str(tmp_path / "merged.json")])
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert [[item["id"] for item in q["profile"]] for q in merged] == list(full.values())


# -- one definition of the ranker flags ------------------------------------------------------
MODEL_SCRIPTS = {  # each model script's required flags (parsing reads no file)
    "evaluate_llm": ["--validation_data", "v.json", "--model_addr", "m", "--output_dir", "o"],
    "train_llm": ["--train_data", "t.json", "--validation_data", "v.json", "--model_name", "m",
                  "--output_dir", "o"],
    "train_user_peft": ["--train_data", "t.json", "--model_name", "m", "--output_dir", "o"],
}
RANKER_FLAGS = ["--tie_order", "argsort", "--use_date", "--contriever_checkpoint", "enc",
                "--device", "cpu", "--seed", "7"]


def model_script_args(script: str, *extra: str):
    import importlib

    module = importlib.import_module(f"LaMP.{script}")
    return module.parse_args([*MODEL_SCRIPTS[script], "--task", "LaMP-3", *extra])


@pytest.mark.parametrize("script", sorted(MODEL_SCRIPTS))
def test_on_the_fly_ranking_gets_the_options_rank_profiles_gets(script):
    """The same flags build the same ranker in a model script (ranking on the fly) as in
    rank_profiles.py: BM25's tie order and the encoder's batch size included."""
    from LaMP.utils.cli.arguments import RANKING, profile_options

    ranked = rank_profiles.parse_args(["--input_data_addr", "q.json", "--output_ranking_addr",
                                       "r.json", "--task", "LaMP-3", "--ranker", "bm25",
                                       "--batch_size", "4", *RANKER_FLAGS])
    options = profile_options(model_script_args(script, "--use_profile", "--retriever", "bm25",
                                                "--retriever_batch_size", "4", *RANKER_FLAGS))
    assert options.retriever == "bm25"
    composite = {"selector": None, "retrievers": (), "retriever_outputs": ()}  # rspg's own
    assert RANKING.options(ranked) == {**options.ranker_options, **composite}
    assert options.ranker_options == {
        "use_date": True, "tie_order": "argsort", "model_name": "enc", "allow_download": True,
        "batch_size": 4, "device": "cpu", "seed": 7}


def test_on_the_fly_bm25_ranks_ties_in_the_published_order_when_asked():
    from LaMP.utils.cli.arguments import profile_options
    from LaMP.utils.tasks import get_task

    # Only "d" matches the review; a, b, c score 0 (np.argsort(...)[::-1]: d, c, b, a).
    profile = [{"id": item, "text": text, "score": "1"}
               for item, text in zip("abcd", ["x", "y", "z", "battery"])]
    question = {"id": "q", "input": REVIEW_INPUT.format("battery"), "profile": profile}
    for flags, expected in ((), ["d", "a", "b", "c"]), (("--tie_order", "argsort"),
                                                       ["d", "c", "b", "a"]):
        options = profile_options(model_script_args("evaluate_llm", "--use_profile", *flags))
        assert options.ranker(get_task("LaMP-3")).rank_one(question) == expected


@pytest.mark.parametrize("script", sorted(MODEL_SCRIPTS))
@pytest.mark.parametrize("extra, message", [
    (["--retriever", "recency", "--tie_order", "argsort"],
     "error: --tie_order applies to --retriever bm25 only"),
    (["--retriever_batch_size", "0"], "error: --retriever_batch_size must be at least 1"),
])
def test_a_bad_ranker_flag_of_a_model_script_is_one_error_line(script, extra, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        model_script_args(script, *extra)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [message]
