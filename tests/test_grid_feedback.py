"""Grid retrievers trained from the LLM's feedback (ropg_kd, ropg_rl, rspg_pre, rspg_post): the
stages they expand to, what each reads, and one tiny run of a ROPG cell on the sample."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from conftest import SAMPLE
from LaMP import reproduce
from LaMP.utils.errors import LampError
from LaMP.utils.grid.plan import Planner, expand_cells
from LaMP.utils.grid.schema import parse_grid
from LaMP.utils.grid.stages import Raw

DATA_ROOT = SAMPLE.parent
TRAIN = str(DATA_ROOT / "user" / "LaMP_7" / "train_questions.json")
DEV = str(DATA_ROOT / "user" / "LaMP_7" / "dev_questions.json")


def grid(**overrides) -> dict:
    document = {"name": "g", "tasks": ["LaMP-7"], "models": {"m": "some/model"},
                "methods": {"zero_shot": {}}, "k": [2],
                "retrievers": {"bm25": {}, "dense": {"ranker": "contriever",
                                                     "flags": {"contriever_checkpoint": "enc"}},
                               "ropg_kd": {}, "ropg_rl": {}, "rspg_pre": {},
                               "rspg_post": {"candidates": ["bm25", "ropg_kd"]}}}
    document.update(overrides)
    return document


def planned(document: dict, limit=None) -> dict:
    parsed = parse_grid(document, "g.yaml", "g")
    planner = Planner(parsed, DATA_ROOT, limit=limit)
    return {cell.axes["retriever"]: planner.plan(cell) for cell in expand_cells(parsed)}


def value(run, flag: str, count: int = 1):
    at = run.argv.index(flag) + 1
    return run.argv[at] if count == 1 else list(run.argv[at:at + count])


def by_stage(cell) -> dict:
    runs = {}
    for run in cell.runs:
        runs.setdefault(run.stage.name, []).append(run)
    return runs


def merged_questions(merge) -> object:
    return value(merge, "--lamp_questions_addr")


def test_a_ropg_retriever_is_feedback_then_training_then_contriever_on_its_checkpoint():
    cells = planned(grid())
    kd, rl = by_stage(cells["ropg_kd"]), by_stage(cells["ropg_rl"])
    assert [run.stage.name for run in cells["ropg_kd"].runs] == [
        "merge", "feedback", "train_retriever", "rank", "merge", "evaluate", "score"]
    (feedback,), (train,), (rank,) = kd["feedback"], kd["train_retriever"], kd["rank"]
    # Feedback is collected on the training questions (unranked), by the cell's model.
    training = value(feedback, "--train_data").run
    assert merged_questions(training) == Raw(TRAIN)
    assert "--profile_ranking_addr" not in training.argv
    assert value(feedback, "--model_addr") == Raw("some/model")
    assert value(train, "--feedback").run is feedback
    assert value(train, "--train_data").run is training
    assert value(train, "--objective") == "kd"
    assert value(rl["train_retriever"][0], "--objective") == "rl"
    # ROPG-KD and ROPG-RL share the feedback, not the encoder.
    assert rl["feedback"][0] is feedback and rl["train_retriever"][0] is not train
    assert value(rank, "--ranker") == "contriever"
    checkpoint = value(rank, "--contriever_checkpoint")
    assert (checkpoint.run, checkpoint.name) == (train, "encoder")
    assert merged_questions(kd["merge"][1]) == Raw(DEV)


def test_a_selector_learns_from_its_candidates_answers_on_the_training_set():
    cells = planned(grid())
    pre, post = by_stage(cells["rspg_pre"]), by_stage(cells["rspg_post"])
    (selector,) = pre["train_selector"]
    # Default candidates: every retriever that ranks and selects none, in grid order.
    rankings = value(selector, "--rankings", 4)
    assert [value(ranking.run, "--ranker") for ranking in rankings] == [
        "bm25", "contriever", "contriever", "contriever"]
    assert {value(ranking.run, "--input_data_addr") for ranking in rankings} == {Raw(TRAIN)}
    predictions = value(selector, "--predictions", 4)
    assert [prediction.run.stage.name for prediction in predictions] == ["evaluate"] * 4
    assert [value(value(p.run, "--validation_data").run, "--profile_ranking_addr").run
            for p in predictions] == [ranking.run for ranking in rankings]
    assert (value(selector, "--mode"), value(selector, "--num_retrieved")) == ("pre", "2")
    (rank,) = [run for run in pre["rank"] if value(run, "--ranker") == "rspg"]
    assert value(rank, "--input_data_addr") == Raw(DEV)
    assert value(rank, "--selector").run is selector
    tokens = value(rank, "--retrievers", 4)
    assert tokens[:2] == ["bm25", "contriever=enc"]
    assert [(token.prefix, token.name) for token in tokens[2:]] == [("contriever=", "encoder")] * 2
    assert [token.run.stage.name for token in tokens[2:]] == ["train_retriever"] * 2
    assert "--retriever_outputs" not in rank.argv
    # Post: the named candidates only, and their answers on the questions being ranked.
    (post_selector,) = post["train_selector"]
    assert value(post_selector, "--mode") == "post"
    (post_rank,) = [run for run in post["rank"] if value(run, "--ranker") == "rspg"]
    outputs = value(post_rank, "--retriever_outputs", 2)
    assert [value(value(o.run, "--validation_data").run, "--lamp_questions_addr")
            for o in outputs] == [Raw(DEV)] * 2
    assert [value(value(value(o.run, "--validation_data").run, "--profile_ranking_addr").run,
                  "--ranker") for o in outputs] == ["bm25", "contriever"]


def test_dry_run_prints_the_feedback_stages_and_the_rank_reads_the_trained_folder(
        tmp_path, capsys):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(grid(retrievers=["bm25", "ropg_kd", "rspg_pre"])),
                    encoding="utf-8")
    runs = tmp_path / "runs"
    reproduce.main(["--grid", str(path), "--data_root", str(DATA_ROOT), "--runs_dir", str(runs),
                    "--dry_run", "--limit", "3"])
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines()
                if line.startswith("python ")]
    scripts = [command[1] for command in commands]
    for script in ("LaMP/collect_feedback.py", "LaMP/train_retriever.py",
                   "LaMP/train_selector.py"):
        assert scripts.count(script) == 1  # shared by both cells
    command = dict(zip(scripts, commands))
    subset = next(c for c in commands if c[1] == "LaMP/utils/make_subset.py" and TRAIN in c)
    assert subset[subset.index("--count") + 1] == "3"  # --limit reaches the training set
    encoder = command["LaMP/train_retriever.py"]
    encoder = encoder[encoder.index("--output_dir") + 1]
    assert Path(encoder).name == "encoder"
    assert Path(encoder).parent.parent == runs.resolve() / "g" / "stages"
    dense = [c for c in commands if c[1] == "LaMP/rank_profiles.py" and "contriever" in c]
    assert all(c[c.index("--contriever_checkpoint") + 1] == encoder for c in dense)
    selector = command["LaMP/train_selector.py"]
    rspg = next(c for c in commands if "rspg" in c)
    assert rspg[rspg.index("--selector") + 1] == selector[selector.index("--output_dir") + 1]
    assert rspg[rspg.index("--retrievers") + 1:] == ["bm25", f"contriever={encoder}"]
    # The trained encoder ranks the evaluated questions (its cell) and, as a candidate, the
    # training questions the selector learns from.
    assert len({c[c.index("--input_data_addr") + 1] for c in dense}) == 2


@pytest.mark.parametrize("retrievers, key, message", [
    ({"bm25": {"candidates": ["bm25"]}}, "retrievers.bm25.candidates", "only a selector"),
    ({"bm25": {}, "rspg_pre": {"candidates": ["bm25", "rspg_post"]}, "rspg_post": {}},
     "retrievers.rspg_pre.candidates", "'rspg_post' is not a retriever of the grid"),
    ({"bm25": {}, "rspg_pre": {"candidates": ["bm24"]}},
     "retrievers.rspg_pre.candidates", "'bm24' is not a retriever of the grid"),
    ({"none": {}, "rspg_pre": {}}, "retrievers.rspg_pre.candidates", "two or more"),
    ({"bm25": {}, "rspg_pre": {}}, "retrievers.rspg_pre.candidates", "(found: bm25)"),
    ({"bm25": {}, "rspg_pre": {"candidates": ["bm25", "bm25"]}},
     "retrievers.rspg_pre.candidates", "bm25"),
    ({"x": {"ranker": "ropg_xx"}}, "retrievers.x.ranker", "ropg_kd, ropg_rl, rspg_pre"),
])
def test_a_selector_without_candidates_to_choose_is_one_error_naming_the_key(
        retrievers, key, message):
    with pytest.raises(LampError) as error:
        parse_grid(grid(retrievers=retrievers), "g.yaml", "g")
    assert str(error.value).startswith(f"g.yaml: {key}: ")
    assert message in str(error.value)


def test_a_named_ropg_retriever_keeps_its_own_name_as_the_column():
    cells = planned(grid(retrievers={"kd_from_bm25": {"ranker": "ropg_kd"}}))
    (train,) = by_stage(cells["kd_from_bm25"])["train_retriever"]
    assert value(train, "--objective") == "kd"


def test_a_ropg_cell_runs_end_to_end_on_the_sample(tmp_path, tiny_t5, torch_single_thread):
    from conftest import build_tiny_bert

    texts = []
    for name in ("train_questions.json", "dev_questions.json"):
        for question in json.loads((SAMPLE / "LaMP_7" / name).read_text(encoding="utf-8")):
            texts += [question["input"], *(item["text"] for item in question["profile"])]
    encoder = build_tiny_bert(tmp_path / "bert", texts)
    model = {"max_length": 64, "generation_max_length": 4, "generation_num_beams": 1,
             "device": "cpu"}
    document = grid(models={"t5": str(tiny_t5)}, retrievers=["ropg_kd"], k=[1], flags={
        "model": model, "feedback": {"num_candidates": 2},
        "train_retriever": {"contriever_checkpoint": encoder, "max_steps": 1,
                            "warmup_steps": 0, "device": "cpu"},
        "rank": {"device": "cpu"}})
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    runs = tmp_path / "runs"
    result = reproduce.main(["--grid", str(path), "--data_root", str(DATA_ROOT),
                             "--runs_dir", str(runs), "--limit", "2"])
    assert result["failures"] == {}
    cell = runs / "g" / "LaMP_7.user.t5.zero_shot.ropg_kd.k1"
    lines = (cell / "feedback" / "feedback.jsonl").read_text(encoding="utf-8").splitlines()
    train = json.loads((SAMPLE / "LaMP_7" / "train_questions.json").read_text("utf-8"))
    assert [json.loads(line)["id"] for line in lines] == [q["id"] for q in train[:2]]
    assert (cell / "train_retriever" / "encoder" / "config.json").is_file()
    ranking = json.loads((cell / "rank" / "ranking.json").read_text(encoding="utf-8"))
    dev = json.loads((SAMPLE / "LaMP_7" / "dev_questions.json").read_text("utf-8"))
    assert sorted(ranking) == sorted(q["id"] for q in dev[:2])
    assert (cell / "score" / "results.json").is_file()


def test_the_shipped_ropg_table3_grid_plans_its_trained_retrievers_per_task(tmp_path, capsys):
    """Every stage of the shipped grid's ROPG/RSPG cells passes its script's parser: the
    sample (laid out as the time split) stands in for the data."""
    from conftest import REPO

    for task in SAMPLE.iterdir():
        (tmp_path / "time").mkdir(exist_ok=True)
        (tmp_path / "time" / task.name).symlink_to(task, target_is_directory=True)
    result = reproduce.main(["--grid", str(REPO / "LaMP" / "configs" / "ropg_table3.yaml"),
                             "--data_root", str(tmp_path), "--runs_dir", str(tmp_path / "runs"),
                             "--dry_run", "--limit", "2"])
    assert {name.split(".")[4] for name in result["cells"]} == {
        "none", "bm25", "recency", "contriever", "ropg_kd", "ropg_rl", "rspg_pre", "rspg_post"}
    scripts = [line.split()[1] for line in capsys.readouterr().out.splitlines()
               if line.startswith("python ")]
    # One feedback run per task, two encoders and two selectors trained from it.
    assert [scripts.count(f"LaMP/{name}.py") for name in
            ("collect_feedback", "train_retriever", "train_selector")] == [7, 14, 14]
