"""Download the LaMP benchmark (tasks 1–5 and 7, user and time splits) into raw_data/.

Example:
    python download_data.py --splits user --tasks LaMP_3 LaMP_7 --sets train dev

Files land in ``{out_dir}/{user|time}/LaMP_{k}/{set}_{questions|outputs}.json``. A file that
is already complete is skipped, an interrupted one resumes from its ``.part`` file, and a
file appears under its final name only after it parses as the LaMP file it should be; a
complete download that fails that check is kept as ``{set}_{kind}.rejected.json`` beside a
``.rejected.reason.json`` note. One run at a time writes into an --out_dir (a lock file).
``--dry_run`` asks the server for the sizes only (the disk space a selection needs).
LaMP-6 is built from the licensed Avocado corpus instead: data/avocado/create_avocado_dataset.py.
The machinery (server layout, HTTP, checks, manifest, lock) is LaMP/utils/data/download.py.
"""
from __future__ import annotations

import argparse
import math
import sys

from LaMP.utils.cli.program import ArgumentParser, run, setup_logging
from LaMP.utils.cli.tables import format_table
from LaMP.utils.data.download import (DEFAULT_BASE_URL, MAX_RETRIES, MAX_WAIT_S, SET_KINDS,
                                      SOURCES, SPLIT_DIRS, Fetcher, FileResult, Manifest,
                                      Source, base_url_problem, download_all, dry_run,
                                      out_dir_lock, plan, raise_if_failed)
from LaMP.utils.data.fileio import check_output_dir
from LaMP.utils.errors import LampError
from LaMP.utils.evaluation.scoring import invalid_gold_ids
from LaMP.utils.tasks import get_task


def parse_source(name: str) -> Source:
    """argparse ``type=`` for --tasks: a folder name (LaMP_2_old) or any task spelling."""
    valid = ", ".join(source.name for source in SOURCES)
    try:  # "-" as "_": the folder spelling LaMP-2_old names LaMP_2_old as LaMP-7 names LaMP_7
        task = get_task(name.replace("-", "_"))
    except LampError:
        raise argparse.ArgumentTypeError(f"unknown task {name!r}; valid: {valid}") from None
    for source in SOURCES:
        if source.task is task:
            return source
    # A real task that is not on the server: LaMP-6.
    raise argparse.ArgumentTypeError(
        f"{task.name} is not downloadable; build it from the Avocado corpus with "
        f"data/avocado/create_avocado_dataset.py (downloadable: {valid})")


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", default="raw_data",
                        help="where the user/ and time/ folders are written (default: raw_data)")
    parser.add_argument("--tasks", nargs="+", type=parse_source,
                        default=[source for source in SOURCES if source.default],
                        help="tasks to fetch: "
                             f"{', '.join(s.name for s in SOURCES if s.default)} (the "
                             "LaMP-N spelling works too); "
                             f"{', '.join(s.name for s in SOURCES if not s.default)}: only on "
                             "request (LaMP_2_old is LaMP-2N, the original news-categorization "
                             "LaMP-2; default: all the others)")
    parser.add_argument("--splits", nargs="+", choices=sorted(SPLIT_DIRS), default=["user", "time"],
                        help="user-based and/or time-based splits (default: both)")
    parser.add_argument("--sets", nargs="+", choices=list(SET_KINDS), default=list(SET_KINDS),
                        help="train, dev and/or test; test has questions only (default: all)")
    parser.add_argument("--base_url", default=DEFAULT_BASE_URL,
                        help=f"the server or a mirror with the same layout (default: "
                             f"{DEFAULT_BASE_URL})")
    parser.add_argument("--fix_known_issues", action="store_true",
                        help="drop malformed questions (an input without its task's "
                             "instruction, such as LaMP-2 user-split dev id 110, or a gold that "
                             "is not a label) from the questions and outputs files alike")
    parser.add_argument("--dry_run", action="store_true",
                        help="only ask the server for file sizes and print what the selection "
                             "needs on disk; download nothing")
    parser.add_argument("--retries", type=int, default=5,
                        help="extra attempts per file after a network failure, at most "
                             f"{MAX_RETRIES} (default: 5)")
    parser.add_argument("--backoff", type=float, default=2.0,
                        help="seconds before the first retry, doubled after each, at most "
                             f"{MAX_WAIT_S:.0f} (default: 2)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds without data before a connection counts as dropped, "
                             f"at most {MAX_WAIT_S:.0f} (default: 60)")
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse values no run can use, before any request; put the selection in its fixed order."""
    if not 0 <= args.retries <= MAX_RETRIES:
        parser.error(f"--retries must be in 0 … {MAX_RETRIES}")
    # float() accepts "nan" and "inf"; neither is a number of seconds a socket can wait.
    if not (math.isfinite(args.backoff) and 0 <= args.backoff <= MAX_WAIT_S):
        parser.error(f"--backoff must be a number of seconds from 0 to {MAX_WAIT_S:.0f}, "
                     f"not {args.backoff}")
    if not (math.isfinite(args.timeout) and 0 < args.timeout <= MAX_WAIT_S):
        parser.error(f"--timeout must be a number of seconds above 0 and at most "
                     f"{MAX_WAIT_S:.0f}, not {args.timeout}")
    problem = base_url_problem(args.base_url)
    if problem is not None:
        parser.error(f"--base_url {args.base_url!r}: {problem}")
    args.base_url = args.base_url.rstrip("/")
    # Sorted and unique: the same selection always runs in the same order.
    args.tasks = sorted(set(args.tasks), key=SOURCES.index)
    args.splits = sorted(set(args.splits), key=["user", "time"].index)
    args.sets = sorted(set(args.sets), key=list(SET_KINDS).index)


def summary_table(results: list[FileResult]) -> str:
    rows = []
    for result in results:
        is_questions = result.rel.endswith("_questions.json")
        mean = (f"{result.profile_items / result.records:.1f}"
                if is_questions and result.records else "")
        rows.append((result.rel, result.status, f"{result.bytes:,}" if result.bytes else "",
                     f"{result.records:,}" if result.records else "", mean))
    total = sum(result.bytes for result in results)
    rows.append((f"{len(results)} files", "", f"{total:,}", "", ""))
    return format_table(("file", "status", "bytes", "questions/golds", "mean profile"), rows)


def main(argv=None) -> list[FileResult]:
    args = parse_args(argv)
    setup_logging()
    out_dir = check_output_dir(args.out_dir, "--out_dir")  # a file in the way: one line
    jobs = plan(out_dir, args.base_url, args.splits, args.tasks, args.sets)
    fetcher = Fetcher(args.retries, args.backoff, args.timeout)
    if args.dry_run:
        results = dry_run(jobs, fetcher)
    else:
        with out_dir_lock(out_dir):
            results = download_all(jobs, fetcher, Manifest(out_dir), invalid_gold_ids,
                                   args.fix_known_issues)
    print(summary_table(results))
    raise_if_failed(results, "size requests" if args.dry_run else "files")
    return results


if __name__ == "__main__":
    sys.exit(run(main))
