"""rank_profiles.py --num_workers: rankings byte-identical for any number of workers and for
shards, errors as with one worker, memory bounded, a lost worker handled, no orphan workers."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from LaMP import rank_profiles
from LaMP.utils.data.jsoninput import MAX_DEPTH
from LaMP.utils.errors import LampError
from LaMP.utils.retrieval import parallel as parallel_rank
from conftest import REPO, SAMPLE

TWEET = "Paraphrase the following tweet without any explanation before or after it: {}"
# Texts with quotes, brackets and backslashes, escape runs of both parities, non-ASCII
# (escaped as surrogate pairs by json.dumps), and ties.
TEXTS = ['he said "hi" [to] {me}', "back\\slash\\\\", 'end with backslash\\', "\\\"", "",
         "café 😀 naïve", "a b c", "a b c", "]}],{[", "x\ny\tz", "the same words",
         "the same words", "[", "}"]


def tricky_questions(count: int, items: int = 7) -> list[dict]:
    questions = []
    for number in range(count):
        profile = [{"id": f"{number}-{index}", "text": TEXTS[(number * 3 + index) % len(TEXTS)],
                    "date": f"20{10 + index % 3}-0{1 + number % 9}-01"}
                   for index in range(items + number % 4)]
        questions.append({"id": f"q{number}",
                          "input": TWEET.format(TEXTS[number % len(TEXTS)] + " a b"),
                          "profile": profile})
    return questions


def write_questions(path: Path, questions: list, ensure_ascii: bool = True,
                    indent: int | None = None) -> Path:
    path.write_text(json.dumps(questions, ensure_ascii=ensure_ascii, indent=indent),
                    encoding="utf-8")
    return path


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Workers even for tiny files, blocks of one question, and as many workers as asked
    for whatever the cores here."""
    monkeypatch.setattr(parallel_rank, "MIN_BYTES", 0)
    monkeypatch.setattr(parallel_rank, "BLOCK_QUESTIONS", 1)
    monkeypatch.setattr(parallel_rank, "available_cores", lambda: 8)


@pytest.fixture
def no_inline(monkeypatch):
    """Fail if the run falls back to ranking inline (the workers must do it)."""
    def refuse(*args, **kwargs):
        raise AssertionError("ranked inline")

    monkeypatch.setattr(rank_profiles, "_rank_inline", refuse)


def run_rank(questions_file: Path, output: Path, task: str, *extra: str) -> bytes:
    rank_profiles.main(["--input_data_addr", str(questions_file), "--output_ranking_addr",
                        str(output), "--task", task, *extra])
    return output.read_bytes()


def rankings_for(questions_file, tmp_path, task, workers, *extra) -> list[bytes]:
    return [run_rank(questions_file, tmp_path / f"w{n}.json", task, "--num_workers", str(n),
                     *extra) for n in workers]


@pytest.mark.parametrize("ranker", ["bm25", "recency", "random"])
def test_sample_rankings_are_byte_identical_for_1_2_3_workers(tmp_path, tiny_blocks, ranker):
    for task_folder in ("LaMP_3", "LaMP_7"):
        path = SAMPLE / task_folder / "dev_questions.json"
        before = path.read_bytes()
        inline, *parallel = rankings_for(path, tmp_path, task_folder, (1, 2, 3),
                                         "--ranker", ranker)
        assert parallel == [inline, inline]
        assert path.read_bytes() == before
        assert len(json.loads(inline)) == len(json.loads(before))


@pytest.mark.parametrize("block", [1, 5, 32])
@pytest.mark.parametrize("layout", ["ascii", "utf-8, indented"])
def test_many_questions_with_ties_rank_the_same_with_workers(tmp_path, tiny_blocks, monkeypatch,
                                                             layout, block):
    # 61 questions: blocks that end short, and with 32 a worker with nothing to rank.
    path = write_questions(tmp_path / "q.json", tricky_questions(61),
                           ensure_ascii=layout == "ascii",
                           indent=2 if "indented" in layout else None)
    inline = run_rank(path, tmp_path / "inline.json", "LaMP-7", "--ranker", "bm25",
                      "--num_workers", "1")
    monkeypatch.setattr(parallel_rank, "BLOCK_QUESTIONS", block)
    monkeypatch.setattr(rank_profiles, "_rank_inline", None)  # the workers must do it
    assert rankings_for(path, tmp_path, "LaMP-7", (2, 3, 4), "--ranker", "bm25") == [inline] * 3
    ranking = json.loads(inline)
    assert ranking["q0"] and len(ranking) == 61


def test_shards_with_workers_equal_the_inline_shards(tmp_path, tiny_blocks, monkeypatch):
    path = write_questions(tmp_path / "q.json", tricky_questions(25))
    shard_flags = ["--ranker", "bm25", "--num_shards", "3"]
    inline = [run_rank(path, tmp_path / f"i{shard}.json", "LaMP-7", *shard_flags,
                       "--shard_id", str(shard), "--num_workers", "1") for shard in range(3)]
    monkeypatch.setattr(rank_profiles, "_rank_inline", None)  # the workers must do it
    parallel = [run_rank(path, tmp_path / f"p{shard}.json", "LaMP-7", *shard_flags,
                         "--shard_id", str(shard), "--num_workers", "2") for shard in range(3)]
    assert parallel == inline
    full = json.loads(run_rank(path, tmp_path / "full.json", "LaMP-7", "--ranker", "bm25",
                               "--num_workers", "2"))
    combined = {}
    for part in parallel:
        combined.update(json.loads(part))
    assert list(combined.items()) == list(full.items())


# --- errors: what one worker reports, in the same words -------------------------------------

def nested(levels: int) -> object:
    value: object = 1
    for _ in range(levels):
        value = [value]
    return value


def bad_file_cases() -> dict[str, bytes]:
    good = tricky_questions(12)
    cases = {}
    missing_input = json.loads(json.dumps(good))
    del missing_input[7]["input"]
    cases["validation error"] = json.dumps(missing_input).encode()
    no_query = json.loads(json.dumps(good))
    no_query[5]["input"] = "Paraphrase this"
    cases["query error"] = json.dumps(no_query).encode()
    duplicate = json.loads(json.dumps(good))
    duplicate[9]["id"] = duplicate[2]["id"]
    cases["duplicate id"] = json.dumps(duplicate).encode()
    duplicate_and_invalid = json.loads(json.dumps(duplicate))
    duplicate_and_invalid[10]["profile"] = "none"
    cases["duplicate id, then an invalid question"] = json.dumps(duplicate_and_invalid).encode()
    too_deep = json.loads(json.dumps(good))
    too_deep[5]["extra"] = nested(MAX_DEPTH)  # list + question + 64 > 64
    cases["nesting too deep"] = json.dumps(too_deep).encode()
    hidden_deep = json.loads(json.dumps(good))  # the parser keeps only the last value
    cases["nesting too deep under a repeated key"] = json.dumps(hidden_deep).replace(
        '"id": "q5"', '"x": ' + json.dumps(nested(70)) + ', "x": 1, "id": "q5"', 1).encode()
    cases["no questions"] = b"[]"
    text = json.dumps(good)
    cut = text.index('{"id": "q6"')
    cases["malformed JSON"] = (text[:cut] + '{"id": "q6",, ' + text[cut + 12:]).encode()
    cases["NaN"] = text.replace('"date": "2010', '"rating": NaN, "date": "2010', 1).encode()
    cases["integer beyond ijson's range"] = text.replace(
        '"id": "q4"', '"id": 9223372036854775808', 1).encode()
    cases["float overflow"] = text.replace('"date"', '"x": 1e999, "date"', 1).encode()
    cases["long float"] = text.replace('"id": "q5"', '"x": 1.' + "0" * 120 + ', "id": "q5"',
                                       1).encode()
    cases["trailing garbage"] = (text + " [1]").encode()
    cases["a question that is not an object"] = text.replace('{"id": "q3"', '7, {"id": "q3"',
                                                             1).encode()
    cases["unclosed list"] = text[:-1].encode()
    cases["lone surrogate escape"] = text.replace('"a b c"', '"\\ud800 a b"', 1).encode()
    cases["bad UTF-8"] = text.replace("a b c", "a \xff c", 1).encode("latin-1", "replace")
    return cases


@pytest.mark.parametrize("case", sorted(bad_file_cases()))
def test_an_error_found_by_a_worker_reads_as_with_one_worker(tmp_path, tiny_blocks, case):
    path = tmp_path / "q.json"
    path.write_bytes(bad_file_cases()[case])
    before = path.read_bytes()
    messages = []
    for workers in (1, 2, 3):
        with pytest.raises(LampError) as error:
            run_rank(path, tmp_path / "r.json", "LaMP-7", "--ranker", "bm25",
                     "--num_workers", str(workers))
        messages.append(str(error.value))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["q.json"]
    assert messages == [messages[0]] * 3
    assert path.read_bytes() == before
    assert multiprocessing.active_children() == []


def test_nesting_at_the_limit_and_plain_numbers_rank_in_workers(tmp_path, tiny_blocks,
                                                               monkeypatch):
    questions = tricky_questions(8)
    questions[2]["extra"] = nested(MAX_DEPTH - 2)  # exactly MAX_DEPTH deep: allowed
    questions[4]["score"] = 0.125
    questions[6]["score"] = -1e-300
    path = write_questions(tmp_path / "q.json", questions)
    inline = run_rank(path, tmp_path / "one.json", "LaMP-7", "--ranker", "bm25",
                      "--num_workers", "1")
    monkeypatch.setattr(rank_profiles, "_rank_inline", None)  # the workers must do it
    assert run_rank(path, tmp_path / "two.json", "LaMP-7", "--ranker", "bm25",
                    "--num_workers", "2") == inline
    assert len(json.loads(inline)) == 8


@pytest.mark.parametrize("bad_question, shard_id", [(2, "2"), (2, "0"), (11, "0")])
def test_a_bad_question_outside_the_shard_is_reported_as_with_one_worker(
        tmp_path, tiny_blocks, bad_question, shard_id):
    # Inline, questions before the shard are read and checked, those after it are not read.
    questions = tricky_questions(12)
    questions[bad_question]["profile"][1] = ["not", "an", "item"]
    path = write_questions(tmp_path / "q.json", questions)
    outcomes = []
    for workers in ("1", "2"):
        try:
            outcomes.append(run_rank(path, tmp_path / "r.json", "LaMP-7", "--ranker", "bm25",
                                     "--num_shards", "3", "--shard_id", shard_id,
                                     "--num_workers", workers))
        except LampError as error:
            outcomes.append(str(error))
    assert outcomes[0] == outcomes[1]
    assert isinstance(outcomes[0], str) == (bad_question < 4 * int(shard_id) + 4)


# --- a lost worker -----------------------------------------------------------------------------

def _exit_at_once(*args, **kwargs):
    os._exit(3)  # a worker killed outright (the out-of-memory killer, kill -9)


def _no_fork(self):
    raise OSError(11, "Resource temporarily unavailable")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers fork on Linux only")
@pytest.mark.parametrize("how", ["dies at once", "dies after a block", "cannot be started"])
def test_a_lost_worker_falls_back_inline_with_the_same_ranking(tmp_path, tiny_blocks,
                                                               monkeypatch, capfd, how):
    path = write_questions(tmp_path / "q.json", tricky_questions(12))
    inline = run_rank(path, tmp_path / "one.json", "LaMP-7", "--ranker", "bm25",
                      "--num_workers", "1")
    # Forked workers run the replacement (a spawned one would import the module afresh).
    context = multiprocessing.get_context("fork")
    monkeypatch.setattr(parallel_rank, "_context", lambda: context)
    work = parallel_rank._work

    def dies_after_a_block(pipe, *args):
        class OneBlock:
            sent = 0

            def send(self, message):
                if self.sent:
                    os._exit(3)
                self.sent += 1
                pipe.send(message)

        work(OneBlock(), *args)

    if how == "cannot be started":
        monkeypatch.setattr(context.Process, "start", _no_fork)
    else:
        monkeypatch.setattr(parallel_rank, "_work", _exit_at_once if how == "dies at once"
                            else dies_after_a_block)
    capfd.readouterr()
    assert run_rank(path, tmp_path / "two.json", "LaMP-7", "--ranker", "bm25",
                    "--num_workers", "2") == inline
    warning = ("cannot start a ranking worker" if how == "cannot be started"
               else "a ranking worker process ended before its work did")
    assert warning in capfd.readouterr().err
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("change", ["replaced", "rewritten in place"])
def test_a_file_changed_while_workers_read_it_is_not_ranked_from_two_versions(
        tmp_path, tiny_blocks, change):
    path = write_questions(tmp_path / "q.json", tricky_questions(3000))
    task_options = ("LaMP-7", "bm25", {"tie_order": "profile"}, 2)
    with parallel_rank.ranking_workers(path, *task_options) as blocks:
        whole = [block for block in blocks]
    assert sum(len(block) for block in whole) == 3000  # unchanged: the workers' rankings
    with pytest.raises(parallel_rank.WorkersFailed, match="changed"):
        with parallel_rank.ranking_workers(path, *task_options) as blocks:
            next(blocks)  # the workers are reading: a block per question fills their pipes
            if change == "replaced":
                copy = tmp_path / "copy.json"
                copy.write_bytes(path.read_bytes())
                os.replace(copy, path)
            else:
                with open(path, "ab") as handle:
                    handle.write(b" ")
            for _ in blocks:
                pass
    assert multiprocessing.active_children() == []


# --- how many workers ------------------------------------------------------------------------

def test_num_workers_defaults_to_the_cores_and_contriever_stays_inline():
    args = rank_profiles.parse_args(["--input_data_addr", "q", "--output_ranking_addr", "r",
                                     "--task", "LaMP-7", "--ranker", "bm25"])
    assert args.num_workers == len(os.sched_getaffinity(0))
    assert not parallel_rank.worth_workers(Path(__file__), 4, "contriever")


@pytest.mark.parametrize("value", ["0", "-1"])
def test_num_workers_below_one_is_an_error_line(tmp_path, value):
    result = subprocess.run(
        [sys.executable, "LaMP/rank_profiles.py", "--input_data_addr", "q.json",
         "--output_ranking_addr", str(tmp_path / "r.json"), "--task", "LaMP-7",
         "--ranker", "bm25", "--num_workers", value],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].endswith("error: --num_workers must be at least 1")
    assert list(tmp_path.iterdir()) == []


def test_num_workers_beyond_the_cores_starts_one_worker_a_core(tmp_path, tiny_blocks,
                                                               monkeypatch, capfd):
    path = write_questions(tmp_path / "q.json", tricky_questions(12))
    inline = run_rank(path, tmp_path / "one.json", "LaMP-7", "--ranker", "bm25",
                      "--num_workers", "1")
    monkeypatch.setattr(parallel_rank, "available_cores", lambda: 3)
    started = []
    context = multiprocessing.get_context("fork")
    start = context.Process.start
    monkeypatch.setattr(parallel_rank, "_context", lambda: context)
    monkeypatch.setattr(context.Process, "start",
                        lambda process: started.append(process) or start(process))
    monkeypatch.setattr(rank_profiles, "_rank_inline", None)  # the workers must do it
    output = tmp_path / "many.json"
    assert run_rank(path, output, "LaMP-7", "--ranker", "bm25", "--num_workers", "1000") == inline
    assert len(started) == 3
    assert ("--num_workers 1000 is more than the 3 cores this process may use; ranking with 3"
            in capfd.readouterr().err)
    assert json.loads((tmp_path / "many.args.json").read_text())["num_workers"] == 3


# --- memory: streamed in every process -------------------------------------------------------

# Runs rank_profiles in a fresh interpreter (workers even for a small file) and prints the
# peak resident memory, in KB, of the main process (VmHWM) and of its largest worker.
PEAKS = """
import resource, sys
from LaMP import rank_profiles
from LaMP.utils.retrieval import parallel
parallel.MIN_BYTES = 0
rank_profiles.main(sys.argv[1:])
with open("/proc/self/status") as status:
    main = next(line for line in status if line.startswith("VmHWM")).split()[1]
print(main, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peaks_mb(path: Path, output: Path, workers: str) -> list[float]:
    result = subprocess.run(
        [sys.executable, "-c", PEAKS, "--input_data_addr", str(path), "--output_ranking_addr",
         str(output), "--task", "LaMP-7", "--ranker", "random", "--num_workers", workers],
        capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1"})
    return [int(kb) / 1024 for kb in result.stdout.split()]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("workers", ["1", "2"])
def test_memory_does_not_grow_with_the_file(tmp_path, workers):
    # Ten times the questions, about 25 MB: parsed whole, or its rankings kept, the file
    # would take well over 100 MB in some process.
    def questions(count: int) -> list[dict]:
        return [{"id": f"q{n}", "input": TWEET.format("a b"),
                 "profile": [{"id": f"q{n}-{i}", "text": "a b c"} for i in range(60)]}
                for n in range(count)]

    small = write_questions(tmp_path / "small.json", questions(1_000))
    large = write_questions(tmp_path / "large.json", questions(10_000))
    assert large.stat().st_size > 20e6
    base = peaks_mb(small, tmp_path / "small_ranking.json", workers)
    grown = peaks_mb(large, tmp_path / "large_ranking.json", workers)
    assert len(json.loads((tmp_path / "large_ranking.json").read_text())) == 10_000
    assert [after - before < 15 for before, after in zip(base, grown)] == [True, True], (
        base, grown)


# --- interrupting a run ------------------------------------------------------------------------

def children(pid: int) -> list[int]:
    found = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:  # the process is gone
        return found
    for task in tasks:
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            # A thread (the progress bar's monitor) ended between the listing and the read.
            continue
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("how, status, last_line", [("SIGINT", 130, "interrupted"),
                                                    ("SIGTERM", 143, "terminated (SIGTERM)"),
                                                    ("SIGKILL", -9, None)])
def test_an_interrupted_run_leaves_no_workers_and_no_files(tmp_path, how, status, last_line):
    # Big enough for workers, and long enough (about a second of ranking after they appear)
    # that the signal lands mid-run on a loaded machine too.
    path = write_questions(tmp_path / "q.json", tricky_questions(20000, items=40))
    assert path.stat().st_size > parallel_rank.MIN_BYTES
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "LaMP/rank_profiles.py", "--input_data_addr", str(path),
         "--output_ranking_addr", str(out / "r.json"), "--task", "LaMP-7", "--ranker", "bm25",
         "--num_workers", "2"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    try:
        workers: list[int] = []
        deadline = time.monotonic() + 120
        while len(workers) < 2 and process.poll() is None and time.monotonic() < deadline:
            workers = children(process.pid)
            time.sleep(0.005)
        assert len(workers) == 2, "the run ended before its workers could be seen"
        if how == "SIGINT":
            os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C does: the whole group
        else:
            os.kill(process.pid, getattr(signal, how))
        _, stderr = process.communicate(timeout=120)
    finally:
        # Whatever failed above, the run and its workers (its whole session) do not outlive
        # the test, nor does a full stderr pipe leave them blocked.
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == status, stderr
    if last_line is not None:
        assert stderr.strip().splitlines()[-1] == last_line
        assert "Traceback" not in stderr
    deadline = time.monotonic() + 60
    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(alive, workers))
    if how != "SIGKILL":  # a killed process cannot clean up its temporary file
        assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers fork on Linux only")
def test_a_command_line_run_forks_its_workers_rather_than_spawn_them(tmp_path):
    # The progress bar's monitor thread, were the bar opened before the workers started,
    # would make them start by spawning: a fresh interpreter importing numpy, every run.
    source = write_questions(tmp_path / "q.json", tricky_questions(12))
    script = (
        "import sys\n"
        "from LaMP import rank_profiles\n"
        "from LaMP.utils.retrieval import parallel\n"
        "parallel.MIN_BYTES = 0\n"
        "parallel.available_cores = lambda: 2\n"
        "chosen = []\n"
        "original = parallel._context\n"
        "parallel._context = lambda: chosen.append(original().get_start_method()) or original()\n"
        "rank_profiles._rank_inline = None\n"
        "rank_profiles.main(sys.argv[1:])\n"
        "print(chosen)\n")
    result = subprocess.run(
        [sys.executable, "-c", script, "--input_data_addr", str(source),
         "--output_ranking_addr", str(tmp_path / "r.json"), "--task", "LaMP-7",
         "--ranker", "bm25", "--num_workers", "2"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["['fork']"]
    assert (tmp_path / "r.json").read_bytes() == run_rank(
        source, tmp_path / "one.json", "LaMP-7", "--ranker", "bm25", "--num_workers", "1")
