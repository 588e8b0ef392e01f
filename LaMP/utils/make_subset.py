"""Write a subset of a questions file and its outputs file: a seeded shuffle, then a slice.

Example (the 200 held-out LaMP-7 dev questions of benchmarks/bench_lora_lamp7.py):
    python LaMP/utils/make_subset.py --questions_addr raw_data/user/LaMP_7/dev_questions.json \
        --outputs_addr raw_data/user/LaMP_7/dev_outputs.json --seed 0 --skip 400 --count 200 \
        --output_questions_addr held_out_questions.json \
        --output_outputs_addr held_out_outputs.json

With ``--users`` only the questions of those users take part (``most_active:N``: the N users
with the most profile items, as OPPU picks its users; or a file of user ids), all of them
unless ``--count`` says how many. With ``--seed`` the questions are put in the order
``random.Random(seed).shuffle`` gives the whole list (the benchmark's split), without it they
keep file order; then ``--skip`` questions are passed over and the next ``--count`` kept, in
that order. Questions are streamed twice (once to count them), so only the kept ones are
held in memory.

Example (OPPU's setting: the 100 most active users of LaMP-7 dev, user split):
    python LaMP/utils/make_subset.py --questions_addr raw_data/user/LaMP_7/dev_questions.json \
        --outputs_addr raw_data/user/LaMP_7/dev_outputs.json --users most_active:100 \
        --output_questions_addr top100_questions.json --output_outputs_addr top100_outputs.json
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import random
import sys
from pathlib import Path

if importlib.util.find_spec("LaMP") is None:
    # Run from a checkout without `pip install -e .`: make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from LaMP.utils.cli.arguments import add_seed_argument
from LaMP.utils.cli.program import ArgumentParser, run, setup_logging
from LaMP.utils.data.fileio import (args_path_for, atomic_write_json, check_outputs, check_readable,
                                    require_regular_file, save_run_args)
from LaMP.utils.data.outputs import load_outputs
from LaMP.utils.data.questions import as_id, iter_questions
from LaMP.utils.data.users import choose_users, profile_sizes, user_of, users_arg, users_file
from LaMP.utils.errors import LampError, preview
from LaMP.utils.retrieval.rankings import count_questions

logger = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions_addr", required=True, help="LaMP questions file")
    parser.add_argument("--outputs_addr", required=True,
                        help="its outputs file (the golds of the kept questions are written)")
    parser.add_argument("--output_questions_addr", required=True,
                        help="where the kept questions go")
    parser.add_argument("--output_outputs_addr", required=True,
                        help="where the golds of the kept questions go")
    add_seed_argument(parser, "shuffle with random.Random(seed) before slicing (default: no "
                              "shuffle, file order)", default=None)
    parser.add_argument("--skip", type=int, default=0,
                        help="questions passed over before the kept ones (default 0)")
    parser.add_argument("--count", type=int, default=None,
                        help="questions kept (required unless --users is given; with it, "
                             "default: all of those users' questions after --skip)")
    parser.add_argument("--users", type=users_arg, default=None,
                        help="keep only the questions of these users: most_active:N (the N "
                             "with the most profile items, equal counts by id) or a file of "
                             "user ids (a JSON list, or one id a line); a user is a "
                             "question's user_id, else (user split) the question itself")
    args = parser.parse_args(argv)
    if args.skip < 0:
        parser.error("--skip must be >= 0")
    if args.count is None and args.users is None:
        parser.error("--count is required (or give --users)")
    if args.count is not None and args.count < 1:
        parser.error("--count must be >= 1")
    return args


def users_positions(path, task, spec: str) -> tuple[list[int], int]:
    """The positions in ``path`` of the questions of the users ``--users spec`` picks, and
    the number of questions (one pass over the file)."""
    users_at: list[str] = []

    def recording():
        for question in iter_questions(path, task):
            if question.get("user_id") is not None and as_id(question["user_id"]) is None:
                raise LampError(f"{path}: question {question['id']}: \"user_id\" must be a "
                                f"string or an integer, not {question['user_id']!r:.60}")
            users_at.append(user_of(question))
            yield question

    sizes = profile_sizes(recording())
    chosen = set(choose_users(spec, sorted(sizes), lambda: sizes, str(path)))
    return [position for position, user in enumerate(users_at) if user in chosen], len(users_at)


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging()
    # Counted first, then read again for the slice: a pipe would be empty the second time.
    questions_path = require_regular_file(
        check_readable(args.questions_addr, "--questions_addr"), "--questions_addr",
        "its questions are counted before the slice is read")
    check_readable(args.outputs_addr, "--outputs_addr")
    check_outputs(files={"--output_questions_addr": args.output_questions_addr,
                         "--output_outputs_addr": args.output_outputs_addr,
                         "--output_questions_addr (its arguments file)":
                             args_path_for(args.output_questions_addr)},
                  inputs={"--questions_addr": args.questions_addr,
                          "--outputs_addr": args.outputs_addr, "--users": users_file(args.users)})
    golds = load_outputs(args.outputs_addr, what="outputs file")
    task = golds.task
    if args.users:
        order, total = users_positions(questions_path, task, args.users)
        logger.info("--users %s: %d of %d questions", args.users, len(order), total)
    else:
        total = count_questions(questions_path)
        order = list(range(total))
    if args.seed is not None:
        # Shuffling positions makes the same swaps as shuffling the questions themselves, so
        # the subset equals random.Random(seed).shuffle(questions)[skip:skip + count].
        random.Random(args.seed).shuffle(order)
    count = args.count if args.count is not None else len(order) - args.skip
    chosen = order[args.skip:args.skip + count]
    if count < 1 or len(chosen) < count:
        asked = f"--skip {args.skip} + --count {args.count}" if args.count else \
            f"--skip {args.skip} and one more"
        raise LampError(f"{questions_path}: {len(order)} questions"
                        + (f" of --users {args.users}" if args.users else "")
                        + f", fewer than {asked}")
    wanted = {position: rank for rank, position in enumerate(chosen)}
    kept: list = [None] * len(chosen)
    for position, question in enumerate(iter_questions(questions_path, task)):
        if position in wanted:
            kept[wanted[position]] = question
    missing = [question["id"] for question in kept if str(question["id"]) not in golds.outputs]
    if missing:
        raise LampError(f"{args.outputs_addr}: no output for {preview(missing)} kept questions")
    atomic_write_json(args.output_questions_addr, kept)
    atomic_write_json(args.output_outputs_addr, {
        "task": task.file_name,
        "golds": [{"id": question["id"], "output": golds.outputs[str(question["id"])]}
                  for question in kept]})
    save_run_args(args_path_for(args.output_questions_addr), args)
    logger.info("kept %d of %d questions", len(kept), total)
    return {"questions": len(kept), "total": total}


if __name__ == "__main__":
    sys.exit(run(main))
