"""Run by tests/test_distributed.py under torchrun (2 CPU processes, gloo); not a test itself.

Shards a tiny LoRA model with FSDP2 (``fully_shard``, per transformer layer, as
configs/accelerate/fsdp.yaml asks accelerate to do on GPUs), predicts with
``predict_in_slices(sharded=True)`` and gathers the full state dict the way accelerate does
before saving. Process 0 writes ``result.json`` and ``<model>/adapter/`` into the folder it is given,
next to what the same model answers unsharded in one process.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py OUT MODEL...
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from LaMP.utils.modeling.distributed import (end_process_group, exit_process, gather_in_order,
                                             launch_from_env, synchronize)
from LaMP.utils.modeling.examples import Example
from LaMP.utils.modeling.model import LampModel, load_model_and_tokenizer
from LaMP.utils.modeling.predict import predict, predict_in_slices
from LaMP.utils.modeling.training import add_lora
from LaMP.utils.tasks import get_task

PROMPTS = [  # lengths differ, so the two processes' batches and answers differ too
    "the quick brown fox",
    "Generate a headline for the following article: new study finds that students who "
    "sleep more learn faster and remember better",
    "What is the score of the following review on a scale of 1 to 5? just answer with 1, "
    "2, 3, 4, or 5: the weather is nice today",
]
SETTINGS = dict(max_length=64, max_new_tokens=6, num_beams=1, batch_size=2, progress=False)


def answers(lamp_model, examples, predict_fn) -> dict:
    return {name: predict_fn(lamp_model, get_task(name), examples, label_scoring=scoring,
                             **SETTINGS)
            for name, scoring in (("LaMP-5", False), ("LaMP-3", True))}


def check(model_dir: str, out: Path, launch) -> dict:
    torch.manual_seed(0)  # the same LoRA weights in every process
    model, tokenizer, seq2seq = load_model_and_tokenizer(model_dir, dtype=torch.float32)
    model = add_lora(model, seq2seq=seq2seq, r=4, alpha=8, dropout=0.0, target_modules=None)
    with torch.no_grad():  # LoRA's B starts at zero; make the adapter change the answers
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    examples = [Example(id=str(i), prompt=p, target=None) for i, p in enumerate(PROMPTS)]
    lamp_model = LampModel(model=model, tokenizer=tokenizer, is_seq2seq=seq2seq,
                           device=torch.device("cpu"))
    reference = answers(lamp_model, examples, predict)
    # One question for two processes: the second answers nothing and still joins the gather.
    def in_slices(*args, **kwargs):
        return predict_in_slices(*args, launch, **kwargs)

    def in_shards(*args, **kwargs):
        return predict_in_slices(*args, launch, sharded=True, **kwargs)

    one_question = {"plain": answers(lamp_model, examples[:1], in_slices)}
    adapter_before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}

    # Transformer-layer wrap: the classes the model names as not to be split, then the top.
    layer_classes = set(model.get_base_model()._no_split_modules)
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module)
    fully_shard(model)
    assert type(next(model.parameters())).__name__ == "DTensor"
    with torch.no_grad():  # FSDP2 sets itself up in the first forward through the top
        model(**tokenizer(PROMPTS[0], return_tensors="pt"),  # module: training does that
              **({"decoder_input_ids": torch.zeros((1, 1), dtype=torch.long)} if seq2seq else {}))

    sharded = answers(lamp_model, examples, in_shards)
    one_question["sharded"] = answers(lamp_model, examples[:1], in_shards)
    # What accelerate's get_state_dict does for FSDP2 before train_llm.py saves.
    state_dict = get_model_state_dict(model, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True))
    ranks = gather_in_order([launch.rank], launch)
    if not launch.is_main:
        return {}
    model.save_pretrained(out / "adapter", state_dict=state_dict)
    same = all(torch.equal(state_dict[k], v) for k, v in adapter_before.items())
    return {"reference": reference, "sharded": sharded, "ranks": ranks,
            "one_question": one_question,
            "gathered_equals_unsharded": same, "lora_tensors": len(adapter_before)}


def main(out: str, *model_dirs: str) -> None:
    torch.set_num_threads(1)
    launch = launch_from_env()
    dist.init_process_group("gloo")
    results = {Path(m).name: check(m, Path(out) / Path(m).name, launch) for m in model_dirs}
    if launch.is_main:
        Path(out, "result.json").write_text(json.dumps(results))
    synchronize(True)  # no process leaves the group while another still talks to it
    end_process_group(True)


if __name__ == "__main__":
    main(*sys.argv[1:])
    exit_process(0)  # as the scripts end after a gloo group
