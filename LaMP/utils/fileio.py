"""Reading and writing the JSON files stages hand to each other.

Reads fail with a ``LampError`` that names the file; writes go to a temporary name in the
same folder and are renamed into place, so a failed run never leaves a half-written output.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

from LaMP.utils.errors import LampError


def check_readable(path: str | os.PathLike, what: str = "file") -> Path:
    path = Path(path)
    if not path.exists():
        raise LampError(f"{what} {path} does not exist")
    if path.is_dir():
        raise LampError(f"{what} {path} is a directory, not a file")
    return path


def parse_json_bytes(data: bytes | str, source: str) -> Any:
    """``json.loads`` with an error that names the source and the position."""
    try:
        return json.loads(data)
    except UnicodeDecodeError as error:
        raise LampError(f"{source}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise LampError(
            f"{source}: malformed JSON ({error.msg} at line {error.lineno} column {error.colno})"
        ) from None


def read_json(path: str | os.PathLike, what: str = "file", max_bytes: int | None = None) -> Any:
    """Load a whole JSON file; ``max_bytes`` refuses files too large to be what we expect."""
    path = check_readable(path, what)
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise LampError(
            f"{path}: {size:,} bytes is too large to be a LaMP {what} (limit {max_bytes:,})"
        )
    try:
        data = path.read_bytes()
    except OSError as error:
        raise LampError(f"{path}: cannot read ({error.strerror})") from None
    return parse_json_bytes(data, str(path))


def check_output_dir(path: str | os.PathLike, what: str = "--output_dir") -> Path:
    """A folder outputs can go to (created later): refuse a path that is an existing file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LampError(f"{what} {path} exists and is not a folder")
    return path


def _temporary_beside(path: Path) -> tuple[int, str]:
    """A new temporary file in ``path``'s folder (created if needed), as LampError on failure."""
    if path.is_dir():
        raise LampError(f"{path} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise LampError(f"{path}: cannot write ({error.strerror})") from None


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    handle, tmp_name = _temporary_beside(path)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as tmp:
            tmp.write(text)
        os.replace(tmp_name, path)
    except BaseException as error:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise LampError(f"{path}: cannot write ({error.strerror})") from None
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def args_path_for(output: str | os.PathLike) -> Path:
    """Where a run's arguments go beside an output file: ``ranking.json`` → ``ranking.args.json``."""
    output = Path(output)
    return output.with_name(f"{output.stem}.args.json")


def save_run_args(path: str | os.PathLike, args: Mapping[str, Any] | Any) -> Path:
    """Save a run's arguments (an ``argparse.Namespace`` or a mapping) as JSON."""
    values = dict(args) if isinstance(args, Mapping) else dict(vars(args))
    plain = {key: value if isinstance(value, (str, int, float, bool, type(None), list))
             else str(value) for key, value in sorted(values.items())}
    return atomic_write_json(path, plain, indent=2)


class JsonListWriter:
    """Write a JSON list one element at a time, then rename it into place.

        with JsonListWriter(path) as out:
            for question in questions:
                out.write(question)

    Memory stays bounded by one element; if the block raises, nothing appears at ``path``.
    """

    _open, _close = "[", "]"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.count = 0
        self._handle = None
        self._tmp_name = None

    def __enter__(self) -> "JsonListWriter":
        handle, self._tmp_name = _temporary_beside(self.path)
        self._handle = os.fdopen(handle, "w", encoding="utf-8")
        self._handle.write(self._open)
        return self

    def write(self, element: Any) -> None:
        self._write_entry(json.dumps(element, ensure_ascii=False))

    def _write_entry(self, text: str) -> None:
        self._handle.write(",\n" if self.count else "\n")
        self._handle.write(text)
        self.count += 1

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            if exc_type is None:
                self._handle.write(f"\n{self._close}\n")
            self._handle.close()
            if exc_type is None:
                os.replace(self._tmp_name, self.path)
        finally:
            if os.path.exists(self._tmp_name):
                os.unlink(self._tmp_name)


class JsonObjectWriter(JsonListWriter):
    """Write a JSON object one ``key: value`` entry at a time, then rename it into place.

    Same guarantees as ``JsonListWriter``: memory bounded by one entry, nothing at ``path``
    if the block raises. Keys are not checked for repeats; the caller knows its keys.
    """

    _open, _close = "{", "}"

    def write(self, key: str, value: Any) -> None:  # type: ignore[override]
        self.write_encoded(key, json.dumps(value, ensure_ascii=False))

    def write_encoded(self, key: str, encoded_value: str) -> None:
        """``write`` with the value already JSON text (encoded elsewhere, e.g. in a worker)."""
        self._write_entry(f"{json.dumps(key, ensure_ascii=False)}: {encoded_value}")
