"""Build LaMP-6 (personalized email subject generation) from the licensed Avocado corpus.

Example:
    python data/avocado/create_avocado_dataset.py \
        --avocado_files_dir avocado-1.0.2/data/text --extract_addr /tmp/avocado \
        --output_dir raw_data/user/LaMP_6 \
        --input_question_file_train LaMP_6/train_questions.json \
        --input_question_file_dev LaMP_6/dev_questions.json \
        --input_question_file_test LaMP_6/test_questions.json

LaMP's LaMP-6 question files name Avocado emails (``147-000874-EM.txt``) instead of holding
them. Only those emails are read, straight from the zips; nothing is extracted. The output
folder gets ``train``/``dev`` questions and outputs and ``test`` questions, in the LaMP format
of the other tasks.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from pathlib import Path


if importlib.util.find_spec("LaMP") is None:
    # Run from a checkout without `pip install -e .` (as the original README's steps
    # do): make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from LaMP.utils.cli.program import ArgumentParser, run, setup_logging
from LaMP.utils.data.avocado import (build_question, describe_problems, read_emails,
                                     referenced_emails, sort_out, zip_files)
from LaMP.utils.data.fileio import JsonListWriter, check_outputs, check_readable, save_run_args
from LaMP.utils.data.outputs import write_outputs
from LaMP.utils.data.questions import iter_questions
from LaMP.utils.errors import LampError, preview
from LaMP.utils.tasks import get_task

logger = logging.getLogger("create_avocado_dataset")

SETS = ("train", "dev", "test")
GOLD_SETS = ("train", "dev")  # test golds stay with the leaderboard


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--avocado_files_dir", required=True,
                        help="the folder of Avocado's text zips: avocado-1.0.2/data/text")
    parser.add_argument("--extract_addr", default=None,
                        help="accepted for the published command line; emails are read from "
                             "the zips directly, so this folder is never written or emptied")
    parser.add_argument("--output_dir", required=True,
                        help="where {train,dev,test}_questions.json and "
                             "{train,dev}_outputs.json are written")
    for set_name in SETS:
        parser.add_argument(f"--input_question_file_{set_name}", required=True,
                            help=f"LaMP's LaMP-6 {set_name}_questions.json (email file names)")
    parser.add_argument("--time_based_separation", action="store_true",
                        help="the question files are the time-based split: keep each "
                             "question's user_id")
    parser.add_argument("--allow_missing", action="store_true",
                        help="build even when referenced emails cannot be used (not in the "
                             "zips; a damaged, encrypted or unreadably compressed zip member; "
                             "no subject or no body): drop the questions whose own email it "
                             "is and the profile items that name it, and count them (default: "
                             "fail and list them, writing nothing)")
    args = parser.parse_args(argv)
    args.avocado_files_dir = Path(args.avocado_files_dir)
    if not os.path.isdir(args.avocado_files_dir):  # Path.is_dir() raises on a name too long
        parser.error(f"--avocado_files_dir {args.avocado_files_dir} is not a folder")
    return args  # --output_dir is checked in main, with the inputs it must not overwrite


ARGS_FILE = "create_avocado_dataset.args.json"


def output_names() -> list[str]:
    """The files written into --output_dir."""
    return ([f"{name}_questions.json" for name in SETS]
            + [f"{name}_outputs.json" for name in GOLD_SETS] + [ARGS_FILE])


def question_files(args) -> dict[str, Path]:
    return {set_name: check_readable(getattr(args, f"input_question_file_{set_name}"),
                                     f"--input_question_file_{set_name}")
            for set_name in SETS}


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging()
    files = question_files(args)
    # Before the emails are read: --output_dir = the folder of LaMP's question files would
    # replace them with the built ones.
    check_outputs(folders={"--output_dir": args.output_dir},
                  contents={"--output_dir": output_names()},
                  inputs={"--avocado_files_dir": args.avocado_files_dir,
                          **{f"--input_question_file_{name}": path
                             for name, path in files.items()}})
    questions = {set_name: list(iter_questions(path, what=f"{set_name} questions file"))
                 for set_name, path in files.items()}
    wanted: set[str] = set()
    for set_name, items in questions.items():
        wanted |= referenced_emails(items, str(files[set_name]))
    zips = zip_files(args.avocado_files_dir)
    logger.info("looking for %d emails in %d zips", len(wanted), len(zips))
    found, unreadable = read_emails(zips, wanted)
    emails, problems = sort_out(wanted, found, unreadable)
    counts = {problem: len(names) for problem, names in problems.items()}
    logger.info("%d of %d referenced emails usable (%s)", len(emails), len(wanted),
                ", ".join(f"{problem}: {count}" for problem, count in counts.items()))
    if len(emails) < len(wanted):
        report = (f"{len(wanted) - len(emails)} of {len(wanted)} referenced emails in "
                  f"{args.avocado_files_dir} cannot be used: {describe_problems(problems)}")
        if not args.allow_missing:
            raise LampError(f"{report}; pass --allow_missing to build without them")
        logger.warning("%s; building without them", report)

    output_dir = Path(args.output_dir)
    task = get_task("LaMP-6")
    summary: dict = {"emails": len(emails), "unusable_emails": counts}
    for set_name in SETS:
        golds, dropped, items_dropped = [], [], 0
        with JsonListWriter(output_dir / f"{set_name}_questions.json") as out:
            for question in questions[set_name]:
                built = build_question(question, emails, args.time_based_separation)
                if built is None:
                    dropped.append(question["id"])
                    continue
                built_question, subject = built
                items_dropped += len(question["profile"]) - len(built_question["profile"])
                out.write(built_question)
                golds.append((built_question["id"], subject))
        if set_name in GOLD_SETS:
            write_outputs(output_dir / f"{set_name}_outputs.json", task, golds)
        if dropped:
            logger.warning("%s: dropped %s questions whose email cannot be used", set_name,
                           preview(dropped))
        summary[set_name] = {"questions": len(golds), "dropped_questions": len(dropped),
                             "dropped_profile_items": items_dropped}
        logger.info("%s: %d questions", set_name, len(golds))
    save_run_args(output_dir / ARGS_FILE, args)
    return summary


if __name__ == "__main__":
    sys.exit(run(main))
