"""Score each training question's top profile items by the LLM's answer with each one alone.

Example (from the LaMP/ folder):
    python collect_feedback.py --train_data ../runs/LaMP_3_train_merged.json --task LaMP-3 \
        --model_addr google/flan-t5-base --output_file ../runs/LaMP_3_feedback.jsonl

For each question (a merged file with gold outputs), the --first_stage ranker picks the top
--num_candidates items; the model answers once per item with that item as the prompt's only
profile item; the task metric of the answer is the item's utility (ROPG's feedback,
docs/feedback-retrieval.md). A question costs --num_candidates generations. One JSON line per
question is appended to --output_file as it is done: a rerun with the same flags skips the
questions already there, so a stopped run goes on where it ended. The run's arguments go
beside it (``<output>.args.json``); --num_shards N --shard_id i answers one contiguous slice
of the questions (one output file per shard; train_retriever.py reads them all).
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from itertools import islice
from pathlib import Path

if importlib.util.find_spec("LaMP") is None:
    # Run from a checkout without `pip install -e .` (as the original README's steps
    # do): make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from LaMP.utils.cli.arguments import (FIRST_STAGE, add_budget_arguments,
                                      add_generation_arguments, add_model_arguments,
                                      add_model_name_argument, add_shard_arguments,
                                      add_task_argument, check_common,
                                      check_generation_arguments, check_shard_arguments)
from LaMP.utils.cli.program import ArgumentParser, run, setup_logging
from LaMP.utils.data.fileio import (args_path_for, check_outputs, check_readable,
                                    plain_run_args, read_json, save_run_args)
from LaMP.utils.errors import LampError

logger = logging.getLogger(__name__)

DEFAULT_CANDIDATES = 20  # the paper's: the first stage's top 20 items of each profile
# What decides a feedback record: a rerun must agree on these to append to the same file
# (the device, batch size and slice only decide where and how fast records are made).
RECORD_SETTINGS = ("train_data", "task", "model_addr", "adapter", "first_stage",
                   "num_candidates", "use_date", "tie_order", "contriever_checkpoint",
                   "max_length",
                   "input_truncation", "prompt_budget", "generation_max_length",
                   "generation_num_beams", "label_scoring", "chat_template", "seed")


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train_data", required=True,
                        help="training questions with gold outputs (merge_with_rank.py output, "
                             "ranked or not)")
    add_task_argument(parser)
    add_model_name_argument(parser, "--model_addr", "the LLM whose answers score the items: "
                            "a hub name or a local folder")
    parser.add_argument("--output_file", required=True,
                        help="feedback file (JSON lines, one per question), appended to and "
                             "continued by a rerun")
    parser.add_argument("--adapter", default=None,
                        help="a peft adapter folder (train_llm.py output) to load on the model")
    parser.add_argument("--num_candidates", type=int, default=DEFAULT_CANDIDATES,
                        help=f"items scored per question, the first stage's best (default "
                             f"{DEFAULT_CANDIDATES}, the paper's); each costs one generation")
    FIRST_STAGE.add(parser)  # --first_stage and its options
    add_budget_arguments(parser)
    add_generation_arguments(parser, training=False)
    add_shard_arguments(parser, "answer")
    parser.add_argument("--limit", type=int, default=None,
                        help="only the first N questions (of the slice; quick checks)")
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    check_common(parser, args)
    check_generation_arguments(parser, args)
    FIRST_STAGE.check(parser, args)
    if args.num_candidates < 1:
        parser.error("--num_candidates must be >= 1")
    check_shard_arguments(parser, args)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    return args


def check_resumable(output: Path, args: argparse.Namespace) -> None:
    """A non-empty feedback file is continued only by a run that makes the same records."""
    if not output.is_file() or output.stat().st_size == 0:
        return
    saved_path = args_path_for(output)
    if saved_path is None or not saved_path.is_file():
        raise LampError(f"--output_file {output} exists and has no {saved_path.name} beside "
                        "it: it is not a feedback file this script started; choose another "
                        "name")
    saved = read_json(saved_path, "feedback arguments file")
    now = plain_run_args(args)
    differ = [key for key in RECORD_SETTINGS
              if not isinstance(saved, dict) or not _same(saved.get(key), now.get(key))]
    if differ:
        shown = ", ".join(f"--{key} {saved.get(key) if isinstance(saved, dict) else '?'} "
                          f"(now {now.get(key)})" for key in differ)
        raise LampError(f"--output_file {output} holds feedback made with other settings: "
                        f"{shown}; rerun with those or choose another --output_file")


def _same(saved, now) -> bool:
    """Equal settings; a path given another way (relative, through a link) is the same."""
    if saved == now:
        return True
    try:
        return (isinstance(saved, str) and isinstance(now, str) and os.path.exists(saved)
                and os.path.exists(now) and os.path.samefile(saved, now))
    except OSError:
        return False


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging()
    train_path = check_readable(args.train_data, "--train_data")
    output = Path(args.output_file)
    check_outputs(files={"--output_file": output,
                         "--output_file (its arguments file)": args_path_for(output)},
                  inputs={"--train_data": train_path, "--model_addr": args.model_addr,
                          "--adapter": args.adapter,
                          "--contriever_checkpoint": args.contriever_checkpoint})
    if os.path.lexists(output) and not output.is_file():
        raise LampError(f"--output_file {output} is not a regular file (a feedback file is "
                        "appended to and read back by a rerun)")
    check_resumable(output, args)

    from LaMP.utils.modeling.checkpoints import check_adapter_folder, check_model_folder
    from LaMP.utils.modeling.examples import check_questions
    from LaMP.utils.retrieval.rankings import shard_range

    check_model_folder(args.model_addr, "--model_addr")
    if args.adapter:
        check_adapter_folder(args.adapter)
    # Every question and gold is checked before the model loads.
    total = check_questions(str(train_path), args.task, require_output=True)
    shard = shard_range(total, args.num_shards, args.shard_id)
    if args.limit is not None:
        shard = shard[:args.limit]

    from transformers import set_seed
    from tqdm import tqdm

    from LaMP.utils.data.feedback import FeedbackAppender
    from LaMP.utils.data.questions import iter_questions
    from LaMP.utils.devices import resolve_device
    from LaMP.utils.modeling.feedback import GenerationSettings, collect_feedback
    from LaMP.utils.modeling.model import load_model
    from LaMP.utils.retrieval import build_ranker

    with FeedbackAppender(output) as appender:
        if appender.cut:
            logger.info("%s: cut %d bytes of a line a stopped run left half written",
                        output, appender.cut)
        questions = islice(iter_questions(train_path, args.task, require_output=True),
                           shard.start, shard.stop)
        set_seed(args.seed)
        device = str(resolve_device(args.device))
        # The first stage before the LLM: a dense encoder that cannot load costs no LLM load.
        ranker = build_ranker(args.first_stage, args.task,
                              **{**FIRST_STAGE.options(args), "device": device})
        lamp_model = load_model(args.model_addr, device=device, adapter=args.adapter,
                                chat_template=args.chat_template,
                                trust_remote_code=args.trust_remote_code,
                                cache_dir=args.cache_dir, lengths=(args.max_length, args.generation_max_length))
        prompt_fn = lamp_model.prompt_builder(args.task, args.max_length, args.input_truncation,
                                              args.prompt_budget)
        settings = GenerationSettings(max_length=args.max_length,
                                      max_new_tokens=args.generation_max_length,
                                      num_beams=args.generation_num_beams,
                                      batch_size=args.per_device_batch_size,
                                      label_scoring=args.label_scoring)
        if not appender.done:
            # Beside the file before its first record: a rerun compares its flags with these.
            save_run_args(args_path_for(output), args)
        already = len(appender.done)
        with tqdm(total=len(shard), unit="question", desc="feedback") as bar:
            summary = collect_feedback(lamp_model, args.task, questions, ranker, appender,
                                       prompt_fn, settings, num_candidates=args.num_candidates,
                                       progress=bar.update)
    summary.update(questions=len(shard), skipped=len(shard) - summary["answered"],
                   output=str(output))
    per_question = summary["seconds_per_question"]
    logger.info("%d questions answered (%d generations, %s per question), %d already in %s "
                "(%d records before this run)", summary["answered"], summary["generations"],
                f"{per_question:.2f} s" if per_question is not None else "no time",
                summary["skipped"], output, already)
    return summary


if __name__ == "__main__":
    sys.exit(run(main))
