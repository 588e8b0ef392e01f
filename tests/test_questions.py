"""The questions loader (LaMP/utils/data/questions.py): streaming, validation messages, and
the malformed-question checks."""
from __future__ import annotations

import pytest

from LaMP.utils.data.questions import input_problem, iter_questions
from LaMP.utils.errors import LampError
from LaMP.utils.tasks import get_task
from conftest import LAMP_REAL, requires_real_data, write_json

LAMP3 = get_task("LaMP-3")
REVIEW = ("What is the score of the following review on a scale of 1 to 5? just answer with "
          "1, 2, 3, 4, or 5 without further explanation. review: ")


def question(qid, text="solid kettle", profile=None, **extra):
    profile = profile if profile is not None else [{"id": f"{qid}0", "text": "ok", "score": "4"}]
    return {"id": qid, "input": REVIEW + text, "profile": profile, **extra}


def test_streams_questions_and_normalises_ids(tmp_path):
    path = write_json(tmp_path / "q.json", [
        question("300"),
        question(301, profile=[{"id": 3010, "text": "meh", "score": 2}]),
    ])
    questions = list(iter_questions(path, LAMP3))
    assert [q["id"] for q in questions] == ["300", "301"]
    # Integer ids and a numeric rating arrive as the text every later stage compares.
    assert questions[1]["profile"] == [{"id": "3010", "text": "meh", "score": "2"}]


def test_one_bad_item_among_clean_ones_is_still_found(tmp_path):
    # Clean profiles are checked in bulk; a single odd item must still be converted or named.
    clean = [{"id": f"i{n}", "text": "fine", "score": "3"} for n in range(50)]
    path = write_json(tmp_path / "q.json", [
        question("1", profile=clean + [{"id": 7, "text": "ok", "score": 5}]),
        question("2", profile=clean + [{"id": "i99", "text": None, "score": "1"}]),
    ])
    stream = iter_questions(path, LAMP3)
    assert next(stream)["profile"][-1] == {"id": "7", "text": "ok", "score": "5"}
    with pytest.raises(LampError, match=r"question 1 \(id 2\): profile item 50 \(id i99\) "
                                        r"lacks the LaMP-3 field 'text'"):
        next(stream)


def test_yields_early_questions_before_reading_the_rest(tmp_path):
    path = tmp_path / "q.json"
    good = '{"id": "300", "input": "a review: b", "profile": []}'
    path.write_text(f"[{good}, {{\"id\": \"301\", \"inp", encoding="utf-8")
    stream = iter_questions(path)
    assert next(stream)["id"] == "300"  # the truncated tail is not read yet
    with pytest.raises(LampError, match=r"q\.json: malformed JSON after question 0 \(id 300\)"):
        next(stream)


@pytest.mark.parametrize("broken, message", [
    ({"input": "x", "profile": []}, r"question 1: missing or invalid \"id\""),
    ({"id": "301", "profile": []}, r"question 1 \(id 301\): missing or non-string \"input\""),
    ({"id": "301", "input": "x"}, r"question 1 \(id 301\): missing \"profile\" list"),
    ({"id": "301", "input": "x", "profile": [{"id": "1", "text": "t"}]},
     r"question 1 \(id 301\): profile item 0 \(id 1\) lacks the LaMP-3 field 'score'"),
    ({"id": "301", "input": "x", "profile": ["text"]},
     r"question 1 \(id 301\): profile item 0 is not an object"),
    ({"id": "301", "input": "x", "profile": [{"text": "t", "score": "1"}]},
     r"question 1 \(id 301\): profile item 0 has a missing or invalid \"id\""),
    ({"id": "301", "input": "x", "profile": [], "output": 4},
     r"question 1 \(id 301\): \"output\" must be a string"),
    ({"id": 3.5, "input": "x", "profile": []}, r"question 1: missing or invalid \"id\""),
])
def test_schema_errors_name_file_index_id_and_field(tmp_path, broken, message):
    path = write_json(tmp_path / "bad.json", [question("300"), broken])
    with pytest.raises(LampError, match=r"bad\.json: " + message):
        list(iter_questions(path, LAMP3))


def test_require_output_names_the_question(tmp_path):
    path = write_json(tmp_path / "q.json", [question("300", output="4"), question("301")])
    with pytest.raises(LampError, match=r"question 1 \(id 301\): no \"output\""):
        list(iter_questions(path, LAMP3, require_output=True))


def test_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + b' [{"id": "1", "input": "x", "profile": []}]')
    assert [q["id"] for q in iter_questions(path)] == ["1"]


@pytest.mark.parametrize("content, message", [
    (b"", "the file is empty"),
    (b"  \n", "the file is empty"),
    (b"\xef\xbb\xbf", "the file is empty"),
    (b'{"task": "LaMP_3", "golds": []}', "expected a JSON list of questions"),
    (b"[1, 2]", "question 0: expected an object, found int"),
    (b'[{"id": "1", "input": "x", "profile": []}] trailing',
     r"malformed JSON after question 0 \(id 1\)"),
    (b"[{,}]", "malformed JSON before the first question"),
])
def test_empty_and_malformed_files(tmp_path, content, message):
    path = tmp_path / "q.json"
    path.write_bytes(content)
    with pytest.raises(LampError, match=message):
        list(iter_questions(path))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(LampError, match="does not exist"):
        list(iter_questions(tmp_path / "nope.json"))
    with pytest.raises(LampError, match="is a directory"):
        list(iter_questions(tmp_path))


def test_an_empty_list_is_read_as_no_questions(tmp_path):
    # The reader accepts it; each stage that needs questions says "no questions" itself
    # (test_rank_profiles.py, test_merge_with_rank.py).
    path = tmp_path / "q.json"
    path.write_bytes(b"[]")
    assert list(iter_questions(path)) == []


def test_unicode_survives(tmp_path):
    path = write_json(tmp_path / "q.json", [question("300", text="très bon — 👍")])
    assert list(iter_questions(path))[0]["input"].endswith("très bon — 👍")


def test_input_problem_finds_questions_without_their_instruction():
    lamp2 = get_task("LaMP-2")
    good = ("Which tag does this movie relate to among the following tags? Just answer with the "
            "tag name without further explanation. tags: [sci-fi, comedy] description: A robot.")
    assert input_problem(good, lamp2) is None
    # The shape of LaMP-2 user-split dev question 110: no instruction, no tag list.
    assert "does not start with the LaMP-2 instruction" in input_problem("x A robot.", lamp2)
    # The instruction without the part the query is taken from.
    assert "lacks the marker 'description:'" in input_problem(good.split(" description:")[0],
                                                              lamp2)
    lamp1 = get_task("LaMP-1")
    citation = ('For an author who has written the paper with the title "A", which reference is '
                'related? Just answer with [1] or [2] without explanation. [1]: "B" [2]: "C"')
    assert input_problem(citation, lamp1) is None
    assert "quoted candidate titles" in input_problem(citation.split(" [1]")[0], lamp1)


@requires_real_data
@pytest.mark.real_data
def test_real_lamp7_dev_streams_and_is_well_formed():
    task = get_task("LaMP-7")
    count = items = 0
    for item in iter_questions(LAMP_REAL / "LaMP_7" / "dev" / "dev_questions.json", task):
        count += 1
        items += len(item["profile"])
        assert input_problem(item["input"], task) is None, item["id"]
    assert (count, items) == (1500, 26464)
