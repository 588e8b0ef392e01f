"""train_llm.py and the training helpers, with tiny random models built offline."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, SAMPLE, load_script, write_json
from LaMP import train_llm
from LaMP.utils.data.outputs import load_outputs
from LaMP.utils.errors import LampError
from LaMP.utils.modeling.examples import Example
from LaMP.utils.modeling.model import LampModel, load_pretrained, load_tokenizer
from LaMP.utils.modeling.distributed import contiguous_slice
from LaMP.utils.modeling.training import (IGNORE_INDEX, PaddingCollator, add_lora,
                                          training_features)
from LaMP.utils.tasks import get_task


def merged_sample(tmp_path, task_number: int, split: str, limit: int) -> str:
    """The bundled sample's questions with their outputs joined in (merge format)."""
    folder = SAMPLE / f"LaMP_{task_number}"
    questions = json.loads((folder / f"{split}_questions.json").read_text())[:limit]
    golds = {g["id"]: g["output"]
             for g in json.loads((folder / f"{split}_outputs.json").read_text())["golds"]}
    for question in questions:
        question["output"] = golds[question["id"]]
    path = tmp_path / f"LaMP_{task_number}_{split}_merged.json"
    path.write_text(json.dumps(questions))
    return str(path)


def lamp_model_for(folder, chat_template=False) -> LampModel:
    model, seq2seq = load_pretrained(str(folder), dtype=torch.float32)
    tokenizer = load_tokenizer(str(folder), seq2seq=seq2seq)
    return LampModel(model=model, tokenizer=tokenizer, is_seq2seq=seq2seq,
                     device=torch.device("cpu"), chat_template=chat_template)


EXAMPLES = [Example(id="1", prompt="the quick brown fox", target="lazy dog"),
            Example(id="2", prompt="I am so tired today but my friends", target="the beach")]


def test_causal_labels_cover_only_the_target_and_eos(tiny_llama):
    lamp_model = lamp_model_for(tiny_llama, chat_template=True)
    tokenizer = lamp_model.tokenizer
    features = training_features(lamp_model, EXAMPLES, max_length=64, target_max_length=16)
    for example, feature in zip(EXAMPLES, features):
        prompt_ids = tokenizer(lamp_model.wrap(example.prompt), add_special_tokens=False)["input_ids"]
        target_ids = tokenizer(example.target, add_special_tokens=False)["input_ids"]
        assert feature["input_ids"] == prompt_ids + target_ids + [tokenizer.eos_token_id]
        assert feature["labels"] == ([IGNORE_INDEX] * len(prompt_ids) + target_ids
                                     + [tokenizer.eos_token_id])
    batch = PaddingCollator(tokenizer.pad_token_id)(features)
    short = min(range(2), key=lambda i: len(features[i]["input_ids"]))
    n = len(features[short]["input_ids"])
    assert batch["attention_mask"][short, n:].sum() == 0
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][short, n:] == tokenizer.pad_token_id).all()
    # The model sees exactly the prompt tokens as context and is scored on the target alone.
    assert (batch["labels"] != IGNORE_INDEX).sum() == sum(
        len(tokenizer(e.target, add_special_tokens=False)["input_ids"]) + 1 for e in EXAMPLES)


def test_target_is_cut_but_keeps_its_end_token(tiny_llama):
    lamp_model = lamp_model_for(tiny_llama)
    long = Example(id="1", prompt="the quick", target="the quick brown fox jumps over the lazy dog")
    (feature,) = training_features(lamp_model, [long], max_length=64, target_max_length=4)
    targets = [t for t in feature["labels"] if t != IGNORE_INDEX]
    assert len(targets) == 4 and targets[-1] == lamp_model.tokenizer.eos_token_id


def test_seq2seq_labels_are_the_target_tokens(tiny_t5):
    lamp_model = lamp_model_for(tiny_t5)
    (feature,) = training_features(lamp_model, EXAMPLES[:1], max_length=64, target_max_length=16)
    assert feature["labels"] == lamp_model.tokenizer("lazy dog")["input_ids"]
    assert feature["labels"][-1] == lamp_model.tokenizer.eos_token_id


@pytest.mark.parametrize("which", ["t5", "llama"])
def test_lora_steps_lower_the_loss_and_change_only_adapters(which, tiny_t5, tiny_llama):
    folder = {"t5": tiny_t5, "llama": tiny_llama}[which]
    torch.manual_seed(0)
    lamp_model = lamp_model_for(folder)
    model = add_lora(lamp_model.model, seq2seq=lamp_model.is_seq2seq, r=4, alpha=8, dropout=0.0,
                     target_modules=None)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    features = training_features(lamp_model, EXAMPLES, max_length=64, target_max_length=16)
    batch = PaddingCollator(lamp_model.tokenizer.pad_token_id)(features)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0] - 0.1
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora_" in name for name in changed)
    assert any("lora_A" in name for name in changed) and any("lora_B" in name for name in changed)


def test_contiguous_slices_cover_everything_once():
    for n in (0, 1, 5, 12):
        for world in (1, 2, 3):
            covered = [i for r in range(world) for i in range(n)[contiguous_slice(n, r, world)]]
            assert covered == list(range(n))


def common_args(tmp_path, model, train, valid, task, *extra):
    return ["--train_data", train, "--validation_data", valid, "--model_name", str(model),
            "--task", task, "--output_dir", str(tmp_path / "out"), "--per_device_batch_size", "4",
            "--generation_max_length", "4", "--generation_num_beams", "1", "--device", "cpu",
            "--learning_rate", "1e-3", "--logging_steps", "1", *extra]


def test_train_writes_adapter_predictions_and_scores(tmp_path, tiny_llama):
    train = merged_sample(tmp_path, 7, "train", 8)
    valid = merged_sample(tmp_path, 7, "dev", 4)
    test = str(SAMPLE / "LaMP_7" / "test_questions.json")
    results = train_llm.main(common_args(tmp_path, tiny_llama, train, valid, "LaMP-7",
                                         "--test_data", test, "--use_profile", "--is_ranked",
                                         "--num_retrieved", "1", "--chat_template",
                                         "--num_train_epochs", "1", "--max_length", "96"))
    out = tmp_path / "out"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json",
                 "args.json", "predictions.json", "test_predictions.json",
                 "results_output.json"):
        assert (out / name).exists(), name
    predictions = load_outputs(out / "predictions.json")
    assert predictions.task is get_task("LaMP-7") and len(predictions) == 4
    assert len(load_outputs(out / "test_predictions.json")) == 12
    # The written predictions score with the evaluator, to the same values.
    golds = tmp_path / "golds.json"
    golds.write_text(json.dumps({"task": "LaMP_7", "golds": [
        {"id": q["id"], "output": q["output"]} for q in json.loads(open(valid).read())]}))
    scored = load_script("eval/eval_task.py").main([
        "--golds_json", str(golds), "--preds_json", str(out / "predictions.json"),
        "--task_name", "LaMP_7", "--output_file", str(tmp_path / "scores.json")])
    assert scored["rouge-1"] == pytest.approx(results["validation"]["rouge-1"])
    saved = json.loads((out / "args.json").read_text())
    assert saved["task"] == "LaMP-7" and saved["peft"] == "lora"
    # The adapter is standard peft: it loads on the base model.
    from peft import PeftModel

    base, _ = load_pretrained(str(tiny_llama))
    assert isinstance(PeftModel.from_pretrained(base, str(out)), PeftModel)


class ScriptedEvaluations:
    """Replaces generation during evaluation with a fixed prediction per evaluation."""

    def __init__(self, answers_per_call):
        self.answers_per_call = list(answers_per_call)
        self.calls = 0

    def __call__(self, trainer, examples):
        answer = self.answers_per_call[min(self.calls, len(self.answers_per_call) - 1)]
        self.calls += 1
        return [answer] * len(examples)


@pytest.mark.parametrize("task, answers, best_step", [
    # LaMP-3's MAE: lower is better. Golds of the first 4 dev questions are scored against a
    # constant answer; the evaluation at step 2 answers with the value nearest to all golds.
    ("LaMP-3", None, None),
    # ROUGE-1: higher is better; step 2's answer is the only one that overlaps the golds.
    ("LaMP-7", ["zzz", "GOLD", "yyy"], 2),
])
def test_best_checkpoint_follows_the_metric_direction(tmp_path, tiny_t5, monkeypatch, task,
                                                      answers, best_step):
    number = int(task[-1])
    train = merged_sample(tmp_path, number, "train", 8)
    valid = merged_sample(tmp_path, number, "dev", 4)
    golds = [q["output"] for q in json.loads(open(valid).read())]
    if task == "LaMP-3":
        numbers = sorted(int(g) for g in golds)
        median = numbers[len(numbers) // 2]
        far = 1 if median >= 3 else 5
        answers, best_step = [str(far), str(median), str(far)], 2
    else:
        answers = [golds[0] if a == "GOLD" else a for a in answers]
    from LaMP.utils.modeling.training import GenerationEvalTrainer

    scripted = ScriptedEvaluations(answers)
    monkeypatch.setattr(GenerationEvalTrainer, "generate_texts",
                        lambda self, examples: scripted(self, examples))
    results = train_llm.main(common_args(tmp_path, tiny_t5, train, valid, task,
                                         "--max_steps", "3", "--eval_steps", "1",
                                         "--save_total_limit", "5"))
    assert results["best_checkpoint"].endswith(f"checkpoint-{best_step}")
    history = [entry["step"] for entry in results["eval_history"]]
    assert history == [1, 2, 3]
    # The predictions written are those of the best evaluation, not of the last one.
    written = load_outputs(tmp_path / "out" / "predictions.json")
    assert set(written.outputs.values()) == {answers[best_step - 1]}


def test_resume_from_last_checkpoint_continues(tmp_path, tiny_t5):
    train = merged_sample(tmp_path, 7, "train", 8)
    valid = merged_sample(tmp_path, 7, "dev", 2)
    first = train_llm.main(common_args(tmp_path, tiny_t5, train, valid, "LaMP-7",
                                       "--max_steps", "2", "--eval_steps", "2"))
    assert first["global_step"] == 2
    resumed = train_llm.main(common_args(tmp_path, tiny_t5, train, valid, "LaMP-7",
                                         "--max_steps", "4", "--eval_steps", "2",
                                         "--resume_from_checkpoint", "last"))
    assert resumed["global_step"] == 4
    steps = [entry["step"] for entry in resumed["eval_history"]]
    assert steps == [2, 4]  # the history of the first run carries over; training went on


def test_user_errors_stop_before_loading(tmp_path, tiny_t5, monkeypatch):
    valid = merged_sample(tmp_path, 3, "dev", 2)
    with pytest.raises(LampError, match="--train_data"):
        train_llm.main(["--train_data", str(tmp_path / "missing.json"), "--validation_data",
                        valid, "--model_name", "none", "--task", "LaMP-3",
                        "--output_dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        train_llm.main(["--train_data", valid, "--validation_data", valid, "--model_name",
                        "none", "--task", "LaMP-9", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit):  # label scoring needs labels
        train_llm.main(["--train_data", valid, "--validation_data", valid, "--model_name",
                        "none", "--task", "LaMP-7", "--output_dir", str(tmp_path / "o"),
                        "--label_scoring"])
    bad_golds = json.loads(open(valid).read())
    bad_golds[1]["output"] = "five"
    bad_golds_path = tmp_path / "bad.json"
    bad_golds_path.write_text(json.dumps(bad_golds))
    for extra, message in ((["--lr_scheduler_type", "cosin"], "training arguments"),
                           (["--device", "cuda:1"], "CUDA_VISIBLE_DEVICES")):
        with pytest.raises(LampError, match=message):
            train_llm.main(["--train_data", valid, "--validation_data", valid, "--model_name",
                            "none", "--task", "LaMP-3", "--output_dir", str(tmp_path / "o"),
                            *extra])
    # Data mistakes are found while the examples are built, with the tokenizer only: before
    # the weights load (and so before any training epoch).
    import LaMP.utils.modeling.model as model_module

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded before the data was checked")

    for name in ("load_model", "load_model_and_tokenizer", "load_pretrained"):
        monkeypatch.setattr(model_module, name, no_weights)
    duplicate = json.loads(open(valid).read())
    duplicate[1]["id"] = duplicate[0]["id"]
    duplicate_path = tmp_path / "duplicate.json"
    duplicate_path.write_text(json.dumps(duplicate))
    for data, message in ((bad_golds_path, "not numbers"),
                          (duplicate_path, "duplicate question ids")):
        for flags in (["--train_data", str(data), "--validation_data", valid],
                      ["--train_data", valid, "--validation_data", str(data)]):
            with pytest.raises(LampError, match=message):
                train_llm.main([*flags, "--model_name", str(tiny_t5), "--task", "LaMP-3",
                                "--output_dir", str(tmp_path / "o")])
    with pytest.raises(LampError, match="checkpoint"):
        train_llm.main(["--train_data", valid, "--validation_data", valid, "--model_name",
                        "none", "--task", "LaMP-3", "--output_dir", str(tmp_path / "o"),
                        "--resume_from_checkpoint", str(tmp_path / "nope")])
    assert not (tmp_path / "o").exists()


def with_duplicate_ids(source: str, path: Path) -> str:
    questions = json.loads(Path(source).read_text())
    questions[1]["id"] = questions[0]["id"]
    if questions[2]["id"].isdigit():  # an integer id equals its decimal text
        questions[3]["id"] = int(questions[2]["id"])
        questions[2]["id"] = str(questions[2]["id"])
    write_json(path, questions)
    return str(path)


@pytest.mark.parametrize("which", ["--train_data", "--validation_data", "--test_data"])
def test_duplicate_ids_in_training_data_stop_before_loading(tmp_path, no_weight_loads, tiny_t5,
                                                            which):
    # Found while the examples are built with the tokenizer alone: the weights never load.
    good = merged_sample(tmp_path, 3, "dev", 4)
    bad = with_duplicate_ids(good, tmp_path / "dup.json")
    first = json.loads(Path(good).read_text())[0]["id"]
    argv = common_args(tmp_path, str(tiny_t5), good, good, "LaMP-3", "--test_data", good)
    argv[argv.index(which) + 1] = bad
    with pytest.raises(LampError) as raised:
        train_llm.main(argv)
    assert str(raised.value).startswith(f"{bad}: duplicate question ids: ")
    assert first in str(raised.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_torchrun_two_processes_write_one_set_of_outputs(tmp_path, tiny_t5):
    train = merged_sample(tmp_path, 7, "train", 8)
    valid = merged_sample(tmp_path, 7, "dev", 5)  # odd: the two slices differ in size
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", "29531", str(REPO / "LaMP" / "train_llm.py"),
               *common_args(tmp_path, tiny_t5, train, valid, "LaMP-7", "--max_steps", "2")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "out"
    predictions = load_outputs(out / "predictions.json")
    assert list(predictions.outputs) == [q["id"] for q in json.loads(open(valid).read())]
    results = json.loads((out / "results_output.json").read_text())
    assert results["validation"]["count"] == 5 and results["global_step"] == 2
    assert (out / "adapter_model.safetensors").exists()
    assert not list(out.glob(".*.tmp"))  # no second writer left a half-written file


def test_training_data_is_read_once_so_pipes_work(tmp_path, tiny_t5):
    """train_llm.py builds its examples in one read of each file (before the weights load),
    so its data may come from pipes, e.g. --train_data <(zcat train.json.gz)."""
    from test_jsoninput import fifo

    train = Path(merged_sample(tmp_path, 3, "train", 4)).read_bytes()
    valid = Path(merged_sample(tmp_path, 3, "dev", 2)).read_bytes()
    with fifo(tmp_path / "train.pipe", train) as train_pipe, \
            fifo(tmp_path / "valid.pipe", valid) as valid_pipe:
        results = train_llm.main(common_args(tmp_path, tiny_t5, str(train_pipe), str(valid_pipe),
                                             "LaMP-3", "--max_steps", "1"))
    assert results["validation"]["count"] == 2 and results["global_step"] == 1


def test_overwrite_removes_old_checkpoints_only_once_everything_before_training_worked(
        tmp_path, tiny_t5):
    from LaMP.utils.errors import LampError

    train = merged_sample(tmp_path, 3, "train", 4)
    valid = merged_sample(tmp_path, 3, "dev", 2)
    old = tmp_path / "out" / "checkpoints" / "checkpoint-7"
    old.mkdir(parents=True)
    (old / "trainer_state.json").write_text("{}")
    duplicate = json.loads(Path(valid).read_text())
    duplicate[1]["id"] = duplicate[0]["id"]
    bad_valid = tmp_path / "dup.json"
    bad_valid.write_text(json.dumps(duplicate))
    for data, extra, message in ((str(bad_valid), [], "duplicate question ids"),
                                 (valid, ["--lora_target_modules", "no_such_layer"], "--peft")):
        with pytest.raises(LampError, match=message):
            train_llm.main(common_args(tmp_path, tiny_t5, train, data, "LaMP-3",
                                       "--overwrite_output_dir", "--max_steps", "1", *extra))
        assert (old / "trainer_state.json").exists()
    train_llm.main(common_args(tmp_path, tiny_t5, train, valid, "LaMP-3", "--overwrite_output_dir",
                               "--max_steps", "1"))
    assert not old.exists()


def test_the_defaults_are_the_published_ones():
    """The published training settings besides the recipe's (tests/test_recipes.py)."""
    args = train_llm.parse_args(["--train_data", "t.json", "--validation_data", "v.json",
                                 "--model_name", "m", "--task", "LaMP-7", "--output_dir", "out"])
    assert (args.max_length, args.generation_max_length, args.generation_num_beams,
            args.gradient_accumulation_steps, args.num_retrieved, args.seed) == (
        256, 128, 4, 1, 1, 42)
    assert (args.peft, args.input_truncation, args.prompt_budget) == ("lora", "share", "exact")
    assert (args.max_steps, args.eval_steps, args.save_total_limit, args.logging_steps) == (
        -1, None, 2, 10)


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused only where 4-bit cannot run")
def test_load_in_4bit_without_cuda_is_one_line_before_any_load(tmp_path, capsys, tiny_t5,
                                                               no_model_loads):
    from conftest import run_cli

    valid = merged_sample(tmp_path, 7, "dev", 2)
    status, lines = run_cli(train_llm.main, [
        "--train_data", valid, "--validation_data", valid, "--model_name", tiny_t5, "--task",
        "LaMP-7", "--output_dir", tmp_path / "o", "--load_in_4bit"], capsys)
    assert (status, lines) == (2, ["error: --load_in_4bit needs a CUDA GPU and the "
                                   "bitsandbytes package"])
    assert not (tmp_path / "o").exists()
    status, lines = run_cli(train_llm.main, [
        "--train_data", valid, "--validation_data", valid, "--model_name", tiny_t5, "--task",
        "LaMP-7", "--output_dir", tmp_path / "o", "--load_in_4bit", "--peft", "none"], capsys)
    assert status == 2 and lines[-1] == ("error: --load_in_4bit trains adapters on a frozen "
                                         "4-bit model: not with --peft none")
