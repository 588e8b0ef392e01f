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

Speed: tokens become dense integer ids through a ``TermIndex``, which splits and looks up
each distinct text once (a time-split user's profile recurs in all of their questions) and
keeps its ids in one flat array; a chunk of questions goes through it in one call. Only the
tokens of a question's own query terms can add to its scores, so only they are sorted to
find term and document frequencies (a tenth of a profile's tokens, or less); every token
of the profiles whose floor needs the average IDF over their whole vocabulary. Everything
is a few numpy calls per chunk of questions, instead of Python loops per token, per
document and per (query token, document) pair.
"""
from __future__ import annotations

import math
from itertools import chain, compress, count, repeat
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


class _Growing:
    """A numpy array that grows at its end (capacity doubling), as ``list.extend`` does."""

    def __init__(self, dtype):
        self._data = np.zeros(1024, dtype=dtype)
        self.size = 0

    def extend(self, values: np.ndarray) -> None:
        end = self.size + len(values)
        if end > len(self._data):
            grown = np.zeros(max(end, 2 * len(self._data)), dtype=self._data.dtype)
            grown[:self.size] = self._data[:self.size]
            self._data = grown
        self._data[self.size:end] = values
        self.size = end

    @property
    def array(self) -> np.ndarray:
        return self._data[:self.size]


class TermIndex:
    """Integer ids for whitespace tokens, and the tokens of every text seen, kept once.

    Ids are dense: 0, 1, 2, … in order of first sight (so that a table indexed by id is
    small). Each distinct text gets a number, and its token ids live in one flat array: a
    time-split user's profile recurs in all of their questions, and is split and looked up
    once. Both tables are bounded: ``trim`` empties them once they pass their limits, and
    must only be called when no ids or text numbers handed out earlier will be used again
    (between chunks of questions).
    """

    def __init__(self, max_terms: int = 500_000, max_text_chars: int = 32_000_000):
        # About 100 bytes per term and per remembered text plus its characters and tokens:
        # the defaults keep the index under ~150 MB.
        self.max_terms = max_terms
        self.max_text_chars = max_text_chars
        self._clear()

    def _clear(self) -> None:
        self._ids: dict[str, int] = {}
        self._numbers: dict[str, int] = {}
        self._text_chars = 0
        self._start = _Growing(np.int64)  # per text number: where its tokens start …
        self._length = _Growing(np.int64)  # … and how many there are
        self._tokens = _Growing(np.int32 if self.max_terms < 2 ** 30 else np.int64)

    def trim(self) -> None:
        if len(self._ids) > self.max_terms or self._text_chars > self.max_text_chars:
            self._clear()

    def token_ids(self, tokens: Tokens, add: bool = True) -> np.ndarray:
        """Ids of already split tokens; a token not seen before gets a new id, or -1 when
        not ``add``."""
        # One C-level pass over the tokens, and a second over the new ones only.
        ids = np.fromiter(map(self._ids.get, tokens, repeat(-1)), dtype=np.int64,
                          count=len(tokens))
        if add:
            new = ids < 0
            if new.any():
                fresh = list(compress(tokens, new.tolist()))
                self._ids.update(zip(dict.fromkeys(fresh), count(len(self._ids))))
                ids[new] = np.fromiter(map(self._ids.__getitem__, fresh), dtype=np.int64,
                                       count=len(fresh))
        return ids

    def text_numbers(self, texts: Sequence[str]) -> np.ndarray:
        """The number of each text, for ``tokens``; texts not seen before are split (on
        whitespace, as ``str.split``) and remembered."""
        numbers = np.fromiter(map(self._numbers.get, texts, repeat(-1)), dtype=np.int64,
                              count=len(texts))
        new = numbers < 0
        if new.any():
            new_texts = list(compress(texts, new.tolist()))
            fresh = list(dict.fromkeys(new_texts))
            split = [text.split() for text in fresh]
            lengths = np.fromiter(map(len, split), dtype=np.int64, count=len(split))
            self._start.extend(self._tokens.size + np.cumsum(lengths) - lengths)
            self._length.extend(lengths)
            self._tokens.extend(self.token_ids(list(chain.from_iterable(split))))
            self._numbers.update(zip(fresh, count(len(self._numbers))))
            self._text_chars += sum(map(len, fresh))
            numbers[new] = np.fromiter(map(self._numbers.__getitem__, new_texts),
                                       dtype=np.int64, count=len(new_texts))
        return numbers

    def tokens(self, numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The token ids of the texts ``numbers``, one after the other (int32 unless
        ``max_terms`` is huge), and each one's number of tokens."""
        lengths = self._length.array[numbers]
        starts = self._start.array[numbers]
        # Each text's run of the flat array, gathered in one go.
        offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
        offsets += np.arange(len(offsets))
        return self._tokens.array[offsets], lengths

    def text_ids(self, texts: Sequence[str]) -> list[np.ndarray]:
        """The token ids of each text, as one array per text."""
        flat, lengths = self.tokens(self.text_numbers(texts))
        return np.split(flat, np.cumsum(lengths)[:-1]) if len(texts) else []


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
    """BM25 scores for several questions at once, tokens given as non-negative integer ids
    (equal ids for equal tokens, e.g. from one ``TermIndex``).

    Returns one float64 array per question, one score per document. An empty corpus gives an
    empty array; a corpus without a single token, or a query that shares no token with its
    corpus, scores every document 0 (where the published code divides by zero).
    """
    if len(queries) != len(corpora):
        raise ValueError(f"{len(queries)} queries for {len(corpora)} corpora")
    documents = list(chain.from_iterable(corpora))
    return bm25_scores_flat(
        _concatenate(queries), np.fromiter(map(len, queries), dtype=np.int64, count=len(queries)),
        _concatenate(documents),
        np.fromiter(map(len, documents), dtype=np.int64, count=len(documents)),
        np.fromiter(map(len, corpora), dtype=np.int64, count=len(corpora)), k1, b, epsilon)


def _concatenate(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return (np.concatenate([np.asarray(array, dtype=np.int64) for array in arrays])
            if len(arrays) else np.zeros(0, dtype=np.int64))


def bm25_scores_flat(query_terms: np.ndarray, query_lengths: np.ndarray, doc_terms: np.ndarray,
                     doc_lengths: np.ndarray, num_docs: np.ndarray, k1: float = K1, b: float = B,
                     epsilon: float = EPSILON) -> list[np.ndarray]:
    """``bm25_scores_ids`` with everything flat: the questions' query token ids one after
    the other (``query_lengths`` each), their documents' token ids one after the other
    (``doc_lengths`` each), and each question's number of documents."""
    num_questions = len(num_docs)
    scores = np.zeros(len(doc_lengths))
    bounds = np.concatenate(([0], np.cumsum(num_docs))).tolist()
    per_question = [scores[start:end] for start, end in zip(bounds[:-1], bounds[1:])]
    if len(doc_terms) == 0:
        return per_question
    doc_question = np.repeat(np.arange(num_questions, dtype=np.int64), num_docs)
    query_question = np.repeat(np.arange(num_questions, dtype=np.int64), query_lengths)

    # Only a question's own query terms can add to its scores: the sort that finds term and
    # document frequencies takes just their tokens (a tenth of a profile's, or less).
    position = np.flatnonzero(_query_term_tokens(doc_terms, doc_lengths, doc_question,
                                                 query_terms, query_question, num_questions))
    doc_end = np.cumsum(doc_lengths)
    token_doc = np.searchsorted(doc_end, position, side="right")
    groups = _Groups(doc_question[token_doc], doc_terms[position], token_doc)
    if groups.count == 0:
        return per_question
    idf = _raw_idf(groups.doc_freq, num_docs[groups.question])
    negative = idf < 0
    if negative.any():
        # The floor for a negative IDF is a fraction of the average IDF over the profile's
        # whole vocabulary: for these profiles (few, on real data), every term's document
        # frequency, from all their tokens.
        floored = np.zeros(num_questions, dtype=bool)
        floored[groups.question[negative]] = True
        docs = np.flatnonzero(floored[doc_question])
        everything = _Groups(np.repeat(doc_question[docs], doc_lengths[docs]),
                             doc_terms[np.repeat(floored[doc_question], doc_lengths)],
                             np.repeat(docs, doc_lengths[docs]))
        average = _average_idf(everything, num_docs, num_questions)
        idf = np.where(negative, (epsilon * average)[groups.question], idf)

    question_len = np.bincount(doc_question, weights=doc_lengths, minlength=num_questions)
    avgdl = question_len / np.maximum(num_docs, 1)
    avgdl[avgdl == 0] = 1.0  # a profile without tokens matches nothing; avoid 0/0
    # Grouped as the published ``1 - b + b * doc_len / avgdl`` parses:
    # ``(1 - b) + ((b * doc_len) / avgdl)``.
    norm = k1 * (1 - b + b * doc_lengths / avgdl[doc_question])

    # Every (query token, document containing it) match, in query order.
    query_group = _find_groups(groups.question, groups.term, query_question, query_terms)
    if len(query_group) == 0:
        return per_question
    match_count = groups.doc_freq[query_group]
    first_match = np.cumsum(match_count) - match_count
    match_pair = (np.repeat(groups.pair_start[query_group] - first_match, match_count)
                  + np.arange(int(match_count.sum())))
    match_doc = groups.pair_doc[match_pair]
    tf = groups.pair_tf[match_pair].astype(np.float64)
    contribution = (np.repeat(idf[query_group], match_count)
                    * (tf * (k1 + 1) / (tf + norm[match_doc])))
    _accumulate_in_order(scores, match_doc, contribution)
    return per_question


def _query_term_tokens(doc_terms: np.ndarray, doc_lengths: np.ndarray, doc_question: np.ndarray,
                       query_terms: np.ndarray, query_question: np.ndarray,
                       num_questions: int) -> np.ndarray:
    """Which document tokens are a term of their own question's query."""
    top = max(int(doc_terms.max()), int(query_terms.max(initial=0))) + 1
    if num_questions <= 64 and top <= 8 * len(doc_terms) + 2 ** 22:
        # A table by term id of the questions whose query has the term, one bit each: one
        # lookup per token (ids from a TermIndex are dense, so the table is small).
        table = np.zeros(top, dtype=np.uint64)
        np.bitwise_or.at(table, query_terms, np.left_shift(np.uint64(1),
                                                           query_question.astype(np.uint64)))
        own_bit = np.left_shift(np.uint64(1), doc_question.astype(np.uint64))
        return (table[doc_terms] & np.repeat(own_bit, doc_lengths)) != 0
    # Many questions, or sparse ids: (question, term) keys, looked up in the query's.
    token_keys, query_keys = _keys(np.repeat(doc_question, doc_lengths), doc_terms,
                                   query_question, query_terms)
    table = np.unique(query_keys)
    if len(table) == 0:
        return np.zeros(len(doc_terms), dtype=bool)
    found = np.minimum(np.searchsorted(table, token_keys), len(table) - 1)
    return table[found] == token_keys


def _keys(question_a: np.ndarray, term_a: np.ndarray, question_b: np.ndarray,
          term_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One int64 key per (question, term) for two sets of them, ordered as the pairs are;
    terms renumbered densely in the rare case that the keys would not fit."""
    width = max(int(term_a.max(initial=0)), int(term_b.max(initial=0))) + 1
    top = max(int(question_a.max(initial=0)), int(question_b.max(initial=0))) + 1
    if top * width >= 2 ** 62:
        dense = np.unique(np.concatenate([term_a, term_b]), return_inverse=True)[1]
        term_a, term_b = dense[:len(term_a)], dense[len(term_a):]
        width = len(dense) + 1
    return question_a * width + term_a, question_b * width + term_b


class _Groups:
    """The tokens of a chunk grouped by (question, term), in that order ("groups": a
    profile's terms), and within a group by document ("pairs", with their term frequency).

    Tokens are given in document order, and a group's documents stay in that order."""

    def __init__(self, question: np.ndarray, term: np.ndarray, doc: np.ndarray):
        # Sort every token by (question, term, position). Within a run of one (question,
        # term), positions ascend: its first element is the term's first appearance in the
        # profile, and its documents come in order.
        question, term, position = _sort_tokens(question, term.astype(np.int64, copy=False))
        new_group = np.ones(len(term), dtype=bool)
        new_group[1:] = (question[1:] != question[:-1]) | (term[1:] != term[:-1])
        group_start = np.flatnonzero(new_group)
        self.count = len(group_start)
        self.question = question[group_start]
        self.term = term[group_start]
        self.first = position[group_start]
        sorted_doc = doc[position]
        new_doc = np.ones(len(term), dtype=bool)
        new_doc[1:] = sorted_doc[1:] != sorted_doc[:-1]
        pair_start = np.flatnonzero(new_group | new_doc)
        self.pair_tf = np.diff(np.append(pair_start, len(sorted_doc)))
        self.pair_doc = sorted_doc[pair_start]
        pair_group = np.cumsum(new_group)[pair_start] - 1
        group_pair_start = np.ones(len(pair_group), dtype=bool)
        group_pair_start[1:] = pair_group[1:] != pair_group[:-1]
        self.pair_start = np.flatnonzero(group_pair_start)
        self.doc_freq = np.diff(np.append(self.pair_start, len(pair_group)))


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
    group_key, query_key = _keys(group_question, group_term, query_question, query_term)
    found = np.searchsorted(group_key, query_key)
    inside = found < len(group_key)
    inside[inside] = group_key[found[inside]] == query_key[inside]
    return found[inside]


def _raw_idf(doc_freq: np.ndarray, profile_size: np.ndarray) -> np.ndarray:
    """``log(N - n + 0.5) - log(n + 0.5)`` per group, before the floor."""
    # math.log, not np.log: numpy's vectorised log may round differently in the last bit.
    # There are few distinct (profile size, document frequency) combinations.
    width = int(doc_freq.max()) + 1
    distinct, inverse = _distinct(profile_size * width + doc_freq)
    sizes, freqs = np.divmod(distinct, width)
    table = np.array([math.log(size - n + 0.5) - math.log(n + 0.5)
                      for size, n in zip(sizes.tolist(), freqs.tolist())])
    return table[inverse]


def _average_idf(groups: _Groups, num_docs: np.ndarray, num_questions: int) -> np.ndarray:
    """Per question, the published average IDF over every term of its profile (0 for the
    questions ``groups`` does not cover)."""
    idf = _raw_idf(groups.doc_freq, num_docs[groups.question])
    # The published average is a running sum over the profile's terms in order of first
    # appearance. Lay each question's IDFs out in a row, in that order, padded with zeros
    # (adding 0.0 changes no sum), and cumsum along rows: a sequential sum, exactly the
    # published one (np.sum would add pairwise and can differ in the last bit).
    # Token positions run question by question, so this order also groups by question.
    appearance = _argsort_distinct(groups.first)
    terms = np.bincount(groups.question, minlength=num_questions)
    row_start = np.cumsum(terms) - terms
    in_row = np.arange(len(idf)) - np.repeat(row_start, terms)
    rows = np.zeros((num_questions, int(terms.max())))
    rows[groups.question[appearance], in_row] = idf[appearance]
    return np.cumsum(rows, axis=1)[:, -1] / np.maximum(terms, 1)


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

    def _prepare(self, question: dict) -> tuple[dict, list[str], list[str], int]:
        """A question's corpus texts and query tokens (what can be wrong with the question
        shows here, question by question)."""
        texts = self.task.corpus(question["profile"], self.use_date)
        query = self.task.query(question["input"], question["id"]).split()
        return question, texts, query, sum(map(len, texts))

    def _score(self, chunk) -> Iterator[Ranked]:
        # The whole chunk's texts and queries through the index at once: per call, the index
        # costs more than per text.
        num_docs = np.fromiter((len(entry[1]) for entry in chunk), dtype=np.int64,
                               count=len(chunk))
        numbers = self.terms.text_numbers(list(chain.from_iterable(entry[1] for entry in chunk)))
        # Queries are one-off texts, not remembered; a token the index does not know (after
        # the profiles' texts) is in no profile, and scores nothing.
        query_lengths = np.fromiter((len(entry[2]) for entry in chunk), dtype=np.int64,
                                    count=len(chunk))
        query_terms = self.terms.token_ids(list(chain.from_iterable(entry[2] for entry in chunk)),
                                           add=False)
        known = query_terms >= 0
        if not known.all():
            query_lengths = np.bincount(np.repeat(np.arange(len(chunk)), query_lengths)[known],
                                        minlength=len(chunk))
            query_terms = query_terms[known]
        doc_terms, doc_lengths = self.terms.tokens(numbers)
        scores = bm25_scores_flat(query_terms, query_lengths, doc_terms, doc_lengths, num_docs)
        self.terms.trim()  # only between chunks: ids are compared within a chunk
        questions = [entry[0] for entry in chunk]
        profiles = [question["profile"] for question in questions]
        if self.tie_order == "argsort":
            rankings = list(map(argsort_ranked_ids, profiles, scores))
        else:
            rankings = ranked_ids_many(profiles, scores)
        yield from zip(questions, rankings)
