"""What every ranker shares: the interface, batching by cost, and scores to ranked ids."""
from __future__ import annotations

from itertools import accumulate, chain
from operator import itemgetter
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from LaMP.utils.tasks import Task

DEFAULT_DENSE_MODEL = "facebook/contriever"  # the published dense ranker
DEFAULT_BATCH_SIZE = 32  # texts per encoder forward pass; raise it on a GPU

Ranked = tuple[dict, list[str]]


class Ranker:
    """Ranks the profile of each question; subclasses implement ``rank``.

    ``options``: the keyword arguments of ``build_ranker`` that the subclass's constructor
    takes besides ``task`` and ``use_date`` (the others concern other rankers).
    """

    name = ""
    options: tuple[str, ...] = ()

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
    """``ranked_ids`` of several profiles with one sort: by question, then descending score;
    the sort is stable, so equal scores keep profile order, as in ``ranked_ids``."""
    sizes = [len(profile) for profile in profiles]
    flat = np.concatenate(scores) if scores else np.zeros(0)
    question = np.repeat(np.arange(len(profiles)), sizes)
    order = np.lexsort((-flat, question))
    ids = np.fromiter(map(itemgetter("id"), chain.from_iterable(profiles)), dtype=object,
                      count=len(flat))
    ranked = ids[order].tolist()
    ends = list(accumulate(sizes))
    return [ranked[end - size:end] for size, end in zip(sizes, ends)]
