"""Rankers (recency, random, the shared interface), applying rankings, ranking files, shards."""
from __future__ import annotations

import json

import pytest

from LaMP.utils.errors import LampError
from LaMP.utils.retrieval import RANKERS, build_ranker
from LaMP.utils.retrieval.rankings import (count_questions, load_rankings, order_profile,
                                           ranking_problem, shard_range)
from LaMP.utils.retrieval.simple import date_key
from LaMP.utils.tasks import get_task
from conftest import write_json

LAMP_3 = get_task("LaMP-3")


def question(qid: str, dates: list, text_of=lambda i: f"review {i}") -> dict:
    profile = []
    for index, date in enumerate(dates):
        item = {"id": f"{qid}-{index}", "text": text_of(index), "score": "3"}
        if date is not ...:
            item["date"] = date
        profile.append(item)
    return {"id": qid, "input": "... review: a review", "profile": profile}


def test_date_key_accepts_day_month_and_year_precision():
    assert date_key("2010-05-03") == (2010, 5, 3)
    assert date_key("2010-5-3") == (2010, 5, 3)
    assert date_key("2010-05") == (2010, 5, 0)
    assert date_key("2010") == (2010, 0, 0)
    assert date_key(2010) == (2010, 0, 0)
    assert date_key("2010-05-03T10:00:00") == (2010, 5, 3)
    assert date_key("2010-05-03 10:00") == (2010, 5, 3)
    assert date_key(None) is None
    assert date_key("") is None
    for bad in ("May 2010", "05/03/2010", "20100503x", "10-05-03"):
        with pytest.raises(ValueError):
            date_key(bad)


def test_recency_newest_first_ties_and_undated_in_profile_order():
    q = question("q", ["2010-05-03", ..., "2012", "2010-05-03", "", "2012-01-01", "2011-12",
                       None])
    ranking = build_ranker("recency", LAMP_3).rank_one(q)
    assert ranking == ["q-5", "q-2", "q-6", "q-0", "q-3", "q-1", "q-4", "q-7"]


def test_recency_bad_date_names_question_and_item():
    with pytest.raises(LampError, match=r"question q: profile item q-1 has date 'soon'"):
        build_ranker("recency", LAMP_3).rank_one(question("q", ["2010", "soon"]))


def test_random_is_seeded_per_question_and_independent_of_order():
    questions = [question(f"q{i}", ["2010"] * 12) for i in range(4)]
    ranker = build_ranker("random", LAMP_3, seed=3)
    forward = {q["id"]: ranking for q, ranking in ranker.rank(questions)}
    backward = {q["id"]: ranking for q, ranking in ranker.rank(reversed(questions))}
    assert forward == backward
    again = dict((q["id"], r) for q, r in build_ranker("random", LAMP_3, seed=3).rank(questions))
    assert again == forward
    other_ranker = build_ranker("random", LAMP_3, seed=4)
    other_seed = dict((q["id"], r) for q, r in other_ranker.rank(questions))
    assert other_seed != forward
    for q in questions:
        assert sorted(forward[q["id"]]) == sorted(item["id"] for item in q["profile"])
    # Not the identity for every question (12! orders; a fixed seed makes this certain).
    assert any(forward[q["id"]] != [item["id"] for item in q["profile"]] for q in questions)


# The rankers without a model (contriever is tested with a tiny encoder, rspg with a
# tiny selector: tests/test_retrieval_dense.py, tests/test_selector.py).
@pytest.mark.parametrize("name", [name for name in RANKERS if name not in ("contriever", "rspg")])
def test_rankers_yield_permutations_in_input_order(name):
    questions = [question(f"q{i}", ["2010", "2011-02", ..., "2009"][: i + 1],
                          text_of=lambda k: f"a review number {k} of words {'a' * k}")
                 for i in range(4)]
    questions.append(question("empty", []))
    results = list(build_ranker(name, LAMP_3).rank(iter(questions)))
    assert [q["id"] for q, _ in results] == [q["id"] for q in questions]
    for q, ranking in results:
        assert sorted(ranking) == sorted(item["id"] for item in q["profile"])


def test_unknown_ranker_lists_the_valid_ones():
    with pytest.raises(LampError, match="unknown ranker 'tfidf'; valid rankers: bm25, "
                                        "contriever, recency, random"):
        build_ranker("tfidf", LAMP_3)


def test_bm25_missing_marker_names_the_question():
    q = question("q9", ["2010"])
    q["input"] = "no marker here"
    with pytest.raises(LampError, match="question q9"):
        build_ranker("bm25", LAMP_3).rank_one(q)


PROFILE = [{"id": "a", "text": "1"}, {"id": "b", "text": "2"}, {"id": "c", "text": "3"}]


def test_order_profile_permutes_items():
    assert [item["text"] for item in order_profile(PROFILE, ["c", "a", "b"])] == ["3", "1", "2"]
    assert order_profile([], []) == []


@pytest.mark.parametrize("ranking, message", [
    (["c", "a"], r"profile items left out: 1 \(first: b\)"),
    (["c", "a", "b", "a"], r"ids ranked more than once: 1 \(first: a\)"),
    (["c", "a", "x"], r"ids not in its profile: 1 \(first: x\); "
                      r"profile items left out: 1 \(first: b\)"),
])
def test_order_profile_errors_name_question_and_ids(ranking, message):
    with pytest.raises(LampError, match=r"ranking of question q7 does not order its profile: "
                                        + message):
        order_profile(PROFILE, ranking, "q7")


def test_order_profile_with_a_repeated_profile_id():
    profile = [{"id": "a", "text": "1"}, {"id": "b", "text": "2"}, {"id": "a", "text": "3"}]
    assert [item["text"] for item in order_profile(profile, ["b", "a", "a"])] == ["2", "1", "3"]
    with pytest.raises(LampError, match="left out"):
        order_profile(profile, ["b", "a"])
    assert ranking_problem(["a", "b", "a"], ["a", "b", "a"]) is None


def test_load_rankings_combines_shards_and_rejects_overlap(tmp_path):
    first = write_json(tmp_path / "s0.json", {"1": ["x", "y"], "2": []})
    second = write_json(tmp_path / "s1.json", {"3": ["z", 5]})
    rankings = load_rankings([first, second])
    assert dict(rankings) == {"1": ["x", "y"], "2": [], "3": ["z", "5"]}
    assert "3" in rankings and "4" not in rankings and len(rankings) == 3
    overlapping = write_json(tmp_path / "s2.json", {"2": ["w"], "4": []})
    with pytest.raises(LampError, match=r"question 2 is ranked in .*s0.json and .*s2.json"):
        load_rankings([first, overlapping])
    (tmp_path / "twice.json").write_text('{"7": ["a"], "7": ["b"]}', encoding="utf-8")
    with pytest.raises(LampError, match=r"question 7 is ranked twice in .*twice.json"):
        load_rankings([tmp_path / "twice.json"])


@pytest.mark.parametrize("content, message", [
    ([["x"]], r"expected a JSON object \{question id: \[profile ids\]\}"),
    ({"1": "x y"}, "the ranking of question 1 must be a list of profile ids"),
    ({"1": [None]}, "the ranking of question 1 must be a list of profile ids"),
])
def test_load_rankings_rejects_malformed_files(tmp_path, content, message):
    with pytest.raises(LampError, match=message):
        load_rankings([write_json(tmp_path / "r.json", content)])
    (tmp_path / "bad.json").write_text("{", encoding="utf-8")
    with pytest.raises(LampError, match="bad.json: malformed JSON"):
        load_rankings([tmp_path / "bad.json"])


def test_shard_ranges_cover_every_question_once():
    for total in (0, 1, 5, 10, 11):
        for shards in (1, 2, 3, 7):
            covered = [i for shard in range(shards) for i in shard_range(total, shards, shard)]
            assert covered == list(range(total))
    assert shard_range(10, 3, 0) == range(0, 3)
    assert shard_range(10, 3, 2) == range(6, 10)
    with pytest.raises(LampError, match="shard id 3 is not in 0 … 2"):
        shard_range(10, 3, 3)


def test_count_questions(tmp_path):
    questions = [question(f"q{i}", ["2010"]) for i in range(5)]
    assert count_questions(write_json(tmp_path / "q.json", questions)) == 5
    (tmp_path / "broken.json").write_text(json.dumps(questions)[:-30], encoding="utf-8")
    with pytest.raises(LampError, match="broken.json: malformed JSON"):
        count_questions(tmp_path / "broken.json")


def test_json_object_writer_streams_and_is_atomic(tmp_path):
    from LaMP.utils.data.fileio import JsonObjectWriter

    path = tmp_path / "r.json"
    with JsonObjectWriter(path) as writer:
        writer.write("1", ["a", "é"])
        writer.write("2", [])
    assert json.loads(path.read_text(encoding="utf-8")) == {"1": ["a", "é"], "2": []}
    with JsonObjectWriter(tmp_path / "empty.json"):
        pass
    assert json.loads((tmp_path / "empty.json").read_text()) == {}
    with pytest.raises(RuntimeError):
        with JsonObjectWriter(tmp_path / "failed.json") as writer:
            writer.write("1", ["a"])
            raise RuntimeError("stop")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.json", "r.json"]


def test_batched_by_cost_closes_on_cost_or_count():
    from LaMP.utils.retrieval.base import batched_by_cost

    assert list(batched_by_cost([3, 1, 1, 5, 2], cost=lambda x: x, limit=4)) == [
        [3, 1], [1, 5], [2]]
    assert list(batched_by_cost(range(5), cost=lambda x: 0, limit=1, max_items=2)) == [
        [0, 1], [2, 3], [4]]
    assert list(batched_by_cost([], cost=len, limit=1)) == []


def test_ranking_many_profiles_at_once_equals_one_at_a_time():
    import numpy as np

    from LaMP.utils.retrieval.base import ranked_ids, ranked_ids_many

    rng = np.random.default_rng(0)
    profiles, scores = [], []
    for size in (0, 1, 5, 12, 3):
        profiles.append([{"id": f"{size}-{i}"} for i in range(size)])
        # Few distinct values, so many ties that must keep profile order.
        scores.append(rng.integers(0, 3, size).astype(float))
    assert ranked_ids_many(profiles, scores) == [ranked_ids(p, s)
                                                 for p, s in zip(profiles, scores)]
