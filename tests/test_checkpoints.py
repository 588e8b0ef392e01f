"""The checks of model, adapter and checkpoint folders (LaMP/utils/modeling/checkpoints.py):
damaged or missing weights and hostile configs are one user error before (or instead of) a
model load and without a hub call; ``--resume_from_checkpoint last`` takes the newest complete
checkpoint; a resume whose flags differ from the run's is refused, naming them."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, edited_adapter, listing, run_cli, write_json
from test_train_llm import common_args, merged_sample
from LaMP import evaluate_llm, train_llm
from LaMP.utils.errors import LampError
from LaMP.utils.modeling import checkpoints


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


# -- adapters -------------------------------------------------------------------------------

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


def test_a_whole_model_given_as_adapter_says_so(tiny_t5):
    with pytest.raises(LampError, match="no adapter_config.json .*whole model"):
        checkpoints.check_adapter_folder(str(tiny_t5))


def test_evaluate_llm_checks_the_adapter_before_loading(tmp_path, tiny_adapter, no_model_loads):
    folder = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, folder)
    (folder / "adapter_model.safetensors").unlink()
    valid = merged_sample(tmp_path, 7, "dev", 2)
    with pytest.raises(LampError, match="no weights"):
        evaluate_llm.main(["--validation_data", valid, "--model_addr", "no/model", "--task",
                           "LaMP-7", "--output_dir", str(tmp_path / "out"), "--adapter",
                           str(folder)])


@pytest.mark.parametrize("config, problem", [
    ([], "adapter_config.json is not a JSON object"),
    ({"peft_type": None}, "adapter_config.json: peft_type must be a string, not None"),
    ({"r": "x"}, "adapter_config.json: r must be a positive integer, not 'x'"),
    ({"r": True}, "adapter_config.json: r must be a positive integer, not True"),
    ({"lora_alpha": "big"}, "adapter_config.json: lora_alpha must be a number, not 'big'"),
    ({"lora_dropout": 2}, "adapter_config.json: lora_dropout must be a number in [0, 1), not 2"),
    ({"target_modules": 5},
     "adapter_config.json: target_modules must be a module name or a list of them, not 5"),
    ({"target_modules": ["q_proj", 3]},
     "adapter_config.json: target_modules must be a module name or a list of them, "
     "not ['q_proj', 3]"),
    ({"base_model_name_or_path": 7},
     "adapter_config.json: base_model_name_or_path must be a string, not 7"),
])
def test_a_wrongly_typed_adapter_config_is_one_line_before_any_load(tiny_llama, tiny_adapter,
                                                                     tmp_path, capsys,
                                                                     monkeypatch, config,
                                                                     problem):
    import LaMP.utils.modeling.model as modeling

    monkeypatch.setattr(modeling, "load_model_and_tokenizer", lambda *a, **k: pytest.fail(
        "the base model loaded before the adapter's config was checked"))
    folder = edited_adapter(tiny_adapter, tmp_path, config)
    data = write_json(tmp_path / "data.json", [])
    before = listing(folder)
    status, lines = run_cli(evaluate_llm.main, [
        "--validation_data", data, "--model_addr", tiny_llama, "--task", "LaMP-7",
        "--output_dir", tmp_path / "out", "--adapter", folder], capsys)
    assert status == 2
    assert lines == [f"error: --adapter {folder}: {problem}"]
    assert listing(folder) == before and not (tmp_path / "out").exists()


def test_a_checkpoint_with_a_hostile_adapter_config_is_incomplete(tiny_adapter, tmp_path):
    from LaMP.utils.modeling.checkpoints import checkpoint_problem

    folder = edited_adapter(tiny_adapter, tmp_path, {"r": "x"})
    (folder / "trainer_state.json").write_text("{}")
    assert checkpoint_problem(folder) == ("adapter_config.json: r must be a positive integer, "
                                          "not 'x'")


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


# -- a resume is checked against the flags of the run it continues ------------------------

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
    # A run killed before it finished has no args.json, and its checkpoints may have no saved
    # flags either.
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
