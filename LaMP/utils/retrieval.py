"""Ranking each question's profile by relevance to its input, and reading/applying rankings.

Rankers (``RANKERS``), all behind one interface, built with ``build_ranker``:

* ``bm25``: Okapi BM25 over the profile (``LaMP.utils.bm25``), scores equal to the
  published ``rank_bm25`` ranker's;
* ``contriever``: a dense encoder, mean pooling, dot product (``LaMP.utils.dense_retrieval``,
  the only module here that imports torch and transformers, and only when it is used);
* ``recency``: newest first;
* ``random``: a seeded shuffle, a baseline.

``Ranker.rank(questions)`` takes an iterable of questions and yields ``(question, ranked_ids)``
in input order: profile item ids, best first, every item exactly once. Ties keep profile
order, so every ranking is a deterministic function of the question (and the seed).

The query and the corpus text of each profile item come from the task registry
(``Task.query``, ``Task.corpus``), the one definition shared with prompting.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import defaultdict
from itertools import chain
from operator import itemgetter
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from LaMP.utils.bm25 import TermIndex, bm25_scores_ids
from LaMP.utils.data import as_id, open_json_stream
from LaMP.utils.errors import LampError, preview
from LaMP.utils.fileio import check_readable
from LaMP.utils.tasks import Task

logger = logging.getLogger(__name__)

RANKERS = ("bm25", "contriever", "recency", "random")
DEFAULT_DENSE_MODEL = "facebook/contriever"  # the published dense ranker
DEFAULT_BATCH_SIZE = 32  # texts per encoder forward pass; raise it on a GPU

Ranked = tuple[dict, list[str]]


class Ranker:
    """Ranks the profile of each question; subclasses implement ``rank``."""

    name = ""

    def __init__(self, task: Task, use_date: bool = False):
        self.task = task
        self.use_date = use_date

    def rank(self, questions: Iterable[dict]) -> Iterator[Ranked]:
        """Yield ``(question, profile ids best first)`` for each question, in input order."""
        raise NotImplementedError

    def rank_one(self, question: dict) -> list[str]:
        """The ranked profile ids of a single question."""
        return next(iter(self.rank([question])))[1]

    def describe(self) -> dict[str, Any]:
        """What determines this ranker's output, for the run's saved arguments."""
        return {"ranker": self.name, "task": self.task.name, "use_date": self.use_date}


def batched_by_cost(items: Iterable, cost: Callable[[Any], int], limit: int,
                    max_items: int | None = None) -> Iterator[list]:
    """Consecutive items in lists that close once their total ``cost`` reaches ``limit`` (or
    they hold ``max_items``); the last list may be smaller. Lazy: an item's cost is taken
    when it is reached, after the lists before it have been handed out and used."""
    batch: list = []
    total = 0
    for item in items:
        batch.append(item)
        total += cost(item)
        if total >= limit or (max_items is not None and len(batch) >= max_items):
            yield batch
            batch, total = [], 0
    if batch:
        yield batch


def ranked_ids(profile: Sequence[Mapping], scores: np.ndarray) -> list[str]:
    """Profile ids by descending score; equal scores keep profile order."""
    order = np.argsort(-scores, kind="stable")
    return [profile[index]["id"] for index in order.tolist()]


# How equal scores are ordered: "profile" keeps profile order (ours, machine-independent);
# "argsort" is the published code's rank_bm25 ``get_top_n`` order, ``np.argsort(scores)[::-1]``,
# whose ties come out in whatever order numpy's default (unstable) sort leaves them.
TIE_ORDERS = ("profile", "argsort")


def argsort_ranked_ids(profile: Sequence[Mapping], scores: np.ndarray) -> list[str]:
    """Profile ids in the published code's order: ``np.argsort(scores)[::-1]`` exactly."""
    order = np.argsort(scores)[::-1]
    return [profile[index]["id"] for index in order.tolist()]


def ranked_ids_many(profiles: Sequence[Sequence[Mapping]], scores: Sequence[np.ndarray]
                    ) -> list[list[str]]:
    """``ranked_ids`` of several profiles with one sort: by question, descending score, then
    profile position (so equal scores keep profile order, as in ``ranked_ids``)."""
    sizes = [len(profile) for profile in profiles]
    flat = np.concatenate(scores) if scores else np.zeros(0)
    question = np.repeat(np.arange(len(profiles)), sizes)
    position = np.arange(len(flat)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    order = np.lexsort((position, -flat, question)).tolist()
    ids = list(map(itemgetter("id"), chain.from_iterable(profiles)))
    ranked, start = [], 0
    for size in sizes:
        ranked.append(list(map(ids.__getitem__, order[start:start + size])))
        start += size
    return ranked


class BM25Ranker(Ranker):
    """Okapi BM25 with rank_bm25's parameters, questions scored in chunks for speed."""

    name = "bm25"

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


_DATE_RE = re.compile(r"(\d{4})(?:-(\d{1,2})(?:-(\d{1,2}))?)?(?:[T ].*)?")


def date_key(value: Any) -> tuple[int, int, int] | None:
    """``(year, month, day)`` of a LaMP date (``YYYY-MM-DD``, ``YYYY-MM`` or ``YYYY``, an
    optional time after it is ignored); missing parts count as 0, so a bare year sorts before
    the dated days of that year. ``None`` when there is no date; ``ValueError`` when the
    value is not a date."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    match = _DATE_RE.fullmatch(str(value).strip())
    if match is None:
        raise ValueError(f"not a date: {value!r}")
    year, month, day = (int(part) if part else 0 for part in match.groups())
    return year, month, day


class RecencyRanker(Ranker):
    """Newest first; equal dates keep profile order; undated items last, in profile order."""

    name = "recency"

    def rank(self, questions: Iterable[dict]) -> Iterator[Ranked]:
        for question in questions:
            yield question, self._order(question)

    @staticmethod
    def _order(question: dict) -> list[str]:
        keyed = []
        for position, item in enumerate(question["profile"]):
            try:
                key = date_key(item.get("date"))
            except ValueError:
                raise LampError(f"question {question['id']}: profile item {item['id']} has date "
                                f"{item.get('date')!r}; expected YYYY-MM-DD, YYYY-MM or YYYY"
                                ) from None
            # Sort ascending on (undated?, negated date): newest first, undated last; the
            # sort is stable, so ties stay in profile order.
            keyed.append(((1, 0, 0, 0) if key is None else (0, -key[0], -key[1], -key[2]),
                          position))
        keyed.sort(key=lambda pair: pair[0])
        return [question["profile"][position]["id"] for _, position in keyed]


class RandomRanker(Ranker):
    """A uniformly random order, seeded per question so it repeats and shards agree."""

    name = "random"

    def __init__(self, task: Task, use_date: bool = False, seed: int = 0):
        super().__init__(task, use_date)
        self.seed = seed

    def rank(self, questions: Iterable[dict]) -> Iterator[Ranked]:
        for question in questions:
            # The generator depends on the seed and the question id only, not on the
            # question's position, so a shard or a subset gets the same orders as a full run.
            id_hash = int.from_bytes(hashlib.blake2b(question["id"].encode("utf-8"),
                                                     digest_size=8).digest(), "little")
            rng = np.random.default_rng([self.seed, id_hash])
            order = rng.permutation(len(question["profile"]))
            yield question, [question["profile"][index]["id"] for index in order.tolist()]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "seed": self.seed}


def build_ranker(name: str, task: Task, *, use_date: bool = False,
                 model_name: str = DEFAULT_DENSE_MODEL, device: str | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0,
                 cache_dir: str | os.PathLike | None = None,
                 allow_download: bool = False, tie_order: str = "profile") -> Ranker:
    """The ranker called ``name`` (one of ``RANKERS``) for ``task``.

    ``model_name``, ``device``, ``batch_size``, ``cache_dir`` (a Hugging Face cache folder)
    and ``allow_download`` concern the dense ranker only; its model loads here, once.
    ``allow_download`` lets a hub model name missing from the local cache be downloaded; pass
    it only when the user named the model explicitly (the project runs offline otherwise).
    ``seed`` concerns the random ranker; ``tie_order`` (one of ``TIE_ORDERS``) the BM25 one.
    """
    if name == "bm25":
        return BM25Ranker(task, use_date, tie_order=tie_order)
    if name == "recency":
        return RecencyRanker(task, use_date)
    if name == "random":
        return RandomRanker(task, use_date, seed=seed)
    if name == "contriever":
        from LaMP.utils.dense_retrieval import DenseRanker

        return DenseRanker(task, use_date=use_date, model_name=model_name, device=device,
                           batch_size=batch_size, cache_dir=cache_dir,
                           allow_download=allow_download)
    raise LampError(f"unknown ranker {name!r}; valid rankers: {', '.join(RANKERS)}")


def ranking_problem(profile_ids: Sequence[str], ranking: Sequence[str]) -> str | None:
    """What is wrong with ``ranking`` as an order of ``profile_ids`` (``None``: nothing)."""
    remaining: dict[str, int] = defaultdict(int)
    for item_id in profile_ids:
        remaining[item_id] += 1
    unknown, repeated = [], []
    for item_id in ranking:
        if item_id not in remaining:
            unknown.append(item_id)
        elif remaining[item_id] == 0:
            repeated.append(item_id)
        else:
            remaining[item_id] -= 1
    missing = [item_id for item_id in profile_ids if remaining.get(item_id, 0) > 0]
    problems = []
    if unknown:
        problems.append(f"ids not in its profile: {preview(unknown)}")
    if repeated:
        problems.append(f"ids ranked more than once: {preview(repeated)}")
    if missing:
        # A profile id listed twice in the profile counts twice here, once per occurrence.
        problems.append(f"profile items left out: {preview(dict.fromkeys(missing))}")
    return "; ".join(problems) or None


def order_profile(profile: list[dict], ranked_ids: Sequence[str],
                  question_id: str = "?") -> list[dict]:
    """The profile items in ranked order; the ranking must list every item exactly once.

    A profile that repeats an id must list it as often in the ranking; its occurrences are
    then placed in profile order.
    """
    index = {item["id"]: position for position, item in enumerate(profile)}
    if len(ranked_ids) == len(index) == len(profile) and index.keys() == set(ranked_ids):
        return [profile[index[item_id]] for item_id in ranked_ids]  # distinct ids, permuted
    problem = ranking_problem([item["id"] for item in profile], ranked_ids)
    if problem is not None:
        raise LampError(f"the ranking of question {question_id} does not order its profile: "
                        f"{problem}")
    positions: dict[str, list[int]] = defaultdict(list)
    for position, item in enumerate(profile):
        positions[item["id"]].append(position)
    queues = {item_id: iter(places) for item_id, places in positions.items()}
    return [profile[next(queues[item_id])] for item_id in ranked_ids]


class Rankings(Mapping[str, list[str]]):
    """Question id -> ranked profile ids, stored compactly (each ranking as its JSON text).

    A train split's ranking has millions of ids; as Python lists they would take ~65 bytes
    each, as text ~10. A ranking is decoded when it is looked up.
    """

    def __init__(self) -> None:
        self._text: dict[str, str] = {}
        self._source: dict[str, str] = {}

    def __getitem__(self, question_id: str) -> list[str]:
        return json.loads(self._text[question_id])

    def __contains__(self, question_id: object) -> bool:
        return question_id in self._text

    def __iter__(self) -> Iterator[str]:
        return iter(self._text)

    def __len__(self) -> int:
        return len(self._text)

    def add(self, question_id: str, ranking: list[str], source: str) -> None:
        if question_id in self._text:
            where = ("twice in " + source if self._source[question_id] == source
                     else f"in {self._source[question_id]} and {source}")
            raise LampError(f"question {question_id} is ranked {where}")
        self._text[question_id] = json.dumps(ranking, ensure_ascii=False)
        self._source[question_id] = source


def load_rankings(paths: Sequence[str | os.PathLike]) -> Rankings:
    """Read one ranking file, or several shard files to combine: ``{question id: [ids]}``.

    Files are streamed. A question ranked twice (within a file or across shard files) is an
    error naming it; so is a malformed entry.
    """
    import ijson

    rankings = Rankings()
    for path in paths:
        path = check_readable(path, "ranking file")
        with open_json_stream(path, b"{", "a JSON object {question id: [profile ids]}") as handle:
            try:
                for question_id, ranking in ijson.kvitems(handle, ""):
                    ids = ([as_id(item_id) for item_id in ranking] if isinstance(ranking, list)
                           else None)
                    if ids is None or None in ids:
                        raise LampError(f"{path}: the ranking of question {question_id} must be "
                                        "a list of profile ids (strings)")
                    rankings.add(question_id, ids, str(path))
            except ijson.JSONError as error:
                raise LampError(f"{path}: malformed JSON "
                                f"({str(error).splitlines()[0][:200]})") from None
    return rankings


def count_questions(path: str | os.PathLike) -> int:
    """How many questions a questions file holds (a streamed pass that builds only ids)."""
    import ijson

    with open_json_stream(path, b"[", "a JSON list of questions") as handle:
        try:
            # use_float: as in iter_questions, so that both passes agree on what they accept
            return sum(1 for _ in ijson.items(handle, "item.id", use_float=True))
        except ijson.JSONError as error:
            reason = str(error).splitlines()[0][:200]
            raise LampError(f"{path}: malformed JSON ({reason})") from None


def shard_range(total: int, num_shards: int, shard_id: int) -> range:
    """Question positions of shard ``shard_id``: contiguous slices whose sizes differ by at
    most one. Contiguous, so that a user's questions (adjacent in LaMP files) mostly share a
    shard and its embedding cache."""
    if not 0 <= shard_id < num_shards:
        raise LampError(f"shard id {shard_id} is not in 0 … {num_shards - 1}")
    return range(total * shard_id // num_shards, total * (shard_id + 1) // num_shards)
