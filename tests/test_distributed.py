"""Data-parallel evaluation and sharded training under a launcher, on 2 CPU processes (gloo).

The launched runs must write exactly what one process writes (byte for byte), whatever the
split: generation and label scoring, a question count the processes do not divide evenly,
and fewer questions than processes (in the FSDP worker's run, plain and sharded).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SAMPLE
from LaMP import evaluate_llm
from LaMP.utils.devices import resolve_device
from LaMP.utils.errors import LampError
from LaMP.utils.modeling import distributed
from LaMP.utils.modeling.distributed import Launch, contiguous_slice, launch_from_env

pytestmark = pytest.mark.usefixtures("torch_single_thread")

OUTPUT_FILES = ["args.json", "predictions.json", "results_output.json"]


def merged(tmp_path: Path, task_number: int, count: int) -> Path:
    """The first ``count`` bundled dev questions with their gold outputs joined in."""
    folder = SAMPLE / f"LaMP_{task_number}"
    questions = json.loads((folder / "dev_questions.json").read_text())[:count]
    golds = {g["id"]: g["output"]
             for g in json.loads((folder / "dev_outputs.json").read_text())["golds"]}
    for question in questions:
        question["output"] = golds[question["id"]]
    path = tmp_path / f"LaMP_{task_number}_dev_{count}.json"
    path.write_text(json.dumps(questions))
    return path


@pytest.fixture(scope="module")
def opinionated_llama(tmp_path_factory) -> Path:
    """A tiny Llama whose label choice depends on the prompt. tiny_llama (0.02 initial
    scale) picks the same label for every question, which would hide a mix-up of the
    gathered slices, and its trained tokenizer differs from run to run; this one reads bytes
    (ByT5's fixed tokenizer) and draws its weights at a 0.3 scale from a fixed seed."""
    import torch
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("opinionated_llama")
    tokenizer = ByT5Tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id, initializer_range=0.3)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def eval_args(data: Path, model: Path, task: str, output_dir: Path, *extra: str) -> list[str]:
    return ["--validation_data", str(data), "--model_addr", str(model), "--task", task,
            "--output_dir", str(output_dir), "--use_profile", "--num_retrieved", "1",
            "--max_length", "96", "--generation_max_length", "4", "--generation_num_beams", "1",
            "--per_device_batch_size", "2", "--device", "cpu", *extra]


def free_port() -> int:
    """A loopback port no one listens on now (the system picks it), so that runs of this
    file side by side do not meet on one rendezvous port."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launched(script: str, args: list[str]) -> subprocess.CompletedProcess:
    """``script`` (a path in the repository) under torchrun with 2 CPU processes (gloo), on
    a free loopback port."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(port),
               str(REPO / script), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def assert_same_outputs(single: Path, parallel: Path) -> None:
    assert sorted(p.name for p in parallel.iterdir()) == OUTPUT_FILES  # nothing stray
    assert (parallel / "predictions.json").read_bytes() == (single / "predictions.json").read_bytes()
    one, two = (json.loads((d / "results_output.json").read_text()) for d in (single, parallel))
    one.pop("seconds"), two.pop("seconds")
    assert one == two


@pytest.mark.parametrize("task_number, count, model, extra", [
    (7, 5, "opinionated_llama", ()),                # generation, 5 = 3 + 2
    # label scoring, 5 = 3 + 2; room for the whole review in bytes
    (3, 5, "opinionated_llama", ("--label_scoring", "--max_length", "1024")),
], ids=["generate-uneven", "label-scoring-uneven"])  # one question: the worker test below
def test_two_processes_write_what_one_process_writes(tmp_path, request, task_number, count,
                                                    model, extra):
    # Every case answers more than one distinct text, so a mix-up of the slices shows.
    model_dir = request.getfixturevalue(model)
    data = merged(tmp_path, task_number, count)
    before = data.read_bytes()
    task = f"LaMP-{task_number}"
    evaluate_llm.main(eval_args(data, model_dir, task, tmp_path / "one", *extra))
    done = launched("LaMP/evaluate_llm.py",
                    eval_args(data, model_dir, task, tmp_path / "two", *extra))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_outputs(tmp_path / "one", tmp_path / "two")
    predictions = json.loads((tmp_path / "two" / "predictions.json").read_text())["golds"]
    assert [p["id"] for p in predictions] == [q["id"] for q in json.loads(before)]
    assert data.read_bytes() == before
    assert len({p["output"] for p in predictions}) > 1, "outputs must tell questions apart"


def test_only_the_main_process_writes(tmp_path, tiny_t5, monkeypatch):
    # Process 1 of 2, with the group and the gather stood in for: it answers its slice and
    # returns every prediction, but leaves the output folder to process 0.
    data = merged(tmp_path, 7, 3)
    monkeypatch.setattr(distributed, "launch_from_env", lambda: Launch(1, 2, 1))
    monkeypatch.setattr(distributed, "init_process_group", lambda launch, device: False)
    answered = []

    def gather(mine, launch):
        answered.extend(mine)
        return ["x"] * 2 + list(mine)

    monkeypatch.setattr("LaMP.utils.modeling.predict.gather_in_order", gather)
    out = evaluate_llm.main(eval_args(data, tiny_t5, "LaMP-7", tmp_path / "out"))
    assert len(answered) == 1  # 3 questions: process 0 takes 2, process 1 the last one
    assert out["predictions"] == ["x", "x", *answered] and out["results"] is None
    assert not (tmp_path / "out").exists()


def test_slices_are_contiguous_and_cover_each_item_once():
    for n in range(0, 9):
        for world in range(1, 5):
            slices = [range(n)[contiguous_slice(n, rank, world)] for rank in range(world)]
            assert [i for part in slices for i in part] == list(range(n))
            assert max(map(len, slices)) - min(map(len, slices)) <= 1


@pytest.mark.parametrize("env, expected", [
    ({}, Launch(0, 1, 0)),
    ({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}, Launch(3, 4, 1)),
    ({"WORLD_SIZE": "2", "RANK": "1"}, Launch(1, 2, 1)),  # LOCAL_RANK defaults to RANK
])
def test_launch_is_read_from_the_launcher_environment(monkeypatch, env, expected):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert launch_from_env() == expected


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not a number"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2, WORLD_SIZE=2"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
])
def test_a_broken_launcher_environment_is_one_error_line(monkeypatch, env, message):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(LampError, match=message):
        launch_from_env()


def test_launched_device_is_the_process_own():
    assert resolve_device("cpu", local_rank=1).type == "cpu"
    with pytest.raises(LampError, match="under a launcher use cpu or cuda"):
        resolve_device("cuda:1", local_rank=0)
    import torch

    if not torch.cuda.is_available():
        assert resolve_device(None, local_rank=1).type == "cpu"
        with pytest.raises(LampError, match="CUDA is not available"):
            resolve_device("cuda", local_rank=1)


def test_fsdp2_sharded_prediction_and_gathered_adapter(tmp_path, opinionated_llama, tiny_t5):
    # accelerate runs FSDP only on GPUs, so the sharding it would apply (FSDP2, one unit per
    # transformer layer plus the top) is applied here by hand, on 2 CPU processes.
    done = launched("tests/distributed_worker.py",
                    [str(tmp_path), str(opinionated_llama), str(tiny_t5)])
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "result.json").read_text())
    from safetensors.torch import load_file

    for model in (opinionated_llama, tiny_t5):
        result = results[model.name]
        assert result["ranks"] == [0, 1]
        # 3 questions over 2 processes whose every forward pass needs both: generation and
        # label scoring answer as the unsharded model does (no hang on the shorter slice).
        assert result["sharded"] == result["reference"]
        assert result["gathered_equals_unsharded"]
        # Fewer questions than processes, plain and sharded: process 1's slice is empty.
        first = {task: texts[:1] for task, texts in result["reference"].items()}
        assert result["one_question"] == {"plain": first, "sharded": first}
        saved = load_file(tmp_path / model.name / "adapter" / "adapter_model.safetensors")
        assert len(saved) == result["lora_tensors"] > 0  # the whole adapter, not a shard
    # The causal model's answers differ by question, so a mix-up of the slices would show.
    assert len(set(results[opinionated_llama.name]["reference"]["LaMP-5"])) == 3


def test_processes_that_did_not_form_a_group_are_one_error(monkeypatch, tmp_path):
    # accelerate launch with the FSDP config on a machine without GPUs: 2 processes, each
    # with a Trainer that sees only itself; both would train alone and both would write.
    from types import SimpleNamespace

    from LaMP import train_llm

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(LampError, match="started 2 processes but each trains alone"):
        train_llm.check_processes_joined(SimpleNamespace(world_size=1))
    train_llm.check_processes_joined(SimpleNamespace(world_size=2))  # a proper group passes


@pytest.mark.parametrize("name, kind", [("fsdp.yaml", "FSDP"), ("deepspeed_zero3.yaml",
                                                                 "DEEPSPEED")])
def test_shipped_accelerate_configs_load_as_intended(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "LaMP" / "configs" / "accelerate" / name))
    assert config.distributed_type == kind and config.num_machines == 1
    if kind == "FSDP":
        fsdp = config.fsdp_config
        assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    else:
        deepspeed = config.deepspeed_config
        assert deepspeed["zero_stage"] == 3 and deepspeed["zero3_save_16bit_model"] is True
        # Left to the Trainer ("auto"): a fixed value here would contradict train_llm's flags.
        assert "gradient_accumulation_steps" not in deepspeed


def test_a_world_size_without_a_launcher_is_one_error_line(monkeypatch):
    import torch

    for name in ("MASTER_ADDR", "MASTER_PORT"):  # what torchrun would have set
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(LampError, match="cannot join the 2 launched processes: .*MASTER_ADDR"):
        distributed.init_process_group(Launch(0, 2, 0), torch.device("cpu"))
