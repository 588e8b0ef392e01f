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
def test_the_depth_check_on_parsed_questions_looks_at_every_value_it_must(item, shallow):
    question = {"id": "q", "input": "x: y", "profile": [{"id": "0", "text": "b"}, item]}
    assert parallel_rank._shallow([question], ("text",)) is shallow
    assert parallel_rank._shallow([question, {**question, "extra": 5}], ("text",)) is shallow
    assert parallel_rank._shallow([{**question, "extra": [5]}], ("text",)) is False
    assert parallel_rank._shallow([{**question, "extra": {"k": 5}}], ("text",)) is False
