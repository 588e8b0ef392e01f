"""Reading and writing the JSON files stages hand to each other.

Reads fail with a ``LampError`` that names the file; writes follow the output policy below
(a regular file goes to a temporary name in the same folder and is renamed into place, so a
failed run never leaves a half-written output).
"""
from __future__ import annotations

import codecs
import errno
import io
import json
import logging
import math
import os
import re
import secrets
import shutil
import stat
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from LaMP.utils.data.jsoninput import READ_SIZE, GuardedReader, RepeatedKeys
from LaMP.utils.errors import LampError, raise_if_stopped

logger = logging.getLogger(__name__)


def check_readable(path: str | os.PathLike, what: str = "file", folder: bool = False) -> Path:
    """``path`` exists and is a file (``folder``: a folder), or a one-line LampError."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        # Path.exists() would raise on a name too long and call a symlink loop missing.
        if error.errno == errno.ELOOP:
            raise LampError(f"{what} {path} is a symlink loop") from None
        if error.errno not in (errno.ENOENT, errno.ENOTDIR):
            raise LampError(f"{what} {path}: cannot read ({error.strerror})") from None
        if os.path.islink(path):
            raise LampError(f"{what} {path} is a symlink to {os.readlink(path)}, which does "
                            "not exist") from None
        raise LampError(f"{what} {path} does not exist") from None
    if stat.S_ISDIR(mode) != folder:
        raise LampError(f"{what} {path} is a directory, not a file" if not folder
                        else f"{what} {path} is not a folder")
    return path


def require_regular_file(path: str | os.PathLike, what: str, why: str) -> Path:
    """Refuse a pipe (``<(zcat x.gz)``, a FIFO) where a stage must read a file more than
    once or seek in it: a pipe's bytes can be read only once. ``why`` finishes the sentence
    "a regular file is needed because ..."."""
    path = check_readable(path, what)
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        kind = "a pipe" if stat.S_ISFIFO(mode) else "not a regular file"
        raise LampError(f"{what} {path} is {kind}; a regular file is needed because {why}")
    return path


def parse_json_bytes(data: bytes | str, source: str) -> Any:
    """``json.loads`` with an error that names the source and the position, after the
    checks of ``LaMP.utils.data.jsoninput`` (UTF-8, nesting, number sizes, lone surrogates,
    repeated keys)."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")  # a lone surrogate is then refused
    reader = GuardedReader(io.BytesIO(data), source)
    while reader.read(READ_SIZE):
        pass  # checking only: json.loads below parses the whole text at once
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    keys = RepeatedKeys()
    try:
        document = json.loads(data[start:].decode("utf-8"),
                              object_pairs_hook=keys.object_pairs_hook)
    except json.JSONDecodeError as error:
        raise LampError(
            f"{source}: malformed JSON ({error.msg} at line {error.lineno} column {error.colno})"
        ) from None
    keys.check(document, source)
    return document


def read_json(path: str | os.PathLike, what: str = "file", max_bytes: int | None = None) -> Any:
    """Load a whole JSON file; ``max_bytes`` refuses files too large to be what we expect.
    The file is read once, front to back, so a pipe works."""
    path = check_readable(path, what)
    status = path.stat()
    if max_bytes is not None and status.st_size > max_bytes:
        raise LampError(f"{path}: {status.st_size:,} bytes is too large to be a LaMP {what} "
                        f"(limit {max_bytes:,})")
    try:
        if stat.S_ISREG(status.st_mode):
            data = path.read_bytes()
        else:
            # A pipe has no size to check up front: read one byte past the limit at most.
            with open(path, "rb") as handle:
                data = handle.read(-1 if max_bytes is None else max_bytes + 1)
    except OSError as error:
        raise LampError(f"{path}: cannot read ({error.strerror})") from None
    if max_bytes is not None and len(data) > max_bytes:
        raise LampError(f"{path}: more than {max_bytes:,} bytes is too large to be a LaMP "
                        f"{what} (limit {max_bytes:,})")
    return parse_json_bytes(data, str(path))


# -- the output policy ------------------------------------------------------------------
# Every file a stage writes goes through _Output below, and every script checks its output
# paths with check_outputs before any work starts:
#  - an output that is, contains or lies inside one of the run's inputs is refused, and so
#    are two outputs that are one file or one inside the other (the second write would
#    replace the first);
#  - a regular file is replaced atomically (temporary beside it, then a rename) and keeps
#    its mode; a new file gets 0666 & ~umask, as `open` would give it;
#  - a symlink is followed: its target is replaced, the link stays;
#  - a character device, FIFO or an inherited descriptor (/dev/stdout, /dev/fd/N,
#    /proc/self/fd/N) is written to directly: renaming over it would replace /dev/null;
#  - temporaries are named after the writing process, so a run killed mid-write (SIGKILL)
#    leaves something the next run for the same output recognises and removes;
#  - JSON is strict: non-finite numbers are written as null (and counted in the log).

# Paths that name an already open descriptor: writing through a rename would detach them.
_DESCRIPTOR_PATH = re.compile(r"^/(dev/(stdout|stderr|fd/\d+)|proc/(self|\d+)/fd/\d+)$")
# `.{name}.lamp-tmp-{host}-{pid}-{random}.tmp`: host and pid say whose temporary it is, so that
# a stale one (its writer is gone) can be told from one another run is writing right now; a
# pid says nothing about another machine's processes (a shared file system), so only this
# host's temporaries are ever judged.
_TMP_MARK = ".lamp-tmp-"
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", os.uname().nodename) or "host"
_active_temporaries: set[str] = set()  # this process's temporaries being written now
# Most file systems allow 255 bytes per name; the temporary adds its mark, host, pid and a
# random part to the output's name, so a long but legal output name is shortened in it.
_NAME_MAX = 255
# The dot, the mark, the host, a pid (Linux pids stay below 2**22), the random part.
_TMP_SUFFIX_MAX = 1 + len(f"{_TMP_MARK}{_HOST}-{2**22}-{'0' * 8}.tmp")


def _tmp_prefix(target: Path) -> str:
    """``.{name}.lamp-tmp-{host}-``: the start of every temporary of ``target``."""
    name = target.name.encode("utf-8", "surrogateescape")
    if len(name) + _TMP_SUFFIX_MAX > _NAME_MAX:
        name = name[:_NAME_MAX - _TMP_SUFFIX_MAX]
    # surrogateescape: a character cut in half still names the same bytes on disk.
    return f".{name.decode('utf-8', 'surrogateescape')}{_TMP_MARK}{_HOST}-"


def _is_direct(path: Path) -> bool:
    """Whether ``path`` is written in place: a device, a FIFO or an open descriptor."""
    if _DESCRIPTOR_PATH.match(str(path)):
        return True
    try:
        mode = os.stat(path).st_mode  # follows symlinks: /dev/stdin links to /proc/…
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def _first_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(".")


def _unresolvable_link(path: Path) -> str | None:
    """Why the symlink ``path`` cannot be written through, or None (not a symlink, or one
    that resolves or dangles into a place that can be created)."""
    if not os.path.islink(path):
        return None
    try:
        os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            # Without this check the rename would replace the link itself: the user's
            # symlink would silently become a regular file.
            return "is a symlink loop"
    return None


def _check_writable_place(path: Path, what: str, folder: bool) -> None:
    """``path`` can be created or replaced: no file in the way, write permission held."""
    named = f"{what} {path}" if what else str(path)
    for candidate in (path, *path.parents):
        problem = _unresolvable_link(candidate)
        if problem:
            raise LampError(f"{named}: {candidate} {problem}")
    ancestor = _first_existing(path if folder else path.parent)
    if os.path.islink(ancestor) and not ancestor.exists():
        # A dangling link where a folder must be: mkdir cannot make a folder through it.
        raise LampError(f"{named}: {ancestor} is a symlink to {os.readlink(ancestor)}, "
                        "which does not exist")
    if ancestor.exists() and not ancestor.is_dir():
        raise LampError(f"{named}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise LampError(f"{named}: cannot write in {ancestor} (permission denied)")
    if not folder and path.is_file() and not os.access(path, os.W_OK):
        raise LampError(f"{named}: the file is read-only (permission denied)")


def check_output_dir(path: str | os.PathLike, what: str = "--output_dir") -> Path:
    """A folder outputs can go to (created later): refuse a file in the way or no permission."""
    path = Path(path)
    try:
        _check_folder_place(path, what)
    except OSError as error:  # a name too long, say: Path.exists() raises on it
        raise LampError(f"{what} {path}: {error.strerror or error}") from None
    return path


def _check_folder_place(path: Path, what: str) -> None:
    if path.exists() and not path.is_dir():
        raise LampError(f"{what} {path} exists and is not a folder")
    _check_writable_place(path, what, folder=True)


def _inputs(inputs: Mapping[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(flag, path as given, resolved path) of every input that exists as a path (a hub
    model name such as ``google/flan-t5-base`` is not a path and cannot be overwritten)."""
    for flag, value in inputs.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if item is not None and os.path.exists(item):
                yield flag, str(item), os.path.realpath(item)


def _inside(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip(os.sep) + os.sep)


def _links_under(folder: Path) -> Iterator[Path]:
    """Every symlink inside ``folder`` (not followed): a write to a fixed name in an output
    folder (``dev_questions.json``, ``checkpoints/``) goes through a link that is there."""
    for root, dirs, names in os.walk(folder, followlinks=False):
        for name in (*dirs, *names):
            if os.path.islink(os.path.join(root, name)):
                yield Path(root, name)


def _same_file(resolved: str, path: Path, other_resolved: str, other: str | Path) -> bool:
    """Whether two paths name one file: the same resolved path (``./``, ``..``, symlinks,
    dangling ones included), or one inode (hard links)."""
    if resolved == other_resolved:
        return True
    try:
        return os.path.samefile(path, other)
    except OSError:  # one of them does not exist (yet)
        return False


def _conflict(resolved: str, path: Path, given: str, in_resolved: str) -> str | None:
    """How an output resolving to ``resolved`` meets an input, or None if it does not."""
    if _same_file(resolved, path, in_resolved, given):
        return "is"
    if _inside(in_resolved, resolved):
        return "contains"
    if _inside(resolved, in_resolved):
        return "is inside"
    return None


class _Planned:
    """One path a run will write: its flag and the path as given (for messages: a Path
    drops a leading ./), whether it is a folder, and for a file or folder inside a folder
    output (its ``contents``), that folder's flag."""

    __slots__ = ("flag", "given", "path", "folder", "owner")

    def __init__(self, flag: str, given: str, folder: bool, owner: str | None = None):
        self.flag, self.given, self.folder, self.owner = flag, given, folder, owner
        self.path = Path(given)


def check_outputs(*, inputs: Mapping[str, Any], files: Mapping[str, Any] | None = None,
                  folders: Mapping[str, Any] | None = None,
                  contents: Mapping[str, Sequence[str]] | None = None) -> None:
    """Refuse, before any work, outputs that would overwrite the run's inputs or each
    other, or cannot be written. Each mapping is ``{flag: path}`` (``None`` skipped; an
    input may be a list); ``contents`` names, per folder flag, what the run writes inside
    that folder (``{"--output_dir": ("predictions.json", "users/")}``, a folder with a
    trailing ``/``), each then checked as an output of its own.

    An output conflicts with an input when both resolve to the same file (symlinks and hard
    links included), when an output folder contains an input, or when an output lies inside
    an input folder (a model folder, say). Two outputs conflict when they are one file, or
    when one lies inside the other (a folder output's own contents excepted): the second
    write would replace the first, or find a file where it needs a folder.
    """
    for flag, path in (*(files or {}).items(), *(folders or {}).items()):
        if isinstance(path, str) and not path:
            # Path("") is ".", the working folder: an empty flag would be read as "here".
            raise LampError(f"{flag} is an empty path; give a "
                            f"{'folder' if flag in (folders or {}) else 'file'} name")
    outputs = [_Planned(flag, str(path), False) for flag, path in (files or {}).items() if path]
    outputs += [_Planned(flag, str(path), True) for flag, path in (folders or {}).items() if path]
    for flag, names in (contents or {}).items():
        if (folders or {}).get(flag):
            outputs += [_Planned(flag, str(Path(folders[flag], name)), name.endswith("/"),
                                 owner=flag) for name in names]
    known_inputs = list(_inputs(inputs))
    for output in outputs:
        try:
            _check_output(output, known_inputs)
        except OSError as error:  # a name too long, say: Path.is_dir() raises on it
            raise LampError(f"{output.flag} {output.path}: {error.strerror or error}") from None
    _check_distinct([output for output in outputs if not _is_direct(output.path)])


def _check_output(output: _Planned, known_inputs: list[tuple[str, str, str]]) -> None:
    """check_outputs for one output."""
    flag, path, folder = output.flag, output.path, output.folder
    if _is_direct(path):
        return  # written in place, never replaced: nothing is lost
    if folder:
        _check_folder_place(path, flag)
    elif path.is_dir():
        if output.owner:  # a fixed name in a folder output: the name is not the user's
            raise LampError(f"{flag} {path.parent}: {path.name} is a folder; remove it or "
                            "choose another folder")
        raise LampError(f"{flag} {path} is a folder; give a file name")
    else:
        _check_writable_place(path, flag, folder=False)
    resolved = os.path.realpath(path)
    for in_flag, given, in_resolved in known_inputs:
        how = _conflict(resolved, path, given, in_resolved)
        if how:
            raise LampError(f"{flag} {path} {how} the input {in_flag} {given}; "
                            "choose another output path")
    if folder and output.owner is None and path.is_dir() and known_inputs:
        # A link in the folder is written through: out/dev_questions.json -> the
        # published file would have it replaced by the built one.
        for link in _links_under(path):
            link_resolved = os.path.realpath(link)
            for in_flag, given, in_resolved in known_inputs:
                how = _conflict(link_resolved, link, given, in_resolved)
                if how:
                    raise LampError(f"{flag} {path} holds {link}, a symlink that {how} "
                                    f"the input {in_flag} {given}; remove the link or "
                                    "choose another folder")


def _check_distinct(outputs: list[_Planned]) -> None:
    """No two outputs are one file, and none lies inside another (a folder output's own
    contents excepted)."""
    resolved = [os.path.realpath(output.path) for output in outputs]
    for i, first in enumerate(outputs):
        for j in range(i + 1, len(outputs)):
            second = outputs[j]
            if _same_file(resolved[j], second.path, resolved[i], first.path):
                raise LampError(f"{second.flag} {second.given} is the same file as "
                                f"{first.flag} {first.given}; give each output its own path")
            for outer, inner, outer_at, inner_at in ((first, second, i, j),
                                                     (second, first, j, i)):
                own = outer.owner is None and inner.owner == outer.flag
                if not own and _inside(resolved[inner_at], resolved[outer_at]):
                    kind = "folder" if outer.folder else "file"
                    raise LampError(f"{inner.flag} {inner.given} lies inside {outer.flag} "
                                    f"{outer.given}, which is written as a {kind}; give each "
                                    "output its own path")


# What a training run leaves in its folder (train_llm.py, a Trainer, save_pretrained).
TRAINING_RUN_FILES = ("checkpoints", "adapter_config.json", "adapter_model.safetensors",
                      "adapter_model.bin", "config.json", "model.safetensors",
                      "model.safetensors.index.json", "pytorch_model.bin", "test_predictions.json")
# What any stage's run leaves (evaluate_llm.py writes exactly these three).
RUN_FILES = ("args.json", "predictions.json", "results_output.json")


def _present(folder: Path, names: Sequence[str]) -> list[str]:
    return [name for name in names if os.path.lexists(folder / name)]


def _records_training(args_file: Path) -> bool:
    """Whether an ``args.json`` is a training run's (it names ``train_data``)."""
    try:
        saved = read_json(args_file, "arguments file")
    except LampError:
        return True  # not one we can read as ours: treat it as someone else's run
    return not isinstance(saved, dict) or "train_data" in saved


def check_new_run_folder(path: str | os.PathLike, flag: str, allowed_by: str) -> None:
    """Refuse a folder that holds a previous run; ``allowed_by`` names the flags that allow it
    (a new training run would replace its files and rotate away its checkpoints)."""
    path = Path(path)
    found = _present(path, TRAINING_RUN_FILES + RUN_FILES) if path.is_dir() else []
    if found:
        raise LampError(f"{flag} {path} holds a previous run ({', '.join(found)}); "
                        f"pass {allowed_by}, or choose another folder")


def check_fresh_folder(path: str | os.PathLike, flag: str) -> None:
    """Refuse a folder that holds anything as the target of ``atomic_folder`` (a trained
    retriever or selector, which appears whole at the end): only a new or empty one."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise LampError(f"{flag} {path} already exists and is not an empty folder; choose a "
                        "new one")


def check_evaluation_folder(path: str | os.PathLike, flag: str) -> None:
    """Refuse a training run's folder as an evaluation's output: its predictions.json,
    results_output.json and args.json would replace the run's own. An earlier evaluation's
    folder is accepted (its files are the ones being redone)."""
    path = Path(path)
    if not path.is_dir():
        return
    found = _present(path, TRAINING_RUN_FILES)
    if (path / "args.json").exists() and _records_training(path / "args.json"):
        found.append("args.json")
    if found:
        raise LampError(f"{flag} {path} holds a training run ({', '.join(found)}); an "
                        "evaluation does not write over it: choose another folder")


def remove_outputs(folder: str | os.PathLike, names: Sequence[str]) -> None:
    """Remove what a rerun does not produce again, so that no stale result sits beside the
    new ones (a symlink is removed, not what it points to)."""
    for name in names:
        path = Path(folder) / name
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif os.path.lexists(path):
                path.unlink()
            else:
                continue
        except OSError as error:
            raise LampError(f"{path}: cannot remove the previous run's output "
                            f"({error.strerror})") from None
        logger.info("removed %s from the previous run", path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _remove_stale_temporaries(target: Path) -> None:
    """Remove temporaries of ``target`` left by writers that were killed (their pid is gone,
    or is ours but not one of our current writes)."""
    pattern = re.compile(re.escape(_tmp_prefix(target)) + r"(\d+)-[0-9a-f]{8}\.tmp")
    try:
        names = os.listdir(target.parent)
    except OSError:
        return
    for name in names:
        match = pattern.fullmatch(name)
        if match is None:
            continue
        stale = target.parent / name
        pid = int(match.group(1))
        if str(stale) in _active_temporaries or (pid != os.getpid() and _pid_alive(pid)):
            continue
        logger.info("removing %s, left by an interrupted run", stale)
        try:
            if stale.is_dir() and not stale.is_symlink():  # an atomic_folder's temporary
                shutil.rmtree(stale)
            else:
                stale.unlink()
        except OSError:
            pass  # removed by a concurrent run, or not ours to remove: harmless either way


def _strict_json(obj: Any, indent: int | None = None) -> tuple[str, int]:
    """JSON text of ``obj`` with non-finite numbers as null, and how many there were.

    ``json.dumps`` would write bare ``NaN``/``Infinity``, which is not JSON and which no
    strict reader (jq, JavaScript, ijson) accepts.
    """
    try:
        return json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False), 0
    except ValueError:
        pass
    count = 0

    def clean(value):
        nonlocal count
        if isinstance(value, float) and not math.isfinite(value):
            count += 1
            return None
        if isinstance(value, Mapping):
            return {key: clean(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(item) for item in value]
        return value

    return json.dumps(clean(obj), indent=indent, ensure_ascii=False, allow_nan=False), count


class _Output:
    """One output being written: to a temporary renamed over the target on ``commit``, or
    straight into a device/FIFO/descriptor. Errors are ``LampError`` naming the path."""

    def __init__(self, path: str | os.PathLike, binary: bool = False):
        self.path = Path(path)
        self.direct = _is_direct(self.path)
        self.tmp_name: str | None = None
        self.non_finite = 0
        if self.direct:
            # Whatever this process printed before must come first on a shared descriptor.
            sys.stdout.flush()
            sys.stderr.flush()
            # O_APPEND and no O_TRUNC: /dev/stdout redirected to a file keeps what the
            # shell (or an earlier write) put there.
            flags, mode = os.O_WRONLY | os.O_APPEND, 0
        else:
            try:
                self._prepare_target()
            except OSError as error:  # a probe of the path itself: a name too long, say
                raise self._error(error) from None
            flags, mode = os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666  # umask applies
        opened = self.tmp_name or str(self.path)
        try:
            handle = os.open(opened, flags | getattr(os, "O_CLOEXEC", 0), mode)
        except OSError as error:
            self._forget()
            raise self._error(error) from None
        if self.tmp_name is not None:
            _active_temporaries.add(self.tmp_name)
            if self.keep_mode is not None:
                os.fchmod(handle, self.keep_mode)
                try:  # the owner too, where allowed (root; or a group of ours)
                    os.fchown(handle, *self.keep_owner)
                except OSError:
                    pass  # not allowed: the file becomes ours, as any rewrite would make it
        self.handle = (os.fdopen(handle, "wb") if binary
                       else os.fdopen(handle, "w", encoding="utf-8"))

    def _prepare_target(self) -> None:
        # A symlink is followed so that the link survives and its target gets the content.
        self.target = Path(os.path.realpath(self.path)) if self.path.is_symlink() else self.path
        if self.target.is_dir():
            raise LampError(f"{self.path} is a folder; give a file name")
        _check_writable_place(self.target, "", folder=False)
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            existing = self.target.stat() if self.target.exists() else None
        except OSError as error:
            raise self._error(error) from None
        self.keep_mode = stat.S_IMODE(existing.st_mode) if existing else None
        self.keep_owner = (existing.st_uid, existing.st_gid) if existing else None
        _remove_stale_temporaries(self.target)
        self.tmp_name = str(self.target.parent / f"{_tmp_prefix(self.target)}"
                                                 f"{os.getpid()}-{secrets.token_hex(4)}.tmp")

    def _error(self, error: OSError) -> LampError:
        return LampError(f"{self.path}: cannot write ({error.strerror or error})")

    def write(self, data: str | bytes) -> None:
        try:
            self.handle.write(data)
        except OSError as error:
            raise self._error(error) from None

    def commit(self) -> None:
        try:
            self.handle.close()  # a full disk often shows only here, when buffers flush
            raise_if_stopped()  # a stop whose exception was lost publishes nothing
            if self.tmp_name is not None:
                os.replace(self.tmp_name, self.target)
        except OSError as error:
            raise self._error(error) from None
        finally:
            self._forget()
        if self.non_finite:
            logger.warning("%s: %d non-finite numbers (NaN or infinity) written as null",
                           self.path, self.non_finite)

    def abort(self) -> None:
        try:
            self.handle.close()
        except OSError:
            pass  # the write already failed; the temporary goes either way
        self._forget()

    def _forget(self) -> None:
        if self.tmp_name is not None:
            _active_temporaries.discard(self.tmp_name)
            if os.path.lexists(self.tmp_name):
                os.unlink(self.tmp_name)
            self.tmp_name = None

    def write_json(self, obj: Any, indent: int | None = None) -> None:
        text, count = _strict_json(obj, indent)
        self.non_finite += count
        self.write(text)


@contextmanager
def open_output(path: str | os.PathLike, binary: bool = False) -> Iterator[Any]:
    """A file object for a whole output (``binary`` for zips), under the output policy:
    nothing appears at ``path`` if the block raises.

        with open_output("golds.zip", binary=True) as handle:
            zipfile.ZipFile(handle, "w")…
    """
    output = _Output(path, binary=binary)
    try:
        yield output.handle
    except OSError as error:
        # The caller writes to the handle itself (zipfile does), so a full disk shows up
        # here; an error reading another file names that file.
        output.abort()
        raise LampError(f"{error.filename or path}: cannot "
                        f"{'read' if error.filename else 'write'} ({error.strerror or error})"
                        ) from None
    except BaseException:
        output.abort()
        raise
    output.commit()


@contextmanager
def writing_into(folder: str | os.PathLike) -> Iterator[None]:
    """For writes made by other libraries (a Trainer's checkpoints, ``save_pretrained``): an
    ``OSError`` (a full disk, no permission) becomes one ``LampError`` naming the file."""
    try:
        yield
    except OSError as error:
        raise LampError(f"{error.filename or folder}: {error.strerror or error}") from None


@contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``target`` to fill, renamed to ``target`` when the block
    ends without an error and removed otherwise: ``target`` appears whole or not at all (a
    per-user adapter). The temporary is named like a file's (``.<name>.lamp-tmp-<host>-<pid>-
    ….tmp``), so the next writer of ``target`` removes one a SIGKILL left. ``target`` must
    not exist when the block ends (two runs writing one folder): a ``LampError`` then.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LampError(f"{target.parent}: cannot create ({error.strerror or error})") from None
    _remove_stale_temporaries(target)
    temporary = target.parent / f"{_tmp_prefix(target)}{os.getpid()}-{secrets.token_hex(4)}.tmp"
    _active_temporaries.add(str(temporary))
    try:
        try:
            temporary.mkdir()
            yield temporary
            raise_if_stopped()
            os.rename(temporary, target)  # no replace: a folder is never renamed over another
        except OSError as error:
            if os.path.lexists(target):
                raise LampError(f"{target}: written by another run at the same time "
                                "(two runs share its folder?)") from None
            raise LampError(f"{error.filename or target}: cannot write "
                            f"({error.strerror or error})") from None
    finally:
        _active_temporaries.discard(str(temporary))
        if os.path.lexists(temporary):
            shutil.rmtree(temporary, ignore_errors=True)


def remove_stale_temporaries_in(folder: str | os.PathLike) -> None:
    """Remove every temporary in ``folder`` that a killed writer on this host left (files
    and ``atomic_folder`` folders alike), not only those of one target."""
    pattern = re.compile(r"\.(.+)" + re.escape(f"{_TMP_MARK}{_HOST}-") + r"\d+-[0-9a-f]{8}\.tmp")
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return
    for name in names:
        match = pattern.fullmatch(name)
        if match is not None:
            _remove_stale_temporaries(Path(folder) / match.group(1))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` under the output policy (atomic for regular files)."""
    output = _Output(path)
    try:
        output.write(text)
    except BaseException:
        output.abort()
        raise
    output.commit()
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> Path:
    """Write ``obj`` as strict JSON (non-finite numbers as null) under the output policy."""
    output = _Output(path)
    try:
        output.write_json(obj, indent)
        output.write("\n")
    except BaseException:
        output.abort()
        raise
    output.commit()
    return Path(path)


def args_path_for(output: str | os.PathLike) -> Path | None:
    """Where a run's arguments go beside an output file: ``ranking.json`` → ``ranking.args.json``.

    None for an output without a file name (``.``, ``/``: a folder, which ``check_outputs``
    refuses as a file output) and for one written in place (a device, FIFO or descriptor):
    ``/dev/null`` has no folder of results to hold ``/dev/null.args.json``, and making one
    there would leave a stray file in /dev.
    """
    output = Path(output)
    if _is_direct(output) or not output.name:
        return None
    return output.with_name(f"{output.stem}.args.json")


def save_run_args(path: str | os.PathLike | None, args: Mapping[str, Any] | Any) -> Path | None:
    """Save a run's arguments (an ``argparse.Namespace`` or a mapping) as JSON; ``path`` None
    (see ``args_path_for``) saves nothing."""
    if path is None:
        logger.info("no arguments file: the output is written in place (a device or pipe)")
        return None
    return atomic_write_json(path, plain_run_args(args), indent=2)


def plain_run_args(args: Mapping[str, Any] | Any) -> dict[str, Any]:
    """A run's arguments as ``save_run_args`` writes them: JSON values (anything else as its
    ``str``), sorted by name; what a saved args.json is compared with."""
    values = dict(args) if isinstance(args, Mapping) else dict(vars(args))
    return {key: value if isinstance(value, (str, int, float, bool, type(None), list, dict))
            else str(value) for key, value in sorted(values.items())}


class JsonListWriter:
    """Write a JSON list one element at a time, then rename it into place.

        with JsonListWriter(path) as out:
            for question in questions:
                out.write(question)

    Memory stays bounded by one element; if the block raises, nothing appears at ``path``
    (a device or FIFO output gets what was written so far: it cannot be taken back).
    """

    _open, _close = "[", "]"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.count = 0
        self._output: _Output | None = None

    def __enter__(self) -> "JsonListWriter":
        self._output = _Output(self.path)
        try:
            self._output.write(self._open)
        except BaseException:
            self._output.abort()
            raise
        return self

    def write(self, element: Any) -> None:
        self._write_entry(element)

    def _write_entry(self, element: Any, key: str | None = None) -> None:
        self._output.write(",\n" if self.count else "\n")
        if key is not None:
            self._output.write_json(key)
            self._output.write(": ")
        self._output.write_json(element)
        self.count += 1

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self._output.abort()
            return
        try:
            self._output.write(f"\n{self._close}\n")
        except BaseException:
            self._output.abort()
            raise
        self._output.commit()


class JsonObjectWriter(JsonListWriter):
    """Write a JSON object one ``key: value`` entry at a time, then rename it into place.

    Same guarantees as ``JsonListWriter``: memory bounded by one entry, nothing at ``path``
    if the block raises. Keys are not checked for repeats; the caller knows its keys.
    """

    _open, _close = "{", "}"

    def write(self, key: str, value: Any) -> None:  # type: ignore[override]
        self._write_entry(value, key=key)
