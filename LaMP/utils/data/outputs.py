"""LaMP output files: gold labels and predictions share one format.

    {"task": "LaMP_7", "golds": [{"id": "610", "output": "..."}, ...]}

This module parses and validates such documents (from a path or from bytes read out of a
zip) and writes them. Every problem is a ``LampError`` naming the source.
"""
from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any, Iterable

from LaMP.utils.data.fileio import (atomic_write_json, parse_json_bytes, read_json,
                                    require_regular_file)
from LaMP.utils.data.questions import as_id
from LaMP.utils.errors import LampError, preview
from LaMP.utils.tasks import Task, get_task, task_of_file

# The largest published LaMP outputs file is a few tens of MB; anything far beyond that is
# not a LaMP file (or is a zip bomb) and is refused before it is read.
MAX_OUTPUTS_BYTES = 512 * 1024 * 1024


@dataclass
class OutputsFile:
    source: str  # the path, or "archive.zip:member.json"
    task: Task
    outputs: dict[str, str]  # id -> output, in file order
    declared: str = ""  # its "task" field as written ("LaMP_2" may be LaMP-2N's: tasks.could_be)

    def __len__(self) -> int:
        return len(self.outputs)


def parse_outputs(document: Any, source: str) -> OutputsFile:
    """Validate a decoded outputs document."""
    if not isinstance(document, dict):
        raise LampError(f'{source}: expected an object with "task" and "golds", '
                        f"found {type(document).__name__}")
    for key in ("task", "golds"):
        if key not in document:
            raise LampError(f'{source}: missing the "{key}" field')
    if not isinstance(document["task"], str):
        raise LampError(f'{source}: "task" must be a string such as "LaMP_1"')
    try:
        get_task(document["task"])
    except LampError as error:
        raise LampError(f"{source}: {error}") from None
    entries = document["golds"]
    if not isinstance(entries, list):
        raise LampError(f'{source}: "golds" must be a list of {{"id", "output"}} objects')
    outputs: dict[str, str] = {}
    duplicates: list[str] = []
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict) or "id" not in entry or "output" not in entry:
            raise LampError(f'{source}: golds[{position}] must be an object with "id" and "output"')
        # LaMP ids are strings; integer ids (a common slip when writing predictions) are
        # accepted by as_id and compared as their decimal text.
        entry_id = as_id(entry["id"])
        if entry_id is None:
            raise LampError(f"{source}: golds[{position}] has id {entry['id']!r}; ids are strings")
        if not isinstance(entry["output"], str):
            raise LampError(f"{source}: id {entry_id} has a non-string output "
                            f"({type(entry['output']).__name__}); outputs are strings")
        if entry_id in outputs:
            duplicates.append(entry_id)
        outputs[entry_id] = entry["output"]
    if duplicates:
        raise LampError(f"{source}: duplicate ids: {preview(duplicates)}")
    # The name alone is not always enough: the original LaMP-2's files say "LaMP_2" too.
    task = task_of_file(document["task"], outputs.values())
    return OutputsFile(source=source, task=task, outputs=outputs, declared=document["task"])


def load_outputs(path: str | os.PathLike, what: str = "outputs file") -> OutputsFile:
    document = read_json(path, what=what, max_bytes=MAX_OUTPUTS_BYTES)
    return parse_outputs(document, str(path))


def parse_outputs_bytes(data: bytes, source: str) -> OutputsFile:
    return parse_outputs(parse_json_bytes(data, source), source)


def outputs_document(task: Task, pairs: Iterable[tuple[str, str]]) -> dict:
    """The LaMP document for ``(id, output)`` pairs."""
    return {"task": task.file_name,
            "golds": [{"id": str(qid), "output": output} for qid, output in pairs]}


def write_outputs(path: str | os.PathLike, task: Task, pairs: Iterable[tuple[str, str]]):
    return atomic_write_json(path, outputs_document(task, pairs), indent=1)


def _is_outputs_member(info: zipfile.ZipInfo) -> bool:
    parts = info.filename.split("/")
    return (not info.is_dir()
            and "__MACOSX" not in parts
            and not parts[-1].startswith("._")  # macOS resource forks
            and parts[-1].lower().endswith(".json"))


def read_outputs_zip(path: str | os.PathLike, what: str = "zip") -> dict[Task, OutputsFile]:
    """Every LaMP outputs file inside a zip, by task; nothing is extracted to disk."""
    path = require_regular_file(path, what, "a zip lists its members at its end, so reading "
                                            "one means seeking back")
    # Opened here because zipfile.is_zipfile(path) answers False for a file it cannot open,
    # which would call an unreadable zip "not a zip archive".
    try:
        with open(path, "rb") as handle:
            is_zip = zipfile.is_zipfile(handle)
    except OSError as error:
        raise LampError(f"{path}: cannot read ({error.strerror})") from None
    if not is_zip:
        raise LampError(f"{path}: not a zip archive")
    by_task: dict[Task, OutputsFile] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            members = sorted((info for info in archive.infolist() if _is_outputs_member(info)),
                             key=lambda info: info.filename)
            for info in members:
                source = f"{path}:{info.filename}"
                if info.flag_bits & 0x1:
                    # zipfile would ask for a password with a RuntimeError
                    raise LampError(f"{source}: encrypted; LaMP outputs files must be plain JSON")
                if info.file_size > MAX_OUTPUTS_BYTES:
                    raise LampError(f"{source}: {info.file_size:,} bytes is too large to be a "
                                    f"LaMP outputs file (limit {MAX_OUTPUTS_BYTES:,})")
                with archive.open(info) as member:
                    # Read at most one byte past the limit: a member whose header lies
                    # about its size cannot make us inflate it all.
                    data = member.read(MAX_OUTPUTS_BYTES + 1)
                if len(data) > MAX_OUTPUTS_BYTES:
                    raise LampError(f"{source}: too large to be a LaMP outputs file")
                parsed = parse_outputs_bytes(data, source)
                if parsed.task in by_task:
                    raise LampError(f"{path}: two files for {parsed.task.file_name}: "
                                    f"{by_task[parsed.task].source} and {source}")
                by_task[parsed.task] = parsed
    except NotImplementedError as error:  # a compression method zipfile cannot read
        raise LampError(f"{path}: cannot read this zip archive ({error})") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, OSError, EOFError) as error:
        # zlib.error: the directory is intact but a member's compressed bytes are not
        raise LampError(f"{path}: damaged zip archive ({error})") from None
    return by_task
