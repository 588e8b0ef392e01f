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

Speed comes from one pass of C-level dictionary work per token (to number the terms) and then
a handful of numpy calls for a whole chunk of questions, instead of Python loops per token,
per document and per (query token, document) pair.
"""
from __future__ import annotations

import math
from itertools import chain, count
from typing import Sequence

import numpy as np

K1 = 1.5  # term-frequency saturation, rank_bm25's default
B = 0.75  # length normalisation, rank_bm25's default
EPSILON = 0.25  # floor for negative IDFs, as a fraction of the average IDF (rank_bm25)

Tokens = Sequence[str]


def tokenize(text: str) -> list[str]:
    """Whitespace tokens (runs of any whitespace), as the published ranker splits texts."""
    return text.split()


def bm25_scores(query: Tokens, documents: Sequence[Tokens], k1: float = K1, b: float = B,
                epsilon: float = EPSILON) -> np.ndarray:
    """BM25 score of every tokenised document of one profile for a tokenised query."""
    return bm25_scores_many([query], [documents], k1, b, epsilon)[0]


def bm25_scores_many(queries: Sequence[Tokens], corpora: Sequence[Sequence[Tokens]],
                     k1: float = K1, b: float = B, epsilon: float = EPSILON
                     ) -> list[np.ndarray]:
    """BM25 scores for several questions at once, each query against its own corpus.

    Returns one float64 array per question, one score per document. An empty corpus gives an
    empty array; a corpus without a single token, or a query that shares no token with its
    corpus, scores every document 0 (where the published code divides by zero).
    """
    if len(queries) != len(corpora):
        raise ValueError(f"{len(queries)} queries for {len(corpora)} corpora")
    num_questions = len(corpora)
    # Number the terms of each profile by the position (counted over the whole chunk) of
    # their first occurrence in that profile. The numbers are then unique across questions
    # and, within a question, increase in order of first appearance: the order in which the
    # published code meets terms and sums their IDFs.
    positions = count()
    term_ids: list[int] = []
    query_terms: list[int] = []
    for query, corpus in zip(queries, corpora):
        first_seen: dict[str, int] = {}
        term_ids.extend(map(first_seen.setdefault, chain.from_iterable(corpus), positions))
        query_terms.extend(filter(None.__ne__, map(first_seen.get, query)))

    num_docs = np.fromiter(map(len, corpora), dtype=np.int64, count=num_questions)
    documents = list(chain.from_iterable(corpora))
    scores = np.zeros(len(documents))
    bounds = np.concatenate(([0], np.cumsum(num_docs))).tolist()
    per_question = [scores[start:end] for start, end in zip(bounds[:-1], bounds[1:])]
    if not query_terms:
        return per_question

    doc_len = np.fromiter(map(len, documents), dtype=np.int64, count=len(documents))
    doc_question = np.repeat(np.arange(num_questions, dtype=np.int64), num_docs)
    token_doc = np.repeat(np.arange(len(documents), dtype=np.int64), doc_len)
    # Distinct (term, document) pairs, sorted by term then document, with the term's count.
    pair_keys, pair_tf = np.unique(np.array(term_ids, dtype=np.int64) * len(documents) + token_doc,
                                   return_counts=True)
    pair_term, pair_doc = np.divmod(pair_keys, len(documents))
    # Runs of one term: a term of one profile, its pairs being the documents that contain it.
    group_start = np.flatnonzero(np.concatenate(([True], pair_term[1:] != pair_term[:-1])))
    doc_freq = np.diff(np.append(group_start, len(pair_keys)))
    group_question = doc_question[pair_doc[group_start]]
    idf = _idf(doc_freq, num_docs[group_question], group_question, num_questions, epsilon)

    question_len = np.bincount(doc_question, weights=doc_len, minlength=num_questions)
    avgdl = question_len / np.maximum(num_docs, 1)
    avgdl[avgdl == 0] = 1.0  # a profile without tokens matches nothing; avoid 0/0
    # Grouped as the published ``1 - b + b * doc_len / avgdl`` parses:
    # ``(1 - b) + ((b * doc_len) / avgdl)``.
    norm = k1 * (1 - b + b * doc_len / avgdl[doc_question])

    # Every (query token, document containing it) match, in query order.
    query_groups = np.searchsorted(pair_term[group_start], np.array(query_terms, dtype=np.int64))
    match_count = doc_freq[query_groups]
    first_match = np.cumsum(match_count) - match_count
    match_pair = (np.repeat(group_start[query_groups] - first_match, match_count)
                  + np.arange(int(match_count.sum())))
    match_doc = pair_doc[match_pair]
    tf = pair_tf[match_pair].astype(np.float64)
    contribution = (np.repeat(idf[query_groups], match_count)
                    * (tf * (k1 + 1) / (tf + norm[match_doc])))
    _accumulate_in_order(scores, match_doc, contribution)
    return per_question


def _idf(doc_freq: np.ndarray, num_docs: np.ndarray, group_question: np.ndarray,
         num_questions: int, epsilon: float) -> np.ndarray:
    """IDF per term (terms grouped by question, in order of first appearance), floored."""
    # math.log, not np.log: numpy's vectorised log may round differently in the last bit.
    # There are few distinct (profile size, document frequency) combinations.
    width = int(doc_freq.max()) + 1
    distinct, inverse = np.unique(num_docs * width + doc_freq, return_inverse=True)
    sizes, freqs = np.divmod(distinct, width)
    table = np.array([math.log(size - n + 0.5) - math.log(n + 0.5)
                      for size, n in zip(sizes.tolist(), freqs.tolist())])
    idf = table[inverse.reshape(-1)]

    # The published average is a running sum in order of first appearance; cumsum adds in
    # exactly that order (a pairwise np.sum can differ in the last bit).
    terms = np.bincount(group_question, minlength=num_questions)
    average = np.zeros(num_questions)
    for question, (end, size) in enumerate(zip(np.cumsum(terms).tolist(), terms.tolist())):
        if size:
            average[question] = float(np.cumsum(idf[end - size:end])[-1]) / size
    return np.where(idf < 0, (epsilon * average)[group_question], idf)


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
