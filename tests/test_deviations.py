"""The switches to the official side of each known deviation (docs/deviations.md):
BM25 tie order, ROUGE aggregation, input truncation; and the grid that measures them."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, TOKENIZER_CORPUS, make_unigram_tokenizer
from LaMP import rank_profiles
from LaMP.utils.grid.plan import Planner, expand_cells
from LaMP.utils.grid.schema import load_grid
from LaMP.utils.modeling.prompts import TokenCounter, make_prompt_fn
from LaMP.utils.retrieval import parallel as parallel_rank
from LaMP.utils.tasks import get_task

TWEET = "Paraphrase the following tweet without any explanation before or after it: {}"
TOKENIZER_LINE = TOKENIZER_CORPUS[-1]


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
    monkeypatch.setattr(parallel_rank, "MIN_BYTES", 0)  # workers even for a tiny file
    monkeypatch.setattr(parallel_rank, "available_cores", lambda: 2)  # on any machine
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
        "error: --tie_order applies to --ranker bm25 (and rspg's bm25 candidate) only")


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


# -- prompt budget ----------------------------------------------------------------------
def word_tokenizer(*texts: str):
    """One token per whitespace-separated word and ``</s>`` after every text, as T5 adds it:
    every official count below can be worked out by hand."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({word for text in texts for word in text.split()})
    vocab = {word: i for i, word in enumerate(["<pad>", "</s>", "<unk>", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                        special_tokens=[("</s>", 1)])
    core.decoder = decoders.WordPiece(cleanup=False)  # words joined by one space
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def words(stem: str, count: int) -> str:
    return " ".join(f"{stem}{i}" for i in range(count))


SUFFIX_7 = " are written by a person. Following the given patterns "
FIXED_7 = "are written by user. Following the given patterns"


def official(task_name: str, text: str, items, max_length: int, *extra: str, **options) -> str:
    strings = [text, *(str(value) for item in items for value in item.values()), SUFFIX_7,
               FIXED_7, '"" ', ' Following the given patterns " " is a title for', *extra]
    tokenizer = word_tokenizer(*strings)
    # reserved=1: the model adds </s> (T5), so the official budget is max_length itself.
    return make_prompt_fn(get_task(task_name), tokenizer, max_length, reserved=1,
                          prompt_budget="official", **options)(text, items)


def test_official_budget_sizes_tweets_by_the_fixed_constants():
    # Input 13 words + </s> = 14 tokens, under int(0.6 * 40) = 24: the items' room is 26.
    # "are written by user. Following ..." counts 9, each ", and " 2, 1 reserved: each of
    # 2 items gets (26 - 1 - 2 - 9) // 2 = 7, of which '"" ' costs 2. The first tweet keeps
    # its 2 words (3 ids with </s>) and passes on 7 - 3 - 2 = 2; the second keeps 7 + 2 - 2
    # = 7 ids: 6 words.
    text = TWEET.format("hello there")
    items = [{"id": "1", "text": words("x", 2)}, {"id": "2", "text": words("y", 10)}]
    expected = f'"x0 x1" , and "{words("y", 6)}" {SUFFIX_7}{text}'
    assert official("LaMP-7", text, items, 40) == expected
    # Our exact count gives the same two items a different cut (no constants, no </s>).
    tokenizer = word_tokenizer(text, *(item["text"] for item in items), SUFFIX_7, '"" ')
    exact = make_prompt_fn(get_task("LaMP-7"), tokenizer, 40, reserved=1)(text, items)
    assert exact != expected and exact.endswith(SUFFIX_7 + text)
    assert TokenCounter(tokenizer).count(exact) <= 39


def test_official_budget_uses_each_tasks_constants():
    # LaMP-5: the input (10 + 5 words) counts 16, room 40 - 16 = 24; "Following the given
    # patterns" counts 5 and 1 is reserved: the one item gets 18, of which '"T" is a title
    # " " ' (6 words, no "for", + </s>) costs 7: 11 ids, 10 words of the abstract.
    text = "Generate a title for the following abstract of a paper: " + words("w", 5)
    items = [{"id": "1", "title": "T", "abstract": words("a", 20)}]
    assert official("LaMP-5", text, items, 40, '"T"') == \
        f'"T" is a title for "{words("a", 10)}" . Following the given patterns {text}'
    # LaMP-1: 28 words + </s> = 29, room 60 - 29 = 31, nothing reserved, an item costs 2:
    # each of 2 titles gets (31 - 2) // 2 = 14, so 12 ids: 11 words; the 3-word title keeps
    # all and the insertion goes after the first "title" of the input.
    text = ('For an author who has written the paper with the title "X", which reference is '
            'related? Just answer with [1] or [2] without explanation. [1]: "Y" [2]: "Z"')
    items = [{"id": "1", "title": words("t", 20), "abstract": ""},
             {"id": "2", "title": words("s", 3), "abstract": ""}]
    joined = f'"{words("t", 11)}", and "{words("s", 3)}"'
    assert official("LaMP-1", text, items, 60) == text.replace("title", f"title, and {joined}", 1)


def test_official_budget_lowers_the_input_share_where_the_tokenizer_refuses():
    # Input 30 words + </s> = 31. Share 0.6 of 36 is 21: room 15, each of 2 items
    # (15 - 12) // 2 = 1, less 2 for '"" ' is -1, which the tokenizer refuses; at 0.5 the
    # room is 18, each item 3, and 1 id (</s> alone) is left for each tweet.
    text = TWEET.format(words("z", 17))
    items = [{"id": "1", "text": words("x", 5)}, {"id": "2", "text": words("y", 5)}]
    assert official("LaMP-7", text, items, 36, input_truncation="tokenizer") == \
        f'"" , and "" {SUFFIX_7}{text}'
    # Where even no share leaves room, the official code gives the bare input.
    assert official("LaMP-7", text, items, 12, input_truncation="tokenizer") == text


def test_official_budget_is_off_by_default_and_changes_only_the_items():
    tokenizer = make_unigram_tokenizer()
    task = get_task("LaMP-7")
    text = TWEET.format("the weather is nice today")
    items = [{"id": "1", "text": TOKENIZER_LINE * 3}, {"id": "2", "text": TOKENIZER_LINE}]
    default = make_prompt_fn(task, tokenizer, 128)(text, items)
    assert make_prompt_fn(task, tokenizer, 128, prompt_budget="exact")(text, items) == default
    official_prompt = make_prompt_fn(task, tokenizer, 128, prompt_budget="official")(text, items)
    assert official_prompt != default
    assert official_prompt.endswith(SUFFIX_7 + text) and default.endswith(SUFFIX_7 + text)
    # Without items both are the input.
    assert make_prompt_fn(task, tokenizer, 128, prompt_budget="official")(text, []) == text


# -- the grid ---------------------------------------------------------------------------
def test_deviations_grid_sets_each_official_switch_against_our_side(tmp_path):
    grid = load_grid(REPO / "LaMP" / "configs" / "deviations_lamp7.yaml")
    planner = Planner(grid, tmp_path)
    cells = {cell.name: planner.plan(cell) for cell in expand_cells(grid)}
    assert len(cells) == 10

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
        assert argv(f"LaMP_7.user.smollm2.official_budget.bm25.k{k}", "evaluate")[-2:] == \
            ["--prompt_budget", "official"]
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


@pytest.mark.parametrize("flag,value", [("input_truncation", "tokenizer"),
                                        ("prompt_budget", "official")])
def test_evaluate_llm_runs_with_an_official_switch_and_records_it(tiny_llama, tmp_path, flag,
                                                                 value):
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
        "--device", "cpu", f"--{flag}", value])
    assert len(returned["predictions"]) == 1 and data.read_bytes() == before
    saved = json.loads((tmp_path / "out" / "args.json").read_text(encoding="utf-8"))
    assert saved[flag] == value
