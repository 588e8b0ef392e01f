"""Ranking a questions file with CPU rankers in worker processes, output in input order.

The main process does almost nothing per byte. It learns what the boundary between the
file's first two questions looks like (``learn_signature``: a few bytes before the first
question's closing brace and the second one's first key, ``}]}, {"id"`` in a file
``json.dump`` wrote), then cuts the file into spans of about ``CHUNK_BYTES`` where that
marker recurs, reading only a few KB past each cut (``signature_spans``), and hands each
worker where its span is. A worker reads its span from the file, parses it with the C
``json`` module, validates every question with ``validate_question``, ranks them and returns
each ranking already encoded; the main process writes them in order. A shard
(``--num_shards``) is cut by the exact splitter instead (``question_spans``: a few numpy
passes over every quote, backslash and bracket), which counts questions, and its spans
travel as bytes.

This path is a fast route to the very same result as the inline one
(``iter_questions`` + ``Ranker.rank``), never a second definition of what a valid file is.
Whenever anything is not plainly well formed — a question that fails validation or ranking,
JSON that ``json`` rejects or accepts where ijson would not (``NaN``, numbers out of ijson's
range, lone surrogate escapes), a layout the splitter does not follow — it gives up with
``FastPathFailed`` and the caller ranks the file inline, which then succeeds with the same
output or raises exactly the error a run with one worker raises.

Splitting is a heuristic that parsing checks: the bytes between the list's ``[`` and ``]``
are cut into spans, every byte in exactly one, and each span must parse (wrapped in
brackets, after its leading comma) as a run of whole values, to exactly the number of
questions the exact splitter counted where it counted them, or the run fails. The first
span starts at the list's start; a span that starts where values end and parses as whole
values ends where values end too, so spans that parse are the list itself, cut between its
elements, and a wrong cut (inside a string, inside a question) cannot go unnoticed. The
depth limit, which ``json`` does not enforce, is checked without a pass over every byte
where that is safe: the parsed questions are shaped as in a LaMP file and the span's
opening brackets do not outnumber the objects and lists they hold by enough to hide deeper
nesting (under a repeated key, in a field that validation made text); otherwise the
readers' guard passes over the span's bytes.

Workers are forked on Linux (no imports to repeat; see ``_pool_context`` for when and how);
they import nothing beyond what the main process has (no torch for these rankers), ignore
Ctrl-C (the main process handles it and terminates them) and, on Linux, die with the main
process even when it is killed outright. Each BM25 worker keeps its share of one inline
run's memo of tokenised texts, so memory does not grow with the number of cores.
"""
from __future__ import annotations

import gc
import io
import json
import logging
import multiprocessing
import os
import re
import signal
import sys
import threading
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from itertools import chain, compress
from operator import itemgetter
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from LaMP.utils.data.fileio import json_string_lists
from LaMP.utils.data.jsoninput import MAX_DEPTH, MAX_NUMBER_DIGITS, GuardedReader
from LaMP.utils.data.questions import validate_question
from LaMP.utils.errors import LampError
from LaMP.utils.retrieval import build_ranker
from LaMP.utils.retrieval.bm25 import TermIndex
from LaMP.utils.tasks import get_task

logger = logging.getLogger(__name__)

# Rankers whose work is per question on the CPU; the dense ranker keeps its one model in
# the main process.
PARALLEL_RANKERS = ("bm25", "recency", "random")
# Bytes of questions per worker task: at LaMP-7 sizes about 80 questions, enough that
# passing the bytes and results between processes costs a few percent, few enough that
# 2 tasks per worker in flight stay a few MB.
CHUNK_BYTES = 1 << 20
BLOCK_BYTES = 8 << 20  # bytes read from the file at a time by the splitter
FAST_PATH_MIN_BYTES = 2 << 20  # with one worker, files from this size take the fast path
_WINDOW_BYTES = 64 << 10  # read at a time when looking for a question's end by its signature
TASKS_PER_WORKER = 2  # in flight per worker: one running, one queued, so none waits
# The most bytes a span cut by the signature may reach (a worker parses a span whole, at
# about ten times its size in memory): past it, the splitter gives up on the file.
MAX_SPAN_BYTES = 32 << 20
_JSON_SPACE = " \t\n\r"  # JSON's whitespace (str.strip() would take more)
_INT_LIMIT = 2 ** 63 - 1  # ijson (yajl) refuses integers beyond +-(2**63 - 1)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")

# +1 for an opening bracket, -1 for a closing one, 0 for every other byte.
_BRACKET_DELTA = np.zeros(256, dtype=np.int8)
_BRACKET_DELTA[[ord("["), ord("{")]] = 1
_BRACKET_DELTA[[ord("]"), ord("}")]] = -1
# 1 for the bytes the splitter looks at (quotes, backslashes, brackets), 0 for the others.
_SPECIAL = bytes(int(byte in b'"\\[]{}') for byte in range(256))


class FastPathFailed(Exception):
    """The file is not plainly well formed; rank it inline to get the exact result."""


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def worth_workers(path: Path, num_workers: int, ranker: str) -> bool:
    """Whether ranking ``path`` in workers can pay for starting them: a CPU ranker, more
    than one worker, and more than a couple of tasks' worth of questions."""
    return (num_workers > 1 and ranker in PARALLEL_RANKERS
            and path.stat().st_size > 2 * CHUNK_BYTES)


def worth_fast_path(path: Path, num_workers: int, ranker: str) -> bool:
    """Whether to rank ``path`` with ``rank_here`` (one worker): a CPU ranker and a regular
    file of a few MB or more (on a small one the inline reader's start costs less)."""
    return (num_workers == 1 and ranker in PARALLEL_RANKERS and path.is_file()
            and path.stat().st_size > FAST_PATH_MIN_BYTES)


# --- splitting the top-level list into runs of questions --------------------------------------

class _Scanner:
    """Where the elements of a top-level JSON list end, block by block of raw bytes.

    Keeps, between blocks, whether the scanned bytes end inside a string, the bracket depth
    there and how many backslashes they end with (an escape may straddle two blocks).
    """

    def __init__(self) -> None:
        self.in_string = False
        self.depth = 0
        self.opened_at = -1  # offset just past the list's "[", once seen
        self.closed_at = -1  # offset just past the list's "]", once seen
        # The deepest nesting outside strings so far (the list itself is 1): exact for a
        # file that parses, so workers need not recheck the depth limit when it is low.
        self.deepest = 0

    def ends(self, region: bytes, offset: int) -> np.ndarray:
        """Offsets (``offset`` + position, just past the closing bracket) of the list
        elements that end in ``region``. The region must start where a backslash run
        starts or after a byte that is not a backslash."""
        data = np.frombuffer(region, dtype=np.uint8)
        # bytes.translate then a nonzero over a bool view: several times faster than
        # comparing the array with each byte of interest.
        special = np.flatnonzero(np.frombuffer(region.translate(_SPECIAL), dtype=bool))
        kind = data[special]
        quotes = special[kind == 34]
        if len(quotes):
            after_backslash = quotes[(quotes > 0) & (data[quotes - 1] == 92)]
            if len(after_backslash):
                keep = np.ones(len(quotes), dtype=bool)
                keep[np.searchsorted(quotes, _escaped(special[kind == 92],
                                                      after_backslash))] = False
                quotes = quotes[keep]
        brackets = special[_BRACKET_DELTA[kind] != 0]
        outside = (np.searchsorted(quotes, brackets) + self.in_string) % 2 == 0
        brackets = brackets[outside]
        delta = _BRACKET_DELTA[data[brackets]].astype(np.int64)
        depth_after = self.depth + np.cumsum(delta)
        if len(quotes) % 2:
            self.in_string = not self.in_string
        if not len(brackets):
            return brackets
        if self.closed_at >= 0:
            raise FastPathFailed("content after the list")
        if self.opened_at < 0:
            if delta[0] != 1 or data[brackets[0]] != ord("[") or self.depth != 0:
                raise FastPathFailed("the file does not start with a list")
            self.opened_at = offset + int(brackets[0]) + 1
        if depth_after.min() < 0:
            raise FastPathFailed("brackets do not balance")
        self.deepest = max(self.deepest, int(depth_after.max()))
        closing = np.flatnonzero(depth_after == 0)
        if len(closing):
            if closing[0] != len(brackets) - 1:
                raise FastPathFailed("content after the list")
            self.closed_at = offset + int(brackets[closing[0]]) + 1
        self.depth = int(depth_after[-1])
        element_end = (delta == -1) & (depth_after == 1)
        return offset + brackets[element_end] + 1


def _escaped(backslashes: np.ndarray, after_backslash: np.ndarray) -> np.ndarray:
    """Those of the quotes in ``after_backslash`` that an odd run of backslashes (at the
    sorted positions ``backslashes``) escapes."""
    new_run = np.ones(len(backslashes), dtype=bool)
    new_run[1:] = backslashes[1:] != backslashes[:-1] + 1
    run_start = backslashes[new_run][np.cumsum(new_run) - 1]
    run_length = after_backslash - run_start[np.searchsorted(backslashes, after_backslash - 1)]
    return after_backslash[run_length % 2 == 1]


class _TooLong(FastPathFailed):
    """No question ended within the bytes the caller allowed."""


def question_spans(path: Path, stop: int | None = None, chunk_bytes: int | None = None,
                   block_bytes: int | None = None, scanner: _Scanner | None = None,
                   grow: bool = False, max_bytes: int | None = None
                   ) -> Iterator[tuple[bytes, int]]:
    """``(span, count)``: consecutive runs of the first ``stop`` (all) questions of the JSON
    list in ``path``, each about ``chunk_bytes`` long. A span runs from just past the end of
    the question before it (so it starts with the separating comma, except the first) to
    just past the end of its last question. Raises ``FastPathFailed`` on a layout it does not
    follow; the spans are only as good as their parse (see the module's docstring).
    ``scanner``, when given, is the one used (its ``deepest`` covers each span when it is
    handed out). ``grow``: reads start at ``block_bytes`` and double up to ``BLOCK_BYTES``
    (a short look at the start of a file, in few reads however long its questions).
    ``max_bytes``: raise ``_TooLong`` once that many bytes are held without a question's
    end."""
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    block_bytes = BLOCK_BYTES if block_bytes is None else block_bytes  # read now: tests patch it
    scanner = _Scanner() if scanner is None else scanner
    buffer = b""
    scanned = 0  # bytes of ``buffer`` already scanned
    given = 0  # questions handed out
    pending: list[int] = []  # offsets in ``buffer`` where questions end, not handed out yet
    with open(path, "rb") as handle:
        if handle.read(3) != b"\xef\xbb\xbf":
            handle.seek(0)
        while stop is None or given < stop:
            block = handle.read(block_bytes)
            if grow:
                block_bytes = max(min(2 * block_bytes, BLOCK_BYTES), block_bytes)
            opened = scanner.opened_at >= 0
            buffer += block
            if max_bytes is not None and not pending and len(buffer) > max_bytes:
                raise _TooLong(f"no question ends within {max_bytes:,} bytes")
            # Start at the first of any backslashes the scanned bytes end with: they are
            # neither quotes nor brackets, and an escape needs its whole run.
            start = scanned
            while start > 0 and buffer[start - 1] == 92:
                start -= 1
            if start < len(buffer):
                pending.extend(scanner.ends(buffer[start:], start).tolist())
            scanned = len(buffer)
            cut = 0
            if not opened and scanner.opened_at >= 0:
                # Spans start past the "[", and only whitespace may come before it.
                if buffer[:scanner.opened_at - 1].strip(_JSON_SPACE.encode()):
                    raise FastPathFailed("something before the list")
                cut = scanner.opened_at
            count = 0
            for end in pending:
                count += 1
                last = stop is not None and given + count == stop
                if end - cut >= chunk_bytes or last:
                    yield buffer[cut:end], count
                    given += count
                    cut, count = end, 0
                    if last:
                        return
            pending = pending[len(pending) - count:]
            if not block:  # end of file: hand out the rest, then check the list closed
                if pending:
                    yield buffer[cut:pending[-1]], len(pending)
                    cut = pending[-1]
                tail = buffer[scanner.closed_at:] if scanner.closed_at >= 0 else None
                if (tail is None or buffer[cut:scanner.closed_at - 1].strip(_JSON_SPACE.encode())
                        or tail.strip(_JSON_SPACE.encode())):
                    raise FastPathFailed("the list is not closed cleanly")
                return
            buffer, scanned = buffer[cut:], scanned - cut
            pending = [end - cut for end in pending]
            if scanner.closed_at >= 0:
                scanner.closed_at -= cut


class Signature(NamedTuple):
    """The bytes where the file's first question ends and its second starts: the closing
    brackets that end the first (two or three of them, with any whitespace between) and the
    second one's first key; in a file ``json.dump`` wrote, ``}]}, {"id"``. And where the
    list's content starts."""

    marker: bytes
    end: int  # where, in ``marker``, a question ends (just past its closing brace)
    list_start: int  # file offset just past the list's "["


def learn_signature(path: Path) -> Signature | None:
    """The ``Signature`` of the questions file ``path``, found by the exact splitter over its
    first two questions; ``None`` when there is no good one (fewer than two questions within
    ``MAX_SPAN_BYTES``, or ones that are not objects, end in fewer than two closing brackets
    or start with a key that has escapes): then the exact splitter cuts the whole file.
    Raises ``FastPathFailed`` on a layout the splitter does not follow."""
    scanner = _Scanner()
    try:
        spans = list(question_spans(path, stop=2, chunk_bytes=1, scanner=scanner,
                                    block_bytes=_WINDOW_BYTES, grow=True,
                                    max_bytes=MAX_SPAN_BYTES))
    except _TooLong:
        return None
    if len(spans) < 2:
        return None
    first, second = spans[0][0].strip(_JSON_SPACE.encode()), spans[1][0]
    closing = _CLOSING_RUN.search(first[-256:])
    match = _NEXT_QUESTION.match(second)
    if not first.startswith(b"{") or closing is None or match is None:
        return None
    with open(path, "rb") as handle:
        bom = 3 if handle.read(3) == b"\xef\xbb\xbf" else 0
    tail = closing.group()
    return Signature(tail + match.group(), len(tail), bom + scanner.opened_at)


# The closing brackets an object ends with, two or three of them (an item's, its profile
# list's and its own, in a LaMP file), whitespace between: fewer would also end profile
# items that end with a string. A comma, then an object's opening brace and its first key,
# which has no escapes.
_CLOSING_RUN = re.compile(rb'(?:[\]}][ \t\n\r]*){1,2}\}\Z')
_NEXT_QUESTION = re.compile(rb'[ \t\n\r]*,[ \t\n\r]*\{[ \t\n\r]*"[^"\\]*"')


def signature_spans(path: Path, signature: Signature, identity: tuple | None = None,
                    chunk_bytes: int | None = None) -> Iterator[tuple[int, int]]:
    """``(offset, length)``: consecutive runs of whole questions of the JSON list in
    ``path``, each about ``chunk_bytes`` long, cut where ``signature.marker`` recurs.

    Far cheaper than ``question_spans``: past each cut it skips ``chunk_bytes`` and reads
    only until the marker's next occurrence (a few KB per span, not the whole file). The cuts
    are guesses that the workers' parse checks: the marker may also occur inside a nested
    value (a profile item that ends like a question) or, in a contrived file, inside a
    string; a span cut there does not parse, and the run goes inline, as with any problem
    with the file, the skipped bytes included (every span is parsed whole). Cuts it misses
    only make spans longer, up to ``MAX_SPAN_BYTES``, past which it raises
    ``FastPathFailed``. Nothing before the list's ``[`` is looked at again:
    ``learn_signature`` checked it.
    ``identity``: the file's (``file_identity``), if it must not have changed.
    """
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    marker, shift = signature.marker, signature.end
    window_bytes = max(_WINDOW_BYTES, 2 * len(marker))  # read at a time: more than a marker
    cut = signature.list_start  # where the next span starts
    with open(path, "rb") as handle:
        if identity is not None and file_identity(os.fstat(handle.fileno())) != identity:
            raise FastPathFailed("the file changed")
        close = _closing_bracket(handle)
        while True:
            position = max(cut + chunk_bytes - shift, cut)
            end = None
            while position < close:
                handle.seek(position)
                window = handle.read(window_bytes)
                found = window.find(marker)
                if found >= 0:
                    end = position + found + shift
                    break
                if len(window) < window_bytes:
                    break
                position += len(window) - len(marker) + 1
                if position - cut > MAX_SPAN_BYTES:
                    raise FastPathFailed("no question end found by its signature")
            if end is None or end > close:
                break
            yield cut, end - cut
            cut = end
    if close - cut > MAX_SPAN_BYTES:
        raise FastPathFailed("no question end found by its signature")
    yield cut, close - cut


def _closing_bracket(handle) -> int:
    """The offset of the "]" the file ends with (JSON whitespace after it allowed)."""
    size = os.fstat(handle.fileno()).st_size
    back = min(size, 4096)
    while True:
        handle.seek(size - back)
        tail = handle.read(back)
        stripped = tail.rstrip(_JSON_SPACE.encode())
        if stripped or back == size:
            break
        back = min(size, back * 16)  # a long run of trailing whitespace
    if not stripped.endswith(b"]"):
        raise FastPathFailed("the list is not closed cleanly")
    return size - back + len(stripped) - 1


# --- the workers ------------------------------------------------------------------------------

_worker: dict = {}


def _start_worker(ranker_name: str, task_name: str, ranker_options: dict, source: str,
                  identity: tuple, num_workers: int, parent: int | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the main process's handler, if forked
    _set_signal_mask(signal.SIG_UNBLOCK, _BLOCKED)  # blocked while the pool started
    if sys.platform.startswith("linux"):
        import ctypes

        # Die with the process that started this one (the main process, or the fork server
        # that dies with it) even if it is killed outright: PR_SET_PDEATHSIG is 1.
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)
    if parent is not None and os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)
    _worker.update(_worker_state(ranker_name, task_name, ranker_options, source, identity,
                                 num_workers))


def _worker_state(ranker_name: str, task_name: str, ranker_options: dict, source: str,
                  identity: tuple, num_workers: int) -> dict:
    """What ``_rank_span`` works with: the task, a ranker, the file."""
    task = get_task(task_name)
    ranker = build_ranker(ranker_name, task, **ranker_options)
    terms = getattr(ranker, "terms", None)
    if isinstance(terms, TermIndex):
        # Every worker keeps its own memo of tokenised texts: they share one inline run's
        # budget, so that memory does not grow with the number of cores.
        ranker.terms = TermIndex(max(terms.max_terms // num_workers, 1),
                                 max(terms.max_text_chars // num_workers, 1))
    # Spans cut by the signature are read here, from the very file the main process read
    # (not one put in its place since): no bytes through the pipes.
    handle = open(source, "rb")
    if file_identity(os.fstat(handle.fileno())) != identity:
        handle.close()
        handle = None
    return {"task": task, "source": source, "ranker": ranker, "file": handle}


def file_identity(status: os.stat_result) -> tuple:
    """What tells one version of a file from another: device, inode, size, change time."""
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _checked_float(text: str) -> float:
    if len(text) > MAX_NUMBER_DIGITS:  # maybe over the digit limit: let the guard decide
        raise ValueError("a long number")
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("a number out of range")
    return value


def _checked_int(text: str) -> int:
    value = int(text)
    if abs(value) > _INT_LIMIT:
        raise ValueError("a number out of range")
    return value


def _parse_span(span: bytes, first: int, count: int | None, deep: bool | None = True
                ) -> list | None:
    """The questions of one span, or ``None`` where ijson might read it differently.

    ``first``: the index of the span's first question, or for spans cut by the signature
    the span's number (for messages only; 0: the span starts the list, the others start
    with a comma). ``count``: how many questions it holds (``None``: not known; the parse
    alone checks the span). ``deep``: the span may nest deeper than ``MAX_DEPTH``; only
    then, or when it holds an escape that may be half a surrogate pair, does the guard's
    pass over the bytes run (``None``: not known, for the caller to check, see
    ``_within_depth``). The other limits every reader enforces are caught without
    it: strict UTF-8 by ``decode``, numbers by the parse hooks (a float too long to be sure
    of is refused outright). ``None`` on any of them sends the run inline, which names the
    problem with its byte offset.
    """
    text = span.decode("utf-8")
    surrogates = "\\u" in text and _SURROGATE_ESCAPE.search(text) is not None
    if (deep or surrogates) and not _guard_passes(span):
        return None
    if first > 0:
        text = text.lstrip(_JSON_SPACE)
        if not text.startswith(","):
            return None
        text = text[1:]
    questions = json.loads(f"[{text}]", parse_constant=_reject_constant,
                           parse_float=_checked_float, parse_int=_checked_int)
    if count is not None and len(questions) != count:
        return None
    if surrogates:
        # ijson turns a lone surrogate escape into "?"; json keeps it, and then the text
        # cannot be encoded. Pairs (escaped emoji) are fine.
        json.dumps(questions, ensure_ascii=False).encode("utf-8")
    return questions


def _guard_passes(span: bytes) -> bool:
    """Whether the readers' guard (depth, numbers, escapes) lets the span's bytes through."""
    try:
        GuardedReader(io.BytesIO(b"[" + span + b"]"), _worker["source"]).read()
    except LampError:
        return False
    return True


def _read_span(offset: int, length: int) -> bytes | None:
    handle = _worker["file"]
    if handle is None:  # the file changed before this worker opened it
        return None
    handle.seek(offset)
    data = handle.read(length)
    return data if len(data) == length else None


_SCALARS = frozenset((str, int, float, bool, type(None)))


def _containers(questions: list[dict], fields: tuple[str, ...]) -> int | None:
    """How many objects and lists valid questions (objects with a profile list of objects
    holding an id and ``fields``, all made text by validation) hold, when they are shaped
    as in a LaMP file: every value of a question but its profile plain, and every value of
    an item plain. ``None`` otherwise. C-level passes only: item sizes, and the dates of
    items that have one more key; the types of all item values only where items hold
    other keys."""
    kinds = list(map(type, chain.from_iterable(map(dict.values, questions))))
    if not set(kinds) <= _SCALARS | {list} or kinds.count(list) != len(questions):
        return None  # a list besides the profile, or an object
    items = list(chain.from_iterable(map(itemgetter("profile"), questions)))
    count = 2 * len(questions) + len(items)  # the questions, their profiles, the items
    plain = len(fields) + 1  # the id and the fields, all text after validation
    sizes = list(map(len, items))
    if max(sizes, default=plain) == plain:
        return count
    if min(sizes) >= plain and max(sizes) == plain + 1:
        dated = compress(items, map(plain.__lt__, sizes))
        try:
            return count if set(map(type, map(itemgetter("date"), dated))) <= _SCALARS else None
        except KeyError:  # another key than a date
            pass
    values = chain.from_iterable(map(dict.values, items))
    return count if set(map(type, values)) <= _SCALARS else None


def _within_depth(span: bytes, questions: list[dict], fields: tuple[str, ...]) -> bool:
    """Whether the questions parsed (and validated) from ``span`` cannot nest deeper than
    ``MAX_DEPTH``, as far as cheap checks can tell (``False``: let the guard decide).

    The parsed questions do not show everything the bytes held: a value under a key that
    occurs twice is dropped by the parser, and validation turns a field's value into
    text. So they must be LaMP-shaped (nothing deeper than an item, depth 4), and the
    span's opening brackets may outnumber the objects and lists they hold by at most
    ``MAX_DEPTH - 4``: nesting past ``MAX_DEPTH`` unseen would take at least one more
    (from a dropped value in an item, at depth 5, to depth ``MAX_DEPTH + 1``). Brackets
    inside strings count against the margin too, which only errs on the side of the
    guard."""
    seen = _containers(questions, fields)
    return seen is not None and span.count(b"[") + span.count(b"{") - seen <= MAX_DEPTH - 4


def _rank_span(span: bytes | tuple[int, int], first: int, count: int | None, rank_from: int,
               deep: bool | None = True) -> list[tuple[str, str]] | None:
    """``(question id, its ranking as JSON text)`` of the questions of a span from index
    ``rank_from`` on (the ones before it are only validated), or ``None`` on any problem.
    ``span``: its bytes, or where they are in the file, ``(offset, length)``; the other
    arguments as for ``_parse_span``."""
    try:
        if isinstance(span, tuple):
            span = _read_span(*span)
            if span is None:
                return None
        questions = _parse_span(span, first, count, deep)
        if questions is None:
            return None
        for offset, question in enumerate(questions):
            validate_question(question, first + offset, _worker["source"], _worker["task"])
        fields = _worker["task"].profile_fields
        if deep is None and not _within_depth(span, questions, fields) and not _guard_passes(span):
            return None
        ranked = list(_worker["ranker"].rank(questions[max(rank_from - first, 0):]))
        return list(zip(map(itemgetter("id"), map(itemgetter(0), ranked)),
                        json_string_lists(list(map(itemgetter(1), ranked)))))
    except (LampError, ValueError, RecursionError):
        # ValueError covers malformed JSON, bad UTF-8 and lone surrogates. The inline run
        # that follows names the problem exactly.
        return None


@contextmanager
def _terminate_on_sigterm():
    """SIGTERM unwinds the main process like Ctrl-C does (so that the pool is terminated
    and no temporary file is left), exiting with 128 + 15 as a killed process would."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# Held off while the pool starts: a signal that lands in the middle of a fork is lost in
# the parent (raised inside an at-fork hook, where Python only prints it) or kills a child
# before it could ignore it. Delivered once the pool is up.
_BLOCKED = {signal.SIGINT, signal.SIGTERM}


def _set_signal_mask(how, signals):
    # Signal masks are POSIX; elsewhere (Windows) workers are spawned, not forked.
    return signal.pthread_sigmask(how, signals) if hasattr(signal, "pthread_sigmask") else set()


def _pool_context():
    """On Linux, fork (nothing to import again) when this process has a single thread; a
    process with more threads (a progress bar's monitor, a test runner's) may be holding a
    lock that a forked child would wait on forever, so then fork from a clean server
    process. Elsewhere spawn, Python's own default there (macOS system libraries do not
    survive a fork)."""
    if not sys.platform.startswith("linux"):
        return multiprocessing.get_context("spawn")
    if threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        return context
    return multiprocessing.get_context("spawn")


def _noop() -> None:
    """A first task: submitting it starts the workers (a process pool forks on first use)."""


@contextmanager
def _started_pool(context, num_workers: int, options: tuple):
    """A process pool of ``num_workers`` started workers; on leaving, however that happens,
    no worker outlives it.

    A ``ProcessPoolExecutor`` rather than a ``multiprocessing.Pool``: a worker that dies
    (killed by the out-of-memory killer or a user, or failing to start) breaks the executor,
    and every wait for a result then raises, where a ``Pool`` would replace the worker,
    lose its task and wait for that task forever (and hang again when terminated).
    """
    parent = os.getpid() if context.get_start_method() == "fork" else None
    pool = ProcessPoolExecutor(num_workers, mp_context=context, initializer=_start_worker,
                               initargs=(*options[:-1], parent))
    try:
        previous = _set_signal_mask(signal.SIG_BLOCK, _BLOCKED)
        # Forked workers share this process's objects until they write to them, and the
        # cycle collector's passes write to every object it visits: frozen, a worker's
        # collector leaves them alone (a process holding a large dataset would otherwise
        # see each worker copy it page by page). Here they thaw at once.
        gc.freeze()
        try:
            started = pool.submit(_noop)  # forks every worker (all at once when forking)
        finally:
            gc.unfreeze()
            _set_signal_mask(signal.SIG_SETMASK, previous)
        _outcome(started)
        yield pool
    finally:
        _stop(pool)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel what is queued and wait for the workers to finish what they hold (a run of
    questions each, well under a second) and exit: no worker outlives the run, also on an
    error or an interrupt. Not by killing them: with tasks still on their way to the
    workers, the executor's own threads then trip over its closed pipes and print
    tracebacks (CPython 3.11)."""
    pool.shutdown(wait=True, cancel_futures=True)


def _outcome(future):
    try:
        return future.result()
    except BrokenProcessPool:
        _lost_worker()


def _submit(pool: ProcessPoolExecutor, task: tuple):
    # A worker that has died breaks the pool for new tasks as well as for the ones it held.
    try:
        return pool.submit(_rank_span, *task)
    except BrokenProcessPool:
        _lost_worker()


def _lost_worker():
    logger.warning("a ranking worker process ended before its work did; ranking in this "
                   "process instead")
    raise FastPathFailed("a worker process ended") from None


def rank_in_workers(path: Path, task_name: str, ranker_name: str, ranker_options: dict,
                    num_workers: int, start: int = 0, stop: int | None = None
                    ) -> Iterator[list[tuple[str, str]]]:
    """Rank questions ``start`` … ``stop - 1`` (all) of ``path`` in ``num_workers`` processes:
    per run of questions, in input order, ``[(question id, ranking as JSON text)]``.

    Questions before ``start`` are validated, not ranked, as in an inline run. Raises
    ``FastPathFailed`` when the file is not plainly well formed (see the module docstring)
    or a worker process ends before its work does.
    """
    context = _pool_context()
    identity, signature = _plan(path, start, stop)
    options = (ranker_name, task_name, ranker_options, str(path), identity, num_workers, None)
    with _terminate_on_sigterm(), _started_pool(context, num_workers, options) as pool:
        in_flight: deque = deque()
        for task in _tasks(path, identity, signature, start, stop):
            in_flight.append(_submit(pool, task))
            if len(in_flight) >= num_workers * TASKS_PER_WORKER:
                yield _result(in_flight.popleft())
        while in_flight:
            yield _result(in_flight.popleft())


def _plan(path: Path, start: int, stop: int | None) -> tuple[tuple, Signature | None]:
    """The file's identity, and how to cut it: the whole file by its signature (the spans
    then read from the file), a shard (or a file without a signature) by the exact
    splitter, which counts questions."""
    identity = file_identity(os.stat(path))
    return identity, learn_signature(path) if start == 0 and stop is None else None


def _tasks(path: Path, identity: tuple, signature: Signature | None, start: int,
           stop: int | None) -> Iterator[tuple]:
    """The arguments of ``_rank_span`` for each span of the file, in order."""
    if signature is not None:
        for number, span in enumerate(signature_spans(path, signature, identity)):
            yield span, number, None, 0, None
        return
    first = 0
    scanner = _Scanner()
    for span, count in question_spans(path, stop, scanner=scanner):
        yield span, first, count, start, scanner.deepest > MAX_DEPTH
        first += count


def rank_here(path: Path, task_name: str, ranker_name: str, ranker_options: dict,
              start: int = 0, stop: int | None = None) -> Iterator[list[tuple[str, str]]]:
    """``rank_in_workers`` with no workers: the same spans, parsed and ranked in this
    process, for one core. Much faster than the inline reader, whose parser hands every JSON
    token to Python; the same result, or ``FastPathFailed`` where the inline run must
    decide."""
    identity, signature = _plan(path, start, stop)
    tasks = _tasks(path, identity, signature, start, stop)
    state = _worker_state(ranker_name, task_name, ranker_options, str(path), identity, 1)
    previous = dict(_worker)
    _worker.clear()
    _worker.update(state)
    try:
        for task in tasks:
            ranked = _rank_span(*task)
            if ranked is None:
                raise FastPathFailed("the questions could not be ranked on the fast path")
            yield ranked
    finally:
        if state["file"] is not None:
            state["file"].close()
        _worker.clear()
        _worker.update(previous)


def _result(pending) -> list[tuple[str, str]]:
    ranked = _outcome(pending)
    if ranked is None:
        raise FastPathFailed("a worker could not rank its questions")
    return ranked
