"""The switches to the official side of each known deviation (README, "Known deviations"):
BM25 tie order, ROUGE aggregation, input truncation; and the grid that measures them."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, make_unigram_tokenizer
from LaMP import rank_profiles
from LaMP.utils import parallel_rank
from LaMP.utils.grid.plan import Planner, expand_cells
from LaMP.utils.grid.schema import load_grid
from LaMP.utils.prompts import TokenCounter, make_prompt_fn
from LaMP.utils.tasks import get_task

TWEET = "Paraphrase the following tweet without any explanation before or after it: {}"


# -- BM25 ties --------------------------------------------------------------------------
def rank(tmp_path: Path, questions: list, *extra: str) -> dict:
    source = tmp_path / "questions.json"
    source.write_text(json.dumps(questions), encoding="utf-8")
    before = source.read_bytes()
    output = tmp_path / f"ranking{len(list(tmp_path.iterdir()))}.json"
    rank_profiles.main(["--input_data_addr", str(source), "--output_ranking_addr", str(output),
                        "--task", "LaMP-7", "--ranker", "bm25", *extra])
    assert source.read_bytes() == before
    return json.loads(output.read_text(encoding="utf-8"))


def test_argsort_ties_come_out_in_reverse_profile_order(tmp_path):
    # Only "d" matches the query; a, b, c score 0. Ours keeps a, b, c in profile order;
    # np.argsort([0, 0, 0, s])[::-1] is [3, 2, 1, 0]: d, c, b, a.
    profile = [{"id": "a", "text": "x"}, {"id": "b", "text": "y"},
               {"id": "c", "text": "z"}, {"id": "d", "text": "hello"}]
    question = {"id": "q", "input": TWEET.format("hello"), "profile": profile}
    assert rank(tmp_path, [question])["q"] == ["d", "a", "b", "c"]
    assert rank(tmp_path, [question], "--tie_order", "profile")["q"] == ["d", "a", "b", "c"]
    assert rank(tmp_path, [question], "--tie_order", "argsort")["q"] == ["d", "c", "b", "a"]


def tied_questions(count: int) -> list[dict]:
    """Profiles past numpy's insertion-sort cutoff (16) with many tied scores."""
    words = ["a b", "a", "b", "c", "a b", "zz", "a", ""]
    return [{"id": f"q{n}", "input": TWEET.format("a b c"),
             "profile": [{"id": f"{n}-{i}", "text": words[(n + i * 3) % len(words)]}
                         for i in range(20 + n % 7)]} for n in range(count)]


def published_get_top_n(question: dict) -> list[str]:
    """rank_bm25's get_top_n over the whole profile, as the published LaMP-7 code calls it."""
    from rank_bm25 import BM25Okapi

    profile = question["profile"]
    bm25 = BM25Okapi([item["text"].split() for item in profile])
    query = question["input"][question["input"].find(":") + 1:].strip().split()
    return [item["id"] for item in bm25.get_top_n(query, profile, n=len(profile))]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_argsort_order_is_the_published_get_top_n_order_with_workers(tmp_path, monkeypatch,
                                                                     workers):
    monkeypatch.setattr(parallel_rank, "CHUNK_BYTES", 1)  # workers even for a tiny file
    if workers != "1":  # the workers must rank, not the inline fallback
        monkeypatch.setattr(rank_profiles, "_rank_inline", pytest.fail)
    questions = tied_questions(12)
    ranking = rank(tmp_path, questions, "--tie_order", "argsort", "--num_workers", workers)
    assert ranking == {question["id"]: published_get_top_n(question) for question in questions}
    # The two orders differ on these ties, so the switch is measurable.
    assert ranking != rank(tmp_path, questions, "--num_workers", workers)


def test_tie_order_with_another_ranker_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        rank_profiles.parse_args(["--input_data_addr", "q.json", "--output_ranking_addr",
                                  "r.json", "--task", "LaMP-7", "--ranker", "recency",
                                  "--tie_order", "argsort"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "error: --tie_order applies to --ranker bm25 only")


# -- ROUGE aggregation ------------------------------------------------------------------
def score(tmp_path: Path, task: str, golds: list, preds: list, *extra: str
          ) -> tuple[dict, bytes]:
    """eval_task.py's main on the given texts: (its result, the results file's bytes)."""
    spec = importlib.util.spec_from_file_location("eval_task_dev", REPO / "eval" / "eval_task.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    gold_file, pred_file = tmp_path / "golds.json", tmp_path / "preds.json"
    gold_file.write_text(json.dumps({"task": task, "golds": [
        {"id": str(i), "output": text} for i, text in enumerate(golds)]}), encoding="utf-8")
    pred_file.write_text(json.dumps({"task": task, "golds": [
        {"id": str(i), "output": text} for i, text in enumerate(preds)]}), encoding="utf-8")
    output = tmp_path / f"results{len(list(tmp_path.iterdir()))}.json"
    result = module.main(["--golds_json", str(gold_file), "--preds_json", str(pred_file),
                          "--task_name", task, "--output_file", str(output), *extra])
    return result, output.read_bytes()


# Pairs whose ROUGE-1 F-measures differ (word overlaps of varied lengths), so that the
# bootstrap means do not pile up on the plain mean.
ROUGE_GOLDS = [" ".join(f"w{j}" for j in range(1 + i % 5)) for i in range(30)]
ROUGE_PREDS = [" ".join(f"w{j}" for j in range(i % 3)) + (" z" * (i % 4)) for i in range(30)]


def reference_median(scores: np.ndarray, seed: int) -> float:
    """The official aggregation with seeded resamples: 1,000 means, their median."""
    rng = np.random.default_rng(seed)
    return float(np.median([scores[rng.integers(0, len(scores), size=len(scores))].mean()
                            for _ in range(1000)]))


def test_bootstrap_median_is_the_median_of_1000_seeded_bootstrap_means(tmp_path):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1"])
    scores = np.array([scorer.score(gold, pred)["rouge1"].fmeasure
                       for gold, pred in zip(ROUGE_GOLDS, ROUGE_PREDS)])
    mean, mean_bytes = score(tmp_path, "LaMP_7", ROUGE_GOLDS, ROUGE_PREDS)
    default, default_bytes = score(tmp_path, "LaMP_7", ROUGE_GOLDS, ROUGE_PREDS,
                                   "--rouge_aggregation", "mean")
    assert mean["rouge-1"] == pytest.approx(scores.mean()) and default_bytes == mean_bytes
    assert "aggregation" not in mean
    official, _ = score(tmp_path, "LaMP_7", ROUGE_GOLDS, ROUGE_PREDS,
                        "--rouge_aggregation", "bootstrap_median", "--seed", "3")
    assert official["rouge-1"] == pytest.approx(reference_median(scores, 3), abs=1e-12)
    assert official["rouge-1"] != pytest.approx(mean["rouge-1"], abs=1e-9)
    assert abs(official["rouge-1"] - mean["rouge-1"]) < 0.02
    assert official["aggregation"] == {"rouge": "bootstrap_median", "samples": 1000, "seed": 3}
    assert official["count"] == 30
    again, _ = score(tmp_path, "LaMP_7", ROUGE_GOLDS, ROUGE_PREDS,
                     "--rouge_aggregation", "bootstrap_median", "--seed", "3")
    assert again == official  # seeded: the official number repeats


def test_bootstrap_median_leaves_other_metrics_alone(tmp_path):
    golds, preds = ["[1]", "[2]", "[1]"], ["[1]", "[1]", "[1]"]
    plain, plain_bytes = score(tmp_path, "LaMP_1", golds, preds)
    official, official_bytes = score(tmp_path, "LaMP_1", golds, preds,
                                     "--rouge_aggregation", "bootstrap_median")
    assert official == plain and official_bytes == plain_bytes
    assert plain["accuracy"] == pytest.approx(2 / 3)


# -- long inputs ------------------------------------------------------------------------
ITEMS = [{"id": "1", "text": "the cat sat on the mat with a hat"},
         {"id": "2", "text": "a dog ran in the park after the ball"}]
LONG = TWEET.format(" ".join(["the quick brown fox jumps over the lazy dog"] * 6))


def prompts(text: str, items, max_length: int = 160) -> tuple[str, str, TokenCounter]:
    tokenizer = make_unigram_tokenizer()
    task = get_task("LaMP-7")
    share = make_prompt_fn(task, tokenizer, max_length)(text, items)
    whole = make_prompt_fn(task, tokenizer, max_length, input_truncation="tokenizer")(text, items)
    return share, whole, TokenCounter(tokenizer)


def test_tokenizer_truncation_keeps_the_whole_input_after_the_same_items():
    share, whole, counter = prompts(LONG, ITEMS)
    assert counter.count(share) <= 160 < counter.count(whole)
    assert whole.endswith(LONG)  # not cut here: the tokenizer cuts the prompt's end
    # The input was cut to its 60% share (96 tokens) on our side; the items before it are the
    # same on both sides (their room is what the share leaves, officially too).
    cut = share[share.index("Paraphrase"):]
    assert LONG.startswith(cut) and cut != LONG and counter.count(cut) <= int(160 * 0.6)
    assert share[:-len(cut)] == whole[:-len(LONG)]
    assert "cat" in whole


def test_tokenizer_truncation_changes_nothing_for_a_short_input():
    share, whole, _ = prompts(TWEET.format("a short one"), ITEMS)
    assert share == whole


def test_tokenizer_truncation_leaves_a_bare_input_whole():
    share, whole, counter = prompts(LONG, [])
    assert whole == LONG and LONG.startswith(share) and counter.count(share) <= 160


# -- the grid ---------------------------------------------------------------------------
def test_deviations_grid_sets_each_official_switch_against_our_side(tmp_path):
    grid = load_grid(REPO / "LaMP" / "configs" / "deviations_lamp7.yaml")
    planner = Planner(grid, tmp_path)
    cells = {cell.name: planner.plan(cell) for cell in expand_cells(grid)}
    assert len(cells) == 8

    def argv(cell_name: str, stage: str) -> list:
        run = next(run for run in cells[cell_name].runs if run.stage.name == stage)
        return [token for token in run.argv if isinstance(token, str)]

    for k in (1, 4):
        ours = f"LaMP_7.user.smollm2.zero_shot.bm25.k{k}"
        assert "--tie_order" not in argv(ours, "rank")
        assert argv(f"LaMP_7.user.smollm2.zero_shot.bm25_argsort.k{k}", "rank")[-2:] == \
            ["--tie_order", "argsort"]
        assert argv(f"LaMP_7.user.smollm2.official_truncation.bm25.k{k}", "evaluate")[-2:] == \
            ["--input_truncation", "tokenizer"]
        rouge = cells[f"LaMP_7.user.smollm2.official_rouge.bm25.k{k}"]
        assert argv(rouge.name, "score")[-2:] == ["--rouge_aggregation", "bootstrap_median"]
        # The official ROUGE scores our predictions: the evaluate stage is the same run.
        assert [run.key for run in rouge.runs[:-1]] == [run.key for run in cells[ours].runs[:-1]]
        assert "--rouge_aggregation" not in argv(ours, "score")


def test_score_flags_of_a_method_are_validated(tmp_path):
    from LaMP.utils.errors import LampError
    from LaMP.utils.grid.schema import parse_grid

    document = {"tasks": ["LaMP-7"], "models": {"m": "x"},
                "methods": {"r": {"score_flags": {"--seed": 1}}}}
    with pytest.raises(LampError, match=r"^g: methods.r.score_flags: '--seed' is not a flag"):
        parse_grid(document, "g", "g")


def test_evaluate_llm_runs_with_tokenizer_truncation_and_records_it(tiny_llama, tmp_path):
    from LaMP import evaluate_llm

    profile = [{"id": f"p{i}", "text": f"tweet number {i} about the weather"} for i in range(3)]
    questions = [{"id": "70", "input": LONG, "output": "x", "profile": profile}]
    data = tmp_path / "merged.json"
    data.write_text(json.dumps(questions), encoding="utf-8")
    before = data.read_bytes()
    returned = evaluate_llm.main([
        "--validation_data", str(data), "--model_addr", str(tiny_llama), "--task", "LaMP-7",
        "--output_dir", str(tmp_path / "out"), "--use_profile", "--is_ranked",
        "--num_retrieved", "2", "--max_length", "40", "--generation_max_length", "2",
        "--device", "cpu", "--input_truncation", "tokenizer"])
    assert len(returned["predictions"]) == 1 and data.read_bytes() == before
    saved = json.loads((tmp_path / "out" / "args.json").read_text(encoding="utf-8"))
    assert saved["input_truncation"] == "tokenizer"
