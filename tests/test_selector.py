"""RSPG (train_selector.py, rank_profiles.py --ranker rspg): a selector learns which retriever
serves the LLM best and the rspg ranker writes that retriever's ranking.

The fixture plants the answer: recency's top item of every question is a "sunny" review and
its answers are the golds; bm25's top item is another review and its answers are wrong.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

from conftest import build_tiny_bert, outputs_doc, write_json  # noqa: E402
from LaMP import rank_profiles, train_selector  # noqa: E402
from LaMP.utils.errors import LampError  # noqa: E402
from LaMP.utils.retrieval import build_ranker, parse_retriever_spec  # noqa: E402
from LaMP.utils.retrieval.selector import selector_segments  # noqa: E402
from LaMP.utils.tasks import get_task  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread")

LAMP_3 = get_task("LaMP-3")
INSTRUCTION = ("What is the score of the following review on a scale of 1 to 5? just answer "
               "with 1, 2, 3, 4, or 5 without further explanation. review: ")
QUERIES = ["battery lasts long", "screen is dim", "camera is sharp", "case feels cheap",
           "sound is loud", "charger broke fast"]
SUNNY = ["sun sun bright happy day", "bright sun warm happy", "happy sun bright sky"]
WORDS = QUERIES + SUNNY + ["old dull grey note", "grey old text here"]


def question(number: int) -> dict:
    query = QUERIES[number % len(QUERIES)]
    return {"id": f"3{number:02d}", "input": INSTRUCTION + query, "output": str(number % 5 + 1),
            "profile": [
                {"id": f"3{number:02d}a", "text": f"{query} indeed", "score": "2",
                 "date": "2010-01-01"},  # bm25's best: it shares the query's words
                {"id": f"3{number:02d}b", "text": SUNNY[number % 3], "score": "5",
                 "date": "2020-01-01"},  # recency's best: the newest
                {"id": f"3{number:02d}c", "text": "old dull grey note", "score": "3",
                 "date": "2015-01-01"}]}


def questions(count: int = 6) -> list[dict]:
    return [question(number) for number in range(count)]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> str:
    return build_tiny_bert(tmp_path_factory.mktemp("bert"), [INSTRUCTION, *WORDS, "| [SEP]"])


def rank(data: Path, output: Path, ranker: str, *extra: str) -> dict:
    rank_profiles.main(["--input_data_addr", str(data), "--output_ranking_addr", str(output),
                        "--task", "LaMP-3", "--ranker", ranker, "--num_workers", "1", *extra])
    return json.loads(output.read_text(encoding="utf-8"))


def predictions(folder: Path, pairs, num_retrieved: int = 1) -> Path:
    """An evaluate_llm.py output folder: predictions.json and its args.json."""
    path = write_json(folder / "predictions.json", outputs_doc("LaMP_3", pairs))
    write_json(folder / "args.json", {"num_retrieved": num_retrieved, "use_profile": True,
                                      "task": "LaMP-3"})
    return path


@pytest.fixture
def planted(tmp_path):
    data = write_json(tmp_path / "train.json", questions())
    rankings = {name: tmp_path / f"{name}.json" for name in ("bm25", "recency")}
    for name, path in rankings.items():
        rank(data, path, name)
    golds = [(q["id"], q["output"]) for q in questions()]
    wrong = [(qid, "1" if gold == "5" else "5") for qid, gold in golds]
    preds = {"bm25": predictions(tmp_path / "eval_bm25", wrong),
             "recency": predictions(tmp_path / "eval_recency", golds)}
    return data, rankings, preds


def train(planted, encoder, output: Path, *extra: str) -> dict:
    data, rankings, preds = planted
    return train_selector.main(["--train_data", str(data), "--task", "LaMP-3",
                                "--rankings", str(rankings["bm25"]), str(rankings["recency"]),
                                "--predictions", str(preds["bm25"]), str(preds["recency"]),
                                "--selector_model", encoder, "--output_dir", str(output),
                                "--max_steps", "40", "--warmup_steps", "0",
                                "--learning_rate", "3e-3", "--logging_steps", "0",
                                "--device", "cpu", *extra])


@pytest.mark.parametrize("mode", ["pre", "post"])
def test_the_selector_picks_the_planted_best_retriever(planted, encoder, tmp_path, mode):
    data, rankings, preds = planted
    selector = tmp_path / f"rspg_{mode}"
    summary = train(planted, encoder, selector, "--mode", mode)
    assert summary["groups"] == 6
    config = json.loads((selector / "selector.json").read_text())
    assert config["mode"] == mode and config["num_retrieved"] == 1 and config["task"] == "LaMP-3"
    outputs = (["--retriever_outputs", str(preds["bm25"]), str(preds["recency"])]
               if mode == "post" else [])
    chosen = rank(data, tmp_path / "rspg.json", "rspg", "--selector", str(selector),
                  "--retrievers", "bm25", "recency", *outputs)
    assert chosen == json.loads(rankings["recency"].read_text())
    assert chosen != json.loads(rankings["bm25"].read_text())
    described = json.loads((tmp_path / "rspg.args.json").read_text())
    assert described["chosen"] == {"bm25": 0, "recency": 6}
    assert described["selector"] == str(selector) and described["mode"] == mode


def test_the_selector_reads_the_input_the_answer_and_the_items_as_prompted():
    q = question(0)
    items = q["profile"][:2]
    assert selector_segments(LAMP_3, q, items) == [
        q["input"], '2 is the score for "battery lasts long indeed"',
        '5 is the score for "sun sun bright happy day"']
    assert selector_segments(LAMP_3, q, items[:1], output="4") == [
        q["input"], "4", '2 is the score for "battery lasts long indeed"']


def test_a_post_selector_needs_every_retrievers_answers(planted, encoder, tmp_path):
    data, rankings, preds = planted
    selector = tmp_path / "post"
    train(planted, encoder, selector, "--mode", "post", "--max_steps", "1")
    output = tmp_path / "rspg.json"
    with pytest.raises(LampError, match="RSPG-Post: it reads each retriever's answers"):
        rank(data, output, "rspg", "--selector", str(selector), "--retrievers", "bm25",
             "recency")
    partial = predictions(tmp_path / "partial", [("300", "1")])
    with pytest.raises(LampError, match="no answer for question 301"):
        rank(data, output, "rspg", "--selector", str(selector), "--retrievers", "bm25",
             "recency", "--retriever_outputs", str(preds["bm25"]), str(partial))
    assert not output.exists()


def test_a_selector_for_another_task_is_refused(planted, encoder, tmp_path):
    data, _, _ = planted
    selector = tmp_path / "pre"
    train(planted, encoder, selector, "--max_steps", "1")
    config = json.loads((selector / "selector.json").read_text())
    (selector / "selector.json").write_text(json.dumps({**config, "task": "LaMP-7"}))
    with pytest.raises(LampError, match="trained for LaMP-7, not LaMP-3"):
        rank(data, tmp_path / "r.json", "rspg", "--selector", str(selector), "--retrievers",
             "bm25", "recency")


def test_predictions_made_with_other_k_are_refused(planted, encoder, tmp_path):
    data, rankings, preds = planted
    write_json(preds["recency"].parent / "args.json", {"num_retrieved": 3, "use_profile": True})
    with pytest.raises(LampError, match="different --num_retrieved"):
        train(planted, encoder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_question_without_a_ranking_is_named(planted, encoder, tmp_path):
    data, rankings, preds = planted
    ranking = json.loads(rankings["bm25"].read_text())
    del ranking["303"]
    write_json(rankings["bm25"], ranking)
    with pytest.raises(LampError, match=r"--rankings 1: no ranking for 1 \(first: 303\)"):
        train(planted, encoder, tmp_path / "out")


@pytest.mark.parametrize("argv, message", [
    (["--ranker", "rspg", "--retrievers", "bm25", "recency"], "needs --selector and --retrievers"),
    (["--ranker", "bm25", "--selector", "s"], "--selector applies to --ranker rspg only"),
    (["--ranker", "rspg", "--selector", "s", "--retrievers", "bm25", "rspg"], "'rspg' is not one"),
    (["--ranker", "rspg", "--selector", "s", "--retrievers", "bm25=x"], "only contriever takes"),
])
def test_rspg_flag_mistakes_end_in_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as ended:
        rank_profiles.main(["--input_data_addr", "q.json", "--output_ranking_addr",
                            str(tmp_path / "r.json"), "--task", "LaMP-3", *argv])
    assert ended.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_retriever_specs():
    assert parse_retriever_spec("contriever=runs/ropg").checkpoint == "runs/ropg"
    assert parse_retriever_spec("contriever=runs/ropg").label == "contriever=runs/ropg"
    assert parse_retriever_spec("bm25").checkpoint is None
    with pytest.raises(LampError, match="name the encoder"):
        parse_retriever_spec("contriever=")


def test_rspg_is_no_on_the_fly_retriever():
    with pytest.raises(LampError, match="needs a trained selector"):
        build_ranker("rspg", LAMP_3)


@pytest.mark.parametrize("change", [{"max_length": "512"}, {"num_retrieved": True},
                                    {"mode": "middle"}, {"task": None}])
def test_a_damaged_selector_config_is_one_error(planted, encoder, tmp_path, change):
    data, _, _ = planted
    selector = tmp_path / "pre"
    train(planted, encoder, selector, "--max_steps", "1")
    config = json.loads((selector / "selector.json").read_text())
    (selector / "selector.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(LampError, match="not a selector config"):
        rank(data, tmp_path / "r.json", "rspg", "--selector", str(selector), "--retrievers",
             "bm25", "recency")


def test_a_damaged_selector_head_is_one_error(planted, encoder, tmp_path):
    data, _, _ = planted
    selector = tmp_path / "pre"
    train(planted, encoder, selector, "--max_steps", "1")
    (selector / "selector_head.safetensors").write_bytes(b"not tensors")
    with pytest.raises(LampError, match="selector_head.safetensors: not this selector's head"):
        rank(data, tmp_path / "r.json", "rspg", "--selector", str(selector), "--retrievers",
             "bm25", "recency")
