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
"""
from __future__ import annotations

import argparse
import errno
import http.client
import logging
import math
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from tqdm import tqdm

try:
    import fcntl
except ImportError:  # Windows has no flock: runs there are not kept apart (a warning says so)
    fcntl = None

from LaMP.utils.cli.program import ArgumentParser, run, setup_logging
from LaMP.utils.cli.tables import format_table
from LaMP.utils.data.fileio import JsonListWriter, atomic_write_json, check_output_dir, read_json
from LaMP.utils.data.outputs import MAX_OUTPUTS_BYTES, OutputsFile, parse_outputs, write_outputs
from LaMP.utils.data.questions import input_problem, iter_questions
from LaMP.utils.errors import LampError, preview
from LaMP.utils.evaluation.scoring import invalid_gold_ids
from LaMP.utils.tasks import TASKS, Task, get_task

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
# Held (fcntl.flock) for the whole run: two runs into one folder would resume, truncate and
# rename each other's .part files. The file stays; it only ever holds the last run's pid.
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


@dataclass
class FileResult:
    rel: str
    status: str  # downloaded, resumed, verified, up to date, failed
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


def parse_source(name: str) -> Source:
    """argparse ``type=`` for --tasks: a folder name (LaMP_2_old) or any task spelling."""
    by_name = {source.name.lower(): source for source in SOURCES}
    spelled = name.strip().lower().replace("-", "_")
    if spelled in by_name:
        return by_name[spelled]
    valid = ", ".join(source.name for source in SOURCES)
    try:
        task = get_task(name)
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
    return args


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


def plan(args) -> list[FileJob]:
    """Every file of the selection, in a fixed order."""
    out_dir = Path(args.out_dir)
    jobs = []
    for split in args.splits:
        for source in args.tasks:
            for set_name in args.sets:
                for kind in SET_KINDS[set_name]:
                    url = URL_TEMPLATE.format(base=args.base_url, split_dir=SPLIT_DIRS[split],
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
                length = response.headers.get("Content-Length")
            return int(length) if length and length.isdigit() else None
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
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            response = self._open(url, headers=headers)
        except HttpStatus as error:
            if have and error.code == 416:  # nothing past what we have: it is complete
                return
            raise
        with response:
            if have and not _resumes_at(response, have):
                logger.info("%s: the server does not resume; starting again", label)
                have = 0
            length = response.headers.get("Content-Length")
            promised = have + int(length) if length and length.isdigit() else None
            total = size if size is not None else promised
            with _writing(part), open(part, "ab" if have else "wb") as out, \
                    tqdm(total=total, initial=have, unit="B", unit_scale=True,
                         unit_divisor=1024, desc=label, leave=False, disable=None) as bar:
                while True:
                    # Only the read is the network: a failed write (a full disk) is not
                    # retried as if the connection had dropped.
                    try:
                        chunk = response.read(CHUNK_BYTES)
                    except (OSError, http.client.HTTPException) as error:
                        raise _Retry(f"connection dropped at {out.tell():,} bytes "
                                     f"({_network_reason(error)})") from None
                    if not chunk:
                        break
                    out.write(chunk)
                    bar.update(len(chunk))
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


@contextmanager
def _writing(path: Path):
    """Turn a failed write (a full disk, no permission) into one line for this file."""
    try:
        yield
    except OSError as error:
        raise DownloadError(f"cannot write {path} ({_os_reason(error)})") from None


def _os_reason(error: OSError) -> str:
    return error.strerror or str(error) or errno.errorcode.get(error.errno, type(error).__name__)


def _resumes_at(response, offset: int) -> bool:
    """Whether a response to a Range request continues the file at ``offset``."""
    content_range = response.headers.get("Content-Range", "")
    return response.status == 206 and content_range.startswith(f"bytes {offset}-")


def _network_reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None) or error
    return f"{type(error).__name__}: {reason}" if str(reason) else type(error).__name__


def inspect_file(path: Path, job: FileJob, question_ids: set | None = None) -> FileResult:
    """Parse a downloaded file as the LaMP file it should be; count it and find problems.

    ``question_ids``: the ids of the questions file of the same split, task and set, when
    this run checked it; an outputs file must be mostly golds of those questions.
    Raises LampError when it is not that file (truncated, corrupt, another task's or set's).
    """
    task = job.source.task
    result = FileResult(job.rel, "", bytes=path.stat().st_size)
    leading: Counter = Counter()  # first character of each id: the id scheme's task
    if job.kind == "questions":
        questions = iter_questions(path, task, what=f"downloaded {job.rel}")
        first_bad_input, ids = None, []
        for question in tqdm(questions, desc=f"checking {job.rel}", unit=" questions",
                             leave=False, disable=None):
            result.records += 1
            result.profile_items += len(question["profile"])
            leading[question["id"][:1]] += 1
            ids.append(question["id"])
            problem = input_problem(question["input"], task)
            if problem is not None:
                result.problems.append([question["id"], problem])
                first_bad_input = first_bad_input or question["input"]
        if result.records == 0:
            raise LampError(f"{path}: no questions")
        result.ids = set(ids)
        if 2 * len(result.problems) > result.records:
            qid, why = result.problems[0]
            raise LampError(f"{path}: {len(result.problems):,} of {result.records:,} inputs "
                            f"are not {task.name} inputs{_looks_like(first_bad_input, task)} "
                            f"(first: question {qid}: {why})")
    else:
        outputs = read_outputs(path, job)
        result.records = len(outputs)
        leading.update(qid[:1] for qid in outputs.outputs)
        result.problems = [[qid, f"output {outputs.outputs[qid]!r} is not a "
                                 f"{task.name} label"] for qid in invalid_gold_ids(outputs)]
        if 2 * len(result.problems) > result.records:
            raise LampError(f"{path}: {len(result.problems):,} of {result.records:,} golds "
                            f"are not {task.name} labels (first: {result.problems[0][1]})")
    foreign = _foreign_ids(leading, result.records, task)
    if foreign is not None:
        raise LampError(f"{path}: {foreign}")
    if job.kind == "outputs" and question_ids is not None:
        others = [qid for qid in outputs.outputs if qid not in question_ids]
        if 2 * len(others) > result.records:
            raise LampError(f"{path}: {len(others):,} of {result.records:,} gold ids are not "
                            f"ids of {job.set}_questions.json (first: "
                            f"{', '.join(others[:3])}): another set's or task's outputs")
    return result


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
    if not isinstance(value, str):
        return False
    try:
        get_task(value)
    except LampError:
        return False
    return True


def read_outputs(path: Path, job: FileJob) -> OutputsFile:
    """A downloaded outputs file, checked to be the outputs of the job's task.

    Another task's name in its "task" field means a wrong file. A name that is no task at all
    (we have not seen every published file) is reported and read as the expected task.
    """
    expected = job.source.task
    document = read_json(path, f"downloaded {job.rel}", max_bytes=MAX_OUTPUTS_BYTES)
    declared = document.get("task") if isinstance(document, dict) else None
    if isinstance(document, dict) and not _names_a_task(declared):
        # No "task" at all, or none we know: the job says which task it is.
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
    --fix_known_issues made it smaller than the server's copy.
    """

    def __init__(self, out_dir: Path):
        self.path = out_dir / MANIFEST_NAME
        if self.path.is_dir() or (self.path.exists() and not self.path.is_file()):
            raise LampError(f"{self.path} is not a file; move it away (it is the download "
                            "manifest's name)")
        document: object = {}
        if self.path.exists():
            try:
                document = read_json(self.path, "download manifest")
            except LampError as error:
                # Losing it costs one check of each file present, never a wrong skip.
                logger.warning("%s; starting a new manifest", error)
        files = document.get("files") if isinstance(document, dict) else None
        if document and not isinstance(files, dict):
            logger.warning('%s: no "files" object; starting a new manifest', self.path)
        self.files: dict = {}
        for rel, entry in sorted(files.items()) if isinstance(files, dict) else ():
            if _valid_entry(entry):
                self.files[rel] = entry
            else:  # one more check of that file, never a skip on a record we cannot read
                logger.warning("%s: the entry for %s is malformed; checking that file again",
                               self.path, rel)

    def get(self, rel: str) -> dict | None:
        return self.files.get(rel)

    def record(self, result: FileResult) -> None:
        entry = {key: value for key, value in asdict(result).items()
                 if key not in ("rel", "status", "error", "ids")}
        self.files[result.rel] = entry
        atomic_write_json(self.path, {"files": dict(sorted(self.files.items()))}, indent=1)


def _valid_entry(entry: object) -> bool:
    """Whether a manifest entry has the fields a skip relies on, each of its type."""
    def count(value) -> bool:
        return type(value) is int and value >= 0

    if not isinstance(entry, dict):
        return False
    ids = entry.get("removed_ids", [])
    problems = entry.get("problems", [])
    # records >= 1: no LaMP file is empty, and an empty one recorded by an older version
    # (another task's file with every question dropped) must be looked at again.
    return (count(entry.get("bytes")) and count(entry.get("records")) and entry["records"] >= 1
            and count(entry.get("profile_items", 0))
            and (entry.get("remote_bytes") is None or count(entry.get("remote_bytes")))
            and isinstance(entry.get("url", ""), str)
            and isinstance(ids, list) and all(isinstance(qid, str) for qid in ids)
            and isinstance(problems, list)
            and all(isinstance(item, list) and len(item) == 2
                    and all(isinstance(part, str) for part in item) for item in problems))


@contextmanager
def out_dir_lock(out_dir: Path):
    """Hold ``{out_dir}/.download_data.lock`` for the run; LampError when another run holds it."""
    path = out_dir / LOCK_NAME
    try:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise LampError(f"--out_dir {out_dir}: cannot write its lock file {path.name} "
                        f"({_os_reason(error)})") from None
    try:
        try:
            if fcntl is None:
                raise OSError(errno.ENOSYS, "no flock on this system")
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(handle, 32).decode("ascii", "replace").strip() or "unknown"
            raise LampError(f"another download_data.py is running into {out_dir} "
                            f"(pid {holder}); wait for it to finish") from None
        except OSError as error:  # a file system without locks (some network mounts)
            logger.warning("%s: cannot lock (%s); make sure no other download_data.py runs "
                           "into this folder", path, _os_reason(error))
        # The pid only helps the message above; a disk too full to hold it is reported
        # by the first file that cannot be written, not here.
        with suppress(OSError):
            os.ftruncate(handle, 0)
            os.write(handle, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(handle)  # closing releases the lock


def fetch_file(job: FileJob, fetcher: Fetcher, manifest: Manifest,
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
                result = inspect_file(job.path, job, question_ids)
            except LampError as error:  # the user's file: say so, and leave it as it is
                raise LampError(f"{error}; this file was not downloaded by this run and is "
                                "left as it is: move it away to download it") from None
            return _finish(job, result, "verified", local, manifest)
        logger.info("%s differs from the server's copy; downloading it again", job.rel)
    with _writing(job.path.parent):
        job.path.parent.mkdir(parents=True, exist_ok=True)
    resumed = fetcher.download(job.url, job.part, remote, job.rel)
    try:
        result = inspect_file(job.part, job, question_ids)
    except LampError as error:
        # The reason names the file as the user knows it, not the .part that is renamed.
        reason = str(error).replace(str(job.part), job.rel)
        raise LampError(f"the downloaded file is not valid, {reject(job, reason)} "
                        f"({reason})") from None
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
    if not job.part.exists() or job.part.stat().st_size == 0:
        job.part.unlink(missing_ok=True)
        return "not kept"
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
    known = {key: entry[key] for key in ("bytes", "records", "profile_items", "problems",
                                         "removed_ids", "remote_bytes", "url") if key in entry}
    return FileResult(job.rel, status, **known)


def _finish(job: FileJob, result: FileResult, status: str, remote: int | None,
            manifest: Manifest) -> FileResult:
    result.status, result.url = status, job.url
    result.remote_bytes = remote if remote is not None else result.bytes
    manifest.record(result)
    return result


def pairs(jobs: list[FileJob]) -> dict[tuple, list[FileJob]]:
    """The jobs of each (split, task, set): a questions file and, but for test, its outputs."""
    groups: dict[tuple, list[FileJob]] = {}
    for job in jobs:
        groups.setdefault((job.split, job.source.name, job.set), []).append(job)
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
        pending: list[str] = []
        for result in present:
            for qid, why in result.problems:
                if qid in result.removed_ids:
                    continue
                known = KNOWN_ISSUES.get((*group, qid))
                logger.warning("%s: question %s is malformed: %s%s", result.rel, qid, why,
                               f" (known issue: {known})" if known else "")
                if qid not in pending:
                    pending.append(qid)
        dropped = sorted({qid for result in present for qid in result.removed_ids})
        for result in present:
            behind = [qid for qid in dropped if qid not in result.removed_ids]
            if behind:
                logger.warning("%s: the other file of its pair had %s dropped by "
                               "--fix_known_issues, this one not yet", result.rel,
                               preview(behind))
                pending.extend(qid for qid in behind if qid not in pending)
        if pending:
            by_group[group] = pending
    return by_group


def drop_questions(job: FileJob, ids: set[str], target: Path | None = None) -> tuple[int, int]:
    """Write one questions or outputs file without ``ids`` to ``target`` (default: in place),
    atomically. Returns the records and profile items that remain.
    """
    target = target or job.path
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
            reason = f"{error.filename}: {_os_reason(error)}" if isinstance(error, OSError) \
                else str(error)
            for job in members:
                logger.error("%s: --fix_known_issues did not complete (%s); run again with "
                             "it to fix the pair", job.rel, reason)
                results[job.rel].status, results[job.rel].error = "not fixed", reason


def _fix_pair(members: list[FileJob], results: dict[str, FileResult], ids: list[str],
              manifest: Manifest) -> None:
    staged = []  # (job, staging path, records, profile items, ids dropped)
    try:
        for job in members:
            result = results[job.rel]
            todo = [qid for qid in ids if qid not in result.removed_ids]
            if not todo:
                continue
            staging = job.path.with_name(f".{job.path.name}.fixing")
            staged.append((job, staging, *drop_questions(job, set(todo), staging), todo))
            if staged[-1][2] == 0:
                raise LampError(f"{job.rel}: dropping {preview(todo)} would leave nothing")
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


def dry_run(jobs: list[FileJob], fetcher: Fetcher) -> list[FileResult]:
    results = []
    for job in jobs:
        try:
            size = fetcher.remote_size(job.url)
            results.append(FileResult(job.rel, "on server" if size is not None else "size unknown",
                                      bytes=size or 0, url=job.url, remote_bytes=size))
        except DownloadError as error:
            results.append(FileResult(job.rel, "failed", url=job.url, error=str(error)))
    return results


def main(argv=None) -> list[FileResult]:
    args = parse_args(argv)
    setup_logging()
    check_output_dir(args.out_dir, "--out_dir")  # a file in the way: one line, no download
    jobs = plan(args)
    fetcher = Fetcher(args.retries, args.backoff, args.timeout)
    if args.dry_run:
        results = dry_run(jobs, fetcher)
        print(summary_table(results))
        raise_if_failed(results, "size requests")
        return results
    out_dir = check_output_dir(args.out_dir, "--out_dir")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file on the way (raw_data/x/…), no permission, a full disk
        raise LampError(f"--out_dir {out_dir}: cannot create ({_os_reason(error)})") from None
    with out_dir_lock(out_dir):
        ordered = download_all(jobs, fetcher, Manifest(out_dir), args.fix_known_issues)
    print(summary_table(ordered))
    raise_if_failed(ordered, "files")
    return ordered


def download_all(jobs: list[FileJob], fetcher: Fetcher, manifest: Manifest,
                 fix: bool) -> list[FileResult]:
    """Every file of the plan, each failure its own (the others still run), in plan order."""
    results: dict[str, FileResult] = {}
    question_ids: dict[tuple, set] = {}  # by (split, task, set), from this run's checks
    for job in tqdm(jobs, desc="files", unit=" file", disable=None):
        group = (job.split, job.source.name, job.set)
        try:
            results[job.rel] = fetch_file(job, fetcher, manifest, question_ids.get(group))
            if results[job.rel].ids is not None:
                question_ids[group] = results[job.rel].ids
        except (DownloadError, LampError, OSError) as error:
            reason = (f"{error.filename or job.rel}: {_os_reason(error)}"
                      if isinstance(error, OSError) else str(error))
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


if __name__ == "__main__":
    sys.exit(run(main))
