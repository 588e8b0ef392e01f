"""rank_profiles.py --num_workers: rankings byte-identical for any number of workers, errors
as with one, no orphan workers; and the splitter that cuts the questions file into runs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from LaMP import rank_profiles
from LaMP.utils.errors import LampError
from LaMP.utils.retrieval import parallel as parallel_rank
from LaMP.utils.retrieval.parallel import FastPathFailed, question_spans
from conftest import REPO, SAMPLE

TWEET = "Paraphrase the following tweet without any explanation before or after it: {}"
# Texts that trip a naive splitter: quotes, brackets and backslashes inside strings, escape
# runs of both parities, non-ASCII (escaped as surrogate pairs by json.dumps), and ties.
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
def small_chunks(monkeypatch):
    """Workers even for tiny files: chunks of one question, no size threshold."""
    monkeypatch.setattr(parallel_rank, "CHUNK_BYTES", 1)


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
def test_sample_rankings_are_byte_identical_for_1_2_3_workers(tmp_path, small_chunks, ranker):
    for task_folder in ("LaMP_3", "LaMP_7"):
        path = SAMPLE / task_folder / "dev_questions.json"
        before = path.read_bytes()
        inline, *parallel = rankings_for(path, tmp_path, task_folder, (1, 2, 3),
                                         "--ranker", ranker)
        assert parallel == [inline, inline]
        assert path.read_bytes() == before
        assert len(json.loads(inline)) == len(json.loads(before))


@pytest.mark.parametrize("layout", ["ascii", "utf-8, indented"])
def test_many_questions_with_ties_rank_the_same_with_workers(tmp_path, small_chunks, no_inline,
                                                             monkeypatch, layout):
    path = write_questions(tmp_path / "q.json", tricky_questions(120),
                           ensure_ascii=layout == "ascii",
                           indent=2 if "indented" in layout else None)
    # Reads that end inside strings and escapes: the exact splitter's blocks (learning the
    # signature, shards) and the signature's windows.
    monkeypatch.setattr(parallel_rank, "BLOCK_BYTES", 97)
    monkeypatch.setattr(parallel_rank, "_WINDOW_BYTES", 97)
    parallel = rankings_for(path, tmp_path, "LaMP-7", (2, 3), "--ranker", "bm25")
    monkeypatch.undo()
    inline = run_rank(path, tmp_path / "inline.json", "LaMP-7", "--ranker", "bm25",
                      "--num_workers", "1")
    assert parallel == [inline, inline]
    ranking = json.loads(inline)
    assert ranking["q0"] and len(ranking) == 120


def _exit_at_once(*args, **kwargs):
    os._exit(3)  # a worker killed outright (the out-of-memory killer, kill -9)


def _exit_at_start(*args, **kwargs):
    raise RuntimeError("a worker that cannot start")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers fork on Linux only")
@pytest.mark.parametrize("replaced, by", [("_rank_span", _exit_at_once),
                                          ("_start_worker", _exit_at_start)],
                         ids=["dies while ranking", "fails to start"])
def test_a_lost_worker_falls_back_inline_instead_of_waiting_forever(
        tmp_path, small_chunks, monkeypatch, capfd, replaced, by):
    import multiprocessing

    path = write_questions(tmp_path / "q.json", tricky_questions(12))
    inline = run_rank(path, tmp_path / "one.json", "LaMP-7", "--ranker", "bm25",
                      "--num_workers", "1")
    # Forked workers run the replacement (a fork server would import the module afresh).
    monkeypatch.setattr(parallel_rank, "_pool_context",
                        lambda: multiprocessing.get_context("fork"))
    monkeypatch.setattr(parallel_rank, replaced, by)
    capfd.readouterr()
    assert run_rank(path, tmp_path / "two.json", "LaMP-7", "--ranker", "bm25",
                    "--num_workers", "2") == inline
    assert "a ranking worker process ended before its work did" in capfd.readouterr().err


def test_shards_with_workers_equal_the_inline_shards(tmp_path, small_chunks, monkeypatch):
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
    text = json.dumps(good)
    cut = text.index('{"id": "q6"')
    cases["malformed JSON"] = (text[:cut] + '{"id": "q6",, ' + text[cut + 12:]).encode()
    cases["NaN"] = text.replace('"date": "2010', '"rating": NaN, "date": "2010', 1).encode()
    cases["integer beyond ijson's range"] = text.replace(
        '"id": "q4"', '"id": 9223372036854775808', 1).encode()
    cases["float overflow"] = text.replace('"date"', '"x": 1e999, "date"', 1).encode()
    cases["trailing garbage"] = (text + " [1]").encode()
    cases["a question that is not an object"] = text.replace('{"id": "q3"', '7, {"id": "q3"',
                                                             1).encode()
    cases["unclosed list"] = text[:-1].encode()
    cases["lone surrogate escape"] = text.replace('"a b c"', '"\\ud800 a b"', 1).encode()
    cases["bad UTF-8"] = text.replace("a b c", "a \xff c", 1).encode("latin-1", "replace")
    return cases


@pytest.mark.parametrize("case", sorted(bad_file_cases()))
def test_an_error_found_by_a_worker_reads_as_with_one_worker(tmp_path, small_chunks, case):
    path = tmp_path / "q.json"
    path.write_bytes(bad_file_cases()[case])
    before = path.read_bytes()
    messages = []
    for workers in (1, 2):
        with pytest.raises(LampError) as error:
            run_rank(path, tmp_path / "r.json", "LaMP-7", "--ranker", "bm25",
                     "--num_workers", str(workers))
        messages.append(str(error.value))
        assert not (tmp_path / "r.json").exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["q.json"]
    assert messages[0] == messages[1]
    assert path.read_bytes() == before


@pytest.mark.parametrize("bad_question, shard_id", [(2, "2"), (2, "0"), (11, "0")])
def test_a_bad_question_outside_the_shard_is_reported_as_with_one_worker(
        tmp_path, small_chunks, bad_question, shard_id):
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


@pytest.mark.parametrize("case, content", [
    # ijson reads this; json.loads alone would not. (A lone surrogate escape, which ijson
    # read as "?", is refused by every reader now: see bad_file_cases.)
    ("vertical tab before the list", None),
])
def test_files_only_ijson_reads_give_its_rankings(tmp_path, small_chunks, case, content):
    text = json.dumps(tricky_questions(6))
    if content is None:
        text = "\x0b" + text
    else:
        text = text.replace('"a b c"', content, 1)
    path = tmp_path / "q.json"
    path.write_text(text, encoding="utf-8")
    inline, parallel = rankings_for(path, tmp_path, "LaMP-7", (1, 2), "--ranker", "bm25")
    assert parallel == inline


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


# --- the splitter ------------------------------------------------------------------------------

@pytest.mark.parametrize("block_bytes", [1, 2, 3, 5, 64, 1 << 20])
@pytest.mark.parametrize("chunk_bytes", [1, 300, 1 << 20])
def test_spans_parse_to_the_questions(tmp_path, block_bytes, chunk_bytes):
    questions = tricky_questions(9, items=3)
    path = write_questions(tmp_path / "q.json", questions, indent=1)
    spans = list(question_spans(path, chunk_bytes=chunk_bytes, block_bytes=block_bytes))
    parsed = []
    for number, (span, count) in enumerate(spans):
        text = span.decode()
        if number:
            text = text.lstrip()
            assert text[0] == ","
            text = text[1:]
        part = json.loads(f"[{text}]")
        assert len(part) == count
        parsed.extend(part)
    assert parsed == questions
    if chunk_bytes == 1:
        assert [count for _, count in spans] == [1] * 9


def test_spans_stop_after_the_questions_asked_for(tmp_path):
    path = write_questions(tmp_path / "q.json", tricky_questions(9, items=2))
    assert sum(count for _, count in question_spans(path, stop=4, chunk_bytes=1)) == 4


@pytest.mark.parametrize("content", ["[]", " [ ] \n", "\ufeff[]"])
def test_an_empty_list_has_no_spans(tmp_path, content):
    path = tmp_path / "q.json"
    path.write_text(content, encoding="utf-8")
    assert list(question_spans(path)) == []


@pytest.mark.parametrize("content", ['{"a": [1]}', "[{}] x", "[{}", "[{}]]", "x[{}]", "[{}, 5]",
                                     "[5]", ""])
def test_layouts_the_splitter_does_not_follow_fail(tmp_path, content):
    path = tmp_path / "q.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(FastPathFailed):
        list(question_spans(path))


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
            # A thread (the progress bar's monitor, a pool's helper) ended between the
            # listing and the read.
            continue
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("how, status", [("SIGINT", 130), ("SIGTERM", 143), ("SIGKILL", -9)])
def test_an_interrupted_run_leaves_no_workers_and_no_files(tmp_path, how, status):
    # Big enough for workers (over two chunks) and for a run that is still going when the
    # workers appear.
    questions = tricky_questions(4000, items=40)
    path = write_questions(tmp_path / "q.json", questions)
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
    if how == "SIGINT":
        assert stderr.strip().splitlines()[-1] == "interrupted"
    deadline = time.monotonic() + 60
    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(alive, workers))
    if how != "SIGKILL":  # a killed process cannot clean up its temporary file
        assert not out.exists() or list(out.iterdir()) == []



def test_a_limit_broken_inside_a_worker_run_is_reported_as_with_one_worker(tmp_path):
    """Workers enforce the readers' limits too (here a 200-digit float deep in a big file,
    which json would take): the run falls back inline and names the byte, as one worker does."""
    from LaMP.utils.errors import LampError
    from LaMP.utils.retrieval.parallel import CHUNK_BYTES

    questions = [{"id": f"7{i}", "input": "Paraphrase the following tweet without any "
                  f"explanation before or after it: tweet {i} about the beach",
                  "profile": [{"id": f"7{i}{j}", "text": "word " * 40 + str(j)}
                              for j in range(30)]} for i in range(800)]
    text = json.dumps(questions)
    assert len(text) > 2 * CHUNK_BYTES  # past the size below which ranking stays inline
    cut = text.rindex('"text": "')
    hostile = tmp_path / "hostile.json"
    hostile.write_text(text[:cut] + '"score": 1.' + "0" * 200 + ", " + text[cut:])
    messages = []
    for workers in ("1", "2"):
        with pytest.raises(LampError) as error:
            rank_profiles.main(["--input_data_addr", str(hostile), "--output_ranking_addr",
                                str(tmp_path / f"out{workers}.json"), "--task", "LaMP-7",
                                "--ranker", "bm25", "--num_workers", workers])
        messages.append(str(error.value))
    assert messages[0] == messages[1] and "the limit is 100 digits" in messages[0]
    assert not list(tmp_path.glob("out*"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers fork on Linux only")
def test_a_command_line_run_forks_its_workers_rather_than_start_a_fork_server(tmp_path):
    # The progress bar's monitor thread, were the bar opened before the pool, would make the
    # pool start from a fork server: a fresh interpreter importing numpy, every run.
    source = write_questions(tmp_path / "q.json", tricky_questions(12))
    script = (
        "import sys\n"
        "from LaMP import rank_profiles\n"
        "from LaMP.utils.retrieval import parallel as parallel_rank\n"
        "parallel_rank.CHUNK_BYTES = 1\n"
        "chosen = []\n"
        "original = parallel_rank._pool_context\n"
        "def recording():\n"
        "    context = original()\n"
        "    chosen.append(context.get_start_method())\n"
        "    return context\n"
        "parallel_rank._pool_context = recording\n"
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


# --- the signature splitter (a whole file in workers) -----------------------------------------

def parsed_signature_spans(path: Path, chunk_bytes: int) -> list[list]:
    signature = parallel_rank.learn_signature(path)
    spans = list(parallel_rank.signature_spans(path, signature, chunk_bytes=chunk_bytes))
    data = path.read_bytes()
    assert spans[0][0] == data.index(b"[") + 1
    assert all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:]))  # no gap, no overlap
    assert sum(spans[-1]) == data.rindex(b"]")
    parsed = []
    for number, (offset, length) in enumerate(spans):
        text = data[offset:offset + length].decode()
        if number:
            text = text.lstrip()
            assert text[0] == ","
            text = text[1:]
        parsed.append(json.loads(f"[{text}]"))
    return parsed


@pytest.mark.parametrize("window", [1, 50, 1 << 16])
@pytest.mark.parametrize("layout", ["compact", "indented", "utf-8"])
def test_signature_spans_are_runs_of_whole_questions(tmp_path, monkeypatch, window, layout):
    monkeypatch.setattr(parallel_rank, "_WINDOW_BYTES", window)  # markers across reads
    questions = tricky_questions(30, items=3)
    path = write_questions(tmp_path / "q.json", questions, ensure_ascii=layout != "utf-8",
                           indent=2 if layout == "indented" else None)
    assert parallel_rank.learn_signature(path).marker.endswith(b'"id"')
    one_each = parsed_signature_spans(path, 1)
    assert [len(part) for part in one_each] == [1] * 30
    assert [question for part in one_each for question in part] == questions
    bigger = parsed_signature_spans(path, 2_000)
    assert 1 < len(bigger) < 30
    assert [question for part in bigger for question in part] == questions


def test_signature_needs_two_questions_objects_and_a_plain_first_key(tmp_path):
    cases = {"[]": None, '[{"id": "a"}]': None, '[[1], [2]]': None,
             '[{"a\\"b": 1}, {"a\\"b": 2}]': None,
             '[{"id": 1}, {"id": 2}]': None,  # ends in a single bracket: items might too
             '\ufeff [{"id": [1]}, {"id": [2]}]': (b']}, {"id"', 2, 5),
             '[{"p": [{}\n ]\n}, {"id": 2}]': (b'}\n ]\n}, {"id"', 6, 1)}
    for content, expected in cases.items():
        path = tmp_path / "q.json"
        path.write_text(content, encoding="utf-8")
        signature = parallel_rank.learn_signature(path)
        assert (signature if signature is None else tuple(signature)) == expected, content
    for content in ('x [{"id": 1}, {"id": 2}]', "[1, 2]"):  # layouts the splitter refuses
        path.write_text(content)
        with pytest.raises(FastPathFailed):
            parallel_rank.learn_signature(path)


def test_a_file_changed_since_it_was_looked_at_is_not_cut(tmp_path):
    path = write_questions(tmp_path / "q.json", tricky_questions(5))
    signature = parallel_rank.learn_signature(path)
    identity = parallel_rank.file_identity(os.stat(path))
    assert len(list(parallel_rank.signature_spans(path, signature, identity, 1))) == 5
    path.write_bytes(path.read_bytes() + b" ")
    with pytest.raises(FastPathFailed):
        list(parallel_rank.signature_spans(path, signature, identity, 1))


def varied_questions(count: int) -> list[dict]:
    """Questions whose first key and ending vary (nested lists closing items and questions):
    boundaries the signature misses, and items that end like a question."""
    questions = tricky_questions(count, items=4)
    for number, question in enumerate(questions):
        if number % 3 == 1:
            questions[number] = {"input": question["input"], "id": question["id"],
                                 "profile": question["profile"]}
        if number % 4 == 2:
            for item in question["profile"]:
                item["tags"] = ["a", ["b"]]  # nested deeper than a plain LaMP item
    return questions


def test_boundaries_the_signature_misses_only_make_spans_longer(tmp_path, small_chunks,
                                                               monkeypatch):
    path = write_questions(tmp_path / "q.json", varied_questions(40))
    parts = parsed_signature_spans(path, 1)
    assert len(parts) < 40 and sum(map(len, parts)) == 40
    inline, = rankings_for(path, tmp_path, "LaMP-7", (1,), "--ranker", "bm25")
    monkeypatch.setattr(rank_profiles, "_rank_inline", None)  # the workers must do it
    assert rankings_for(path, tmp_path, "LaMP-7", (2, 3), "--ranker", "bm25") == [inline] * 2


def rankings_with_fallbacks(path: Path, tmp_path: Path, monkeypatch) -> list[bytes]:
    """The rankings with 1 and with 2 workers, the second checked to have gone inline."""
    inline = run_rank(path, tmp_path / "one.json", "LaMP-7", "--ranker", "bm25",
                      "--num_workers", "1")
    calls = []
    original = rank_profiles._rank_inline
    monkeypatch.setattr(rank_profiles, "_rank_inline",
                        lambda *args: calls.append(args) or original(*args))
    parallel = run_rank(path, tmp_path / "two.json", "LaMP-7", "--ranker", "bm25",
                        "--num_workers", "2")
    assert len(calls) == 1
    return [inline, parallel]


def test_a_cut_inside_a_profile_sends_the_run_inline_with_the_same_rankings(
        tmp_path, small_chunks, monkeypatch):
    # Items that start with "id" and end with a list of objects end like the questions
    # do: the signature cuts between items too, and a span cut there does not parse.
    questions = tricky_questions(20, items=3)
    for question in questions:
        question["profile"] = [{"id": item["id"], "text": item["text"], "tags": [{"k": "v"}]}
                               for item in question["profile"]]
    path = write_questions(tmp_path / "q.json", questions)
    signature = parallel_rank.learn_signature(path)
    assert signature.marker == b'}]}, {"id"'
    data = path.read_bytes()
    assert data.count(signature.marker) > 3 * (len(questions) - 1)  # items' ends too
    inline, parallel = rankings_with_fallbacks(path, tmp_path, monkeypatch)
    assert parallel == inline and len(json.loads(inline)) == 20


def test_a_span_past_its_limit_sends_the_run_inline(tmp_path, small_chunks, monkeypatch):
    # The second question starts with another key than all the others: the signature
    # learned from the first boundary never recurs, and the rest is one span.
    questions = tricky_questions(30, items=3)
    questions[1] = {"input": questions[1]["input"], "id": questions[1]["id"],
                    "profile": questions[1]["profile"]}
    path = write_questions(tmp_path / "q.json", questions)
    question_bytes = len(json.dumps(questions[0]))
    monkeypatch.setattr(parallel_rank, "MAX_SPAN_BYTES", 5 * question_bytes)
    monkeypatch.setattr(parallel_rank, "_WINDOW_BYTES", 64)
    assert parallel_rank.learn_signature(path).marker == b'}]}, {"input"'
    with pytest.raises(FastPathFailed):
        parsed_signature_spans(path, 1)
    inline, parallel = rankings_with_fallbacks(path, tmp_path, monkeypatch)
    assert parallel == inline


# --- one worker: the fast path in this process -------------------------------------------------

@pytest.fixture
def inline_reference(monkeypatch):
    """A function giving a run's output (or error line) with the fast path off: the
    inline reader, the reference."""
    original = rank_profiles._rank_inline

    def reference(*flags: str, path: Path, out: Path):
        with monkeypatch.context() as patch:
            patch.setattr(parallel_rank, "FAST_PATH_MIN_BYTES", float("inf"))
            patch.setattr(rank_profiles, "_rank_inline", original)
            try:
                return run_rank(path, out, "LaMP-7", *flags)
            except LampError as error:
                return str(error)
    return reference


def test_one_worker_ranks_on_the_fast_path_in_this_process(tmp_path, small_chunks, monkeypatch,
                                                           inline_reference):
    import multiprocessing

    path = write_questions(tmp_path / "q.json", tricky_questions(60), ensure_ascii=False)
    flags = ("--ranker", "bm25", "--num_workers", "1")
    inline = inline_reference(*flags, path=path, out=tmp_path / "inline.json")
    monkeypatch.setattr(parallel_rank, "FAST_PATH_MIN_BYTES", 1)
    monkeypatch.setattr(rank_profiles, "_rank_inline", None)  # the fast path must do it
    assert run_rank(path, tmp_path / "fast.json", "LaMP-7", *flags) == inline
    assert multiprocessing.active_children() == []
    assert parallel_rank._worker == {}  # nothing of the run left behind in this process
    for shard in range(3):
        shard_flags = (*flags, "--num_shards", "3", "--shard_id", str(shard))
        expected = inline_reference(*shard_flags, path=path, out=tmp_path / f"i{shard}.json")
        assert run_rank(path, tmp_path / f"f{shard}.json", "LaMP-7", *shard_flags) == expected


@pytest.mark.parametrize("case", sorted(bad_file_cases()))
def test_an_error_on_the_one_worker_fast_path_reads_as_inline(tmp_path, small_chunks,
                                                              monkeypatch, inline_reference,
                                                              case):
    path = tmp_path / "q.json"
    path.write_bytes(bad_file_cases()[case])
    flags = ("--ranker", "bm25", "--num_workers", "1")
    expected = inline_reference(*flags, path=path, out=tmp_path / "r.json")
    monkeypatch.setattr(parallel_rank, "FAST_PATH_MIN_BYTES", 1)
    with pytest.raises(LampError) as error:
        run_rank(path, tmp_path / "r.json", "LaMP-7", *flags)
    assert str(error.value) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.json"]
    assert parallel_rank._worker == {}


def test_no_signature_for_a_first_question_past_the_span_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(parallel_rank, "MAX_SPAN_BYTES", 5_000)
    monkeypatch.setattr(parallel_rank, "_WINDOW_BYTES", 64)  # many reads, growing
    questions = tricky_questions(4, items=3)
    questions[0]["profile"] *= 100  # about 10 KB
    path = write_questions(tmp_path / "q.json", questions)
    assert parallel_rank.learn_signature(path) is None
    monkeypatch.setattr(parallel_rank, "MAX_SPAN_BYTES", 50_000)
    assert parallel_rank.learn_signature(path).marker == b'}]}, {"id"'


def test_without_a_signature_the_exact_splitter_cuts_the_file_for_the_workers(
        tmp_path, small_chunks, monkeypatch):
    # Questions that end with a string (as merged files do): no signature.
    questions = [{**question, "output": "the end"} for question in tricky_questions(20)]
    path = write_questions(tmp_path / "q.json", questions)
    assert parallel_rank.learn_signature(path) is None
    inline, = rankings_for(path, tmp_path, "LaMP-7", (1,), "--ranker", "bm25")
    monkeypatch.setattr(rank_profiles, "_rank_inline", None)  # the workers must do it
    assert rankings_for(path, tmp_path, "LaMP-7", (2,), "--ranker", "bm25") == [inline]
