"""The throughput side of the training helpers (LaMP/utils/modeling/training.py): length-grouped
batches, bf16 autocast where native, batched evaluation, and the train_llm.py flags for them."""
from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import SAMPLE
from LaMP import train_llm
from LaMP.utils.errors import LampError
from LaMP.utils.modeling.examples import Example
from LaMP.utils.modeling.model import LampModel, load_pretrained, load_tokenizer
from LaMP.utils.modeling.training import (GenerationEvalTrainer, GenerationSettings,
                                          LengthGroupedSampler, LengthGroupedTrainer,
                                          PaddingCollator, add_lora, resolve_bf16,
                                          throughput_arguments, training_features)
from LaMP.utils.tasks import get_task

REQUIRED = ["--train_data", "t.json", "--validation_data", "v.json", "--model_name", "m",
            "--task", "LaMP-7", "--output_dir", "out", "--device", "cpu"]


def padding_share(lengths, order, batch_size) -> float:
    real = slots = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start:start + batch_size]]
        real, slots = real + sum(batch), slots + max(batch) * len(batch)
    return 1 - real / slots


# A fixed synthetic set shaped like LaMP-7 training features (lengths 60-140 tokens).
LENGTHS = [random.Random(i).randint(60, 140) for i in range(403)]


def test_grouped_batches_carry_less_padding_than_random_ones():
    generator = torch.Generator().manual_seed(0)
    sampler = LengthGroupedSampler(LENGTHS, batch_size=16, generator=generator)
    grouped = list(sampler)
    shuffled = torch.randperm(len(LENGTHS), generator=generator).tolist()
    assert sorted(grouped) == list(range(len(LENGTHS)))  # every question once per epoch
    assert padding_share(LENGTHS, grouped, 16) < 0.03
    assert padding_share(LENGTHS, shuffled, 16) > 0.2
    # Only the last batch may be short: 403 = 25 x 16 + 3, and those 3 come last, so the
    # data loader's batches are exactly the grouped ones.
    batches = [grouped[i:i + 16] for i in range(0, len(grouped), 16)]
    assert [len(b) for b in batches] == [16] * 25 + [3]
    assert all(max(LENGTHS[i] for i in b) - min(LENGTHS[i] for i in b) <= 8 for b in batches[:-1])
    # The longest question is in the first batch (memory runs out at step one, if at all).
    assert max(LENGTHS) in [LENGTHS[i] for i in batches[0]]


def test_grouped_order_changes_from_epoch_to_epoch_and_follows_the_seed():
    def epochs(seed):
        sampler = LengthGroupedSampler(LENGTHS, 16, generator=torch.Generator().manual_seed(seed))
        return list(sampler), list(sampler)

    first, second = epochs(0)
    assert first != second
    assert epochs(0) == (first, second)  # the same seed, the same batches
    # Beyond one mega-batch (50 batches) each one is sorted on its own and all still appear.
    long = [random.Random(i).randint(1, 300) for i in range(16 * 120)]
    order = list(LengthGroupedSampler(long, 16, generator=torch.Generator().manual_seed(1)))
    assert sorted(order) == list(range(len(long)))
    assert padding_share(long, order, 16) < 0.1


def test_group_by_length_is_on_by_default_and_off_with_the_flag(tmp_path, tiny_llama):
    model, _ = load_pretrained(str(tiny_llama), dtype=torch.float32)
    features = [{"input_ids": [1] * n, "labels": [1] * n} for n in LENGTHS[:40]]
    samplers = {}
    for extra in ([], ["--no_group_by_length"]):
        args = train_llm.parse_args(REQUIRED + extra)
        args.bf16 = False
        training_args = train_llm.training_arguments(args, tmp_path / "checkpoints")
        trainer = GenerationEvalTrainer(
            model=model, args=training_args, train_dataset=features, eval_dataset=EXAMPLES,
            data_collator=PaddingCollator(0), task=get_task("LaMP-7"), eval_examples=EXAMPLES,
            lamp_model=None, generation=GenerationSettings(8, 4, 1, 4))
        samplers[bool(extra)] = (training_args.train_sampling_strategy,
                                 trainer._get_train_sampler())
    strategy, sampler = samplers[False]
    assert strategy == "group_by_length" and isinstance(sampler, LengthGroupedSampler)
    assert sampler.batch_size == 16 and sampler.lengths == LENGTHS[:40]
    strategy, sampler = samplers[True]
    assert strategy == "random" and isinstance(sampler, torch.utils.data.RandomSampler)


EXAMPLES = [Example(id=str(i), prompt=prompt, target=target) for i, (prompt, target) in enumerate([
    ("the quick brown fox", "lazy dog"),
    ("I am so tired today but my friends", "the beach"),
    ("a", "b c"),
    ("paraphrase this tweet about the weather in the park today please", "sunny park"),
])]


@pytest.mark.parametrize("bf16", [False, True])
def test_training_with_grouping_lowers_the_loss(tmp_path, tiny_llama, bf16, torch_single_thread):
    if bf16 and not resolve_bf16(None, use_cpu=True):
        pytest.skip("this CPU has no native bf16")
    from transformers import TrainingArguments, set_seed

    set_seed(0)
    model, _ = load_pretrained(str(tiny_llama), dtype=torch.float32)
    tokenizer = load_tokenizer(str(tiny_llama), seq2seq=False)
    lamp_model = LampModel(model=model, tokenizer=tokenizer, is_seq2seq=False,
                           device=torch.device("cpu"))
    model = add_lora(model, seq2seq=False, r=4, alpha=8, dropout=0.0, target_modules=None)
    features = training_features(lamp_model, EXAMPLES * 4, max_length=64, target_max_length=8)
    training_args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=10,
        learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, remove_unused_columns=False, label_names=["labels"], seed=0,
        **throughput_arguments(group_by_length=True, bf16=bf16))
    trainer = LengthGroupedTrainer(model=model, args=training_args, train_dataset=features,
                                   data_collator=PaddingCollator(tokenizer.pad_token_id))
    assert isinstance(trainer._get_train_sampler(), LengthGroupedSampler)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 40
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.1
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast, not a cast


def no_bf16_cpu(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_f": True})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_bf16_defaults_to_what_the_hardware_runs_natively(monkeypatch):
    no_bf16_cpu(monkeypatch)
    assert resolve_bf16(None, use_cpu=True) is False
    assert resolve_bf16(False, use_cpu=True) is False
    with pytest.raises(LampError, match="--bf16: this CPU has no AVX512-BF16 or AMX-BF16"):
        resolve_bf16(True, use_cpu=True)
    for flag in ("avx512_bf16", "amx_bf16"):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {flag: True})
        assert resolve_bf16(None, use_cpu=True) is True
        assert resolve_bf16(False, use_cpu=True) is False
    # On a GPU the GPU decides, whatever the CPU has.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_bf16(None, use_cpu=False) is False
    with pytest.raises(LampError, match="this GPU has no bf16"):
        resolve_bf16(True, use_cpu=False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_bf16(None, use_cpu=False) is True


def test_bf16_flags(tmp_path, monkeypatch):
    assert train_llm.parse_args(REQUIRED).bf16 is None
    assert train_llm.parse_args(REQUIRED + ["--bf16"]).bf16 is True
    assert train_llm.parse_args(REQUIRED + ["--no_bf16"]).bf16 is False
    assert train_llm.parse_args(REQUIRED).group_by_length is True
    # --bf16 where it is not native: one error line before any model is loaded.
    no_bf16_cpu(monkeypatch)
    train = SAMPLE / "LaMP_7" / "dev_questions.json"
    merged = tmp_path / "merged.json"
    golds = {g["id"]: g["output"] for g in
             json.loads((SAMPLE / "LaMP_7" / "dev_outputs.json").read_text())["golds"]}
    merged.write_text(json.dumps([{**q, "output": golds[q["id"]]}
                                  for q in json.loads(train.read_text())[:2]]))
    with pytest.raises(LampError, match="--bf16: this CPU"):
        train_llm.main(["--train_data", str(merged), "--validation_data", str(merged),
                        "--model_name", str(tmp_path / "no_model"), "--task", "LaMP-7",
                        "--output_dir", str(tmp_path / "out"), "--device", "cpu", "--bf16"])
    assert not (tmp_path / "out").exists()


def test_evaluation_generates_in_one_batched_call(tmp_path, tiny_llama, monkeypatch):
    """Evaluation during training goes through LampModel.generate, which sorts prompts by
    length and generates them batch_size at a time."""
    calls = []

    def fake_generate(self, prompts, *, max_length, max_new_tokens, num_beams, batch_size,
                      progress, synced_gpus=False, adapter_names=None):
        calls.append((list(prompts), batch_size, num_beams))
        return ["x"] * len(prompts)

    monkeypatch.setattr(LampModel, "generate", fake_generate)
    model, _ = load_pretrained(str(tiny_llama), dtype=torch.float32)
    tokenizer = load_tokenizer(str(tiny_llama), seq2seq=False)
    args = train_llm.parse_args(REQUIRED + ["--no_bf16", "--per_device_batch_size", "3"])
    trainer = GenerationEvalTrainer(
        model=model, args=train_llm.training_arguments(args, tmp_path / "checkpoints"),
        train_dataset=[], eval_dataset=EXAMPLES, data_collator=PaddingCollator(0),
        task=get_task("LaMP-7"), eval_examples=EXAMPLES,
        lamp_model=LampModel(model=None, tokenizer=tokenizer, is_seq2seq=False, device=None),
        generation=GenerationSettings(max_length=64, max_new_tokens=4, num_beams=1,
                                      batch_size=3))
    metrics = trainer.evaluate()
    assert calls == [([e.prompt for e in EXAMPLES], 3, 1)]
    assert "eval_rouge-1" in metrics
