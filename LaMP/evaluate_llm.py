"""Zero-shot (or adapter) evaluation of a language model on a LaMP task, with or without RAG.

Example (from the LaMP/ folder):
    python evaluate_llm.py --validation_data ../runs/LaMP_7_dev_merged.json \
        --model_addr google/flan-t5-base --task LaMP-7 --output_dir ../runs/eval \
        --use_profile --is_ranked --num_retrieved 2

Writes ``predictions.json`` (the LaMP format the evaluator reads), ``results_output.json``
(metrics, when the data carries gold outputs) and ``args.json`` into ``--output_dir``. A rerun
into the same folder replaces them (and removes a results_output.json the new data has no
golds for); a training run's folder is refused, since these names would replace its own.
With ``--user_adapters DIR`` (a per-user training run) each question is answered with its
own user's adapter, users mixed in one batch where peft allows it (see
``LaMP/utils/modeling/user_serving.py``).
Runs unchanged under ``torchrun`` / ``accelerate launch``: each process answers a contiguous
slice of the questions and the main process alone writes the same files one process would.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import time
from pathlib import Path


if importlib.util.find_spec("LaMP") is None:
    # Run from a checkout without `pip install -e .` (as the original README's steps
    # do): make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from LaMP.utils.cli.arguments import (add_generation_arguments, add_model_arguments,
                                      add_model_name_argument,
                                      add_profile_arguments, add_task_argument, check_common,
                                      check_generation_arguments, profile_options)
from LaMP.utils.cli.program import ArgumentParser, run, setup_logging
from LaMP.utils.data.fileio import (RUN_FILES, atomic_write_json, check_evaluation_folder,
                                    check_outputs, check_readable, remove_outputs, save_run_args)
from LaMP.utils.modeling.checkpoints import check_adapter_folder, check_model_folder
from LaMP.utils.modeling.user_serving import MAX_LOADED_ADAPTERS, MISSING_CHOICES

logger = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--validation_data", required=True,
                        help="questions to evaluate: a merged file (with outputs) or a "
                             "questions file (test split: predictions only)")
    add_model_name_argument(parser, "--model_addr", "model to run: a hub name or a local folder")
    add_task_argument(parser)
    parser.add_argument("--output_dir", required=True,
                        help="folder for predictions.json, results_output.json and args.json")
    add_profile_arguments(parser)
    add_generation_arguments(parser, training=False)
    parser.add_argument("--adapter", default=None,
                        help="a peft adapter folder (train_llm.py output, any --peft method but "
                             "none) to load on the model")
    parser.add_argument("--user_adapters", default=None,
                        help="per-user PEFT: a train_user_peft.py --output_dir; each question "
                             "is answered with its user's adapter (users/<user_id, else the "
                             "question id>/), many users per batch for LoRA and rsLoRA")
    parser.add_argument("--max_loaded_adapters", type=int, default=MAX_LOADED_ADAPTERS,
                        help="--user_adapters: most users' adapters on the model at once; "
                             f"more users are served in groups of this many (default "
                             f"{MAX_LOADED_ADAPTERS}: about 70 MB of LoRA r 8 on a 135M model, "
                             "1 GB on a 7B one)")
    parser.add_argument("--user_adapter_batches", choices=("stacked", "peft"),
                        default="stacked",
                        help="--user_adapters, LoRA and rsLoRA: how a batch mixes users; "
                             "stacked (default: the adapters' weights stacked per layer, two "
                             "batched products per layer; 2-3x faster here, same answers) or "
                             "peft (peft's adapter_names, one product per adapter in the "
                             "batch). Adapters that cannot be stacked go through peft anyway")
    parser.add_argument("--missing_user_adapter", choices=MISSING_CHOICES, default="error",
                        help="--user_adapters: a question whose user has no adapter is an "
                             "error (default: a run meant to be per-user should not quietly "
                             "fall back), or is answered by the base model (base)")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate only the first N questions (quick checks)")
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    check_common(parser, args)
    check_generation_arguments(parser, args)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    if args.adapter and args.user_adapters:
        parser.error("--adapter and --user_adapters cannot be combined: each question is "
                     "answered by its user's adapter alone (merge a shared adapter into the "
                     "model first)")
    if args.max_loaded_adapters < 1:
        parser.error("--max_loaded_adapters must be >= 1")
    return args


def check_inputs(args: argparse.Namespace) -> None:
    """Every path and the whole questions file, before anything loads: a data mistake in
    the last question should not cost a model load first."""
    check_readable(args.validation_data, "--validation_data")
    check_outputs(folders={"--output_dir": args.output_dir}, contents={"--output_dir": RUN_FILES},
                  inputs={"--validation_data": args.validation_data,
                          "--model_addr": args.model_addr, "--adapter": args.adapter,
                          "--user_adapters": args.user_adapters,
                          "--contriever_checkpoint": args.contriever_checkpoint})
    check_evaluation_folder(args.output_dir, "--output_dir")
    check_model_folder(args.model_addr, "--model_addr")
    if args.adapter:
        check_adapter_folder(args.adapter)
    from LaMP.utils.modeling.examples import check_questions

    check_questions(args.validation_data, args.task, limit=args.limit)


def find_adapters(args: argparse.Namespace):
    """``--user_adapters``' folders for the questions' users, checked before the model
    loads, and the questions' (id, user) pairs; ``(None, None)`` without the flag."""
    if not args.user_adapters:
        return None, None
    from LaMP.utils.modeling.adapter_fit import AdapterFit
    from LaMP.utils.modeling.model import is_seq2seq_config, load_config
    from LaMP.utils.modeling.user_serving import (check_user_adapters_root,
                                                  find_user_adapters, question_users)

    check_user_adapters_root(args.user_adapters)
    ids_and_users = question_users(args.validation_data, args.task, limit=args.limit)
    # The adapters are checked against the model's layers from its config alone: both
    # ways of serving (--user_adapter_batches) then take and refuse the same folders.
    model_config = load_config(args.model_addr, trust_remote_code=args.trust_remote_code,
                               cache_dir=args.cache_dir, lengths=(args.max_length, args.generation_max_length))
    user_adapters = find_user_adapters(
        args.user_adapters, [user for _, user in ids_and_users],
        missing=args.missing_user_adapter, model=args.model_addr,
        fit=AdapterFit(model_config, seq2seq=is_seq2seq_config(model_config),
                       trust_remote_code=args.trust_remote_code))
    # A user's folder may be a link to elsewhere: it is an input like the root.
    check_outputs(folders={"--output_dir": args.output_dir},
                  inputs={"--user_adapters": [str(f) for f in user_adapters.adapter_folders]
                          + ([user_adapters.base_adapter] if user_adapters.base_adapter
                             else [])})
    return user_adapters, ids_and_users


def predict(args: argparse.Namespace, user_adapters, ids_and_users, launch, device):
    """Load the model once and answer this process's slice of the questions: the
    examples, their predictions and the seconds the predictions took."""
    from transformers import set_seed

    from LaMP.utils.modeling.examples import build_examples
    from LaMP.utils.modeling.model import load_model
    from LaMP.utils.modeling.predict import predict_in_slices

    set_seed(args.seed)
    task = args.task
    base_adapter = user_adapters.base_adapter if user_adapters else None
    lamp_model = load_model(args.model_addr, device=str(device),
                            adapter=base_adapter or args.adapter,
                            chat_template=args.chat_template,
                            trust_remote_code=args.trust_remote_code, cache_dir=args.cache_dir,
                            lengths=(args.max_length, args.generation_max_length))
    if base_adapter:
        # OPPU: the users' adapters were trained on the base with the task adapter merged
        # in (train_user_peft.py --base_adapter); they are served on the same.
        lamp_model.model = lamp_model.model.merge_and_unload()
    # Dense retrieval runs on this process's device too, not on GPU 0 in every process.
    options = profile_options(args, device=str(device))
    # Per-user prompt-learning adapters are loaded after the prompts are built: their
    # virtual tokens are reserved now.
    virtual = user_adapters.virtual_tokens if user_adapters else None
    builder = lamp_model.prompt_builder(task, args.max_length, args.input_truncation,
                                        args.prompt_budget, virtual_tokens=virtual)
    examples = build_examples(args.validation_data, task, builder, options, limit=args.limit)
    per_user = {}
    if user_adapters:
        assert [e.id for e in examples] == [qid for qid, _ in ids_and_users]
        per_user = dict(users=[user for _, user in ids_and_users], user_adapters=user_adapters,
                        max_loaded_adapters=args.max_loaded_adapters,
                        stacked_adapters=args.user_adapter_batches == "stacked")
    started = time.perf_counter()
    predictions = predict_in_slices(lamp_model, task, examples, launch,
                                    max_length=args.max_length,
                                    max_new_tokens=args.generation_max_length,
                                    num_beams=args.generation_num_beams,
                                    batch_size=args.per_device_batch_size,
                                    label_scoring=args.label_scoring, **per_user)
    return examples, predictions, time.perf_counter() - started


def write_outputs(args: argparse.Namespace, examples, predictions, elapsed: float,
                  world_size: int) -> dict | None:
    """predictions.json, results_output.json (when the questions carry golds), args.json."""
    from LaMP.utils.modeling.predict import write_predictions

    output_dir = Path(args.output_dir)
    # Removed first: written again below only if these questions carry golds, and never
    # left from an earlier run beside predictions it does not describe.
    remove_outputs(output_dir, ["results_output.json"])
    results = write_predictions(output_dir, args.task, examples, predictions)
    if results is not None:
        results["seconds"] = elapsed
        atomic_write_json(output_dir / "results_output.json", results, indent=2)
    save_run_args(output_dir / "args.json", args)
    logger.info("%d predictions in %.1f s (%.2f questions/s) over %d process(es) → %s",
                len(examples), elapsed, len(examples) / max(elapsed, 1e-9), world_size,
                output_dir)
    return results


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging()
    check_inputs(args)
    user_adapters, ids_and_users = find_adapters(args)

    from LaMP.utils.devices import resolve_device
    from LaMP.utils.modeling.distributed import (end_process_group, init_process_group,
                                                 launch_from_env, synchronize)

    # Under torchrun / accelerate launch every process gets here having checked the same
    # inputs; each answers a contiguous slice and the main process writes everything.
    launch = launch_from_env()
    # A device this machine lacks: one line, no load. Under a launcher: this process's GPU.
    device = resolve_device(args.device,
                            local_rank=launch.local_rank if launch.distributed else None)
    if not launch.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one copy of the progress messages
    created_group = init_process_group(launch, device)
    try:
        examples, predictions, elapsed = predict(args, user_adapters, ids_and_users, launch,
                                                 device)
        synchronize(created_group)
    finally:
        end_process_group(created_group)
    results = None
    if launch.is_main:
        results = write_outputs(args, examples, predictions, elapsed, launch.world_size)
    return {"predictions": predictions, "results": results}


if __name__ == "__main__":
    from LaMP.utils.modeling.distributed import exit_process

    exit_process(run(main))
