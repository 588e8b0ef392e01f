"""Feedback files: the LLM's verdict on each candidate profile item of each question.

One JSON object per line, one line per question, in the order the questions were answered:

    {"id": "310", "candidates": ["3102", "3100", ...], "utilities": [0.75, 1.0, ...],
     "outputs": ["4", "5", ...]}

``candidates`` are profile item ids in the first-stage retriever's order (best first),
``utilities[j]`` is the task metric of the answer the LLM gave with ``candidates[j]`` as its
only profile item (``outputs[j]``), higher better. Lines are appended as questions are done, so
an interrupted run loses at most the question being written; ``FeedbackAppender`` picks the
file up where it ended.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterator, Sequence

from LaMP.utils.data.fileio import check_readable, parse_json_bytes
from LaMP.utils.data.questions import as_id
from LaMP.utils.errors import LampError

# Far beyond any real line (20 candidates with 128-token answers take a few kB): a longer
# line is not a feedback record, and reading it whole would cost its size in memory.
MAX_LINE_BYTES = 16 * 1024 * 1024


def validate_record(record, where: str) -> dict:
    """One feedback line's object, checked: ids as strings, lists of one length, finite
    utilities. Returns it."""
    if not isinstance(record, dict):
        raise LampError(f"{where}: expected a JSON object, found {type(record).__name__}")
    qid = as_id(record.get("id"))
    if qid is None:
        raise LampError(f'{where}: missing or invalid "id"')
    record["id"] = qid
    where = f"{where} (id {qid})"
    lists = {}
    for field in ("candidates", "utilities", "outputs"):
        if not isinstance(record.get(field), list):
            raise LampError(f'{where}: missing "{field}" list')
        lists[field] = record[field]
    candidates = [as_id(item) for item in lists["candidates"]]
    if None in candidates:
        raise LampError(f'{where}: "candidates" must be profile item ids (strings)')
    if len(set(candidates)) != len(candidates):
        raise LampError(f"{where}: a candidate is listed twice")
    record["candidates"] = candidates
    if not all(isinstance(value, (int, float)) and not isinstance(value, bool)
               and math.isfinite(value) for value in lists["utilities"]):
        raise LampError(f'{where}: "utilities" must be finite numbers')
    if not all(isinstance(text, str) for text in lists["outputs"]):
        raise LampError(f'{where}: "outputs" must be strings')
    if not len(candidates) == len(lists["utilities"]) == len(lists["outputs"]):
        raise LampError(f'{where}: "candidates", "utilities" and "outputs" differ in length')
    return record


def _lines(handle, source: str) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, bytes, ends with a newline) of each line, bounded in length."""
    number = 0
    while True:
        line = handle.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        number += 1
        if len(line) > MAX_LINE_BYTES:
            raise LampError(f"{source}: line {number} is longer than {MAX_LINE_BYTES:,} bytes; "
                            "not a feedback file")
        yield number, line, line.endswith(b"\n")


def _parse(line: bytes, where: str) -> dict:
    # The checks of every JSON reader (a repeated key, nesting, NaN, number sizes, UTF-8):
    # a line is a JSON document of its own.
    return validate_record(parse_json_bytes(line, where), where)


def read_feedback(paths: Sequence[str | os.PathLike]) -> dict[str, dict]:
    """Every record of one feedback file or of several (shards), by question id; a question
    in two lines (or two files) is an error, and so is a last line cut short by a run that
    was stopped (rerun collect_feedback.py to finish it)."""
    records: dict[str, dict] = {}
    where_from: dict[str, str] = {}
    for path in paths:
        path = check_readable(path, "feedback file")
        try:
            handle = open(path, "rb")
        except OSError as error:
            raise LampError(f"{path}: cannot read ({error.strerror})") from None
        with handle:
            for number, line, complete in _lines(handle, str(path)):
                where = f"{path}: line {number}"
                if not complete:
                    raise LampError(f"{where} is cut short (its run was stopped); run "
                                    "collect_feedback.py again with the same flags to finish")
                if not line.strip():
                    continue
                record = _parse(line, where)
                if record["id"] in records:
                    raise LampError(f"question {record['id']} has feedback twice: "
                                    f"{where_from[record['id']]} and {where}")
                records[record["id"]] = record
                where_from[record["id"]] = where
    return records


def _whole_record(line: bytes, where: str) -> bool:
    try:
        _parse(line, where)
    except LampError:
        return False
    return True


class FeedbackAppender:
    """Appends records to a feedback file, one line per question, each on disk before the
    next is answered; reopening a file continues it (``done``: the ids it already holds).

    A last line without its newline is what a stopped run leaves mid-write: it is cut off
    (its question is answered again). Any other malformed line is an error, since the file
    is then not one this class wrote. A file that does not exist yet is created by the
    first ``write`` (a run that fails before its first record leaves none). While open, the
    file is locked against a second writer (two shards given one output file).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.done: set[str] = set()
        self.cut = 0
        self._handle = None
        if os.path.lexists(self.path) and not self.path.is_file():
            raise LampError(f"{self.path}: not a regular file (a feedback file is appended to "
                            "and read back on a rerun)")
        if self.path.exists():
            self._open()
            try:
                self.cut = self._read_back()
            except BaseException:
                self.close()
                raise

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a+b")
        except OSError as error:
            raise LampError(f"{self.path}: cannot write ({error.strerror})") from None
        try:
            self._lock()
        except BaseException:
            self.close()
            raise

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, one writer per file is up to the user
            return
        try:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise LampError(f"{self.path}: another run is writing this feedback file; give "
                            "each shard its own --output_file") from None

    def _read_back(self) -> int:
        """Collect the ids already done; cut a partial last line. Returns bytes cut."""
        self._handle.seek(0)
        good_end = 0
        for number, line, complete in _lines(self._handle, str(self.path)):
            where = f"{self.path}: line {number}"
            if not complete:
                if _whole_record(line, where):  # only its newline is missing (hand-edited)
                    self._handle.write(b"\n")
                    self._add(_parse(line, where), where)
                    good_end += len(line) + 1
                break
            if line.strip():
                self._add(_parse(line, where), where)
            good_end = self._handle.tell()
        size = self._handle.seek(0, os.SEEK_END)
        if size > good_end:
            self._handle.truncate(good_end)
        return size - good_end

    def _add(self, record: dict, where: str) -> None:
        if record["id"] in self.done:
            raise LampError(f"{where}: question {record['id']} occurs twice")
        self.done.add(record["id"])

    def write(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"
        if self._handle is None:
            self._open()
            if self._handle.seek(0, os.SEEK_END):
                self.close()
                raise LampError(f"{self.path}: written by another run since this one started; "
                                "give each run its own --output_file")
        try:
            self._handle.write(line.encode("utf-8"))
            self._handle.flush()
            os.fsync(self._handle.fileno())
        except OSError as error:
            raise LampError(f"{self.path}: cannot write ({error.strerror or error})") from None
        self.done.add(record["id"])

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "FeedbackAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

