"""Loading LaMP question files, the one loader every stage uses.

A questions file is a JSON list of ``{"id", "input", "profile": [{"id", ...fields}]}``; a
merged (ranked) file adds each question's gold ``"output"``. Files run to gigabytes for the
train splits, so ``iter_questions`` streams them with ``ijson`` (memory bounded by one
question, hostile files included: see ``LaMP.utils.data.jsoninput``) and validates each question
as it arrives, naming file, index, id and field.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from operator import itemgetter
from typing import Any, Iterator

from LaMP.utils.data.fileio import check_readable
from LaMP.utils.data.jsoninput import GuardedReader, RepeatedKeys
from LaMP.utils.errors import LampError
from LaMP.utils.tasks import Task


def as_id(value: Any) -> str | None:
    """A LaMP id as a string (integers are accepted as their decimal text), else ``None``."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def validate_question(question: Any, index: int, source: str, task: Task | None = None,
                      require_output: bool = False) -> dict:
    """Check one question's shape; ids become strings. Returns the question."""
    where = f"{source}: question {index}"
    if not isinstance(question, dict):
        raise LampError(f"{where}: expected an object, found {type(question).__name__}")
    qid = as_id(question.get("id"))
    if qid is None:
        raise LampError(f'{where}: missing or invalid "id"')
    question["id"] = qid
    where = f"{where} (id {qid})"
    if not isinstance(question.get("input"), str):
        raise LampError(f'{where}: missing or non-string "input"')
    profile = question.get("profile")
    if not isinstance(profile, list):
        raise LampError(f'{where}: missing "profile" list')
    fields = task.profile_fields if task is not None else ()
    if not _profile_is_clean(profile, fields):
        _check_profile(profile, fields, where, task)
    if "output" in question and not isinstance(question["output"], str):
        raise LampError(f'{where}: "output" must be a string')
    if require_output and "output" not in question:
        raise LampError(f'{where}: no "output" (a merged file with gold outputs is needed)')
    return question


def _profile_is_clean(profile: list, fields: tuple[str, ...]) -> bool:
    """Whether every item is an object whose id and ``fields`` are all strings (the usual
    case), checked with C-level calls: per-item Python code costs as much as ranking."""
    try:
        # Field by field: no tuple per item.
        return all(set(map(type, map(itemgetter(field), profile))) <= {str}
                   for field in ("id", *fields))
    except (TypeError, KeyError, IndexError):
        return False


def _check_profile(profile: list, fields: tuple[str, ...], where: str, task: Task | None) -> None:
    """Item by item: the first problem as an error; integer ids and numeric fields as text."""
    for position, item in enumerate(profile):
        if not isinstance(item, dict):
            raise LampError(f"{where}: profile item {position} is not an object")
        item_id = as_id(item.get("id"))
        if item_id is None:
            raise LampError(f'{where}: profile item {position} has a missing or invalid "id"')
        item["id"] = item_id
        for field in fields:
            value = item.get(field)
            if value is None:
                raise LampError(f"{where}: profile item {position} (id {item_id}) "
                                f"lacks the {task.name} field {field!r}")
            if not isinstance(value, str):
                # Ratings sometimes arrive as numbers; every template treats fields as text.
                item[field] = str(value)


@contextmanager
def open_json_stream(path: str | os.PathLike, opener: bytes = b"", expected: str = ""
                     ) -> Iterator[GuardedReader]:
    """A checked binary reader on a JSON file for ijson (see ``LaMP.utils.data.jsoninput``): past
    any byte order mark, refusing a document that does not start with ``opener`` and input
    beyond the limits. The file is opened and read once, so a pipe works."""
    try:
        handle = open(path, "rb")
    except OSError as error:
        raise LampError(f"{path}: cannot read ({error.strerror})") from None
    with handle:
        yield GuardedReader(handle, str(path), opener, expected)


def input_problem(text: str, task: Task) -> str | None:
    """Why ``text`` is not a well-formed input of ``task``, or ``None`` when it is.

    The published files hold a few questions whose input lost its instruction (LaMP-2's
    user-split dev question 110 starts with "x " and has neither the instruction nor the
    tag list); such a question cannot be prompted or queried the way its task says.
    """
    if task.input_prefix is not None:
        if not text.lstrip().casefold().startswith(task.input_prefix.casefold()):
            return f"input does not start with the {task.name} instruction {task.input_prefix!r}"
    try:
        task.query(text)
    except LampError:
        return f"input lacks {task.query_description()}"
    return None


def iter_questions(path: str | os.PathLike, task: Task | None = None,
                   require_output: bool = False, what: str = "questions file"
                   ) -> Iterator[dict]:
    """Stream and validate the questions of a LaMP file, one at a time."""
    import ijson

    path = check_readable(path, what)
    index, last_id = -1, None
    keys = RepeatedKeys()
    with open_json_stream(path, b"[", "a JSON list of questions") as handle:
        questions = ijson.items(handle, "item", use_float=True, map_type=keys.map_type)
        try:
            for index, question in enumerate(keys.watched(questions)):
                if keys.found:  # a repeat in this question, or in one parsed ahead of it
                    keys.check(question, str(path), (index,))
                last_id = validate_question(question, index, str(path), task,
                                            require_output)["id"]
                yield question
        except ijson.JSONError as error:
            where = ("before the first question" if index < 0
                     else f"after question {index} (id {last_id})")
            raise LampError(f"{path}: malformed JSON {where} "
                            f"({str(error).splitlines()[0][:200]})") from None
