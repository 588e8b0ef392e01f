"""Workers skip the byte-level guard where the splitter and the parse hooks already rule a
limit out; each limit must still end as one worker's run ends (same error line, no output)."""
from __future__ import annotations

import json

import pytest

from LaMP import rank_profiles
from LaMP.utils.data.jsoninput import MAX_DEPTH
from LaMP.utils.errors import LampError
from LaMP.utils.retrieval import parallel as parallel_rank
from LaMP.utils.retrieval.parallel import _Scanner, question_spans

TWEET = "Paraphrase the following tweet without any explanation before or after it: {}"


def questions(count: int = 8) -> list[dict]:
    return [{"id": f"q{n}", "input": TWEET.format(f"words {n} [x] {{y}}"),
             "profile": [{"id": f"q{n}-{i}", "text": f"words {i} \"[{{\" {n % 3}"}
                         for i in range(5)]} for n in range(count)]


def nested(levels: int) -> object:
    value: object = 1
    for _ in range(levels):
        value = [value]
    return value


def run(path, out, workers: str) -> bytes:
    rank_profiles.main(["--input_data_addr", str(path), "--output_ranking_addr", str(out),
                        "--task", "LaMP-7", "--ranker", "bm25", "--num_workers", workers])
    return out.read_bytes()


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(parallel_rank, "CHUNK_BYTES", 1)


def test_the_scanner_records_the_deepest_nesting_outside_strings(tmp_path):
    data = questions(3)
    data[1]["extra"] = nested(5)
    path = tmp_path / "q.json"
    path.write_text(json.dumps(data))
    scanner = _Scanner()
    assert sum(count for _, count in question_spans(path, chunk_bytes=1, scanner=scanner)) == 3
    # The list (1), the question (2), five lists around an integer (3 to 7); the brackets
    # inside the texts are not counted.
    assert scanner.deepest == 7


@pytest.mark.parametrize("case, limit_line", [
    ("too deep", f"nesting deeper than {MAX_DEPTH} levels"),
    ("long float", "the limit is 100 digits"),
    ("long negative float", "the limit is 100 digits"),
    ("lone surrogate", "half of a UTF-16 surrogate pair"),
])
def test_a_limit_in_a_worker_span_reads_as_with_one_worker(tmp_path, small_chunks, case,
                                                            limit_line):
    data = questions()
    if case == "too deep":
        data[5]["extra"] = nested(MAX_DEPTH)  # list + question + 64 > 64
        text = json.dumps(data)
    else:
        text = json.dumps(data)
        value = {"long float": "1." + "0" * 120, "long negative float": "-0." + "5" * 120,
                 "lone surrogate": '"\\udc00"'}[case]
        text = text.replace('"id": "q5"', f'"x": {value}, "id": "q5"', 1)
    path = tmp_path / "q.json"
    path.write_text(text)
    before = path.read_bytes()
    messages = []
    for workers in ("1", "2"):
        with pytest.raises(LampError) as error:
            run(path, tmp_path / "r.json", workers)
        messages.append(str(error.value))
    assert messages[0] == messages[1] and limit_line in messages[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.json"]
    assert path.read_bytes() == before


def test_nesting_at_the_limit_and_short_floats_rank_in_workers(tmp_path, small_chunks,
                                                                monkeypatch):
    data = questions()
    data[2]["extra"] = nested(MAX_DEPTH - 2)  # exactly MAX_DEPTH deep: allowed
    data[4]["score"] = 0.125
    data[6]["score"] = -1e-300
    path = tmp_path / "q.json"
    path.write_text(json.dumps(data))
    inline = run(path, tmp_path / "one.json", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("ranked inline")

    monkeypatch.setattr(rank_profiles, "_rank_inline", refuse)
    assert run(path, tmp_path / "two.json", "2") == inline
    assert len(json.loads(inline)) == len(data)


@pytest.mark.parametrize("item, shallow", [
    ({"id": "1", "text": "a"}, True),
    ({"id": "1", "text": "a", "date": "2020-01-01"}, True),
    ({"id": "1", "text": "a", "date": None}, True),
    ({"id": "1", "text": "a", "date": ["2020"]}, False),
    ({"id": "1", "text": "a", "tags": "x"}, True),
    ({"id": "1", "text": "a", "tags": ["x"]}, False),
    ({"id": "1", "text": "a", "date": "d", "tags": {"k": 1}}, False),
])
def test_the_shape_check_on_parsed_questions_looks_at_every_value_it_must(item, shallow):
    question = {"id": "q", "input": "x: y", "profile": [{"id": "0", "text": "b"}, item]}
    count = 4 if shallow else None  # the question, its profile, two items
    assert parallel_rank._containers([question], ("text",)) == count
    assert parallel_rank._containers([question, {**question, "extra": 5}], ("text",)) == (
        None if count is None else 2 * count)
    assert parallel_rank._containers([{**question, "extra": [5]}], ("text",)) is None
    assert parallel_rank._containers([{**question, "extra": {"k": 5}}], ("text",)) is None


def nested_dicts(levels: int) -> str:
    return '{"k": ' * levels + "1" + "}" * levels


# Nesting the parsed questions do not show: under a key that occurs twice (the parser keeps
# the last value), or in a field that validation turns into text. Found by review.
HIDDEN_DEPTH = {
    "a field holding a deep list": lambda text: text.replace(
        '"text": "words 1', '"text": ' + json.dumps(nested(70)) + ', "x": "words 1', 1),
    "a field holding deep objects": lambda text: text.replace(
        '"text": "words 1', '"text": ' + nested_dicts(61) + ', "x": "words 1', 1),
    "a repeated question key": lambda text: text.replace(
        '"id": "q5"', '"extra": ' + json.dumps(nested(70)) + ', "extra": 1, "id": "q5"', 1),
    "a repeated item key": lambda text: text.replace(
        '"id": "q5-1"', '"x": ' + json.dumps(nested(62)) + ', "x": 1, "id": "q5-1"', 1),
}


@pytest.mark.parametrize("ranker", ["bm25", "recency"])
@pytest.mark.parametrize("case", sorted(HIDDEN_DEPTH))
def test_nesting_the_parsed_questions_hide_is_refused_as_with_one_worker(
        tmp_path, small_chunks, monkeypatch, case, ranker):
    text = HIDDEN_DEPTH[case](json.dumps(questions()))
    path = tmp_path / "q.json"
    path.write_text(text)
    messages = []
    for workers, fast_from in (("1", float("inf")), ("1", 1), ("2", 1)):
        monkeypatch.setattr(parallel_rank, "FAST_PATH_MIN_BYTES", fast_from)
        with pytest.raises(LampError) as error:
            rank_profiles.main(["--input_data_addr", str(path), "--output_ranking_addr",
                                str(tmp_path / "r.json"), "--task", "LaMP-7", "--ranker",
                                ranker, "--num_workers", workers])
        messages.append(str(error.value))
    assert messages == [messages[0]] * 3 and "nesting deeper than" in messages[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.json"]


def test_brackets_in_texts_past_the_margin_take_the_guard_and_rank_in_workers(
        tmp_path, small_chunks, monkeypatch):
    data = questions(6)
    data[3]["profile"][0]["text"] = "[" * 70 + " words"  # not nesting: inside a string
    path = tmp_path / "q.json"
    path.write_text(json.dumps(data))
    inline = run(path, tmp_path / "one.json", "1")
    guarded = []
    original = parallel_rank._guard_passes
    monkeypatch.setattr(parallel_rank, "_guard_passes",
                        lambda span: guarded.append(len(span)) or original(span))
    monkeypatch.setattr(parallel_rank, "_pool_context",
                        lambda: __import__("multiprocessing").get_context("fork"))
    monkeypatch.setattr(parallel_rank, "FAST_PATH_MIN_BYTES", 1)
    monkeypatch.setattr(rank_profiles, "_rank_inline", None)
    assert run(path, tmp_path / "fast.json", "1") == inline
    assert len(guarded) == 1  # the one span with the bracketed text, in this process
    assert run(path, tmp_path / "two.json", "2") == inline
