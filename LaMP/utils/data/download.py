"""The machinery of download_data.py: the server's layout, resumable HTTP with retries, the
checks a download passes before it takes its final name, the manifest that lets a complete
file be skipped, the --out_dir lock, and --fix_known_issues."""
from __future__ import annotations

import errno
import http.client
import logging
import os
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout
from tqdm import tqdm

from LaMP.utils.data.fileio import JsonListWriter, atomic_write_json, read_json
from LaMP.utils.data.outputs import MAX_OUTPUTS_BYTES, OutputsFile, parse_outputs, write_outputs
from LaMP.utils.data.questions import input_problem, iter_questions
from LaMP.utils.errors import LampError, preview, raise_if_stopped
from LaMP.utils.tasks import TASKS, Task, get_task

# The script's name, not __name__: every line this module logs is download_data.py's report.
logger = logging.getLogger("download_data")

DEFAULT_BASE_URL = "https://ciir.cs.umass.edu/downloads/LaMP"


@dataclass(frozen=True)
class Source:
    """One downloadable dataset: its local folder name and its path on the server."""

    name: str  # the local folder and the --tasks spelling
    remote: str  # the path under the base URL (and under "time/" for the time split)
    task: Task  # the registry task its files follow
    default: bool  # downloaded when --tasks is not given


# The URL scheme, in one place: {base}/{split dir}{remote}/{set}/{set}_{kind}.json.
# The current LaMP-2 (movie tagging) lives under LaMP_2/new/ in both splits; the older
# LaMP-2 (news categorization, another profile schema) stayed under LaMP_2/ and is only
# fetched when asked for by name. LaMP-6 is not on the server (Avocado is licensed).
SOURCES = (
    Source("LaMP_1", "LaMP_1", get_task("LaMP-1"), True),
    Source("LaMP_2", "LaMP_2/new", get_task("LaMP-2"), True),
    Source("LaMP_3", "LaMP_3", get_task("LaMP-3"), True),
    Source("LaMP_4", "LaMP_4", get_task("LaMP-4"), True),
    Source("LaMP_5", "LaMP_5", get_task("LaMP-5"), True),
    Source("LaMP_7", "LaMP_7", get_task("LaMP-7"), True),
    Source(get_task("LaMP-2N").folder, "LaMP_2", get_task("LaMP-2N"), False),
)
SPLIT_DIRS = {"user": "", "time": "time/"}
SET_KINDS = {"train": ("questions", "outputs"), "dev": ("questions", "outputs"),
             "test": ("questions",)}  # test golds are kept by the leaderboard
URL_TEMPLATE = "{base}/{split_dir}{remote}/{set}/{set}_{kind}.json"
MANIFEST_NAME = "download_manifest.json"
# What the manifest keeps of a FileResult, by file.
ENTRY_KEYS = ("bytes", "records", "profile_items", "problems", "removed_ids", "remote_bytes",
              "url")
# Held for the whole run: two runs into one folder would resume, truncate and rename each
# other's .part files. The file stays; it only ever holds the last run's pid.
LOCK_NAME = ".download_data.lock"

# Published defects that others found and our checks confirm. The checks find any question
# of this kind in any file; this table only marks which findings are expected.
KNOWN_ISSUES = {
    ("user", "LaMP_2", "dev", "110"):
        "its input is 'x …' with neither the instruction nor the tag list",
}

CHUNK_BYTES = 1 << 20  # read size: large enough for speed, small enough for a smooth bar
# HTTP statuses worth another try; any other 4xx (404 above all) is final.
RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}
# The longest --timeout and the longest wait between tries: a server silent for a day is not
# coming back, and the socket and sleep calls overflow far beyond it.
MAX_WAIT_S = 86400.0
# The most --retries: with the longest backoff that is already months of trying; a typo
# such as 10**20 would make an unreachable server hang the run for ever.
MAX_RETRIES = 100

# LaMP ids are f"{task index - 1}{set digit}{row}" (LaMP-7 dev: 610 … 611499), so the first
# character tells which task a file's ids were made for.
TASK_OF_DIGIT = {task.id_digit: task for task in TASKS.values() if task.benchmark}

# A file that this run could not bring up to date; the run ends with status 2.
FAILED = ("failed", "not fixed")

# The evaluator's verdict on a gold file: the ids whose gold it would refuse. It is passed
# in (LaMP.utils.evaluation.scoring.invalid_gold_ids) because the metrics sit above this layer.
GoldCheck = Callable[[OutputsFile], list[str]]


class DownloadError(Exception):
    """A file that could not be fetched; one line, reported per file."""


class HttpStatus(DownloadError):
    """The server answered with an error status that another try will not change."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class _Retry(Exception):
    """A transient failure: the attempt may be repeated (resuming where it stopped)."""


@dataclass
class FileJob:
    split: str
    source: Source
    set: str
    kind: str
    url: str
    path: Path  # final location
    rel: str  # path relative to out_dir, the manifest key

    @property
    def part(self) -> Path:
        return self.path.with_name(self.path.name + ".part")

    @property
    def group(self) -> tuple[str, str, str]:
        """(split, task folder, set): a questions file and, but for test, its outputs."""
        return self.split, self.source.name, self.set


@dataclass
class FileResult:
    rel: str
    status: str  # downloaded, resumed, verified, up to date, failed, not fixed
    bytes: int = 0
    records: int = 0  # questions, or gold outputs
    profile_items: int = 0
    problems: list = field(default_factory=list)  # [[id, why], ...]
    removed_ids: list = field(default_factory=list)
    remote_bytes: int | None = None
    url: str = ""
    error: str = ""
    # The question ids of a questions file checked in this run, to check its outputs
    # against; not saved in the manifest.
    ids: set | None = field(default=None, repr=False, compare=False)


def base_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be the base of the file URLs, or None when it can."""
    if any(ord(char) <= 32 or ord(char) == 127 for char in url):
        return "contains a space or a control character (percent-encode it)"
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 -- parsing the port is the check ("http://h:abc", 99999)
    except ValueError as error:  # "Invalid IPv6 URL" for http://[::1
        return f"not a valid URL ({error})"
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if not parts.hostname:
        return "names no host"
    if not parts.path.isascii():  # http.client sends the path as ASCII (a host may be IDNA)
        return "has a non-ASCII path (percent-encode it)"
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        return "must not have a ?query or #fragment: the file paths are appended to it"
    return None


def plan(out_dir: Path, base_url: str, splits, sources, sets) -> list[FileJob]:
    """Every file of the selection, in the order given (splits, then tasks, then sets)."""
    jobs = []
    for split in splits:
        for source in sources:
            for set_name in sets:
                for kind in SET_KINDS[set_name]:
                    url = URL_TEMPLATE.format(base=base_url, split_dir=SPLIT_DIRS[split],
                                              remote=source.remote, set=set_name, kind=kind)
                    rel = f"{split}/{source.name}/{set_name}_{kind}.json"
                    jobs.append(FileJob(split, source, set_name, kind, url, out_dir / rel, rel))
    return jobs


class Fetcher:
    """HTTP with retries and resumable downloads, on the standard library only."""

    def __init__(self, retries: int, backoff: float, timeout: float,
                 sleep: Callable[[float], None] = time.sleep):
        self.retries, self.backoff, self.timeout, self.sleep = retries, backoff, timeout, sleep

    def _with_retries(self, what: str, attempt_fn):
        for attempt in range(self.retries + 1):
            try:
                return attempt_fn()
            except _Retry as reason:
                if attempt == self.retries:
                    raise DownloadError(f"{reason} (gave up after {attempt + 1} attempts)") \
                        from None
                # min() on the exponent too: 2 ** 1100 does not fit in a float.
                delay = min(self.backoff * 2 ** min(attempt, 64), MAX_WAIT_S)
                logger.warning("%s: %s; retrying in %.1f s (%d of %d)", what, reason, delay,
                               attempt + 1, self.retries)
                self.sleep(delay)

    def _open(self, url: str, **request_options):
        try:
            request = urllib.request.Request(url, **request_options)
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as error:
            error.close()
            if error.code in RETRYABLE_STATUS:
                raise _Retry(f"HTTP {error.code} {error.reason}") from None
            raise HttpStatus(error.code, f"HTTP {error.code} {error.reason} for {url}") \
                from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            raise _Retry(_network_reason(error)) from None
        except ValueError as error:  # a URL that parse_args let through; no try will fix it
            raise DownloadError(f"cannot request {url} ({error})") from None

    def remote_size(self, url: str) -> int | None:
        """The file's size from a HEAD request, or None when the server does not say."""
        def attempt():
            try:
                response = self._open(url, method="HEAD")
            except HttpStatus as error:
                if error.code in (405, 501):
                    return None  # no HEAD support: the file is checked after the download
                raise
            with response:
                return _length(response)
        return self._with_retries(url, attempt)

    def download(self, url: str, part: Path, size: int | None, label: str) -> bool:
        """Fetch ``url`` into ``part``, resuming what is there; True when it resumed."""
        resumed = part.exists() and part.stat().st_size > 0
        self._with_retries(label, lambda: self._attempt(url, part, size, label))
        return resumed

    def _attempt(self, url: str, part: Path, size: int | None, label: str) -> None:
        have = part.stat().st_size if part.exists() else 0
        if size is not None and have > size:  # not a prefix of this file: start again
            part.unlink()
            have = 0
        if have and have == size:
            return
        try:
            response = self._open(url, headers={"Range": f"bytes={have}-"} if have else {})
        except HttpStatus as error:
            if have and error.code == 416:  # nothing past what we have: it is complete
                return
            raise
        with response:
            if have and not _resumes_at(response, have):
                logger.info("%s: the server does not resume; starting again", label)
                have = 0
            length = _length(response)
            promised = have + length if length is not None else None
            _save(response, part, have, size if size is not None else promised, label)
        got = part.stat().st_size
        if got == 0:  # an empty 200: nothing to check or resume, and no LaMP file is empty
            part.unlink()
            raise DownloadError(f"the server sent an empty file for {url}")
        if size is not None and got > size:  # it changed since we asked its size
            part.unlink()
            raise _Retry(f"the server sent {got:,} bytes, not the {size:,} it announced")
        # http.client ends a body cut short without an error: compare with what was promised.
        expected = size if size is not None else promised
        if expected is not None and got < expected:
            raise _Retry(f"connection ended at {got:,} of {expected:,} bytes")


def _save(response, part: Path, have: int, total: int | None, label: str) -> None:
    """Append the body to ``part`` (or write it anew when ``have`` is 0), with a progress bar."""
    with _writing(part), open(part, "ab" if have else "wb") as out, \
            tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                 desc=label, leave=False, disable=None) as bar:
        while True:
            # Only the read is the network: a failed write (a full disk) is not retried as
            # if the connection had dropped.
            try:
                chunk = response.read(CHUNK_BYTES)
            except (OSError, http.client.HTTPException) as error:
                raise _Retry(f"connection dropped at {out.tell():,} bytes "
                             f"({_network_reason(error)})") from None
            if not chunk:
                return
            out.write(chunk)
            bar.update(len(chunk))


@contextmanager
def _writing(path: Path):
    """Turn a failed write (a full disk, no permission) into one line for this file."""
    try:
        yield
    except OSError as error:
        raise DownloadError(f"cannot write {path} ({_os_reason(error)})") from None


def _os_reason(error: OSError) -> str:
    return error.strerror or str(error) or errno.errorcode.get(error.errno, type(error).__name__)


def _length(response) -> int | None:
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _resumes_at(response, offset: int) -> bool:
    """Whether a response to a Range request continues the file at ``offset``."""
    content_range = response.headers.get("Content-Range", "")
    return response.status == 206 and content_range.startswith(f"bytes {offset}-")


def _network_reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None) or error
    return f"{type(error).__name__}: {reason}" if str(reason) else type(error).__name__


def inspect_file(path: Path, job: FileJob, invalid_golds: GoldCheck,
                 question_ids: set | None = None) -> FileResult:
    """Parse a downloaded file as the LaMP file it should be; count it and find problems.

    ``question_ids``: the ids of the questions file of the same split, task and set, when
    this run checked it; an outputs file must be mostly golds of those questions.
    Raises LampError when it is not that file (truncated, corrupt, another task's or set's).
    A few malformed questions or golds are problems, a majority refuses the file.
    """
    task = job.source.task
    result = FileResult(job.rel, "", bytes=path.stat().st_size)
    if job.kind == "questions":
        ids, first_bad_input = _scan_questions(path, job, result)
        if not ids:
            raise LampError(f"{path}: no questions")
        result.ids = set(ids)
    else:
        outputs = read_outputs(path, job)
        ids = list(outputs.outputs)
        result.problems = [[qid, f"output {outputs.outputs[qid]!r} is not a {task.name} label"]
                           for qid in invalid_golds(outputs)]
    result.records = len(ids)
    if 2 * len(result.problems) > result.records:
        qid, why = result.problems[0]
        what = (f"inputs are not {task.name} inputs{_looks_like(first_bad_input, task)} "
                f"(first: question {qid}: {why})" if job.kind == "questions"
                else f"golds are not {task.name} labels (first: {why})")
        raise LampError(f"{path}: {len(result.problems):,} of {result.records:,} {what}")
    foreign = _foreign_ids(Counter(qid[:1] for qid in ids), result.records, task)
    if foreign is not None:
        raise LampError(f"{path}: {foreign}")
    if job.kind == "outputs" and question_ids is not None:
        others = [qid for qid in ids if qid not in question_ids]
        if 2 * len(others) > result.records:
            raise LampError(f"{path}: {len(others):,} of {result.records:,} gold ids are not "
                            f"ids of {job.set}_questions.json (first: "
                            f"{', '.join(others[:3])}): another set's or task's outputs")
    return result


def _scan_questions(path: Path, job: FileJob, result: FileResult) -> tuple[list, str | None]:
    """Count a questions file's profile items into ``result`` and flag its malformed inputs
    there; return its ids and the first malformed input."""
    ids, first_bad_input = [], None
    questions = iter_questions(path, job.source.task, what=f"downloaded {job.rel}")
    for question in tqdm(questions, desc=f"checking {job.rel}", unit=" questions",
                         leave=False, disable=None):
        ids.append(question["id"])
        result.profile_items += len(question["profile"])
        problem = input_problem(question["input"], job.source.task)
        if problem is not None:
            result.problems.append([question["id"], problem])
            first_bad_input = first_bad_input or question["input"]
    return ids, first_bad_input


def _looks_like(text: str, task: Task) -> str:
    """`` but LaMP-N inputs`` when another task's checks accept ``text``; else empty."""
    for other in TASKS.values():
        if other is not task and input_problem(text, other) is None:
            return f" but {other.name} inputs"
    return ""


def _foreign_ids(leading: Counter, total: int, task: Task) -> str | None:
    """Why ids whose first characters are ``leading`` belong to another task, or None.

    Only a majority in another task's scheme counts: a file whose ids follow no scheme we
    know is not refused on that ground.
    """
    own = task.id_digit
    if 2 * leading[own] >= total:
        return None
    digit, count = max(leading.items(), key=lambda item: (item[1], item[0]))
    other = TASK_OF_DIGIT.get(digit)
    if other is None or 2 * count <= total:
        return None
    return (f"{count:,} of {total:,} ids start with {digit!r} as {other.name} ids do "
            f"({task.name} ids start with {own!r}): it holds {other.name} data")


def _names_a_task(value) -> bool:
    try:
        return isinstance(value, str) and get_task(value) is not None
    except LampError:
        return False


def read_outputs(path: Path, job: FileJob) -> OutputsFile:
    """A downloaded outputs file, checked to be the outputs of the job's task.

    Another task's name in its "task" field means a wrong file. A name that is no task at all
    (we have not seen every published file) is reported and read as the expected task.
    """
    expected = job.source.task
    document = read_json(path, f"downloaded {job.rel}", max_bytes=MAX_OUTPUTS_BYTES)
    declared = document.get("task") if isinstance(document, dict) else None
    if isinstance(document, dict) and not _names_a_task(declared):
        logger.warning("%s: its \"task\" is %r, not %s; read as %s outputs", job.rel,
                       declared, expected.file_name, expected.file_name)
        document = {**document, "task": expected.file_name}
    outputs = parse_outputs(document, str(path))
    if outputs.task is not expected:
        raise LampError(f"{path}: holds {outputs.task.file_name} outputs, "
                        f"expected {expected.file_name}")
    return outputs


class Manifest:
    """What was downloaded, from where and with what size: ``{out_dir}/download_manifest.json``.

    It lets a later run recognise a complete file without reading it again, even after
    --fix_known_issues made it smaller than the server's copy. It is a cache: whatever in it
    cannot be read costs one more check of the files concerned, never a wrong skip.
    """

    def __init__(self, out_dir: Path):
        self.path = out_dir / MANIFEST_NAME
        if self.path.exists() and not self.path.is_file():
            raise LampError(f"{self.path} is not a file; move it away (it is the download "
                            "manifest's name)")
        document: object = {}
        if self.path.exists():
            try:
                document = read_json(self.path, "download manifest")
            except LampError as error:
                logger.warning("%s; starting a new manifest", error)
        files = document.get("files") if isinstance(document, dict) else None
        if document and not isinstance(files, dict):
            logger.warning('%s: no "files" object; starting a new manifest', self.path)
        self.files: dict = {}
        for rel, entry in sorted(files.items()) if isinstance(files, dict) else ():
            if _valid_entry(entry):
                self.files[rel] = entry
            else:
                logger.warning("%s: the entry for %s is malformed; checking that file again",
                               self.path, rel)

    def get(self, rel: str) -> dict | None:
        return self.files.get(rel)

    def record(self, result: FileResult) -> None:
        self.files[result.rel] = {key: getattr(result, key) for key in ENTRY_KEYS}
        atomic_write_json(self.path, {"files": dict(sorted(self.files.items()))}, indent=1)


def _valid_entry(entry: object) -> bool:
    """Whether a manifest entry has the fields a skip relies on, each of its type."""
    def count(value) -> bool:
        return type(value) is int and value >= 0

    def strings(items) -> bool:
        return isinstance(items, list) and all(isinstance(item, str) for item in items)

    if not isinstance(entry, dict):
        return False
    problems = entry.get("problems", [])
    # records >= 1: no LaMP file is empty, so an entry that says so (a wrong file whose every
    # question was dropped) is a reason to look at the file again.
    return (count(entry.get("bytes")) and count(entry.get("records")) and entry["records"] >= 1
            and count(entry.get("profile_items", 0))
            and (entry.get("remote_bytes") is None or count(entry.get("remote_bytes")))
            and isinstance(entry.get("url", ""), str) and strings(entry.get("removed_ids", []))
            and isinstance(problems, list)
            and all(strings(item) and len(item) == 2 for item in problems))


@contextmanager
def out_dir_lock(out_dir: Path):
    """Create ``out_dir`` and hold ``{out_dir}/.download_data.lock`` for the run; LampError
    when another run holds it. A file system without locks is a warning, not an error."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file on the way (raw_data/x/…), no permission, a full disk
        raise LampError(f"--out_dir {out_dir}: cannot create ({_os_reason(error)})") from None
    path = out_dir / LOCK_NAME
    try:
        holder = _lock_holder(path)
    except OSError as error:
        raise LampError(f"--out_dir {out_dir}: cannot write its lock file {path.name} "
                        f"({_os_reason(error)})") from None
    # With on_acquired filelock keeps to flock: its soft fallback, a marker file, would
    # outlive a killed run and refuse every later one.
    lock = FileLock(path, on_acquired=_record_pid)
    try:
        lock.acquire(blocking=False)
    except Timeout:  # an OSError too: caught first
        raise LampError(f"another download_data.py is running into {out_dir} "
                        f"(pid {holder}); wait for it to finish") from None
    except OSError as error:  # a file system without locks (some network mounts)
        logger.warning("%s: cannot lock (%s); make sure no other download_data.py runs "
                       "into this folder", path, _os_reason(error))
    try:
        yield
    finally:
        if lock.is_locked:
            lock.release()


def _lock_holder(path: Path) -> str:
    """The pid in the lock file (created when missing), read before the lock is tried so
    that nothing the lock does to the file can lose it. OSError for what cannot be a lock
    file (a folder, a link, a FIFO, no permission): an error, where a lock the file system
    refuses is only a warning."""
    handle = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        if not stat.S_ISREG(os.fstat(handle).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return os.read(handle, 32).decode("ascii", "replace").strip() or "unknown"
    finally:
        os.close(handle)


def _record_pid(handle: int) -> None:
    """Write this process's pid into the lock file it now holds, for the message above.
    A disk too full to hold it is reported by the first file that cannot be written."""
    with suppress(OSError):
        os.ftruncate(handle, 0)
        os.lseek(handle, 0, os.SEEK_SET)
        os.write(handle, f"{os.getpid()}\n".encode())


def fetch_file(job: FileJob, fetcher: Fetcher, manifest: Manifest, invalid_golds: GoldCheck,
               question_ids: set | None = None) -> FileResult:
    """Bring one file up to date; DownloadError or LampError when it cannot be.

    ``question_ids`` as for ``inspect_file``.
    """
    remote = fetcher.remote_size(job.url)
    entry = manifest.get(job.rel)
    if job.path.exists():
        local = job.path.stat().st_size
        # A mirror with the same files counts as the same source: sizes decide, not URLs.
        if entry is not None and local == entry.get("bytes") \
                and remote in (None, entry.get("remote_bytes")):
            return _from_entry(job, entry, "up to date")
        if entry is None and remote in (None, local):
            # A file from elsewhere (a copy, a run without the manifest): check it once.
            try:
                result = inspect_file(job.path, job, invalid_golds, question_ids)
            except LampError as error:  # the user's file: say so, and leave it as it is
                raise LampError(f"{error}; this file was not downloaded by this run and is "
                                "left as it is: move it away to download it") from None
            return _finish(job, result, "verified", local, manifest)
        logger.info("%s differs from the server's copy; downloading it again", job.rel)
    with _writing(job.path.parent):
        job.path.parent.mkdir(parents=True, exist_ok=True)
    resumed = fetcher.download(job.url, job.part, remote, job.rel)
    try:
        result = inspect_file(job.part, job, invalid_golds, question_ids)
    except LampError as error:
        # The reason names the file as the user knows it, not the .part that is renamed.
        reason = str(error).replace(str(job.part), job.rel)
        raise LampError(f"the downloaded file is not valid, {reject(job, reason)} "
                        f"({reason})") from None
    raise_if_stopped()  # the .part stays, checked without fetching on the next run
    with _writing(job.path):
        job.part.replace(job.path)
        for stale in rejected_paths(job):  # an earlier refusal this file replaces
            stale.unlink(missing_ok=True)
    return _finish(job, result, "resumed" if resumed else "downloaded", remote, manifest)


def rejected_paths(job: FileJob) -> tuple[Path, Path]:
    """Where a refused download and the note that says why are kept."""
    stem = job.path.name.removesuffix(".json")
    return (job.path.with_name(f"{stem}.rejected.json"),
            job.path.with_name(f"{stem}.rejected.reason.json"))


def reject(job: FileJob, reason: str) -> str:
    """Keep a complete download that failed its check beside the final name; say where.

    A checker can be wrong, and a train file is gigabytes: the bytes stay, under a name no
    stage reads, with the reason next to them. The next run downloads the file again.
    """
    kept, note = rejected_paths(job)
    try:
        job.part.replace(kept)
    except OSError as error:
        # Not renamed: the .part is complete and the next run checks it without fetching.
        return f"left as {job.part.name} ({_os_reason(error)})"
    try:
        atomic_write_json(note, {"file": job.rel, "url": job.url, "bytes": kept.stat().st_size,
                                 "reason": reason}, indent=1)
    except (OSError, LampError) as error:
        why = _os_reason(error) if isinstance(error, OSError) else error
        return f"kept as {kept.name} (the note {note.name} could not be written: {why})"
    return f"kept as {kept.name} (the reason is in {note.name})"


def _from_entry(job: FileJob, entry: dict, status: str) -> FileResult:
    return FileResult(job.rel, status, **{key: entry[key] for key in ENTRY_KEYS if key in entry})


def _finish(job: FileJob, result: FileResult, status: str, remote: int | None,
            manifest: Manifest) -> FileResult:
    result.status, result.url = status, job.url
    result.remote_bytes = remote if remote is not None else result.bytes
    manifest.record(result)
    return result


def _failure(error: Exception, rel: str | None = None) -> str:
    """One line for a failure; an OSError names the file it was about (else ``rel``)."""
    if not isinstance(error, OSError):
        return str(error)
    where = error.filename or rel
    return f"{where}: {_os_reason(error)}" if where else _os_reason(error)


def pairs(jobs: list[FileJob]) -> dict[tuple, list[FileJob]]:
    """The jobs of each (split, task, set): a questions file and, but for test, its outputs."""
    groups: dict[tuple, list[FileJob]] = {}
    for job in jobs:
        groups.setdefault(job.group, []).append(job)
    return groups


def report_problems(jobs: list[FileJob], results: dict[str, FileResult]) -> dict[tuple, list]:
    """Log the malformed questions of each (split, task, set); return the ids to drop by group.

    Those are the ids any check flagged in the questions or the outputs file, and the ids
    already dropped from one file of the pair but not from the other (a fix that a failed
    download interrupted): --fix_known_issues then completes the pair, never half of it.
    """
    by_group: dict[tuple, list] = {}
    for group, members in pairs(jobs).items():
        present = [results[job.rel] for job in members
                   if job.rel in results and results[job.rel].status not in FAILED]
        pending: dict[str, None] = {}  # ordered and unique
        for result in present:
            for qid, why in result.problems:
                if qid not in result.removed_ids:
                    known = KNOWN_ISSUES.get((*group, qid))
                    logger.warning("%s: question %s is malformed: %s%s", result.rel, qid, why,
                                   f" (known issue: {known})" if known else "")
                    pending[qid] = None
        dropped = sorted({qid for result in present for qid in result.removed_ids})
        for result in present:
            behind = [qid for qid in dropped if qid not in result.removed_ids]
            if behind:
                logger.warning("%s: the other file of its pair had %s dropped by "
                               "--fix_known_issues, this one not yet", result.rel,
                               preview(behind))
                pending.update(dict.fromkeys(behind))
        if pending:
            by_group[group] = list(pending)
    return by_group


def drop_questions(job: FileJob, ids: set[str], target: Path) -> tuple[int, int]:
    """Write ``job``'s questions or outputs file without ``ids`` to ``target``, atomically.
    Returns the records and profile items that remain."""
    if job.kind == "questions":
        items = 0
        with JsonListWriter(target) as out:
            for question in iter_questions(job.path, job.source.task):
                if question["id"] not in ids:
                    out.write(question)
                    items += len(question["profile"])
        return out.count, items
    outputs = read_outputs(job.path, job)
    kept = [(qid, text) for qid, text in outputs.outputs.items() if qid not in ids]
    write_outputs(target, outputs.task, kept)
    return len(kept), 0


def fix_known_issues(jobs: list[FileJob], results: dict[str, FileResult],
                     problems: dict[tuple, list], manifest: Manifest) -> None:
    """Drop each group's malformed questions from its questions and outputs files together.

    A pair is fixed only when both files are here, and both rewrites are finished before
    either replaces its file: a failure leaves the pair as it was, and the next run fixes it.
    """
    for group, members in pairs(jobs).items():
        ids = problems.get(group)
        if not ids:
            continue
        missing = [job.rel for job in members
                   if job.rel not in results or results[job.rel].status in FAILED]
        if missing:
            logger.warning("%s: not fixed while %s is missing; run again to fix the pair",
                           ", ".join(job.rel for job in members if job.rel not in missing),
                           ", ".join(missing))
            continue
        try:
            _fix_pair(members, results, ids, manifest)
        except (LampError, OSError) as error:
            reason = _failure(error)
            for job in members:
                logger.error("%s: --fix_known_issues did not complete (%s); run again with "
                             "it to fix the pair", job.rel, reason)
                results[job.rel].status, results[job.rel].error = "not fixed", reason


def _fix_pair(members: list[FileJob], results: dict[str, FileResult], ids: list[str],
              manifest: Manifest) -> None:
    staged = []  # (job, staging path, records, profile items, ids dropped)
    try:
        for job in members:
            todo = [qid for qid in ids if qid not in results[job.rel].removed_ids]
            if todo:
                staging = job.path.with_name(f".{job.path.name}.fixing")
                staged.append((job, staging, *drop_questions(job, set(todo), staging), todo))
                if staged[-1][2] == 0:
                    raise LampError(f"{job.rel}: dropping {preview(todo)} would leave nothing")
        raise_if_stopped()
        for job, staging, records, items, todo in staged:
            os.replace(staging, job.path)
            result = results[job.rel]
            result.records, result.profile_items = records, items
            result.removed_ids = sorted(set(result.removed_ids) | set(todo))
            result.bytes = job.path.stat().st_size
            manifest.record(result)
            logger.info("%s: dropped %s", job.rel, preview(todo))
    finally:
        for _, staging, *_ in staged:
            staging.unlink(missing_ok=True)


def dry_run(jobs: list[FileJob], fetcher: Fetcher) -> list[FileResult]:
    """The size of every file on the server; nothing is downloaded."""
    results = []
    for job in jobs:
        try:
            size = fetcher.remote_size(job.url)
            results.append(FileResult(job.rel, "on server" if size is not None else "size unknown",
                                      bytes=size or 0, url=job.url, remote_bytes=size))
        except DownloadError as error:
            results.append(FileResult(job.rel, "failed", url=job.url, error=str(error)))
    return results


def download_all(jobs: list[FileJob], fetcher: Fetcher, manifest: Manifest,
                 invalid_golds: GoldCheck, fix: bool) -> list[FileResult]:
    """Every file of the plan, each failure its own (the others still run), in plan order."""
    results: dict[str, FileResult] = {}
    question_ids: dict[tuple, set] = {}  # by group, from this run's checks
    for job in tqdm(jobs, desc="files", unit=" file", disable=None):
        try:
            results[job.rel] = fetch_file(job, fetcher, manifest, invalid_golds,
                                          question_ids.get(job.group))
            if results[job.rel].ids is not None:
                question_ids[job.group] = results[job.rel].ids
        except (DownloadError, LampError, OSError) as error:
            reason = _failure(error, job.rel)
            logger.error("%s: %s", job.rel, reason)
            results[job.rel] = FileResult(job.rel, "failed", url=job.url, error=reason)
    problems = report_problems(jobs, results)
    if problems and fix:
        fix_known_issues(jobs, results, problems, manifest)
    elif problems:
        logger.warning("run again with --fix_known_issues to drop the malformed questions "
                       "from the questions and outputs files")
    return [results[job.rel] for job in jobs]


def raise_if_failed(results: list[FileResult], what: str) -> None:
    failed = [result.rel for result in results if result.status in FAILED]
    if failed:
        raise LampError(f"{len(failed)} of {len(results)} {what} failed (see the messages "
                        f"above; run again to resume): {preview(failed)}")
