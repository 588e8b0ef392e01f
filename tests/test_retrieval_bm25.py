"""BM25: scores equal to rank_bm25's BM25Okapi bit for bit, rankings stable on ties."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from rank_bm25 import BM25Okapi

from LaMP.utils.retrieval import build_ranker
from LaMP.utils.retrieval.bm25 import (BM25Ranker, TermIndex, _argsort_distinct, _distinct,
                                       bm25_scores, bm25_scores_ids, bm25_scores_many)
from LaMP.utils.tasks import get_task
from conftest import LAMP_REAL, REPO, requires_real_data


def reference_scores(query: str, corpus: list[str]) -> np.ndarray:
    """The published algorithm: a BM25Okapi index built for this one profile."""
    return BM25Okapi([text.split() for text in corpus]).get_scores(query.split())


def our_scores(query: str, corpus: list[str]) -> np.ndarray:
    return bm25_scores(query.split(), [text.split() for text in corpus])


CASES = {
    "plain": ("cat sat mat", ["the cat sat on the mat", "a dog", "cat cat cat", "mat"]),
    "repeated query token": ("cat cat dog", ["cat", "dog dog", "cat dog bird", "bird"]),
    # One document: every term is in all documents, every IDF negative, the floor negative.
    "single document": ("a b", ["a b c"]),
    # Two documents: IDF exactly 0 for terms in one of them.
    "two documents": ("x y", ["x z", "y z"]),
    "no overlap": ("zebra", ["a b", "c d"]),
    "empty query": ("", ["a b", "c"]),
    "empty documents": ("a", ["", "a", "   "]),
    "unicode and odd whitespace": ("café\u00a0naïve", ["café au lait", "naïve\tcafé\n", "x"]),
    "identical documents": ("red fox", ["red fox", "blue", "red fox", "fox red"]),
    "long profile": ("w3 w5 w7 w3", [" ".join(f"w{(i * j) % 11}" for j in range(i % 9 + 1))
                                     for i in range(60)]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_scores_equal_rank_bm25_bit_for_bit(name):
    query, corpus = CASES[name]
    expected = reference_scores(query, corpus)
    assert np.array_equal(our_scores(query, corpus), expected)


def test_no_tokens_at_all_scores_zero_where_rank_bm25_divides_by_zero():
    assert np.array_equal(our_scores("a", ["", " "]), [0.0, 0.0])
    assert our_scores("a", []).shape == (0,)


def test_the_ranker_splits_on_any_whitespace_like_the_published_ranker():
    # "b" and "e" are whole tokens of the second text only when tabs, newlines and the
    # ideographic space separate words, as str.split() (the published tokenizer) has it.
    task = get_task("LaMP-7")
    question = {"id": "q", "input": "Paraphrase the following tweet without any explanation "
                                    "before or after it: b e",
                "profile": [{"id": "1", "text": "b_e x"},
                            {"id": "2", "text": " a  b\tc\nd\u3000e "},
                            {"id": "3", "text": "y"}]}
    assert build_ranker("bm25", task).rank_one(question)[0] == "2"


def test_hand_computed_score():
    # Three documents; "cat" is in one of them: idf = ln(2.5) - ln(1.5).
    # avgdl = 4/3; doc 0 has length 2 and tf 1.
    scores = our_scores("cat", ["cat dog", "dog", "bird"])
    idf = np.log(2.5) - np.log(1.5)
    expected = idf * (1 * 2.5) / (1 + 1.5 * (0.25 + 0.75 * 2 / (4 / 3)))
    assert scores[0] == pytest.approx(expected, rel=1e-12)
    assert scores[1] == scores[2] == 0.0


def test_chunking_does_not_change_scores():
    names = sorted(CASES)
    queries = [CASES[name][0].split() for name in names]
    corpora = [[text.split() for text in CASES[name][1]] for name in names]
    together = bm25_scores_many(queries, corpora)
    for name, scores in zip(names, together):
        assert np.array_equal(scores, reference_scores(*CASES[name])), name


def test_ranker_sorts_by_score_and_keeps_profile_order_on_ties():
    task = get_task("LaMP-7")
    profile = [{"id": str(i), "text": text} for i, text in
               enumerate(["blue", "red fox", "fox", "red fox", "red", "green", "sky", "sea"])]
    question = {"id": "q", "input": "Paraphrase: red fox", "profile": profile}
    ranking = build_ranker("bm25", task).rank_one(question)
    # "red fox" twice (tied, profile order), then the one-word items "fox" and "red" (tied:
    # same IDF and length), then the non-matching ones in profile order.
    assert ranking == ["1", "3", "2", "4", "0", "5", "6", "7"]


@requires_real_data
def test_real_lamp_7_dev_rankings_equal_rank_bm25():
    task = get_task("LaMP-7")
    questions = json.loads((LAMP_REAL / "LaMP_7" / "dev" / "dev_questions.json").read_text())
    ranker = build_ranker("bm25", task)
    checked_ties = 0
    for question, ranking in ranker.rank(questions):
        corpus = task.corpus(question["profile"])
        expected = reference_scores(task.query(question["input"]), corpus)
        ids = [item["id"] for item in question["profile"]]
        assert sorted(ranking) == sorted(ids)
        assert np.array_equal(our_scores(task.query(question["input"]), corpus), expected)
        # The published order, ties aside: scores non-increasing along our ranking, and
        # tied items in profile order.
        positions = [ids.index(item_id) for item_id in ranking]
        ranked_scores = expected[positions]
        assert np.all(np.diff(ranked_scores) <= 0), question["id"]
        for a, b, score_a, score_b in zip(positions, positions[1:], ranked_scores,
                                          ranked_scores[1:]):
            if score_a == score_b:
                checked_ties += 1
                assert a < b, question["id"]
    assert checked_ties > 0  # the file has ties (e.g. items sharing no query token)


# With workers even for a tiny file, and a failure if the run falls back to inline.
# Forked workers hold exactly the main process's modules and import nothing more.
WORKERS = ("from LaMP.utils.retrieval import parallel as parallel_rank\n"
           "parallel_rank.MIN_BYTES = 0\n"
           "parallel_rank.available_cores = lambda: 2\n"
           "rank_profiles._rank_inline = None\n")


@pytest.mark.parametrize("workers, setup", [("1", ""), ("2", WORKERS)])
def test_bm25_path_imports_neither_torch_nor_transformers(tmp_path, workers, setup):
    questions = [{"id": "1", "input": "Paraphrase: b",
                  "profile": [{"id": "i1", "text": "a"}, {"id": "i2", "text": "b b"},
                              {"id": "i3", "text": "c"}]}]
    path = tmp_path / "q.json"
    path.write_text(json.dumps(questions))
    code = (
        "import sys\n"
        "from LaMP import rank_profiles\n"
        f"{setup}"
        f"rank_profiles.main(['--input_data_addr', {str(path)!r}, '--output_ranking_addr', "
        f"{str(tmp_path / 'r.json')!r}, '--task', 'LaMP-7', '--ranker', 'bm25', "
        f"'--num_workers', {workers!r}])\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "print('heavy:', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "heavy: []" in result.stdout
    assert json.loads((tmp_path / "r.json").read_text()) == {"1": ["i2", "i1", "i3"]}


def test_term_index_ids_are_dense_in_order_of_first_sight():
    index = TermIndex()
    assert index.token_ids(["b", "a", "b", "c"]).tolist() == [0, 1, 0, 2]
    assert index.token_ids(["c", "d"]).tolist() == [2, 3]
    # Not added: unknown tokens are -1, and stay unknown.
    assert index.token_ids(["e", "a", "e"], add=False).tolist() == [-1, 1, -1]
    assert index.token_ids(["e"]).tolist() == [4]
    assert index.token_ids([]).shape == (0,)


def test_term_index_remembers_each_text_once_and_gathers_their_tokens():
    index = TermIndex()
    numbers = index.text_numbers(["a b  a", "b c\n", "a b  a", ""])
    assert numbers.tolist() == [0, 1, 0, 2]  # a repeated text: one number, within a call too
    assert index.text_numbers(["b c\n", "x"]).tolist() == [1, 3]
    tokens, lengths = index.tokens(np.array([1, 0, 2, 3, 0]))
    a, b, c, x = index.token_ids(["a", "b", "c", "x"]).tolist()
    assert lengths.tolist() == [2, 3, 0, 1, 3]
    assert tokens.tolist() == [b, c, a, b, a, x, a, b, a]
    assert [ids.tolist() for ids in index.text_ids(["a b  a", "x", ""])] == [[a, b, a], [x], []]
    assert index.text_ids([]) == []


def test_term_index_grows_past_its_first_allocation():
    index = TermIndex()
    texts = [f"w{n} w{n + 1} w{n + 2}" for n in range(2_000)]  # 6,000 tokens, 2,002 terms
    numbers = index.text_numbers(texts)
    tokens, lengths = index.tokens(numbers[::-1])
    expected = [index.token_ids(text.split()).tolist() for text in texts[::-1]]
    assert tokens.tolist() == [token for ids in expected for token in ids]
    assert set(lengths.tolist()) == {3}


def test_term_index_trim_empties_tables_past_their_limits():
    index = TermIndex(max_terms=3)
    index.text_numbers(["a b c"])
    index.trim()
    assert index.text_numbers(["z", "a b c"]).tolist() == [1, 0]  # 4 terms: not trimmed yet
    index.trim()
    assert index.text_numbers(["z"]).tolist() == [0]  # emptied: numbers and ids start again
    assert index.token_ids(["q"]).tolist() == [1]
    small = TermIndex(max_text_chars=4)
    small.text_numbers(["abc"])
    small.trim()
    assert small.text_numbers(["abcd"]).tolist() == [1]
    small.trim()
    assert small.text_numbers(["abcd"]).tolist() == [0]


def test_huge_ids_take_the_unpacked_sort_and_give_the_same_scores():
    query, corpus = CASES["long profile"]
    vocabulary = {token: 2 ** 60 + 977 * number for number, token in
                  enumerate(dict.fromkeys(" ".join([query, *corpus]).split()))}
    as_ids = lambda text: np.array([vocabulary[token] for token in text.split()], dtype=np.int64)
    other_query, other_corpus = CASES["plain"]
    vocabulary.update({token: 2 ** 61 + number for number, token in
                       enumerate(" ".join([other_query, *other_corpus]).split())
                       if token not in vocabulary})
    scores = bm25_scores_ids([as_ids(query), as_ids(other_query)],
                             [[as_ids(text) for text in corpus],
                              [as_ids(text) for text in other_corpus]])
    assert np.array_equal(scores[0], reference_scores(query, corpus))
    assert np.array_equal(scores[1], reference_scores(other_query, other_corpus))


def test_chunk_sizes_and_index_resets_do_not_change_rankings():
    task = get_task("LaMP-7")
    questions = [{"id": str(n), "input": f"Paraphrase: {CASES[name][0]}",
                  "profile": [{"id": f"{n}-{i}", "text": text}
                              for i, text in enumerate(CASES[name][1])]}
                 for n, name in enumerate(sorted(CASES) * 3)]
    default = [ranking for _, ranking in build_ranker("bm25", task).rank(questions)]
    small = BM25Ranker(task, chunk_questions=2, chunk_tokens=5)
    small.terms = TermIndex(max_terms=4, max_text_chars=10)
    assert [ranking for _, ranking in small.rank(questions)] == default


@pytest.mark.parametrize("spread", [10, 10_000_000])  # the table path, and the sort fallback
def test_sort_free_helpers_match_numpy(spread):
    rng = np.random.default_rng(spread)
    keys = rng.integers(0, spread, size=5_000)
    distinct, inverse = _distinct(keys)
    expected, expected_inverse = np.unique(keys, return_inverse=True)
    assert np.array_equal(distinct, expected)
    assert np.array_equal(inverse, expected_inverse.reshape(-1))
    positions = rng.choice(spread * 1_000, size=3_000, replace=False)
    assert np.array_equal(_argsort_distinct(positions), np.argsort(positions))
    assert len(_distinct(np.zeros(0, dtype=np.int64))[0]) == 0


def random_profiles(seed: int, questions: int):
    """Small profiles over a small vocabulary: many terms in more than half of a profile's
    documents (negative IDFs, floored), next to profiles without any."""
    rng = np.random.default_rng(seed)
    cases = []
    for number in range(questions):
        vocabulary = [f"t{index}" for index in range(int(rng.integers(2, 40)))]
        # Some documents empty, never all (rank_bm25 would divide by zero).
        corpus = [" ".join(rng.choice(vocabulary, size=int(rng.integers(0 if index else 1, 12))))
                  for index in range(int(rng.integers(1, 9)))]
        query = " ".join(rng.choice(vocabulary + ["absent"], size=int(rng.integers(0, 7))))
        cases.append((query, corpus))
    return cases


@pytest.mark.parametrize("seed", range(3))
def test_many_questions_at_once_equal_rank_bm25_bit_for_bit(seed):
    cases = random_profiles(seed, 150)
    expected = [reference_scores(query, corpus) for query, corpus in cases]
    assert any(np.any(scores < 0) for scores in expected)  # the floor is exercised
    # 150 questions at once take the key lookup; 50 at a time, the table of query terms.
    for size in (150, 50, 7):
        for start in range(0, len(cases), size):
            part = cases[start:start + size]
            got = bm25_scores_many([query.split() for query, _ in part],
                                   [[text.split() for text in corpus] for _, corpus in part])
            for offset, scores in enumerate(got):
                assert np.array_equal(scores, expected[start + offset]), (size, start + offset)
