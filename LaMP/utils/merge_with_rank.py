"""Join LaMP questions with a profile ranking and (optionally) gold outputs, by question id.

Example:
    cd LaMP
    python utils/merge_with_rank.py --lamp_questions_addr dev_questions.json \
        --lamp_output_addr dev_outputs.json --profile_ranking_addr dev_bm25.json \
        --merged_output_addr dev_bm25_merged.json

The merged file is a JSON list of questions ``{"id", "input", "profile", "output"}`` whose
profiles are in ranked order. Without ``--profile_ranking_addr`` profiles keep their order;
without ``--lamp_output_addr`` (a test split) there is no ``output``. Several ranking files
(the shards of one ranking) are combined. Questions are streamed and written atomically.
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
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from LaMP.utils.cli.program import ArgumentParser, run, setup_logging
from LaMP.utils.data.fileio import (JsonListWriter, args_path_for, check_outputs, check_readable,
                                    save_run_args)
from LaMP.utils.data.outputs import load_outputs
from LaMP.utils.data.questions import iter_questions
from LaMP.utils.errors import LampError, preview
from LaMP.utils.retrieval.rankings import load_rankings, order_profile

logger = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lamp_questions_addr", required=True,
                        help="LaMP questions file (JSON list of {id, input, profile})")
    parser.add_argument("--lamp_output_addr", default=None,
                        help="LaMP outputs file with the gold outputs (omit for a test split)")
    parser.add_argument("--profile_ranking_addr", nargs="+", default=None,
                        help="ranking file from rank_profiles.py, or the files of all its "
                             "shards (omit to keep profile order)")
    parser.add_argument("--merged_output_addr", required=True,
                        help="where to write the merged questions file")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging(args.verbose)
    questions_path = check_readable(args.lamp_questions_addr, "questions file")
    output_path = Path(args.merged_output_addr)
    check_outputs(files={"--merged_output_addr": output_path,
                         "--merged_output_addr (its arguments file)": args_path_for(output_path)},
                  inputs={"--lamp_questions_addr": questions_path,
                          "--lamp_output_addr": args.lamp_output_addr,
                          "--profile_ranking_addr": args.profile_ranking_addr})
    outputs = load_outputs(args.lamp_output_addr).outputs if args.lamp_output_addr else None
    rankings = load_rankings(args.profile_ranking_addr) if args.profile_ranking_addr else None

    seen: set[str] = set()
    unranked: list[str] = []
    without_output: list[str] = []
    bad_rankings: list[str] = []
    with JsonListWriter(output_path) as writer:
        for question in iter_questions(questions_path):
            question_id = question["id"]
            if question_id in seen:
                raise LampError(f"{questions_path}: question id {question_id} occurs twice")
            seen.add(question_id)
            if rankings is not None:
                if question_id not in rankings:
                    unranked.append(question_id)
                    continue
                try:
                    question["profile"] = order_profile(question["profile"],
                                                        rankings[question_id], question_id)
                except LampError as error:
                    bad_rankings.append(str(error))
                    continue
            if outputs is not None:
                if question_id not in outputs:
                    without_output.append(question_id)
                    continue
                question["output"] = outputs[question_id]
            writer.write(question)
        # Checked after the whole pass, so that one message lists every offending id; raised
        # inside the writer, so that nothing is left at the output path.
        _raise_problems(questions_path, args, unranked, without_output, bad_rankings)
        if not seen:
            raise LampError(f"{questions_path}: no questions")
    _warn_unused(rankings, "ranking", seen)
    _warn_unused(outputs, "outputs file", seen)
    save_run_args(args_path_for(output_path), args)
    logger.info("merged %d questions%s%s into %s", writer.count,
                ", ranked" if rankings is not None else " (profile order)",
                ", with outputs" if outputs is not None else "", output_path)
    return {"questions": writer.count, "ranked": rankings is not None,
            "with_outputs": outputs is not None, "output": str(output_path)}


def _raise_problems(questions_path, args, unranked, without_output, bad_rankings) -> None:
    problems = []
    if unranked:
        problems.append(f"the ranking ({', '.join(args.profile_ranking_addr)}) lacks questions "
                        f"of {questions_path}: {preview(unranked)}")
    if bad_rankings:
        more = f" (and {len(bad_rankings) - 1} more questions)" if len(bad_rankings) > 1 else ""
        problems.append(bad_rankings[0] + more)
    if without_output:
        problems.append(f"{args.lamp_output_addr} has no output for questions: "
                        f"{preview(without_output)}")
    if problems:
        raise LampError("; ".join(problems))


def _warn_unused(by_id, what: str, seen: set[str]) -> None:
    if by_id is None:
        return
    unused = [question_id for question_id in by_id if question_id not in seen]
    if unused:
        # A subset of a split's questions is a legitimate input; say so, but merge.
        logger.warning("the %s has entries for %s questions not in the questions file",
                       what, preview(unused))


if __name__ == "__main__":
    sys.exit(run(main))
