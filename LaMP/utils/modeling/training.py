"""Fine-tuning pieces: features, padding, LoRA set-up and a Trainer that evaluates by generation.

- Seq2seq models learn ``labels`` = the target's tokens (the tokenizer adds its end token).
- Causal models read ``prompt + target + eos``; the loss covers only the target and the eos
  token: prompt and padding positions carry the ignore index -100.
- Evaluation generates answers (or scores labels) with the same wrapper that
  ``evaluate_llm.py`` uses, scores them with the shared metrics, and reports them to the
  Trainer under ``eval_<metric>`` so that the best checkpoint follows the task's own metric.
  Under several processes each one generates for a contiguous slice and all gather the
  texts, so every process computes the same metrics.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import torch
from transformers import Trainer, TrainerCallback

from LaMP.utils.modeling.checkpoints import RUN_ARGS
from LaMP.utils.modeling.distributed import Launch
from LaMP.utils.modeling.examples import Example
from LaMP.utils.data.fileio import save_run_args
from LaMP.utils.modeling.model import IGNORE as IGNORE_INDEX  # positions the loss skips
from LaMP.utils.modeling.model import LampModel
from LaMP.utils.modeling.predict import predict_in_slices
from LaMP.utils.evaluation.scoring import score_outputs
from LaMP.utils.tasks import Task

logger = logging.getLogger(__name__)


def training_features(lamp_model: LampModel, examples: Sequence[Example], *, max_length: int,
                      target_max_length: int) -> list[dict[str, list[int]]]:
    """Token ids and labels for each example (no padding yet)."""
    tokenizer = lamp_model.tokenizer
    # A prompt-learning adapter's virtual tokens take their share of the length limit.
    max_length -= lamp_model.virtual_tokens
    features = []
    for example in examples:
        if lamp_model.is_seq2seq:
            input_ids = tokenizer(example.prompt, truncation=True, max_length=max_length)["input_ids"]
            labels = tokenizer(example.target, truncation=True,
                               max_length=target_max_length)["input_ids"]
        else:
            prompt_ids = tokenizer(lamp_model.wrap(example.prompt),
                                   add_special_tokens=not lamp_model.chat_template,
                                   truncation=True, max_length=max_length)["input_ids"]
            target_ids = tokenizer(example.target, add_special_tokens=False)["input_ids"]
            target_ids = target_ids[:max(target_max_length - 1, 0)] + [tokenizer.eos_token_id]
            input_ids = prompt_ids + target_ids
            labels = [IGNORE_INDEX] * len(prompt_ids) + target_ids
        features.append({"input_ids": input_ids, "labels": labels})
    return features


@dataclass
class PaddingCollator:
    """Right-pads ``input_ids`` (pad id, mask 0) and ``labels`` (ignore index) per batch."""

    pad_token_id: int

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        label_width = max(len(f["labels"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        labels = torch.full((len(features), label_width), IGNORE_INDEX, dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.tensor(feature["input_ids"])
            attention_mask[row, :n] = 1
            labels[row, :len(feature["labels"])] = torch.tensor(feature["labels"])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def on_cpu(use_cpu: bool) -> bool:
    """Whether training runs on the CPU (asked for, or no GPU to run on)."""
    return use_cpu or not torch.cuda.is_available()


def bf16_supported(use_cpu: bool) -> bool:
    """Whether bf16 autocast runs on native bf16 arithmetic where training will run.

    On a CPU that needs the AVX512-BF16 or AMX-BF16 instructions: without them oneDNN
    emulates bf16 through fp32, which saves nothing. On CUDA, Ampere and newer.
    """
    if not on_cpu(use_cpu):
        return torch.cuda.is_bf16_supported()
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def resolve_bf16(requested: bool | None, use_cpu: bool) -> bool:
    """bf16 autocast on or off; ``None`` (the default) turns it on where it is native."""
    supported = bf16_supported(use_cpu)
    if requested and not supported:
        from LaMP.utils.errors import LampError

        hardware = ("this CPU has no AVX512-BF16 or AMX-BF16 instructions" if on_cpu(use_cpu)
                    else "this GPU has no bf16 (it needs Ampere or newer)")
        raise LampError(f"--bf16: {hardware}; use --no_bf16 or leave both out")
    return supported if requested is None else requested


def throughput_arguments(*, group_by_length: bool, bf16: bool) -> dict:
    """The TrainingArguments that decide training speed, shared by train_llm.py and
    benchmarks/bench_training.py so that the benchmark measures what the script runs.
    ``group_by_length`` takes effect through a :class:`LengthGroupedTrainer`."""
    return {"train_sampling_strategy": "group_by_length" if group_by_length else "random",
            "bf16": bf16}


# Batches sorted together: the Trainer's own bound on its mega-batches. 800 questions at
# batch 16, so on LaMP-sized sets most of an epoch is sorted at once.
MEGA_BATCH_BATCHES = 50


class LengthGroupedSampler(torch.utils.data.Sampler):
    """An epoch's indices in batches of questions of similar length, batches in random order.

    Random mega-batches of ``MEGA_BATCH_BATCHES`` batches are sorted by length (ties keep
    their random order) and cut into batches; the batches are then shuffled, except that the
    full batch with the longest question comes first and a short batch stays last, where
    the data loader expects it. The Trainer's own sampler sorts only mega-batches of a
    quarter of the set: on 400 real LaMP-7 questions at batch 16 its batches were 6.6%
    padding, these 1.6% (random order: 23%).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, generator=None):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.generator = generator  # None: torch's global generator, which the Trainer seeds

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        return iter(self.batches_in_order())

    def batches_in_order(self) -> list[int]:
        permutation = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        size, mega = self.batch_size, self.batch_size * MEGA_BATCH_BATCHES
        batches = []
        for start in range(0, len(permutation), mega):
            # Longest first: a short batch at the end holds the shortest questions.
            chunk = sorted(permutation[start:start + mega], key=lambda i: -self.lengths[i])
            batches += [chunk[i:i + size] for i in range(0, len(chunk), size)]
        short = [batches.pop()] if batches and len(batches[-1]) < size else []
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=self.generator)]
        if shuffled:
            # The longest batch first, so that one too big for memory fails at step one.
            longest = max(range(len(shuffled)), key=lambda b: self.lengths[shuffled[b][0]])
            shuffled[0], shuffled[longest] = shuffled[longest], shuffled[0]
        return [index for batch in shuffled + short for index in batch]


class LengthGroupedTrainer(Trainer):
    """A Trainer whose ``train_sampling_strategy="group_by_length"`` uses
    :class:`LengthGroupedSampler` with batches of the data loader's size, so that under
    several processes each one still receives whole grouped batches."""

    def _get_train_sampler(self, train_dataset=None):
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        dataset = self.train_dataset if train_dataset is None else train_dataset
        # The data loader's batch size (one device's batch, times the GPUs of DataParallel).
        return LengthGroupedSampler([len(feature["input_ids"]) for feature in dataset],
                                    self.args.train_batch_size)


def add_peft(model, method: str, options: Mapping, *, seq2seq: bool):
    """``model`` with the adapter of ``method`` (a row of ``peft_methods.PEFT_METHODS``)
    attached, built from ``options`` (the parsed flags as a mapping); only the adapter
    trains. ``none`` returns ``model`` itself (full fine-tuning)."""
    from LaMP.utils.errors import LampError
    from LaMP.utils.modeling.peft_methods import build_config, check_supported, get_method

    row = get_method(method)
    if row.builder is None:
        return model
    check_supported(row, seq2seq=seq2seq, model_name=str(options.get("model_name", "this one")))
    from peft import get_peft_model

    config = build_config(row, options, seq2seq=seq2seq, model_config=model.config)
    try:
        return get_peft_model(model, config)
    except (ValueError, TypeError, KeyError) as error:
        # peft knows default target modules only for the architectures it lists, and names
        # that match no layer end here too.
        layers_flag = next((f for f in row.flags if f.endswith("_target_modules")), None)
        hint = f"; name the layers with --{layers_flag}" if layers_flag else ""
        raise LampError(f"--peft {method} set-up failed ({str(error).splitlines()[0]}){hint}"
                        ) from None


def add_lora(model, *, seq2seq: bool, r: int, alpha: int, dropout: float,
             target_modules: Sequence[str] | None):
    """Wrap ``model`` with LoRA adapters; only the adapters train (``add_peft`` with lora)."""
    return add_peft(model, "lora", {"lora_r": r, "lora_alpha": alpha, "lora_dropout": dropout,
                                    "lora_target_modules": target_modules}, seq2seq=seq2seq)


class RunArgsInCheckpoints(TrainerCallback):
    """Saves the run's flags into every checkpoint, after the Trainer's own files, so that
    a resume with another model, task or adapter shape is caught before anything loads."""

    def __init__(self, run_args: Mapping):
        self.run_args = dict(run_args)

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            save_run_args(folder / RUN_ARGS, self.run_args)


def weights_are_sharded(trainer: Trainer) -> bool:
    """Whether the trainer's model is split over the processes (FSDP, DeepSpeed ZeRO-3), so
    that every forward pass and every full state dict needs all of them."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return True
    if getattr(trainer, "is_deepspeed_enabled", False):
        plugin = trainer.accelerator.state.deepspeed_plugin
        return plugin is not None and plugin.zero_stage == 3
    return False


def gathered_state_dict(trainer: Trainer) -> dict | None:
    """The model's whole state dict, gathered from the processes when its weights are
    sharded (every process must call this: the gather is collective); ``None`` when each
    process holds all of it (``save_pretrained`` then reads the model itself)."""
    if not weights_are_sharded(trainer):
        return None
    # DeepSpeed gathers through its engine; FSDP through the prepared model.
    model = trainer.deepspeed if trainer.is_deepspeed_enabled else trainer.model
    return trainer.accelerator.get_state_dict(model)


@dataclass
class GenerationSettings:
    max_length: int
    max_new_tokens: int
    num_beams: int
    batch_size: int
    label_scoring: bool = False


class GenerationEvalTrainer(LengthGroupedTrainer):
    """A Trainer whose evaluation generates answers and scores them with the task metric."""

    def __init__(self, *args, task: Task, eval_examples: Sequence[Example],
                 lamp_model, generation: GenerationSettings, **kwargs):
        super().__init__(*args, **kwargs)
        self.task = task
        self.eval_examples = list(eval_examples)
        # Its tokenizer and chat wrapping; generation runs on the model the Trainer holds now.
        self.lamp_model = lamp_model
        self.generation = generation
        self.eval_predictions: dict[int, list[str]] = {}  # global step -> validation texts

    def generate_texts(self, examples: Sequence[Example]) -> list[str]:
        """Predictions for ``examples``, split over the processes and gathered in order."""
        launch = Launch(rank=self.args.process_index, world_size=self.args.world_size,
                        local_rank=max(self.args.local_process_index, 0))
        lamp_model = replace(self.lamp_model, model=self.model, device=self.model.device)
        was_training = self.model.training
        settings = self.generation
        texts = predict_in_slices(lamp_model, self.task, examples, launch,
                                  sharded=weights_are_sharded(self),
                                  max_length=settings.max_length,
                                  max_new_tokens=settings.max_new_tokens,
                                  num_beams=settings.num_beams, batch_size=settings.batch_size,
                                  label_scoring=settings.label_scoring,
                                  progress=self.is_local_process_zero())
        if was_training:
            self.model.train()
        return texts

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        examples = self.eval_examples
        texts = self.generate_texts(examples)
        self.eval_predictions[self.state.global_step] = texts
        scores = score_outputs(self.task, [e.id for e in examples], [e.target for e in examples],
                               texts, "validation data")
        metrics = {f"{metric_key_prefix}_{key}": float(value) for key, value in scores.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def best_eval_predictions(self) -> list[str]:
        """Validation predictions of the model as it is now (the best checkpoint, after
        training), reusing the evaluation that selected it instead of generating again."""
        best_step = self.state.best_global_step
        if best_step in self.eval_predictions:
            return self.eval_predictions[best_step]
        return self.generate_texts(self.eval_examples)
