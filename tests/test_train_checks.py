"""Training and model checks: seeds, hyper-parameters, damaged weights and checkpoints,
incompatible resumes and duplicate question ids, all reported as user errors before (or
instead of) a model load."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, load_script, write_json
from test_train_llm import common_args, merged_sample
from LaMP import evaluate_llm, rank_profiles, train_llm
from LaMP.utils.cli.program import seed_arg
from LaMP.utils.errors import LampError
from LaMP.utils.modeling import checkpoints
from LaMP.utils.seeds import MAX_SEED


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model, tokenizer or config load fails the test: errors must come first."""
    import LaMP.utils.modeling.model as modeling

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the user error was reported")

    for name in ("load_model", "load_model_and_tokenizer", "load_pretrained", "load_config",
                 "load_tokenizer"):
        monkeypatch.setattr(modeling, name, refuse)


@pytest.fixture
def no_weight_loads(monkeypatch):
    """Loading weights fails the test; the config and tokenizer may load (train_llm.py builds
    its examples, and so checks its data, with the tokenizer alone)."""
    import LaMP.utils.modeling.model as modeling

    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded before the user error was reported")

    for name in ("load_model", "load_model_and_tokenizer", "load_pretrained"):
        monkeypatch.setattr(modeling, name, refuse)


@pytest.fixture
def no_network(monkeypatch):
    """Every connection attempt (and name look-up) is recorded and refused."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


# -- --seed: one shared type --------------------------------------------------------------

def test_seed_type_takes_the_range_every_generator_accepts():
    assert seed_arg("0") == 0 and seed_arg(str(MAX_SEED)) == MAX_SEED == 2**32 - 1
    import argparse

    for bad in ("-1", str(2**32), "1.5", "seven", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            seed_arg(bad)


SEED_SCRIPTS = {
    "train_llm": lambda: train_llm.main,
    "evaluate_llm": lambda: evaluate_llm.main,
    "rank_profiles": lambda: rank_profiles.main,
    "eval_task": lambda: load_script("eval/eval_task.py").main,
    "eval_all": lambda: load_script("eval/eval_all.py").main,
    "compare": lambda: load_script("eval/compare.py").main,
    "demo": lambda: load_script("demo.py").main,
    "make_sample": lambda: load_script("data/make_sample.py").main,
    "collect_feedback": lambda: load_script("LaMP/collect_feedback.py").main,
    "train_retriever": lambda: load_script("LaMP/train_retriever.py").main,
    "train_selector": lambda: load_script("LaMP/train_selector.py").main,
}


@pytest.mark.parametrize("script", sorted(SEED_SCRIPTS))
@pytest.mark.parametrize("seed", ["-1", "-7", str(2**32), "4294967296000"])
def test_a_seed_out_of_range_is_a_usage_error_in_every_script(script, seed, capsys,
                                                                no_model_loads):
    with pytest.raises(SystemExit) as exited:
        SEED_SCRIPTS[script]()(["--seed", seed])
    assert exited.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith(f"error: argument --seed: {int(seed)} is outside 0 … {MAX_SEED}")


def test_a_negative_seed_from_the_command_line_has_no_traceback(tmp_path):
    valid = merged_sample(tmp_path, 7, "dev", 2)
    done = subprocess.run([sys.executable, str(REPO / "LaMP" / "train_llm.py"),
                           *common_args(tmp_path, "no/model", valid, valid, "LaMP-7",
                                        "--seed", "-1")],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "argument --seed: -1 is outside" in done.stderr
    assert not (tmp_path / "out").exists()


# -- hyper-parameters: checked while parsing ----------------------------------------------

BAD_TRAINING_NUMBERS = [
    ("--learning_rate", "-1"), ("--learning_rate", "0"), ("--learning_rate", "nan"),
    ("--learning_rate", "inf"), ("--weight_decay", "-0.1"), ("--weight_decay", "nan"),
    ("--num_train_epochs", "nan"), ("--num_train_epochs", "inf"), ("--num_train_epochs", "0"),
    ("--warmup_ratio", "-0.1"), ("--warmup_ratio", "1"), ("--warmup_ratio", "nan"),
    ("--lora_dropout", "1"), ("--lora_dropout", "-0.5"), ("--lora_dropout", "nan"),
    ("--lora_r", "0"), ("--lora_alpha", "-4"), ("--per_device_batch_size", "0"),
    ("--gradient_accumulation_steps", "0"), ("--eval_steps", "0"), ("--logging_steps", "0"),
    ("--save_total_limit", "0"), ("--max_steps", "0"), ("--max_steps", "-2"),
    ("--generation_max_length", "0"), ("--generation_num_beams", "0"),
    ("--max_length", "8"), ("--num_retrieved", "-1"),
]


@pytest.mark.parametrize("flag, value", BAD_TRAINING_NUMBERS)
def test_bad_training_numbers_stop_while_parsing(tmp_path, capsys, no_model_loads, flag,
                                                 value):
    valid = merged_sample(tmp_path, 7, "dev", 2)
    argv = common_args(tmp_path, "no/model", valid, valid, "LaMP-7", flag, value)
    with pytest.raises(SystemExit) as exited:
        train_llm.main(argv)
    assert exited.value.code == 2
    assert f"error: {flag}" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value", [
    ("--generation_max_length", "0"), ("--generation_num_beams", "0"),
    ("--per_device_batch_size", "0"), ("--max_length", "8"), ("--limit", "0"),
])
def test_bad_evaluation_numbers_stop_while_parsing(tmp_path, capsys, no_model_loads, flag,
                                                   value):
    valid = merged_sample(tmp_path, 7, "dev", 2)
    with pytest.raises(SystemExit) as exited:
        evaluate_llm.main(["--validation_data", valid, "--model_addr", "no/model", "--task",
                           "LaMP-7", "--output_dir", str(tmp_path / "out"), flag, value])
    assert exited.value.code == 2
    assert f"error: {flag}" in capsys.readouterr().err.strip().splitlines()[-1]


def test_good_numbers_still_parse(tmp_path):
    valid = merged_sample(tmp_path, 7, "dev", 2)
    args = train_llm.parse_args(common_args(
        tmp_path, "m", valid, valid, "LaMP-7", "--lora_dropout", "0", "--warmup_ratio", "0",
        "--weight_decay", "0", "--max_steps", "-1", "--seed", str(MAX_SEED)))
    assert args.lora_dropout == 0 and args.seed == MAX_SEED


# -- damaged or missing weights -----------------------------------------------------------

def write_safetensors(path: Path, tensors: dict[str, int]) -> Path:
    """A minimal safetensors file by hand: {name: number of float32 values}."""
    header, offset = {}, 0
    for name, count in tensors.items():
        header[name] = {"dtype": "F32", "shape": [count], "data_offsets": [offset,
                                                                          offset + 4 * count]}
        offset += 4 * count
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * offset)
    return path


def test_safetensors_header_check(tmp_path):
    good = write_safetensors(tmp_path / "good.safetensors", {"a": 3, "b": 5})
    assert checkpoints.safetensors_problem(good) is None
    data = good.read_bytes()
    cases = {"short": data[:5], "mid-header": data[:20], "mid-data": data[:-1],
             "empty": b"", "garbage": (6).to_bytes(8, "little") + b"{nope}",
             "huge length": (2**60).to_bytes(8, "little") + b"{}"}
    for name, content in cases.items():
        (tmp_path / "bad.safetensors").write_bytes(content)
        problem = checkpoints.safetensors_problem(tmp_path / "bad.safetensors")
        assert problem and ("truncated" in problem or "damaged" in problem), name


def test_real_safetensors_pass_and_cut_ones_fail(tmp_path, tiny_t5):
    weights = tiny_t5 / "model.safetensors"
    assert checkpoints.safetensors_problem(weights) is None
    cut = tmp_path / "model.safetensors"
    cut.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    assert "truncated" in checkpoints.safetensors_problem(cut)


def damaged_copy(model: Path, tmp_path: Path, damage: str) -> Path:
    folder = tmp_path / f"model-{damage}"
    shutil.copytree(model, folder)
    weights = folder / "model.safetensors"
    if damage == "missing":
        weights.unlink()
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    return folder


@pytest.mark.parametrize("damage, message", [("missing", "no weights"),
                                             ("truncated", "model.safetensors is truncated")])
def test_a_damaged_local_model_is_one_error_and_no_hub_call(tmp_path, tiny_t5, no_network,
                                                            damage, message):
    from LaMP.utils.modeling.model import load_model

    folder = damaged_copy(tiny_t5, tmp_path, damage)
    with pytest.raises(LampError, match=message) as raised:
        load_model(str(folder), device="cpu")
    assert str(folder) in str(raised.value)
    assert no_network == []


def test_a_damaged_model_stops_evaluate_llm_before_loading(tmp_path, tiny_t5, no_model_loads):
    folder = damaged_copy(tiny_t5, tmp_path, "truncated")
    valid = merged_sample(tmp_path, 7, "dev", 2)
    with pytest.raises(LampError, match=r"--model_addr .*model.safetensors is truncated"):
        evaluate_llm.main(["--validation_data", valid, "--model_addr", str(folder), "--task",
                           "LaMP-7", "--output_dir", str(tmp_path / "out")])
    with pytest.raises(LampError, match=r"--model_name .*model.safetensors is truncated"):
        train_llm.main(common_args(tmp_path, folder, valid, valid, "LaMP-7"))
    assert not (tmp_path / "out").exists()


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("damage, message", [
    ("cut config", "cannot load model"),
    ("cut tokenizer", "cannot load the tokenizer"),
    ("other shapes", "cannot load the weights"),
])
def test_a_model_folder_that_does_not_load_is_one_error(tmp_path, tiny_llama, no_network,
                                                        damage, message):
    from LaMP.utils.modeling.model import load_model

    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    if damage == "cut config":
        (folder / "config.json").write_text((folder / "config.json").read_text()[:30])
    elif damage == "cut tokenizer":
        (folder / "tokenizer.json").write_text((folder / "tokenizer.json").read_text()[:50])
    else:  # the weights of another model size under this config
        edit_json(folder / "config.json", hidden_size=64, intermediate_size=128)
    with pytest.raises(LampError, match=message) as raised:
        load_model(str(folder), device="cpu")
    assert str(folder) in str(raised.value) and "\n" not in str(raised.value)
    assert no_network == []


@pytest.fixture(scope="module")
def tiny_adapter(tiny_llama, tmp_path_factory) -> Path:
    from LaMP.utils.modeling.model import load_pretrained
    from LaMP.utils.modeling.training import add_lora

    model, _ = load_pretrained(str(tiny_llama))
    folder = tmp_path_factory.mktemp("adapter")
    add_lora(model, seq2seq=False, r=4, alpha=8, dropout=0.0,
             target_modules=None).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("offline", ["0", "1"])
@pytest.mark.parametrize("damage, message", [
    ("no weights", "no weights (adapter_model.safetensors or adapter_model.bin)"),
    ("truncated", "adapter_model.safetensors is truncated"),
    ("cut config", "adapter_config.json is not valid JSON"),
])
def test_a_damaged_adapter_is_one_error_and_no_hub_call(tmp_path, tiny_llama, tiny_adapter,
                                                        no_network, monkeypatch, offline,
                                                        damage, message):
    import huggingface_hub.constants

    from LaMP.utils.modeling.model import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline == "1")
    folder = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, folder)
    weights = folder / "adapter_model.safetensors"
    if damage == "no weights":
        weights.unlink()
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:weights.stat().st_size - 10])
    else:
        config = folder / "adapter_config.json"
        config.write_text(config.read_text()[:40])
    with pytest.raises(LampError) as raised:
        load_model(str(tiny_llama), device="cpu", adapter=str(folder))
    assert str(raised.value).startswith(f"--adapter {folder}: {message}")
    assert no_network == []


def test_a_whole_adapter_loads_without_any_network(tiny_llama, tiny_adapter, no_network):
    from peft import PeftModel

    from LaMP.utils.modeling.model import load_model

    lamp_model = load_model(str(tiny_llama), device="cpu", adapter=str(tiny_adapter))
    assert isinstance(lamp_model.model, PeftModel)
    assert no_network == []


def test_a_whole_model_given_as_adapter_says_so(tiny_t5):
    with pytest.raises(LampError, match="no adapter_config.json .*whole model"):
        checkpoints.check_adapter_folder(str(tiny_t5))


def test_an_adapter_of_another_model_is_one_error(tiny_t5, tiny_adapter, no_network):
    from LaMP.utils.modeling.model import load_model

    with pytest.raises(LampError, match=f"cannot load adapter {tiny_adapter} onto {tiny_t5}"):
        load_model(str(tiny_t5), device="cpu", adapter=str(tiny_adapter))
    assert no_network == []


def test_evaluate_llm_checks_the_adapter_before_loading(tmp_path, tiny_adapter, no_model_loads):
    folder = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, folder)
    (folder / "adapter_model.safetensors").unlink()
    valid = merged_sample(tmp_path, 7, "dev", 2)
    with pytest.raises(LampError, match="no weights"):
        evaluate_llm.main(["--validation_data", valid, "--model_addr", "no/model", "--task",
                           "LaMP-7", "--output_dir", str(tmp_path / "out"), "--adapter",
                           str(folder)])


def test_sharded_weights_are_checked_shard_by_shard(tmp_path):
    write_safetensors(tmp_path / "model-1.safetensors", {"a": 2})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}))
    assert "model-2.safetensors listed" in checkpoints.weights_problem(
        tmp_path, checkpoints.MODEL_WEIGHTS)
    write_safetensors(tmp_path / "model-2.safetensors", {"b": 2})
    assert checkpoints.weights_problem(tmp_path, checkpoints.MODEL_WEIGHTS) is None


def test_a_cut_torch_file_is_found(tmp_path):
    import torch

    torch.save({"w": torch.zeros(100)}, tmp_path / "pytorch_model.bin")
    assert checkpoints.weights_problem(tmp_path, checkpoints.MODEL_WEIGHTS) is None
    data = (tmp_path / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[:len(data) // 2])
    assert "truncated" in checkpoints.weights_problem(tmp_path, checkpoints.MODEL_WEIGHTS)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert "empty" in checkpoints.weights_problem(tmp_path, checkpoints.MODEL_WEIGHTS)


# -- checkpoints: `last` means the newest complete one ------------------------------------

def fake_checkpoint(folder: Path, *, state=True, weights=True, adapter=True) -> Path:
    folder.mkdir(parents=True)
    if adapter:
        (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    if weights:
        write_safetensors(folder / ("adapter_model.safetensors" if adapter
                                    else "model.safetensors"), {"w": 4})
    if state:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    return folder


def test_last_skips_incomplete_checkpoints_and_says_why(tmp_path, caplog):
    fake_checkpoint(tmp_path / "checkpoint-2")
    fake_checkpoint(tmp_path / "checkpoint-10", adapter=False)  # 10 > 2 (not by name)
    fake_checkpoint(tmp_path / "checkpoint-11", state=False)
    cut_state = fake_checkpoint(tmp_path / "checkpoint-12")
    (cut_state / "trainer_state.json").write_text('{"global_st')
    cut_weights = fake_checkpoint(tmp_path / "checkpoint-13")
    weights = cut_weights / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-2])
    fake_checkpoint(tmp_path / "checkpoint-14", weights=False)
    (tmp_path / "checkpoint-15").mkdir()
    import torch

    cut_optimizer = fake_checkpoint(tmp_path / "checkpoint-16")
    torch.save({"state": torch.zeros(64)}, cut_optimizer / "optimizer.pt")
    data = (cut_optimizer / "optimizer.pt").read_bytes()
    (cut_optimizer / "optimizer.pt").write_bytes(data[:len(data) // 2])
    (tmp_path / "checkpoint-99.json").write_text("{}")  # not a folder: not a checkpoint
    with caplog.at_level(logging.WARNING):
        assert checkpoints.last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    skipped = {record.getMessage().split(":")[0].split()[-1]: record.getMessage()
               for record in caplog.records if "skipping" in record.getMessage()}
    assert sorted(Path(name).name for name in skipped) == [
        f"checkpoint-{n}" for n in (11, 12, 13, 14, 15, 16)]
    reasons = " ".join(skipped.values())
    for reason in ("no trainer_state.json", "trainer_state.json is not valid JSON",
                   "adapter_model.safetensors is truncated", "no weights",
                   "optimizer.pt is truncated"):
        assert reason in reasons


def test_no_complete_checkpoint_is_one_error(tmp_path):
    with pytest.raises(LampError, match="no checkpoint in"):
        checkpoints.last_complete_checkpoint(tmp_path / "missing")
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(LampError, match=r"no complete checkpoint .*\(incomplete: checkpoint-3\)"):
        checkpoints.last_complete_checkpoint(tmp_path)


def test_an_explicit_incomplete_checkpoint_is_one_error_before_loading(tmp_path,
                                                                        no_model_loads):
    valid = merged_sample(tmp_path, 7, "dev", 2)
    broken = fake_checkpoint(tmp_path / "checkpoint-5", state=False)
    with pytest.raises(LampError) as raised:
        train_llm.main(common_args(tmp_path, "no/model", valid, valid, "LaMP-7",
                                   "--resume_from_checkpoint", str(broken)))
    assert str(raised.value) == (f"--resume_from_checkpoint {broken}: incomplete checkpoint "
                                 "(no trainer_state.json); pass an older one or 'last'")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_t5):
    """A finished 2-step LoRA run on LaMP-7 (r 4, alpha 8) with a checkpoint at each step."""
    tmp_path = tmp_path_factory.mktemp("trained")
    train = merged_sample(tmp_path, 7, "train", 8)
    valid = merged_sample(tmp_path, 7, "dev", 2)
    argv = common_args(tmp_path, tiny_t5, train, valid, "LaMP-7", "--max_steps", "2",
                       "--eval_steps", "1", "--save_total_limit", "5", "--lora_r", "4",
                       "--lora_alpha", "8")
    train_llm.main(argv)
    return tmp_path, argv


def copied_run(trained_run, tmp_path) -> list[str]:
    """The trained run's output folder copied to ``tmp_path``, and its argv pointed there."""
    source, argv = trained_run
    shutil.copytree(source / "out", tmp_path / "out")
    argv = list(argv)
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "out")
    return argv


def replace_flag(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    return argv


def test_resume_skips_the_checkpoint_a_kill_left_incomplete(trained_run, tmp_path, capsys):
    argv = copied_run(trained_run, tmp_path)
    checkpoint_dir = tmp_path / "out" / "checkpoints"
    # What a kill during the step-3 save leaves: weights cut short, no trainer state yet.
    half = checkpoint_dir / "checkpoint-3"
    shutil.copytree(checkpoint_dir / "checkpoint-2", half)
    (half / "trainer_state.json").unlink()
    weights = half / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 3])
    (checkpoint_dir / "checkpoint-4").mkdir()  # killed right after the folder was made
    capsys.readouterr()
    resumed = train_llm.main(replace_flag(argv, "--max_steps", "3")
                             + ["--resume_from_checkpoint", "last"])
    assert resumed["global_step"] == 3
    assert [entry["step"] for entry in resumed["eval_history"]] == [1, 2, 3]
    # main() configures logging itself, so the warnings are read from stderr.
    messages = [line for line in capsys.readouterr().err.splitlines() if "skipping" in line]
    assert len(messages) == 2
    assert "checkpoint-4: incomplete (no trainer_state.json)" in messages[0]
    assert "checkpoint-3: incomplete (no trainer_state.json)" in messages[1]
    assert checkpoints.checkpoint_problem(half) is None  # step 3 was saved again, whole


@pytest.mark.parametrize("flag, value, message", [
    ("--lora_r", "8", "--lora_r 4 (now: 8)"),
    ("--lora_alpha", "16", "--lora_alpha 8 (now: 16)"),
    ("--peft", "none", "--peft lora (now: none)"),
    # the run named no modules; the adapter records those peft chose for T5
    ("--lora_target_modules", "k", "--lora_target_modules q v (now: k)"),
])
def test_an_incompatible_resume_names_the_flags_before_loading(trained_run, tmp_path,
                                                                no_model_loads, flag, value,
                                                                message):
    argv = copied_run(trained_run, tmp_path)
    with pytest.raises(LampError) as raised:
        train_llm.main(replace_flag(argv, flag, value) + ["--resume_from_checkpoint", "last"])
    assert str(raised.value).startswith("--resume_from_checkpoint ")
    assert message in str(raised.value)
    assert "was trained with other flags" in str(raised.value)


def test_naming_the_modules_peft_chose_is_the_same_adapter(trained_run):
    source, argv = trained_run
    checkpoint = source / "out" / "checkpoints" / "checkpoint-2"
    now = vars(train_llm.parse_args(argv + ["--lora_target_modules", "v", "q"]))
    assert checkpoints.resume_differences(checkpoint, now) == []


def test_another_model_or_task_is_caught_too(trained_run, tmp_path, tiny_llama,
                                             no_model_loads):
    argv = copied_run(trained_run, tmp_path)
    with pytest.raises(LampError, match=f"--model_name .* \\(now: {tiny_llama}\\)"):
        train_llm.main(replace_flag(argv, "--model_name", str(tiny_llama))
                       + ["--resume_from_checkpoint", "last"])
    lamp5 = merged_sample(tmp_path, 5, "dev", 2)
    other_task = replace_flag(replace_flag(replace_flag(argv, "--task", "LaMP_5"),
                                           "--train_data", lamp5), "--validation_data", lamp5)
    with pytest.raises(LampError, match=r"--task LaMP-7 \(now: LaMP-5\)"):
        train_llm.main(other_task + ["--resume_from_checkpoint", "last"])


def test_the_adapter_config_alone_still_catches_a_changed_shape(trained_run, tmp_path,
                                                                 no_model_loads):
    # A run killed before it finished has no args.json; old checkpoints have no saved flags.
    argv = copied_run(trained_run, tmp_path)
    (tmp_path / "out" / "args.json").unlink()
    for folder in (tmp_path / "out" / "checkpoints").iterdir():
        (folder / checkpoints.RUN_ARGS).unlink()
    with pytest.raises(LampError, match=r"--lora_r 4 \(now: 8\); --lora_alpha 8 \(now: 32\)"):
        train_llm.main(replace_flag(replace_flag(argv, "--lora_r", "8"), "--lora_alpha", "32")
                       + ["--resume_from_checkpoint", "last"])


def test_an_explicit_checkpoint_is_checked_against_its_own_run(trained_run, tmp_path,
                                                                no_model_loads):
    # No flags saved in the checkpoint: those of the run it belongs to still count, even
    # when this run writes elsewhere.
    argv = copied_run(trained_run, tmp_path)
    checkpoint = tmp_path / "out" / "checkpoints" / "checkpoint-2"
    (checkpoint / checkpoints.RUN_ARGS).unlink()
    lamp5 = merged_sample(tmp_path, 5, "dev", 2)
    other = replace_flag(replace_flag(replace_flag(replace_flag(
        argv, "--task", "LaMP-5"), "--train_data", lamp5), "--validation_data", lamp5),
        "--output_dir", str(tmp_path / "elsewhere"))
    with pytest.raises(LampError, match=r"--task LaMP-7 \(now: LaMP-5\)"):
        train_llm.main(other + ["--resume_from_checkpoint", str(checkpoint)])


def test_a_full_fine_tune_checkpoint_refuses_a_lora_resume(tmp_path):
    folder = fake_checkpoint(tmp_path / "checkpoint-1", adapter=False)
    assert checkpoints.resume_differences(folder, {"peft": "lora", "lora_r": 8}) == [
        "--peft none (now: lora)"]
    assert checkpoints.resume_differences(folder, {"peft": "none", "lora_r": 8}) == []


def test_the_same_folder_spelled_differently_is_the_same_model(tmp_path, tiny_t5):
    folder = fake_checkpoint(tmp_path / "checkpoint-1")
    (folder / checkpoints.RUN_ARGS).write_text(json.dumps({"model_name": str(tiny_t5)}))
    same = {"peft": "lora", "lora_r": 4, "lora_alpha": 8, "model_name": f"{tiny_t5}/"}
    assert checkpoints.resume_differences(folder, same) == []


SLOW_SAVE = """
import sys, time
from transformers import Trainer
from LaMP import train_llm
from LaMP.utils.cli.program import run

save_rng_state = Trainer._save_rng_state


def slow_second_save(self, output_dir):
    # The weights and optimizer of step 2 are on disk, its trainer state is not yet: the
    # test kills the process here, as a kill mid-save would.
    save_rng_state(self, output_dir)
    if self.state.global_step == 2:
        time.sleep(600)


Trainer._save_rng_state = slow_second_save
sys.exit(run(train_llm.main, sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_real_sigkill_during_a_save_then_resume_last(tmp_path, tiny_t5, capsys):
    train = merged_sample(tmp_path, 7, "train", 8)
    valid = merged_sample(tmp_path, 7, "dev", 2)
    argv = common_args(tmp_path, tiny_t5, train, valid, "LaMP-7", "--max_steps", "3",
                       "--eval_steps", "1", "--save_total_limit", "5")
    checkpoint_dir = tmp_path / "out" / "checkpoints"
    second = checkpoint_dir / "checkpoint-2"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, *argv], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # Watch the folder: kill once step 2's weights are written and its state is not.
        deadline = time.monotonic() + 600
        while not (second / "adapter_model.safetensors").exists():
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "checkpoint-2 never appeared"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    assert checkpoints.checkpoint_problem(second) == "no trainer_state.json"
    assert checkpoints.checkpoint_problem(checkpoint_dir / "checkpoint-1") is None
    capsys.readouterr()
    resumed = train_llm.main(argv + ["--resume_from_checkpoint", "last"])
    assert resumed["global_step"] == 3
    # Evaluations 2 and 3 happened after the resume from step 1.
    assert [entry["step"] for entry in resumed["eval_history"]] == [1, 2, 3]
    assert "checkpoint-2: incomplete (no trainer_state.json)" in capsys.readouterr().err
    assert checkpoints.checkpoint_problem(second) is None  # saved again, whole this time


# -- duplicate question ids ---------------------------------------------------------------

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


def test_a_hostile_adapter_config_is_one_error_not_a_recursion_error(tmp_path):
    """Config files in model/adapter/checkpoint folders go through the guarded JSON reader."""
    from LaMP.utils.modeling.checkpoints import check_adapter_folder, checkpoint_problem

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(LampError, match="adapter_config.json is not valid JSON"):
        check_adapter_folder(adapter)
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text('{"a": ' * 70 + "1" + "}" * 70)
    assert "trainer_state.json is not valid JSON" in checkpoint_problem(checkpoint)
