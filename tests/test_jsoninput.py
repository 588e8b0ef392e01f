"""The guarded JSON reader (LaMP/utils/data/jsoninput.py) in every stage that reads JSON:
hostile values, nesting, repeated keys and block boundaries, and pipes as input.

Every case ends in exit status 2 with exactly one ``error:`` line that names the file and the
byte offset, leaves the input byte-identical and writes nothing, or (pipes) succeeds. Offsets
are worked out by hand from where the hostile bytes are placed (``HOLE``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from LaMP import evaluate_llm, rank_profiles
from LaMP.utils import merge_with_rank
from LaMP.utils.data.jsoninput import MAX_DEPTH
from LaMP.utils.errors import LampError
from conftest import REPO, load_script, run_cli

eval_task = load_script("eval/eval_task.py")
eval_all = load_script("eval/eval_all.py")
compare = load_script("eval/compare.py")

TWEET = "Paraphrase the following tweet without any explanation before or after it: {}"
TEXTS = ["sunny day at the beach", "coffee first then code", "the beach was cold today"]
HOLE = "@HOLE@"  # a string value later replaced by raw hostile bytes
QUOTED_HOLE = json.dumps(HOLE).encode()


def tweet_questions() -> list[dict]:
    return [{"id": str(700 + n), "input": TWEET.format(TEXTS[n]),
             "profile": [{"id": f"{n}{i}", "text": TEXTS[(n + i) % 3]} for i in range(3)]}
            for n in range(3)]


def golds_doc() -> dict:
    return {"task": "LaMP_7", "golds": [{"id": str(700 + n), "output": TEXTS[n]}
                                        for n in range(3)]}


def with_hole(document, hostile: bytes) -> tuple[bytes, int]:
    """``document`` as JSON with its one ``HOLE`` string replaced by ``hostile``, and the
    byte offset where ``hostile`` starts."""
    data = json.dumps(document).encode()
    offset = data.index(QUOTED_HOLE)
    return data.replace(QUOTED_HOLE, hostile), offset


def fails(main, argv, capsys, inputs: list[Path], output: Path, *fragments: str) -> str:
    """``main(argv)`` as the script runs it: exit status 2, exactly one ``error:`` line holding
    ``fragments``, inputs byte-identical, nothing written next to ``output``."""
    before = {path: path.read_bytes() for path in inputs}
    listing = sorted(os.listdir(output.parent))
    status, lines = run_cli(main, argv, capsys)
    assert status == 2
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, errors
    for fragment in fragments:
        assert fragment in errors[0]
    assert {path: path.read_bytes() for path in inputs} == before
    assert sorted(os.listdir(output.parent)) == listing
    return errors[0]


# --- the readers, each with a place for hostile bytes ------------------------------------------
# Each builder writes the files one stage reads, with ``hostile`` in one of them; it returns
# (main, argv, the files, the output path, the source the error must name, offset of hostile,
# nesting depth of a bracket placed at the hole).


def write_with_hole(path: Path, document, hostile: bytes) -> int:
    """Write ``document`` to ``path`` with ``hostile`` in its hole; where ``hostile`` starts."""
    data, offset = with_hole(document, hostile)
    path.write_bytes(data)
    return offset


def output_in(tmp_path: Path, name: str) -> Path:
    """An output path in a folder of its own, so that a stray file there would show."""
    (tmp_path / "out").mkdir()
    return tmp_path / "out" / name


def questions_reader(tmp_path: Path, hostile: bytes):
    questions = tweet_questions()
    questions[1]["extra"] = HOLE  # a key the stages ignore: list > question > here
    path = tmp_path / "questions.json"
    offset = write_with_hole(path, questions, hostile)
    output = output_in(tmp_path, "ranking.json")
    argv = ["--input_data_addr", str(path), "--output_ranking_addr", str(output),
            "--task", "LaMP-7", "--ranker", "bm25"]
    return rank_profiles.main, argv, [path], output, str(path), offset, 3


def outputs_reader(tmp_path: Path, hostile: bytes):
    golds = tmp_path / "golds.json"
    golds.write_text(json.dumps(golds_doc()))
    preds_doc = golds_doc()
    preds_doc["extra"] = HOLE  # top-level object > here
    preds = tmp_path / "preds.json"
    offset = write_with_hole(preds, preds_doc, hostile)
    output = output_in(tmp_path, "results.json")
    argv = ["--golds_json", str(golds), "--preds_json", str(preds), "--task_name", "LaMP_7",
            "--output_file", str(output)]
    return eval_task.main, argv, [golds, preds], output, str(preds), offset, 2


def compare_reader(tmp_path: Path, hostile: bytes):
    main, argv, inputs, output, source, offset, depth = outputs_reader(tmp_path, hostile)
    golds, preds = inputs
    argv = ["--golds_json", str(golds), "--preds_a", str(golds), "--preds_b", str(preds),
            "--task_name", "LaMP_7", "--output_file", str(output), "--bootstrap", "10"]
    return compare.main, argv, inputs, output, source, offset, depth


def zip_reader(tmp_path: Path, hostile: bytes):
    preds_doc = golds_doc()
    preds_doc["extra"] = HOLE
    data, offset = with_hole(preds_doc, hostile)
    golds, preds = tmp_path / "golds.zip", tmp_path / "preds.zip"
    with zipfile.ZipFile(golds, "w") as archive:
        archive.writestr("LaMP_7.json", json.dumps(golds_doc()))
    with zipfile.ZipFile(preds, "w") as archive:
        archive.writestr("out/LaMP_7.json", data)
    output = output_in(tmp_path, "results.json")
    argv = ["--golds_zip", str(golds), "--preds_zip", str(preds), "--output_file", str(output)]
    return eval_all.main, argv, [golds, preds], output, f"{preds}:out/LaMP_7.json", offset, 2


def ranking_reader(tmp_path: Path, hostile: bytes):
    questions = tmp_path / "questions.json"
    questions.write_text(json.dumps(tweet_questions()))
    ranking_doc = {str(700 + n): [f"{n}{i}" for i in range(3)] for n in range(3)}
    ranking_doc["799"] = HOLE  # object > here
    ranking = tmp_path / "ranking.json"
    offset = write_with_hole(ranking, ranking_doc, hostile)
    output = output_in(tmp_path, "merged.json")
    argv = ["--lamp_questions_addr", str(questions), "--profile_ranking_addr", str(ranking),
            "--merged_output_addr", str(output)]
    return merge_with_rank.main, argv, [questions, ranking], output, str(ranking), offset, 2


READERS = {"questions (rank_profiles)": questions_reader,
           "outputs (eval_task)": outputs_reader,
           "outputs (compare)": compare_reader,
           "zip member (eval_all)": zip_reader,
           "ranking (merge_with_rank)": ranking_reader}

# hostile bytes -> (what the error says, offset of the problem within the hostile bytes)
HOSTILE = {
    "5000-digit number": (b"1" * 5000, "a number of 5,000 characters", 0),
    "101-digit number": (b"-" + b"9" * 101, "a number of 102 characters", 0),
    "2**63": (b"9223372036854775808", "the integer 9223372036854775808 does not fit 64 bits",
              0),
    "-2**63": (b"-9223372036854775808", "the integer -9223372036854775808 does not fit", 0),
    "1e400": (b"1e400", "the number 1e400 is too large (it overflows to infinity)", 0),
    "-2.5E+999": (b"[-2.5E+999]", "the number -2.5E+999 is too large", 1),
    "NaN": (b"NaN", "NaN is not a JSON number", 0),
    "Infinity": (b"[1, -Infinity]", "-Infinity is not a JSON number", 4),
    "lone high surrogate": (b'"ok \\ud800"', r"the escape \ud800 is half of a UTF-16 surrogate "
                                             "pair", 4),
    "lone low surrogate": (b'"\\uDC01 x"', r"the escape \uDC01 is half", 1),
    "high then escaped backslash": (b'"\\ud83d\\\\ude00"', r"the escape \ud83d is half", 1),
    "invalid UTF-8": (b'"caf\xff"', "not UTF-8 text (invalid start byte)", 4),
    "raw UTF-8 surrogate": (b'"\xed\xa0\x80"', "not UTF-8 text (invalid continuation byte)", 1),
}
# Near misses that are valid and must still work in every reader.
BENIGN = [b"0." + b"9" * 99, b"[9223372036854775807, -9223372036854775807]", b"1e308",
          b"1e-400", b'"\\ud83d\\ude00 \\\\ud800"', b'"[[[[{{{{"', b"[" * 40 + b"]" * 40]


@pytest.mark.parametrize("case", HOSTILE)
@pytest.mark.parametrize("reader", READERS)
def test_hostile_values_are_one_error_line_naming_file_and_byte(tmp_path, capsys, reader, case):
    hostile, what, within = HOSTILE[case]
    main, argv, inputs, output, source, offset, _ = READERS[reader](tmp_path, hostile)
    line = fails(main, argv, capsys, inputs, output)
    assert line.startswith(f"error: {source}: {what}")
    assert line.endswith(f" at byte {offset + within}")


# A ranking file has no place where any value is ignored: what passes the checks there may
# then be refused for its shape (and only for that), which shows the checks let it through.
SHAPE_ERROR = {"ranking (merge_with_rank)": "the ranking of question 799 must be a list"}


def passes_the_checks(main, argv, capsys, output: Path, reader: str) -> None:
    code, lines = run_cli(main, argv, capsys)
    if code != 0:
        assert code == 2 and reader in SHAPE_ERROR and any(SHAPE_ERROR[reader] in line
                                                           for line in lines), lines
    else:
        assert output.exists()


@pytest.mark.parametrize("benign", BENIGN)
@pytest.mark.parametrize("reader", READERS)
def test_near_misses_are_accepted(tmp_path, capsys, reader, benign):
    main, argv, inputs, output, *_ = READERS[reader](tmp_path, benign)
    passes_the_checks(main, argv, capsys, output, reader)


@pytest.mark.parametrize("reader", READERS)
def test_nesting_of_64_levels_works_and_65_is_refused_at_the_65th_bracket(tmp_path, capsys,
                                                                          reader):
    build = READERS[reader]
    (tmp_path / "probe").mkdir()
    depth_at_hole = build(tmp_path / "probe", b"0")[-1]
    # Brackets opened at the hole reach depths depth_at_hole, depth_at_hole + 1, ...
    fits = MAX_DEPTH - depth_at_hole + 1
    (tmp_path / "ok").mkdir()
    main, argv, inputs, output, *_ = build(tmp_path / "ok", b"[" * fits + b"]" * fits)
    passes_the_checks(main, argv, capsys, output, reader)
    (tmp_path / "deep").mkdir()
    main, argv, inputs, output, source, offset, _ = build(tmp_path / "deep",
                                                          b"[" * (fits + 1) + b"]" * (fits + 1))
    line = fails(main, argv, capsys, inputs, output, source, "nesting deeper than 64 levels")
    assert line.endswith(f" at byte {offset + fits}")  # the bracket that opens level 65


def test_a_5000_digit_id_is_refused_in_questions_and_outputs(tmp_path, capsys):
    questions = tmp_path / "questions.json"
    data = json.dumps(tweet_questions()).encode().replace(b'"701"', b"1" * 5000)
    questions.write_bytes(data)
    output = tmp_path / "ranking.json"
    fails(rank_profiles.main, ["--input_data_addr", str(questions), "--output_ranking_addr",
                               str(output), "--task", "LaMP-7", "--ranker", "bm25"],
          capsys, [questions], output,
          f"{questions}: a number of 5,000 characters", f"at byte {data.index(b'1' * 5000)}")
    golds = tmp_path / "golds.json"
    golds.write_bytes(json.dumps(golds_doc()).encode().replace(b'"700"', b"7" * 5000))
    fails(eval_task.main, ["--golds_json", str(golds), "--preds_json", str(golds),
                           "--task_name", "LaMP_7", "--output_file", str(output)],
          capsys, [golds], output, f"{golds}: a number of 5,000 characters")


def test_questions_file_starting_deep_is_refused_at_byte_64(tmp_path, capsys):
    path = tmp_path / "questions.json"
    path.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    output = tmp_path / "ranking.json"
    fails(rank_profiles.main, ["--input_data_addr", str(path), "--output_ranking_addr",
                               str(output), "--task", "LaMP-7", "--ranker", "bm25"],
          capsys, [path], output, f"{path}: nesting deeper than 64 levels", "at byte 64")


def test_not_utf8_in_a_later_block_names_its_byte(tmp_path, capsys):
    # Past the first read (64 KiB), so the offset is counted across blocks.
    questions = tweet_questions()
    questions[0]["profile"][0]["text"] = "x" * 200_000
    questions[2]["extra"] = HOLE
    data, offset = with_hole(questions, b'"\xc3\x28"')  # 0xC3 needs a continuation byte
    path = tmp_path / "questions.json"
    path.write_bytes(data)
    output = tmp_path / "ranking.json"
    fails(rank_profiles.main, ["--input_data_addr", str(path), "--output_ranking_addr",
                               str(output), "--task", "LaMP-7", "--ranker", "bm25"],
          capsys, [path], output, "not UTF-8 text (invalid continuation byte)",
          f"at byte {offset + 1}")


# --- 100,000 levels in a fresh interpreter, with memory limits ------------------------------

LIMIT_BYTES = 2 << 30  # address space: a parser without the depth limit needs ~22 GB here
PEAK_LIMIT_MB = 200
# Runs a script under the address-space limit and writes its peak resident memory (VmHWM,
# KB) at exit. Measured inside the child: its rusage would include the pytest process it
# was forked from, which other tests may have grown.
LIMITED = """
import atexit, os, resource, runpy, sys
limit = int(os.environ["LIMIT_BYTES"])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
def peak():
    with open("/proc/self/status") as status, open(os.environ["PEAK_FILE"], "w") as out:
        out.write(next(line for line in status if line.startswith("VmHWM")).split()[1])
atexit.register(peak)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_limited(args: list[str], cwd: Path) -> tuple[int, str, float]:
    """Run a script under an address-space limit; its exit status, stderr and peak RSS."""
    peak_file = cwd / "peak.kb"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "OPENBLAS_NUM_THREADS": "1", "LIMIT_BYTES": str(LIMIT_BYTES), "PEAK_FILE": str(peak_file)}
    done = subprocess.run([sys.executable, "-c", LIMITED, *args], cwd=cwd, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_mb = int(peak_file.read_text()) / 1024
    peak_file.unlink()
    return done.returncode, done.stderr, peak_mb


@pytest.mark.parametrize("script, reader", [("LaMP/rank_profiles.py", questions_reader),
                                            ("eval/eval_task.py", outputs_reader),
                                            ("eval/eval_all.py", zip_reader),
                                            ("LaMP/utils/merge_with_rank.py", ranking_reader)])
def test_100000_levels_fail_fast_in_small_memory(tmp_path, script, reader):
    levels = 100_000
    _, argv, inputs, output, source, offset, depth = reader(tmp_path, b"[" * levels
                                                            + b"]" * levels)
    before = {path: path.read_bytes() for path in inputs}
    code, stderr, peak_mb = run_limited([str(REPO / script), *argv], tmp_path)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in stderr, stderr[-2000:]
    assert errors == [f"error: {source}: nesting deeper than 64 levels (LaMP files need 4) "
                      f"at byte {offset + MAX_DEPTH + 1 - depth}"]
    assert peak_mb < PEAK_LIMIT_MB
    assert {path: path.read_bytes() for path in inputs} == before
    assert not output.exists()


# --- pipes ---------------------------------------------------------------------------------


@contextmanager
def fifo(path: Path, data: bytes):
    """A named pipe at ``path`` that a thread fills with ``data`` once a reader opens it."""
    os.mkfifo(path)

    def write():
        try:
            with open(path, "wb") as pipe:
                pipe.write(data)
        except BrokenPipeError:  # the reader stopped early; its error is what is tested
            pass

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        yield path
    finally:
        if writer.is_alive():
            # Nobody opened the pipe (a refusal): open it here so that the writer finishes.
            reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            writer.join(10)
            os.close(reader)
        writer.join(10)
        assert not writer.is_alive()


def test_rank_profiles_and_merge_read_pipes(tmp_path):
    questions = json.dumps(tweet_questions()).encode()
    regular = tmp_path / "questions.json"
    regular.write_bytes(questions)
    args = ["--task", "LaMP-7", "--ranker", "bm25"]
    rank_profiles.main(["--input_data_addr", str(regular), "--output_ranking_addr",
                        str(tmp_path / "expected.json"), *args])
    with fifo(tmp_path / "questions.fifo", questions) as pipe:
        summary = rank_profiles.main(["--input_data_addr", str(pipe), "--output_ranking_addr",
                                      str(tmp_path / "ranking.json"), *args])
    assert summary["questions"] == 3
    ranking = (tmp_path / "ranking.json").read_bytes()
    assert ranking == (tmp_path / "expected.json").read_bytes()

    golds = json.dumps(golds_doc()).encode()
    with fifo(tmp_path / "q2.fifo", questions) as q_pipe, \
            fifo(tmp_path / "r.fifo", ranking) as r_pipe, \
            fifo(tmp_path / "o.fifo", golds) as o_pipe:
        merge_with_rank.main(["--lamp_questions_addr", str(q_pipe), "--profile_ranking_addr",
                              str(r_pipe), "--lamp_output_addr", str(o_pipe),
                              "--merged_output_addr", str(tmp_path / "merged.json")])
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert [q["output"] for q in merged] == TEXTS
    assert [[item["id"] for item in q["profile"]] for q in merged] == list(
        json.loads(ranking).values())


def test_eval_task_reads_pipes(tmp_path):
    golds = json.dumps(golds_doc()).encode()
    with fifo(tmp_path / "golds.fifo", golds) as g_pipe, \
            fifo(tmp_path / "preds.fifo", golds) as p_pipe:
        result = eval_task.main(["--golds_json", str(g_pipe), "--preds_json", str(p_pipe),
                                 "--task_name", "LaMP_7",
                                 "--output_file", str(tmp_path / "results.json")])
    assert result["rouge-1"] == pytest.approx(1.0)  # predictions equal to the golds


def test_pipe_for_a_stage_that_reads_twice_or_seeks_is_one_error_line(tmp_path, capsys):
    questions = json.dumps(tweet_questions()).encode()
    output = tmp_path / "out" / "x.json"
    output.parent.mkdir()
    with fifo(tmp_path / "q.fifo", questions) as pipe:
        fails(rank_profiles.main, ["--input_data_addr", str(pipe), "--output_ranking_addr",
                                   str(output), "--task", "LaMP-7", "--ranker", "bm25",
                                   "--num_shards", "2"], capsys, [], output,
              f"questions file {pipe} is a pipe; a regular file is needed because "
              "--num_shards counts its questions")
    with fifo(tmp_path / "q2.fifo", questions) as pipe:
        fails(evaluate_llm.main, ["--validation_data", str(pipe), "--model_addr",
                                  str(tmp_path / "no-model"), "--task", "LaMP-7",
                                  "--output_dir", str(output.parent)], capsys, [], output,
              f"questions file {pipe} is a pipe; a regular file is needed because it is "
              "checked before the model loads")
    zipped = tmp_path / "golds.zip"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("LaMP_7.json", json.dumps(golds_doc()))
    with fifo(tmp_path / "z.fifo", zipped.read_bytes()) as pipe:
        fails(eval_all.main, ["--golds_zip", str(zipped), "--preds_zip", str(pipe),
                              "--output_file", str(output)], capsys, [zipped], output,
              f"predictions zip {pipe} is a pipe; a regular file is needed because a zip")


# --- block boundaries ------------------------------------------------------------------------


class Trickle:
    """A stream that returns at most ``step`` bytes per read, as a slow pipe may."""

    def __init__(self, data: bytes, step: int):
        self.data, self.step, self.position = data, step, 0

    def read(self, size: int) -> bytes:
        chunk = self.data[self.position:self.position + min(size, self.step)]
        self.position += len(chunk)
        return chunk


# (document, what the error says or None, offset) with offsets counted by hand
BOUNDARY_CASES = [
    (b'["a\\"b[[[", "\\ud83d\\ude00", "x\\\\", 12, 1.5e3]', None, None),
    (b'{"k": "\\ud83d\\\\ude00"}', r"the escape \ud83d is half", 7),  # '{"k": "' is 7 bytes
    (b'[1, 12345678901234567890]', "the integer 12345678901234567890 does not fit", 4),
    (b"[" * 65, "nesting deeper than 64 levels", 64),
    (b'["\xe2\x82\xac", "\xe2\x82"]', "not UTF-8 text (invalid continuation byte)", 9),
    (b"\xef\xbb\xbf[1e400]", "the number 1e400 is too large", 4),  # 3 bytes of BOM, then '['
]


@pytest.mark.parametrize("step", [1, 2, 3, 5, 8, 1 << 16])
@pytest.mark.parametrize("read_size", [1, 3, 4096])
@pytest.mark.parametrize("document, what, offset", BOUNDARY_CASES)
def test_block_boundaries_change_nothing(monkeypatch, read_size, step, document, what, offset):
    # Any read size and any short reads: strings, escapes, surrogate pairs, numbers and
    # UTF-8 sequences cut anywhere give the same verdict and offset, and the bytes pass on
    # unchanged (less the byte order mark).
    from LaMP.utils.data import jsoninput

    monkeypatch.setattr(jsoninput, "READ_SIZE", read_size)
    reader = jsoninput.GuardedReader(Trickle(document, step), "doc.json", b"", "")
    if what is None:
        assert reader.read() == document
        return
    with pytest.raises(LampError) as caught:
        reader.read()
    message = str(caught.value)
    assert message.startswith(f"doc.json: {what}") and message.endswith(f" at byte {offset}")


def test_escapes_are_set_aside_so_that_only_the_quotes_around_strings_remain():
    # Every string of up to four backslashes, quotes, "u" and "a": escape runs of either
    # parity, escaped quotes, and an escaped backslash before "u" (no \\u escape).
    from itertools import product

    from LaMP.utils.data.jsoninput import _neutralize_escapes

    strings = ["".join(chars) for length in range(5) for chars in product('\\"ua', repeat=length)]
    document = json.dumps(strings).encode()
    neutral = _neutralize_escapes(document)
    assert len(neutral) == len(document)
    delimiters, position = [], 1  # past the list's "["
    for string in strings:
        encoded = json.dumps(string)
        delimiters += [position, position + len(encoded) - 1]
        position += len(encoded) + 2  # and ", "
    assert [index for index, byte in enumerate(neutral) if byte == ord('"')] == delimiters


@pytest.mark.parametrize("document, message", [
    (b"  \n", "questions.json: the file is empty"),
    (b"\xef\xbb\xbf", "questions.json: the file is empty"),
    (b' {"id": 1}', "questions.json: expected a JSON list of questions"),
])
def test_opener_is_checked_on_the_one_read(document, message):
    from LaMP.utils.data.jsoninput import GuardedReader

    reader = GuardedReader(Trickle(document, 1), "questions.json", b"[",
                           "a JSON list of questions")
    with pytest.raises(LampError, match=message):
        reader.read()


# --- repeated keys -----------------------------------------------------------------------------
# json.loads and ijson keep the last value of a key repeated in one object; every reader
# refuses it instead, naming the key and its object's place (a JSON path from the top).

AT_HOLE = {"questions (rank_profiles)": "[1].extra", "outputs (eval_task)": "extra",
           "outputs (compare)": "extra", "zip member (eval_all)": "extra",
           "ranking (merge_with_rank)": '["799"]'}
# hole -> (the key as the error shows it, the object's place below the hole)
REPEATS = {
    "two values": (b'{"k": 1, "k": 2}', '"k"', ""),
    "one value twice": (b'{"k": "1", "k": "1"}', '"k"', ""),
    "null twice": (b'{"a": 0, "k": null, "k": null}', '"k"', ""),
    "deeper, among other objects": (b'[{"k": 1}, {"b": [{"x": 1, "y": 2, "x": {"x": 3}}]}]',
                                    '"x"', "[1].b[0]"),
    "a key that JSON escapes": (b'{"a \\"b": 1, "a \\"b": 2}', r'"a \"b"', ""),
}


@pytest.mark.parametrize("case", REPEATS)
@pytest.mark.parametrize("reader", READERS)
def test_a_repeated_key_is_one_error_line_naming_it_and_its_object(tmp_path, capsys, reader,
                                                                    case):
    hostile, shown, below = REPEATS[case]
    main, argv, inputs, output, source, *_ = READERS[reader](tmp_path, hostile)
    line = fails(main, argv, capsys, inputs, output)
    assert line == (f"error: {source}: the key {shown} occurs twice in the object at "
                    f"{AT_HOLE[reader]}{below} (only one of its values could be read)")


def test_keys_repeated_across_objects_and_written_after_parsing_are_not_repeats(tmp_path):
    from LaMP.utils.data.questions import iter_questions

    questions = tweet_questions()
    questions[0]["id"] = 700  # validation writes it back as "700"
    questions[1]["extra"] = [{"k": 1}, {"k": {"k": 2}}]
    path = tmp_path / "questions.json"
    path.write_text(json.dumps(questions))
    parsed = list(iter_questions(path))
    assert [question["id"] for question in parsed] == ["700", "701", "702"]
    assert parsed[1]["extra"] == [{"k": 1}, {"k": {"k": 2}}]


def question_file_with(path: Path, edit) -> Path:
    """Three tweet questions, the text of the second one edited by ``edit``."""
    text = json.dumps(tweet_questions())
    head = text.index('{"id": "701"')
    path.write_text(text[:head] + edit(text[head:]))
    return path


@pytest.mark.parametrize("edit, where", [
    (lambda text: text.replace('"id": "701"', '"id": "701", "id": "799"', 1), "[1]"),
    (lambda text: text.replace('"text"', '"text": "again", "text"', 1), "[1].profile[0]"),
    (lambda text: text.replace('"input"', '"profile": [], "input"', 1), "[1]"),
])
def test_questions_name_the_question_with_the_repeat_and_stop_there(tmp_path, edit, where):
    from LaMP.utils.data.questions import iter_questions

    path = question_file_with(tmp_path / "questions.json", edit)
    seen = []
    with pytest.raises(LampError) as raised:
        for question in iter_questions(path):
            seen.append(question["id"])
    key = str(raised.value).split('"')[1]
    assert str(raised.value) == (f'{path}: the key "{key}" occurs twice in the object at '
                                 f"{where} (only one of its values could be read)")
    assert seen == ["700"]  # the question before it, never the one after (parsed with it)


def test_a_repeat_past_the_first_block_names_its_question(tmp_path):
    from LaMP.utils.data.questions import iter_questions

    questions = [{**question, "id": str(index)} for index, question in
                 enumerate(tweet_questions() * 2000)]  # about 800 KB: many 64 KiB blocks
    text = json.dumps(questions).replace('{"id": "5432", ', '{"id": "5432", "id": "x", ', 1)
    path = tmp_path / "questions.json"
    path.write_text(text)
    with pytest.raises(LampError, match=r'the key "id" occurs twice in the object at \[5432\] '):
        for _ in iter_questions(path):
            pass


@pytest.mark.parametrize("text, key, where", [
    ('{"task": "LaMP_7", "golds": [], "golds": []}', "golds", "the top-level object"),
    ('{"task": "LaMP_7", "golds": [{"id": "700", "output": "a", "output": "b"}]}', "output",
     "the object at golds[0]"),
])
def test_whole_file_readers_refuse_repeats_at_every_level(tmp_path, text, key, where):
    from LaMP.utils.data.fileio import read_json
    from LaMP.utils.data.outputs import load_outputs

    path = tmp_path / "golds.json"
    path.write_text(text)
    for read in (read_json, load_outputs):
        with pytest.raises(LampError) as raised:
            read(path)
        assert str(raised.value) == (f'{path}: the key "{key}" occurs twice in {where} (only '
                                     "one of its values could be read)")


def test_a_parsed_question_copies_and_pickles_as_plain_dicts(tmp_path):
    import copy
    import pickle

    from LaMP.utils.data.questions import iter_questions

    path = tmp_path / "questions.json"
    path.write_text(json.dumps(tweet_questions()))
    question = next(iter_questions(path))
    for clone in (copy.deepcopy(question), pickle.loads(pickle.dumps(question))):
        assert clone == question
        assert type(clone) is dict and type(clone["profile"][0]) is dict
