"""Okapi BM25 over each question's profile, vectorised with numpy across many questions.

LaMP ranks each question's profile on its own: the profile is the whole corpus, so document
frequencies, the IDF table and the average document length belong to that one question. The
scores equal those of ``rank_bm25.BM25Okapi`` built per question (the published ranker) bit
for bit:

* IDF ``log(N - n + 0.5) - log(n + 0.5)``; a negative IDF (a term in more than half of the
  documents) is replaced by ``epsilon`` times the average IDF over the profile's vocabulary;
* a term contributes ``idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len / avglen))``,
  summed over the query's tokens in order (a repeated query token counts again).

Bit for bit matters because the ranking is a sort: a different rounding can swap two items
whose scores tie in the published code. So the arithmetic follows the published expression's
order of operations, the logarithms come from ``math.log`` as there, and the sums that the
published code accumulates one term at a time are accumulated in the same order.

Speed: tokens become integer ids through a ``TermIndex`` (one C-level dictionary pass per
token, and none at all for a text seen before: a time-split user's profile recurs in all of
their questions). Everything after that is a few numpy calls for a whole chunk of questions,
instead of Python loops per token, per document and per (query token, document) pair.
"""
from __future__ import annotations

import math
from itertools import accumulate, chain, compress, count, repeat
from operator import is_
from typing import Iterable, Iterator, Sequence

import numpy as np

from LaMP.utils.errors import LampError
from LaMP.utils.retrieval.base import (TIE_ORDERS, Ranked, Ranker, argsort_ranked_ids,
                                       batched_by_cost, ranked_ids_many)
from LaMP.utils.tasks import Task

K1 = 1.5  # term-frequency saturation, rank_bm25's default
B = 0.75  # length normalisation, rank_bm25's default
EPSILON = 0.25  # floor for negative IDFs, as a fraction of the average IDF (rank_bm25)

Tokens = Sequence[str]


class TermIndex:
    """Integer ids for whitespace tokens, with each text's id array memoised.

    Equal tokens get equal ids and different tokens different ids; the ids themselves are
    arbitrary (they come from a running counter). Both tables are bounded: ``trim`` empties
    them once they pass their limits, and must only be called when no ids handed out earlier
    will be compared with ids handed out later (between chunks of questions).
    """

    def __init__(self, max_terms: int = 500_000, max_text_chars: int = 32_000_000):
        # About 100 bytes per term and per cached text plus its characters: the defaults
        # keep the index under ~100 MB.
        self.max_terms = max_terms
        self.max_text_chars = max_text_chars
        self._clear()

    def _clear(self) -> None:
        self._ids: dict[str, int] = {}
        self._texts: dict[str, np.ndarray] = {}
        self._text_chars = 0
        self._counter = count()

    def trim(self) -> None:
        # The counter advances with every token seen; restarting it keeps ids small enough
        # to pack into sort keys (see _sort_tokens).
        if (len(self._ids) > self.max_terms or self._text_chars > self.max_text_chars
                or next(self._counter) > 2 ** 31):
            self._clear()

    def token_ids(self, tokens: Tokens) -> np.ndarray:
        """Ids of already split tokens."""
        # setdefault with a running counter: a new token takes the counter's value, a known
        # one keeps its id; one C-level pass, no Python code per token.
        return np.fromiter(map(self._ids.setdefault, tokens, self._counter), dtype=np.int64,
                           count=len(tokens))

    def text_ids(self, texts: Sequence[str], remember: bool = True) -> list[np.ndarray]:
        """Ids of the whitespace tokens of each text (memoised when ``remember``)."""
        known = list(map(self._texts.get, texts))
        # Indices of the texts not seen before, found without Python code per text.
        missing = list(compress(range(len(known)), map(is_, known, repeat(None))))
        if missing:
            split = [texts[index].split() for index in missing]
            flat = self.token_ids(list(chain.from_iterable(split)))
            ends = list(accumulate(map(len, split)))
            for index, start, end in zip(missing, [0, *ends[:-1]], ends):
                known[index] = flat[start:end]
                if remember:
                    # A copy: a remembered view would pin the whole array it was cut from.
                    known[index] = self._texts[texts[index]] = known[index].copy()
                    self._text_chars += len(texts[index])
        return known


def bm25_scores(query: Tokens, documents: Sequence[Tokens], k1: float = K1, b: float = B,
                epsilon: float = EPSILON) -> np.ndarray:
    """BM25 score of every tokenised document of one profile for a tokenised query."""
    return bm25_scores_many([query], [documents], k1, b, epsilon)[0]


def bm25_scores_many(queries: Sequence[Tokens], corpora: Sequence[Sequence[Tokens]],
                     k1: float = K1, b: float = B, epsilon: float = EPSILON
                     ) -> list[np.ndarray]:
    """BM25 scores of tokenised documents for several questions, each against its own corpus."""
    index = TermIndex()
    return bm25_scores_ids([index.token_ids(query) for query in queries],
                           [[index.token_ids(document) for document in corpus]
                            for corpus in corpora], k1, b, epsilon)


def bm25_scores_ids(queries: Sequence[np.ndarray], corpora: Sequence[Sequence[np.ndarray]],
                    k1: float = K1, b: float = B, epsilon: float = EPSILON
                    ) -> list[np.ndarray]:
    """BM25 scores for several questions at once, tokens given as ids from one ``TermIndex``.

    Returns one float64 array per question, one score per document. An empty corpus gives an
    empty array; a corpus without a single token, or a query that shares no token with its
    corpus, scores every document 0 (where the published code divides by zero).
    """
    if len(queries) != len(corpora):
        raise ValueError(f"{len(queries)} queries for {len(corpora)} corpora")
    num_questions = len(corpora)
    num_docs = np.fromiter(map(len, corpora), dtype=np.int64, count=num_questions)
    documents = list(chain.from_iterable(corpora))
    scores = np.zeros(len(documents))
    bounds = np.concatenate(([0], np.cumsum(num_docs))).tolist()
    per_question = [scores[start:end] for start, end in zip(bounds[:-1], bounds[1:])]
    doc_len = np.fromiter(map(len, documents), dtype=np.int64, count=len(documents))
    if not documents or int(doc_len.sum()) == 0:
        return per_question

    doc_question = np.repeat(np.arange(num_questions, dtype=np.int64), num_docs)
    token_doc = np.repeat(np.arange(len(documents), dtype=np.int64), doc_len)
    # Sort every token by (question, term, position). Runs of one (question, term) are the
    # profile's terms ("groups"); within a run, positions ascend, so its first element is the
    # term's first appearance in the profile and its documents come in order.
    question, term, position = _sort_tokens(doc_question[token_doc],
                                            np.concatenate(documents, dtype=np.int64))
    new_group = np.concatenate(([True], (question[1:] != question[:-1])
                                | (term[1:] != term[:-1])))
    group_start = np.flatnonzero(new_group)
    group_question = question[group_start]
    group_term = term[group_start]
    # Distinct (group, document) pairs and their term frequency.
    sorted_doc = token_doc[position]
    new_doc = np.concatenate(([True], sorted_doc[1:] != sorted_doc[:-1]))
    pair_start = np.flatnonzero(new_group | new_doc)
    pair_tf = np.diff(np.append(pair_start, len(sorted_doc)))
    pair_doc = sorted_doc[pair_start]
    pair_group = np.cumsum(new_group)[pair_start] - 1
    group_pair_start = np.flatnonzero(np.concatenate(([True],
                                                      pair_group[1:] != pair_group[:-1])))
    doc_freq = np.diff(np.append(group_pair_start, len(pair_group)))

    idf = _idf(doc_freq, num_docs, group_question, position[group_start], num_questions, epsilon)

    question_len = np.bincount(doc_question, weights=doc_len, minlength=num_questions)
    avgdl = question_len / np.maximum(num_docs, 1)
    avgdl[avgdl == 0] = 1.0  # a profile without tokens matches nothing; avoid 0/0
    # Grouped as the published ``1 - b + b * doc_len / avgdl`` parses:
    # ``(1 - b) + ((b * doc_len) / avgdl)``.
    norm = k1 * (1 - b + b * doc_len / avgdl[doc_question])

    # Every (query token, document containing it) match, in query order.
    query_question = np.repeat(np.arange(num_questions, dtype=np.int64),
                               np.fromiter(map(len, queries), dtype=np.int64, count=num_questions))
    query_term = np.concatenate([np.asarray(query, dtype=np.int64) for query in queries])
    query_group = _find_groups(group_question, group_term, query_question, query_term)
    if len(query_group) == 0:
        return per_question
    match_count = doc_freq[query_group]
    first_match = np.cumsum(match_count) - match_count
    match_pair = (np.repeat(group_pair_start[query_group] - first_match, match_count)
                  + np.arange(int(match_count.sum())))
    match_doc = pair_doc[match_pair]
    tf = pair_tf[match_pair].astype(np.float64)
    contribution = (np.repeat(idf[query_group], match_count)
                    * (tf * (k1 + 1) / (tf + norm[match_doc])))
    _accumulate_in_order(scores, match_doc, contribution)
    return per_question


def _sort_tokens(question: np.ndarray, term: np.ndarray):
    """(question, term, position) of every token, sorted by question, term, then position."""
    position = np.arange(len(term), dtype=np.int64)
    term_bits = max(int(term.max()), 0).bit_length() if len(term) else 0
    position_bits = max(len(term) - 1, 0).bit_length()
    question_bits = max(int(question.max()), 0).bit_length() if len(question) else 0
    if question_bits + term_bits + position_bits <= 63:
        # One packed int64 key: numpy's (vectorised) sort of plain integers is far faster
        # than a multi-key sort.
        key = np.sort((question << (term_bits + position_bits)) | (term << position_bits)
                      | position)
        position = key & ((1 << position_bits) - 1)
        term = (key >> position_bits) & ((1 << term_bits) - 1)
        return key >> (term_bits + position_bits), term, position
    order = np.lexsort((position, term, question))  # rare: ids too large to pack
    return question[order], term[order], order


def _find_groups(group_question: np.ndarray, group_term: np.ndarray,
                 query_question: np.ndarray, query_term: np.ndarray) -> np.ndarray:
    """For each query token, the index of its (question, term) group; tokens without one
    (absent from their profile) are dropped. Groups are sorted by (question, term)."""
    width = max(int(group_term.max()), int(query_term.max(initial=0))) + 1
    if (int(group_question.max()) + 1) * width >= 2 ** 62:  # rare: renumber terms densely
        dense = np.unique(np.concatenate([group_term, query_term]), return_inverse=True)[1]
        group_term, query_term = dense[:len(group_term)], dense[len(group_term):]
        width = len(dense) + 1
    group_key = group_question * width + group_term
    query_key = query_question * width + query_term
    found = np.searchsorted(group_key, query_key)
    inside = found < len(group_key)
    inside[inside] = group_key[found[inside]] == query_key[inside]
    return found[inside]


def _idf(doc_freq: np.ndarray, num_docs: np.ndarray, group_question: np.ndarray,
         group_first: np.ndarray, num_questions: int, epsilon: float) -> np.ndarray:
    """IDF per (question, term) group, negative values floored as rank_bm25 does."""
    # math.log, not np.log: numpy's vectorised log may round differently in the last bit.
    # There are few distinct (profile size, document frequency) combinations.
    group_size = num_docs[group_question]
    width = int(doc_freq.max()) + 1
    distinct, inverse = _distinct(group_size * width + doc_freq)
    sizes, freqs = np.divmod(distinct, width)
    table = np.array([math.log(size - n + 0.5) - math.log(n + 0.5)
                      for size, n in zip(sizes.tolist(), freqs.tolist())])
    idf = table[inverse]

    # The published average is a running sum over the profile's terms in order of first
    # appearance. Lay each question's IDFs out in a row, in that order, padded with zeros
    # (adding 0.0 changes no sum), and cumsum along rows: a sequential sum, exactly the
    # published one (np.sum would add pairwise and can differ in the last bit).
    # Token positions run question by question, so this order also groups by question.
    appearance = _argsort_distinct(group_first)
    terms = np.bincount(group_question, minlength=num_questions)
    row_start = np.cumsum(terms) - terms
    in_row = np.arange(len(idf)) - np.repeat(row_start, terms)
    rows = np.zeros((num_questions, int(terms.max())))
    rows[group_question[appearance], in_row] = idf[appearance]
    average = np.cumsum(rows, axis=1)[:, -1] / np.maximum(terms, 1)
    return np.where(idf < 0, (epsilon * average)[group_question], idf)


def _distinct(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(keys, return_inverse=True)`` for non-negative integers; without a sort
    when their range is small (the usual case here)."""
    top = int(keys.max()) + 1 if len(keys) else 0
    if top > 4 * len(keys) + 65_536:
        distinct, inverse = np.unique(keys, return_inverse=True)
        return distinct, inverse.reshape(-1)
    present = np.zeros(top, dtype=bool)
    present[keys] = True
    distinct = np.flatnonzero(present)
    slot = np.zeros(top, dtype=np.int64)
    slot[distinct] = np.arange(len(distinct))
    return distinct, slot[keys]


def _argsort_distinct(values: np.ndarray) -> np.ndarray:
    """``np.argsort(values)`` for distinct non-negative integers (token positions): each
    value's rank from ``_distinct``, inverted."""
    _, rank = _distinct(values)
    order = np.empty_like(rank)
    order[rank] = np.arange(len(rank))
    return order


def _accumulate_in_order(scores: np.ndarray, doc: np.ndarray, contribution: np.ndarray) -> None:
    """``scores[doc] += contribution`` one match at a time, keeping each document's order.

    Each document's score is then the same running sum as in the published code (its zero
    terms skipped, which leaves a float sum unchanged). Vectorised by rounds: round r adds
    every document's r-th contribution, and no document appears twice in a round.
    """
    by_doc = np.argsort(doc, kind="stable")
    doc, contribution = doc[by_doc], contribution[by_doc]
    starts = np.flatnonzero(np.concatenate(([True], doc[1:] != doc[:-1])))
    round_of = np.arange(len(doc)) - np.repeat(starts, np.diff(np.append(starts, len(doc))))
    by_round = np.argsort(round_of, kind="stable")
    doc, contribution = doc[by_round], contribution[by_round]
    bounds = np.concatenate(([0], np.cumsum(np.bincount(round_of)))).tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        scores[doc[start:end]] += contribution[start:end]


class BM25Ranker(Ranker):
    """Okapi BM25 with rank_bm25's parameters, questions scored in chunks for speed."""

    name = "bm25"
    options = ("tie_order",)

    def __init__(self, task: Task, use_date: bool = False, chunk_tokens: int = 50_000,
                 chunk_questions: int = 32, tie_order: str = "profile"):
        super().__init__(task, use_date)
        if tie_order not in TIE_ORDERS:
            raise LampError(f"unknown tie order {tie_order!r}; valid: {', '.join(TIE_ORDERS)}")
        self.tie_order = tie_order
        # A chunk shares numpy calls among its questions; bounded so that memory stays that
        # of a few questions' tokens. Measured on LaMP-7-sized profiles, chunks beyond a few
        # dozen questions gain nothing (their sorts outgrow the CPU caches).
        self.chunk_tokens = chunk_tokens
        self.chunk_questions = chunk_questions
        self.terms = TermIndex()

    def rank(self, questions: Iterable[dict]) -> Iterator[Ranked]:
        prepared = map(self._prepare, questions)
        # A chunk's cost is its profiles' characters, a cheap stand-in for their tokens
        # (LaMP text runs about five characters a token) that bounds memory all the same.
        for chunk in batched_by_cost(prepared, lambda entry: entry[3],
                                     self.chunk_tokens * 5, self.chunk_questions):
            yield from self._score(chunk)

    def _prepare(self, question: dict) -> tuple[dict, np.ndarray, list[np.ndarray], int]:
        query = self.task.query(question["input"], question["id"])
        # Queries are one-off texts: not worth remembering.
        query_ids = self.terms.token_ids(query.split())
        texts = self.task.corpus(question["profile"], self.use_date)
        return question, query_ids, self.terms.text_ids(texts), sum(map(len, texts))

    def _score(self, chunk) -> Iterator[Ranked]:
        scores = bm25_scores_ids([entry[1] for entry in chunk], [entry[2] for entry in chunk])
        self.terms.trim()  # only between chunks: ids are compared within a chunk
        questions = [entry[0] for entry in chunk]
        profiles = [question["profile"] for question in questions]
        if self.tie_order == "argsort":
            rankings = list(map(argsort_ranked_ids, profiles, scores))
        else:
            rankings = ranked_ids_many(profiles, scores)
        yield from zip(questions, rankings)
