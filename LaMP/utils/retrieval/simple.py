"""The rankers without a model: newest first, and a seeded random order (a baseline)."""
from __future__ import annotations

import hashlib
import re
from typing import Any, Iterable, Iterator

import numpy as np

from LaMP.utils.errors import LampError
from LaMP.utils.retrieval.base import Ranked, Ranker
from LaMP.utils.tasks import Task


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
    options = ("seed",)

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
