"""Train a dense retriever from the LLM's feedback (ROPG: knowledge distillation or REINFORCE).

Example (from the LaMP/ folder):
    python train_retriever.py --feedback ../runs/LaMP_3_feedback.jsonl \
        --train_data ../runs/LaMP_3_train_merged.json --task LaMP-3 --objective kd \
        --contriever_checkpoint facebook/contriever --output_dir ../runs/ropg_kd

Reads collect_feedback.py's records (every shard's file may be given) and the questions they
were made from, and trains the encoder so that its scores over each question's candidates
follow their utilities (docs/feedback-retrieval.md). --output_dir receives the encoder and
its tokenizer in the Hugging Face layout, which the dense ranker loads as it is:
``rank_profiles.py --ranker contriever --contriever_checkpoint DIR``; with args.json and
training_log.json (the loss of every step).
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
from LaMP.utils.data.fileio import check_fresh_folder, check_outputs, check_readable
from LaMP.utils.errors import LampError
from LaMP.utils.retrieval.base import DEFAULT_DENSE_MODEL

logger = logging.getLogger(__name__)

OBJECTIVE_CHOICES = ("kd", "rl")  # LaMP.utils.modeling.feedback_training.OBJECTIVES
MAX_TEXT_TOKENS = 512  # the released code's query and document limit


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--feedback", required=True, nargs="+",
                        help="collect_feedback.py output file(s), e.g. one per shard")
    parser.add_argument("--train_data", required=True,
                        help="the questions the feedback was collected on (their profiles "
                             "give the candidates' texts)")
    add_task_argument(parser)
    parser.add_argument("--objective", required=True, choices=OBJECTIVE_CHOICES,
                        help="kd: fit the retriever's distribution over the candidates to the "
                             "utilities' (ROPG-KD); rl: REINFORCE with the sampled item's "
                             "utility over the first stage's top item's as reward (ROPG-RL)")
    parser.add_argument("--contriever_checkpoint", default=None,
                        help=f"encoder to start from: a local folder or a hub name (default "
                             f"{DEFAULT_DENSE_MODEL}, the paper's, used only if already in the "
                             "local Hugging Face cache; a name given here may be downloaded); "
                             "any encoder the dense ranker loads")
    parser.add_argument("--output_dir", required=True,
                        help="new folder for the trained encoder (a --contriever_checkpoint "
                             "for rank_profiles.py)")
    add_feedback_training_arguments(parser, "questions")
    parser.add_argument("--max_length", type=int, default=MAX_TEXT_TOKENS,
                        help=f"most tokens of a query or an item (default {MAX_TEXT_TOKENS}, the "
                             "released code's; the encoder's own limit applies too)")
    parser.add_argument("--use_date", action="store_true",
                        help="add each item's date to its text, as rank_profiles.py --use_date "
                             "does (use the same setting when ranking)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--cache_dir", default=None,
                        help="Hugging Face cache folder for a downloaded encoder")
    add_seed_argument(parser, "seed of the question order, the RL samples and dropout")
    args = parser.parse_args(argv)
    check_feedback_training_arguments(parser, args)
    if args.max_length < 8:
        parser.error("--max_length must be at least 8 tokens")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging()
    train_path = check_readable(args.train_data, "--train_data")
    feedback_paths = [check_readable(path, "--feedback") for path in args.feedback]
    output_dir = Path(args.output_dir)
    check_outputs(folders={"--output_dir": output_dir},
                  inputs={"--train_data": train_path, "--feedback": feedback_paths,
                          "--contriever_checkpoint": args.contriever_checkpoint})
    check_fresh_folder(output_dir, "--output_dir")

    import torch
    from transformers import set_seed

    from LaMP.utils.data.feedback import read_feedback
    from LaMP.utils.data.fileio import atomic_folder, atomic_write_json, save_run_args, writing_into
    from LaMP.utils.data.questions import iter_questions
    from LaMP.utils.devices import resolve_device
    from LaMP.utils.modeling.feedback_training import (TrainSettings, retriever_groups,
                                                       retriever_loss, train_groups)
    from LaMP.utils.retrieval.dense import encoder_max_length, load_encoder

    records = read_feedback(feedback_paths)
    groups = retriever_groups(args.task, iter_questions(train_path, args.task), records,
                              use_date=args.use_date)
    logger.info("%d questions with feedback, %d with two or more candidates to learn from",
                len(records), len(groups))
    if not groups:
        raise LampError(f"{', '.join(map(str, feedback_paths))}: no question has two or more "
                        "candidates to learn from")
    device = resolve_device(args.device)
    set_seed(args.seed)
    tokenizer, model = load_encoder(args.contriever_checkpoint or DEFAULT_DENSE_MODEL,
                                    torch.float32, args.cache_dir,
                                    allow_download=args.contriever_checkpoint is not None)
    model.to(device)
    max_length = min(args.max_length, encoder_max_length(tokenizer, model))
    settings = TrainSettings(max_steps=args.max_steps, learning_rate=args.learning_rate,
                             warmup_steps=args.warmup_steps,
                             batch_size=args.per_device_batch_size,
                             max_grad_norm=args.max_grad_norm, seed=args.seed,
                             logging_steps=args.logging_steps)
    losses = train_groups(model, groups, retriever_loss(model, tokenizer, max_length, device,
                                                        args.objective, args.temperature),
                          settings)
    with atomic_folder(output_dir) as folder, writing_into(folder):
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        save_run_args(Path(folder) / "args.json", args)
        atomic_write_json(Path(folder) / "training_log.json",
                          {"objective": args.objective, "groups": len(groups),
                           "losses": losses}, indent=1)
    logger.info("trained %s for %d steps on %d questions; wrote %s (rank with "
                "--ranker contriever --contriever_checkpoint %s)", args.objective,
                len(losses), len(groups), output_dir, output_dir)
    return {"output_dir": str(output_dir), "groups": len(groups), "losses": losses}


if __name__ == "__main__":
    sys.exit(run(main))
