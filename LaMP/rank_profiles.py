"""Rank every question's profile by relevance to its input; write {question id: [item ids]}.

Example:
    cd LaMP
    python rank_profiles.py --input_data_addr ../raw_data/user/LaMP_7/dev_questions.json \
        --output_ranking_addr ../runs/LaMP_7_dev_bm25.json --task LaMP-7 --ranker bm25

The ranking lists each question's profile item ids, best first (ties in profile order). The
questions file is streamed; the output is written atomically, with the run's arguments
beside it (``<output>.args.json``). Big jobs can be split with ``--num_shards N --shard_id i``
(questions in N contiguous slices); ``utils/merge_with_rank.py`` accepts all the shard files.
bm25, recency and random parse and rank in ``--num_workers`` processes (every core by default);
the ranking is byte for byte the same for any number of workers.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from itertools import chain, islice
from pathlib import Path

if importlib.util.find_spec("LaMP") is None:
    # Run from a checkout without `pip install -e .` (as the original README's steps
    # do): make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from LaMP.utils.cli.arguments import (RANKING, add_seed_argument, add_shard_arguments,
                                      add_task_argument, check_shard_arguments)
from LaMP.utils.cli.program import ArgumentParser, run, setup_logging
from LaMP.utils.data.fileio import (JsonObjectWriter, args_path_for, check_outputs, check_readable,
                                    require_regular_file, save_run_args)
from LaMP.utils.data.questions import iter_questions
from LaMP.utils.errors import LampError
from LaMP.utils.retrieval import build_ranker, parse_retriever_spec
from LaMP.utils.retrieval.base import Ranker
from LaMP.utils.retrieval.parallel import (PARALLEL_RANKERS, WorkersFailed, available_cores,
                                           bounded_workers, ranking_workers, worth_workers)
from LaMP.utils.retrieval.rankings import count_questions, shard_range

logger = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input_data_addr", required=True,
                        help="LaMP questions file (JSON list of {id, input, profile})")
    parser.add_argument("--output_ranking_addr", required=True,
                        help="where to write the ranking JSON {question id: [profile ids]}")
    add_task_argument(parser)
    RANKING.add(parser)  # --ranker and its options
    parser.add_argument("--device", default=None,
                        help="device for contriever: cpu, cuda or cuda:N (default: cuda when "
                             "available, else cpu)")
    add_seed_argument(parser, "seed of the random ranker (each question's order depends only on "
                              "the seed and the question id)")
    add_shard_arguments(parser, "rank")
    parser.add_argument("--num_workers", type=int, default=available_cores(),
                        help="processes that parse and rank the questions for bm25, recency and "
                             "random, at most the cores this process may use (default: all "
                             f"of them, {available_cores()} here; 1 ranks in this process; "
                             "contriever always runs its one model in this process)")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    RANKING.check(parser, args)
    check_shard_arguments(parser, args)
    if args.num_workers < 1:
        parser.error("--num_workers must be at least 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging(args.verbose)
    input_path = check_readable(args.input_data_addr, "questions file")
    output_path = Path(args.output_ranking_addr)
    check_outputs(files={"--output_ranking_addr": output_path,
                         "--output_ranking_addr (its arguments file)": args_path_for(output_path)},
                  inputs={"--input_data_addr": input_path,
                          "--contriever_checkpoint": args.contriever_checkpoint,
                          "--selector": args.selector,
                          "--retrievers": [parse_retriever_spec(spec).checkpoint
                                           for spec in args.retrievers or ()],
                          "--retriever_outputs": args.retriever_outputs})

    shard = None
    if args.num_shards > 1:
        require_regular_file(input_path, "questions file",
                             "--num_shards counts its questions before ranking one slice, "
                             "so it is read twice")
        shard = shard_range(count_questions(input_path), args.num_shards, args.shard_id)
        logger.info("shard %d of %d: questions %d … %d", args.shard_id, args.num_shards,
                    shard.start, shard.stop - 1)
    ranker = count = None
    if args.ranker in PARALLEL_RANKERS:
        args.num_workers = bounded_workers(args.num_workers)
    if worth_workers(input_path, args.num_workers, args.ranker) and (shard is None or shard):
        try:
            ranker, count = _rank_in_workers(args, input_path, output_path, shard)
        except WorkersFailed as reason:
            # The inline run gives the same output, or the exact error a run with one worker
            # gives (which question, which problem).
            logger.debug("ranking inline instead (%s)", reason)
    if count is None:
        ranker, count = _rank_inline(args, input_path, output_path, shard)
    save_run_args(args_path_for(output_path), {**vars(args), **ranker.describe()})
    logger.info("ranked %d questions with %s; wrote %s", count, args.ranker, output_path)
    return {"questions": count, "output": str(output_path)}


def _build_ranker(args: argparse.Namespace) -> Ranker:
    return build_ranker(args.ranker, args.task, **RANKING.options(args))


def _rank_inline(args: argparse.Namespace, input_path: Path, output_path: Path,
                 shard: range | None) -> tuple[Ranker, int]:
    """Rank in this process: the reference behaviour, and the only one for the rankers with
    a model (contriever, rspg)."""
    questions = iter_questions(input_path, args.task)
    if shard is not None:
        questions = islice(questions, shard.start, shard.stop)
    # Read the first question before building the ranker (for contriever, loading a
    # model), so that a malformed file fails at once.
    first = next(questions, None)
    questions = chain([first], questions) if first is not None else iter(())
    ranker = _build_ranker(args)

    # Written as it goes: a train split's ranking holds millions of ids, too many to keep.
    seen: set[str] = set()
    with JsonObjectWriter(output_path) as writer:
        from tqdm import tqdm  # here, not at the top: its import takes a tenth of a second

        progress = tqdm(ranker.rank(questions), total=len(shard) if shard is not None else None,
                        unit="question", desc="ranking")
        for question, ranking in progress:
            if question["id"] in seen:
                raise LampError(f"{input_path}: question id {question['id']} occurs twice")
            seen.add(question["id"])
            writer.write(question["id"], ranking)
        if not seen and shard is None:
            raise LampError(f"{input_path}: no questions to rank")
    return ranker, writer.count


def _rank_in_workers(args: argparse.Namespace, input_path: Path, output_path: Path,
                     shard: range | None) -> tuple[Ranker, int]:
    """Rank in ``--num_workers`` processes; ``WorkersFailed`` where they cannot (the caller
    then ranks inline, which names any problem exactly)."""
    ranker = _build_ranker(args)  # cheap for these rankers; it describes the run
    options = RANKING.options(args)
    bounds = (shard.start, shard.stop) if shard is not None else ()
    seen: set[str] = set()
    with JsonObjectWriter(output_path) as writer, \
            ranking_workers(input_path, args.task.name, args.ranker, options,
                            args.num_workers, *bounds) as blocks:
        # Only once the workers are up: the import is then paid while they rank, and the
        # bar's monitor thread would have made them start by spawning (a fresh interpreter
        # each), since forking a process that has a second thread is not safe.
        from tqdm import tqdm

        with tqdm(total=len(shard) if shard is not None else None, unit="question",
                  desc="ranking") as progress:
            for block in blocks:
                for question_id, ranking in block:
                    if question_id in seen:
                        raise WorkersFailed("a question id occurs twice")
                    seen.add(question_id)
                    writer.write(question_id, ranking)
                progress.update(len(block))
        if not seen and shard is None:
            raise LampError(f"{input_path}: no questions to rank")
    return ranker, writer.count


if __name__ == "__main__":
    sys.exit(run(main))
