"""Ranking a questions file with a CPU ranker in worker processes, output in input order.

Each of ``n`` workers streams the whole file through the one reader (``iter_questions``)
and ranks blocks of ``BLOCK_QUESTIONS`` consecutive questions dealt round-robin (worker
``w``: blocks ``w``, ``w + n``, …), sending each block's rankings down its own pipe; the
main process takes the blocks from the workers in turn, which is input order. Every worker
pays for reading the whole file; in exchange the file is never cut, and only rankings cross
between processes. Memory: what the reader holds, a block, and a full pipe (a worker that
runs ahead waits on it) per worker; BM25 workers share one inline run's memo budget.

A worker that finds the file wrong (invalid or malformed, past a reader's limit, a query
that cannot be made) or changed (each worker opens it by name: replaced or rewritten since
the main process looked, before or after the worker read it) only says so, and one that
dies (the OOM killer, ``kill -9``) ends its pipe: either way ``WorkersFailed`` sends the
caller to rank inline, which gives the same output or exactly one worker's error.

Workers fork on Linux from a process with one thread (nothing to import again), else spawn
(a child forked from a threaded process may wait forever on a lock another thread held).
They ignore Ctrl-C, the main process's to handle (as SIGTERM, through
``LaMP.utils.cli.program``), die with it even when it is killed outright, and are
terminated and reaped however the ranking ends.
"""
from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import signal
import sys
import threading
from contextlib import contextmanager
from itertools import count, islice
from pathlib import Path
from typing import Iterator

from LaMP.utils.data.questions import iter_questions
from LaMP.utils.errors import LampError
from LaMP.utils.retrieval import build_ranker
from LaMP.utils.retrieval.bm25 import TermIndex
from LaMP.utils.tasks import get_task

logger = logging.getLogger(__name__)

# Per-question CPU work; the dense ranker keeps its one model in the main process.
PARALLEL_RANKERS = ("bm25", "recency", "random")
# Questions per message: as many as BM25 scores together; a message costs little beside them.
BLOCK_QUESTIONS = 32
MIN_BYTES = 2 << 20  # smaller files rank inline: starting workers costs more than they save
_FAILED = "failed"  # what a worker sends instead of a block when it cannot rank the file
# Held off while workers start: a signal that lands in the middle of a fork is lost in the
# parent or kills a child before it could ignore it. Delivered once all are up.
_BLOCKED = {signal.SIGINT, signal.SIGTERM}


class WorkersFailed(Exception):
    """The workers could not rank the file; ranking it inline gives the exact result."""


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def bounded_workers(requested: int) -> int:
    """``requested``, or the cores this process may use if fewer: the ranking is the same
    for any number of workers, and a worker beyond the cores only adds a copy of the
    reader's work."""
    cores = available_cores()
    if requested > cores:
        logger.warning("--num_workers %d is more than the %d cores this process may use; "
                       "ranking with %d", requested, cores, cores)
    return min(requested, cores)


def file_identity(path: str | Path) -> tuple:
    """What tells this file from another put under its name, or the same one rewritten."""
    status = os.stat(path)
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def worth_workers(path: Path, num_workers: int, ranker: str) -> bool:
    """Whether to rank ``path`` in workers: a CPU ranker, more than one worker, and a
    regular file (each worker opens it) of ``MIN_BYTES`` or more."""
    return (num_workers > 1 and ranker in PARALLEL_RANKERS and path.is_file()
            and path.stat().st_size >= MIN_BYTES)


@contextmanager
def ranking_workers(path: Path, task_name: str, ranker_name: str, ranker_options: dict,
                    num_workers: int, start: int = 0, stop: int | None = None
                    ) -> Iterator[Iterator[list[tuple[str, list[str]]]]]:
    """Start ``num_workers`` processes ranking questions ``start`` … ``stop - 1`` (all) of
    ``path``; yields an iterator over blocks ``[(question id, ranked profile ids)]`` in
    input order, which raises ``WorkersFailed`` where the caller must rank inline. On
    leaving, however that happens, no worker outlives the block."""
    context = _context()
    identity = file_identity(path)
    processes, pipes = [], []
    try:
        previous = _mask(signal.SIG_BLOCK)
        # Frozen, this process's objects are left alone by a forked worker's cycle collector,
        # which would otherwise write to (and so copy) every page of a caller's big dataset.
        gc.freeze()
        try:
            for number in range(num_workers):
                receiver, sender = context.Pipe(duplex=False)
                pipes.append(receiver)
                process = context.Process(
                    target=_work, daemon=True,
                    args=(sender, str(path), identity, task_name, ranker_name,
                          ranker_options, number, num_workers, start, stop, os.getpid()))
                process.start()
                processes.append(process)
                sender.close()  # a worker's death then ends its pipe
        except OSError as error:  # no more processes or memory for one
            logger.warning("cannot start a ranking worker (%s); ranking in this process",
                           error)
            raise WorkersFailed("a worker did not start") from None
        finally:
            gc.unfreeze()
            _mask(signal.SIG_SETMASK, previous)
        yield _blocks(pipes)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.join()
        for pipe in pipes:
            pipe.close()


def _blocks(pipes: list) -> Iterator[list[tuple[str, list[str]]]]:
    for block in count():
        pipe = pipes[block % len(pipes)]
        message = _receive(pipe)
        if message is None:  # the questions ended: every other worker is done too
            if any(_receive(other) is not None for other in pipes if other is not pipe):
                raise WorkersFailed("the workers disagree on where the questions end")
            return
        if message == _FAILED:
            raise WorkersFailed("a worker could not rank its questions, or found the file "
                                "changed")
        yield message


def _receive(pipe):
    try:
        return pipe.recv()
    except EOFError:
        logger.warning("a ranking worker process ended before its work did; ranking in this "
                       "process instead")
        raise WorkersFailed("a worker process ended") from None


def _context():
    if sys.platform.startswith("linux") and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _mask(how, signals=_BLOCKED):
    # Signal masks are POSIX; elsewhere workers are spawned, not forked.
    return signal.pthread_sigmask(how, signals) if hasattr(signal, "pthread_sigmask") else set()


def _work(pipe, source: str, identity: tuple, task_name: str, ranker_name: str,
          ranker_options: dict, number: int, num_workers: int, start: int, stop: int | None,
          parent: int) -> None:
    """A worker: rank blocks ``number``, ``number + num_workers`` … of the questions from
    ``start`` on, sending each block's rankings, then ``None``; ``_FAILED`` on a problem,
    or where ``source`` is no longer the file of ``identity``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the main process's handler, if forked
    if sys.platform.startswith("linux"):
        import ctypes

        # Die with the main process even if it is killed outright: PR_SET_PDEATHSIG is 1.
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)
        if os.getppid() != parent:  # it died before prctl took effect
            os._exit(1)
    _mask(signal.SIG_UNBLOCK)
    task = get_task(task_name)
    ranker = build_ranker(ranker_name, task, **ranker_options)
    if isinstance(getattr(ranker, "terms", None), TermIndex):
        ranker.terms = TermIndex(max(ranker.terms.max_terms // num_workers, 1),
                                 max(ranker.terms.max_text_chars // num_workers, 1))
    numbered = islice(enumerate(iter_questions(source, task)), stop)
    mine = (question for index, question in numbered
            if index >= start and (index - start) // BLOCK_QUESTIONS % num_workers == number)
    block = []
    try:
        if _changed(source, identity):
            raise LampError("the file changed")
        for question, ranking in ranker.rank(mine):
            block.append((question["id"], ranking))
            if len(block) == BLOCK_QUESTIONS:
                pipe.send(block)
                block = []
    except LampError:
        pipe.send(_FAILED)
        return
    if _changed(source, identity):  # the blocks sent may mix two versions: none is used
        pipe.send(_FAILED)
        return
    if block:
        pipe.send(block)
    pipe.send(None)


def _changed(source: str, identity: tuple) -> bool:
    try:
        return file_identity(source) != identity
    except OSError:
        return True
