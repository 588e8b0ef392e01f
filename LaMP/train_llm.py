"""Fine-tune a seq2seq or causal language model on a LaMP task with a PEFT method (or fully).

Example (from the LaMP/ folder):
    python train_llm.py --train_data ../runs/LaMP_7_train_merged.json \
        --validation_data ../runs/LaMP_7_dev_merged.json --model_name google/flan-t5-base \
        --task LaMP-7 --output_dir ../runs/train --retriever bm25 --use_profile \
        --is_ranked --num_retrieved 2

Evaluates by generation after every epoch (or every --eval_steps), keeps the checkpoint that is
best by the task's own metric, and leaves in --output_dir: the adapter (standard peft format)
or the full model, the tokenizer, args.json, predictions.json for the validation data,
test_predictions.json for --test_data, and results_output.json. Runs unchanged under
`torchrun` / `accelerate launch`; only the main process writes files.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import time
from pathlib import Path


if importlib.util.find_spec("LaMP") is None:
    # Run from a checkout without `pip install -e .` (as the original README's steps
    # do): make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from LaMP.utils.cli.arguments import (add_bf16_arguments, add_generation_arguments,
                                      add_model_arguments,
                                      add_model_name_argument,
                                      add_optimizer_arguments, add_profile_arguments,
                                      add_task_argument, check_common, check_generation_arguments,
                                      check_optimizer_arguments, profile_options)
from LaMP.utils.cli.program import ArgumentParser, run, setup_logging
from LaMP.utils.data.fileio import (RUN_FILES, atomic_write_json, check_new_run_folder,
                                    check_outputs, check_readable, remove_outputs, save_run_args,
                                    writing_into)
from LaMP.utils.errors import LampError
from LaMP.utils.modeling.checkpoints import (check_checkpoint, check_model_folder,
                                             check_resume_compatible, last_complete_checkpoint)
from LaMP.utils.modeling.peft_methods import (add_peft_arguments, check_peft_arguments, get_method,
                                              planned_virtual_tokens)
from LaMP.utils.modeling.recipes import TASK_STAGE, add_recipe_argument, apply_recipe

logger = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train_data", required=True,
                        help="training questions with outputs (merge_with_rank.py output)")
    parser.add_argument("--validation_data", required=True,
                        help="validation questions with outputs; picks the best checkpoint")
    parser.add_argument("--test_data", default=None,
                        help="optional questions to predict after training (no outputs needed)")
    add_model_name_argument(parser, "--model_name",
                            "model to start from: a hub name or a local folder")
    add_task_argument(parser)
    parser.add_argument("--output_dir", required=True,
                        help="folder for the adapter, predictions, results and checkpoints")
    add_profile_arguments(parser, max_length=256)
    # The defaults are the --recipe's row: lamp, the published LaMP hyper-parameters.
    add_optimizer_arguments(parser, num_train_epochs=10,
                            learning_rate_help="peak learning rate (default: the --recipe's; "
                                               "lamp 5e-5 as published for full fine-tuning, "
                                               "LoRA usually wants 10-40x more, 5e-4 to 2e-3; "
                                               "oppu 1e-4)")
    add_generation_arguments(parser, training=True)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1,
                        help="steps whose gradients add up before each optimizer update")
    add_peft_arguments(parser)  # --peft NAME and the flags of its methods
    parser.add_argument("--load_in_4bit", action="store_true",
                        help="load the frozen base model in 4-bit (QLoRA; needs CUDA and "
                             "bitsandbytes)")
    # Default (neither flag): bf16 autocast where it is native. With length grouping it
    # trained SmolLM2 1.5x faster per CPU-second on an AVX512-BF16 CPU, held-out loss within
    # 0.3% (benchmarks/bench_training.py; GPUs: the usual bf16 mixed precision).
    add_bf16_arguments(parser)
    parser.add_argument("--no_group_by_length", dest="group_by_length", action="store_false",
                        help="draw training batches in plain random order (the published "
                             "recipe) instead of grouping questions of similar length, "
                             "which cuts the padding the model computes on")
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="recompute activations in the backward pass to save memory")
    parser.add_argument("--eval_steps", type=int, default=None,
                        help="evaluate and checkpoint every N steps instead of every epoch")
    parser.add_argument("--save_total_limit", type=int, default=2,
                        help="checkpoints kept on disk (the best one is always kept)")
    parser.add_argument("--resume_from_checkpoint", default=None,
                        help="a checkpoint folder to resume from, or 'last' for the newest "
                             "complete one in --output_dir/checkpoints (incomplete ones, as a "
                             "kill during a save leaves them, are skipped); the model, task, "
                             "--peft and the method's shape flags (--lora_r, "
                             "--num_virtual_tokens, …) must match the checkpoint's")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="train into an --output_dir that holds a previous run: its "
                             "checkpoints are removed and its files replaced (default: refuse, "
                             "as the Hugging Face Trainer does)")
    parser.add_argument("--report_to", default="none",
                        help="where the Trainer reports logs: none, tensorboard, wandb, …")
    parser.add_argument("--logging_steps", type=int, default=10, help="log the loss every N steps")
    add_model_arguments(parser)
    add_recipe_argument(parser, TASK_STAGE)
    args = parser.parse_args(argv)
    apply_recipe(args, TASK_STAGE)  # the flags not given take the recipe's values
    check_common(parser, args)
    check_optimizer_arguments(parser, args)
    check_generation_arguments(parser, args)
    for flag in ("gradient_accumulation_steps", "logging_steps", "save_total_limit"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1")
    if args.eval_steps is not None and args.eval_steps < 1:
        parser.error("--eval_steps must be >= 1")
    check_peft_arguments(parser, args)
    if args.load_in_4bit and get_method(args.peft).builder is None:
        parser.error("--load_in_4bit trains adapters on a frozen 4-bit model: not with "
                     "--peft none")
    return args


def check_inputs(args: argparse.Namespace) -> None:
    """Fail on user mistakes before anything expensive is loaded."""
    check_readable(args.train_data, "--train_data")
    check_readable(args.validation_data, "--validation_data")
    if args.test_data:
        check_readable(args.test_data, "--test_data")
    if args.device not in (None, "cpu", "cuda"):
        raise LampError(f"--device {args.device}: training takes cpu or cuda (the launcher "
                        "gives each process its GPU; choose GPUs with CUDA_VISIBLE_DEVICES)")
    if args.device == "cuda":
        from LaMP.utils.devices import resolve_device

        resolve_device("cuda")
    check_model_folder(args.model_name, "--model_name")
    if args.load_in_4bit:
        import importlib.util

        import torch

        if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
            raise LampError("--load_in_4bit needs a CUDA GPU and the bitsandbytes package")


def load_tokenizer_side(args: argparse.Namespace):
    """(config, a weightless LampModel): the tokenizer and chat wrapping, all that building
    the prompts needs, loaded in a moment so that the data is read before the weights."""
    from LaMP.utils.modeling.model import LampModel, load_config_and_tokenizer

    config, tokenizer, seq2seq = load_config_and_tokenizer(
        args.model_name, chat_template=args.chat_template,
        trust_remote_code=args.trust_remote_code, cache_dir=args.cache_dir,
        lengths=(args.max_length, args.generation_max_length))
    return config, LampModel(model=None, tokenizer=tokenizer, is_seq2seq=seq2seq, device=None,
                             chat_template=args.chat_template)


def load_for_training(args: argparse.Namespace, config, text_side):
    """``text_side`` with its model: the weights, ready for the Trainer (the --peft adapter
    attached)."""
    from dataclasses import replace

    import torch

    from LaMP.utils.modeling.model import load_pretrained
    from LaMP.utils.modeling.training import add_peft

    quantization, device_map = None, None
    if args.load_in_4bit:
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.bfloat16)
        # A 4-bit model cannot move after loading: place it on this process's GPU now
        # (the launcher's LOCAL_RANK), not on GPU 0 in every process.
        device_map = {"": int(os.environ.get("LOCAL_RANK", 0))}
    # Weights stay fp32 (bf16 runs as autocast, which keeps trainable weights in fp32).
    model, seq2seq = load_pretrained(
        args.model_name, config=config, dtype=torch.float32,
        trust_remote_code=args.trust_remote_code, cache_dir=args.cache_dir,
        quantization_config=quantization, device_map=device_map)
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=args.gradient_checkpointing)
    elif args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if args.peft != "none":
            model.enable_input_require_grads()  # checkpointed blocks need a grad-carrying input
    model = add_peft(model, args.peft, vars(args), seq2seq=seq2seq)
    return replace(text_side, model=model, device=model.device)


def training_arguments(args: argparse.Namespace, checkpoint_dir: Path):
    from transformers import TrainingArguments

    from LaMP.utils.modeling.training import on_cpu, throughput_arguments

    task = args.task
    strategy = "epoch"
    eval_steps = args.eval_steps
    if eval_steps is None and args.max_steps > 0:
        eval_steps = args.max_steps  # a step budget may end before the first epoch does
    if eval_steps is not None:
        strategy = "steps"
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=args.per_device_batch_size,
        per_device_eval_batch_size=args.per_device_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        lr_scheduler_type=args.lr_scheduler_type,
        warmup_steps=args.warmup_ratio,  # a float below 1 is a share of all steps
        eval_strategy=strategy,
        save_strategy=strategy,
        eval_steps=eval_steps,
        save_steps=eval_steps,
        save_total_limit=args.save_total_limit,
        load_best_model_at_end=True,
        metric_for_best_model=task.selection_metric,
        greater_is_better=task.greater_is_better,
        **throughput_arguments(group_by_length=args.group_by_length, bf16=args.bf16),
        logging_steps=args.logging_steps,
        report_to=args.report_to,
        seed=args.seed,
        data_seed=args.seed,
        use_cpu=on_cpu(args.device == "cpu"),  # also on a machine without a GPU: bf16 needs it
        remove_unused_columns=False,  # features are plain dicts of exactly what the model takes
        label_names=["labels"],
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
    )


def resume_checkpoint(args: argparse.Namespace) -> str | None:
    """The checkpoint to resume from, checked before the model loads: complete (``last``
    skips the incomplete ones a kill leaves) and trained with the same model, task and
    adapter shape as this run."""
    if not args.resume_from_checkpoint:
        return None
    output_dir = Path(args.output_dir)
    if args.resume_from_checkpoint == "last":
        checkpoint = last_complete_checkpoint(output_dir / "checkpoints")
    else:
        checkpoint = Path(args.resume_from_checkpoint)
        check_checkpoint(checkpoint)
    # The flags of the finished run the checkpoint belongs to (<run>/checkpoints/checkpoint-N
    # beside <run>/args.json); checkpoints carry their own as well.
    check_resume_compatible(checkpoint, vars(args),
                            checkpoint.resolve().parent.parent / "args.json")
    return str(checkpoint)


def check_processes_joined(trainer_arguments) -> None:
    """Several launched processes that did not form one group would each train alone and
    all write --output_dir: accelerate does that with an FSDP/DeepSpeed/multi-GPU config on
    a machine without GPUs."""
    from LaMP.utils.modeling.distributed import launch_from_env

    launched = launch_from_env().world_size
    if launched > 1 and trainer_arguments.world_size != launched:
        raise LampError(f"the launcher started {launched} processes but each trains alone: "
                        "accelerate's FSDP and DeepSpeed modes need GPUs; on CPUs use "
                        "torchrun (or accelerate launch without a config file) and --device cpu")


def check_paths(args: argparse.Namespace) -> None:
    """Outputs against inputs, a previous run in --output_dir, then every input file."""
    # The resume checkpoint is not among the inputs: it lies inside --output_dir by design.
    check_outputs(folders={"--output_dir": args.output_dir},
                  contents={"--output_dir": ("checkpoints/", "test_predictions.json", *RUN_FILES)},
                  inputs={"--train_data": args.train_data,
                          "--validation_data": args.validation_data,
                          "--test_data": args.test_data, "--model_name": args.model_name,
                          "--contriever_checkpoint": args.contriever_checkpoint})
    if not (args.overwrite_output_dir or args.resume_from_checkpoint):
        check_new_run_folder(args.output_dir, "--output_dir",
                             "--overwrite_output_dir to replace it or --resume_from_checkpoint "
                             "to continue it")
    check_inputs(args)


def read_examples(args: argparse.Namespace):
    """The config, the tokenizer side and the validation, test and training examples, read
    once and before the weights load: a mistake in the last question costs no model load (and
    removes no old checkpoint), a bad validation label no epoch."""
    from LaMP.utils.modeling.examples import build_examples

    config, text_side = load_tokenizer_side(args)
    prompt_fn = text_side.prompt_builder(args.task, args.max_length, args.input_truncation,
                                         args.prompt_budget,
                                         virtual_tokens=planned_virtual_tokens(args.peft,
                                                                               vars(args)))
    options = profile_options(args)
    # The small files first: a mistake there costs no ranking of the training file.
    eval_examples = build_examples(args.validation_data, args.task, prompt_fn, options,
                                   require_output=True)
    test_examples = (build_examples(args.test_data, args.task, prompt_fn, options)
                     if args.test_data else [])
    train_examples = build_examples(args.train_data, args.task, prompt_fn, options,
                                    require_output=True)
    return config, text_side, eval_examples, test_examples, train_examples


def build_trainer(args: argparse.Namespace, lamp_model, trainer_arguments, train_examples,
                  eval_examples):
    """The Trainer over the tokenised training examples, evaluating by generation."""
    from LaMP.utils.modeling.training import (GenerationEvalTrainer, GenerationSettings,
                                              PaddingCollator, RunArgsInCheckpoints,
                                              training_features)

    features = training_features(lamp_model, train_examples, max_length=args.max_length,
                                 target_max_length=args.generation_max_length)
    generation = GenerationSettings(max_length=args.max_length,
                                    max_new_tokens=args.generation_max_length,
                                    num_beams=args.generation_num_beams,
                                    batch_size=args.per_device_batch_size,
                                    label_scoring=args.label_scoring)
    trainer = GenerationEvalTrainer(
        model=lamp_model.model, args=trainer_arguments,
        train_dataset=features, eval_dataset=eval_examples,
        data_collator=PaddingCollator(lamp_model.tokenizer.pad_token_id),
        task=args.task, eval_examples=eval_examples, lamp_model=lamp_model,
        generation=generation,
        callbacks=[RunArgsInCheckpoints(vars(args))])  # what a later resume is checked against
    if trainer.is_world_process_zero():
        trainable, total = trainable_and_total(lamp_model)
        logger.info("%d training examples; %s of %s parameters train (%.2f%%)",
                    len(features), f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return trainer


def trainable_and_total(lamp_model) -> tuple[int, int]:
    parameters = list(lamp_model.model.parameters())
    return (sum(p.numel() for p in parameters if p.requires_grad),
            sum(p.numel() for p in parameters))


def save_run(args: argparse.Namespace, trainer, lamp_model, results: dict,
             predictions: dict) -> None:
    """The adapter (or model), tokenizer, prediction files, results and args.json; under
    FSDP / ZeRO-3 every process joins the gather of the weights and one writes."""
    from LaMP.utils.data.outputs import write_outputs
    from LaMP.utils.modeling.training import gathered_state_dict

    output_dir = Path(args.output_dir)
    state_dict = gathered_state_dict(trainer)
    if not trainer.is_world_process_zero():
        return
    with writing_into(output_dir):
        # The adapter alone under a PEFT method (peft keeps only its weights of a full
        # state dict).
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(
            output_dir, state_dict=state_dict)
        lamp_model.tokenizer.save_pretrained(output_dir)
    for name, (examples, texts) in predictions.items():
        write_outputs(output_dir / name, args.task, zip((e.id for e in examples), texts))
    atomic_write_json(output_dir / "results_output.json", results, indent=2)
    save_run_args(output_dir / "args.json", args)
    logger.info("validation %s; outputs in %s", results["validation"], output_dir)


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging()
    check_paths(args)

    from transformers import set_seed

    from LaMP.utils.modeling.predict import score_predictions
    from LaMP.utils.modeling.training import resolve_bf16

    set_seed(args.seed)
    task = args.task
    output_dir = Path(args.output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    resume = resume_checkpoint(args)
    # Resolved before args.json is written, so that it records what the run did.
    args.bf16 = resolve_bf16(args.bf16, use_cpu=args.device == "cpu")
    try:  # before the model loads: a bad schedule name is one line, early
        trainer_arguments = training_arguments(args, checkpoint_dir)
    except ValueError as error:
        raise LampError(f"training arguments: {str(error).splitlines()[0]}") from None
    check_processes_joined(trainer_arguments)

    config, text_side, eval_examples, test_examples, train_examples = read_examples(args)
    lamp_model = load_for_training(args, config, text_side)
    trainer = build_trainer(args, lamp_model, trainer_arguments, train_examples, eval_examples)
    trainable = trainable_and_total(lamp_model)[0]  # before training shards anything

    if args.overwrite_output_dir and not resume and int(os.environ.get("RANK", "0")) == 0:
        # The old run's checkpoints would outrank the new ones in the Trainer's rotation
        # (by step number) and in --resume_from_checkpoint last. One process removes them,
        # once everything before training has worked.
        remove_outputs(output_dir, ["checkpoints"] + ([] if args.test_data
                                                      else ["test_predictions.json"]))
    started = time.perf_counter()
    with writing_into(checkpoint_dir):  # a full disk while checkpointing: one line
        train_output = trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.perf_counter() - started

    # The best checkpoint is loaded at the end of training; predict with it.
    eval_texts = trainer.best_eval_predictions()
    test_texts = trainer.generate_texts(test_examples) if test_examples else []
    results = {
        "task": task.name,
        "validation": score_predictions(task, eval_examples, eval_texts, "validation data"),
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "best_metric": {task.selection_metric: trainer.state.best_metric},
        "train_loss": train_output.training_loss,
        "train_seconds": train_seconds,
        "global_step": trainer.state.global_step,
        "trainable_parameters": trainable,  # what --peft trains (the benchmark compares it)
        "eval_history": [entry for entry in trainer.state.log_history
                         if any(key.startswith("eval_") for key in entry)],
    }
    predictions = {"predictions.json": (eval_examples, eval_texts)}
    if test_examples:
        predictions["test_predictions.json"] = (test_examples, test_texts)
    save_run(args, trainer, lamp_model, results, predictions)
    return results


if __name__ == "__main__":
    sys.exit(run(main))
