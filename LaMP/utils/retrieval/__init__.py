"""Ranking each question's profile by relevance to its input, and reading/applying rankings.

Rankers, one row each in ``RETRIEVERS`` (name -> ``"module:Class"``, imported when used), all
behind one interface (``base.Ranker``), built with ``build_ranker``:

* ``bm25``: Okapi BM25 over the profile (``bm25``), scores equal to the published
  ``rank_bm25`` ranker's;
* ``contriever``: a dense encoder, mean pooling, dot product (``dense``, the only module
  here that imports torch and transformers, and only when that ranker is built);
* ``recency``: newest first, and ``random``: a seeded shuffle, a baseline (``simple``);
* ``rspg``: per question, the ranking of the retriever a trained selector picks among several
  of the above (``selector``, RSPG).

``Ranker.rank(questions)`` takes an iterable of questions and yields ``(question, ranked_ids)``
in input order: profile item ids, best first, every item exactly once. Ties keep profile
order, so every ranking is a deterministic function of the question (and the seed).

The query and the corpus text of each profile item come from the task registry
(``Task.query``, ``Task.corpus``), the one definition shared with prompting. ``rankings``
reads ranking files and applies them; ``parallel`` ranks a file in worker processes.

Adding a retriever: a ``Ranker`` subclass (its ``name``, the build ``options`` it takes, its
``rank``) and one row below.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from LaMP.utils.errors import LampError
from LaMP.utils.retrieval.base import Ranker
from LaMP.utils.tasks import Task

RETRIEVERS = {
    "bm25": "LaMP.utils.retrieval.bm25:BM25Ranker",
    "contriever": "LaMP.utils.retrieval.dense:DenseRanker",
    "recency": "LaMP.utils.retrieval.simple:RecencyRanker",
    "random": "LaMP.utils.retrieval.simple:RandomRanker",
    "rspg": "LaMP.utils.retrieval.selector:SelectorRanker",
}
RANKERS = tuple(RETRIEVERS)
# Rankers built from other rankers and a trained model of their own: they take flags only
# rank_profiles.py has, so on-the-fly ranking (--retriever) and RSPG's candidates are the rest.
COMPOSITE_RANKERS = ("rspg",)
ON_THE_FLY_RANKERS = tuple(name for name in RANKERS if name not in COMPOSITE_RANKERS)


def ranker_class(name: str) -> type[Ranker]:
    """The class of the ranker called ``name``, its module imported now."""
    if name not in RETRIEVERS:
        raise LampError(f"unknown ranker {name!r}; valid rankers: {', '.join(RANKERS)}")
    module, _, attribute = RETRIEVERS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def build_ranker(name: str, task: Task, *, use_date: bool = False, **options) -> Ranker:
    """The ranker called ``name`` (one of ``RANKERS``) for ``task``.

    ``options`` may hold every ranker's options; each ranker takes the ones it names in
    ``options`` and leaves the rest: ``model_name``, ``device``, ``batch_size``, ``cache_dir``
    (a Hugging Face cache folder) and ``allow_download`` for the dense ranker, whose model
    loads here, once (``allow_download`` lets a hub model name missing from the local cache
    be downloaded; pass it only when the user named the model explicitly, the project runs
    offline otherwise); ``seed`` for the random ranker; ``tie_order`` (one of
    ``base.TIE_ORDERS``) for BM25.
    """
    ranker = ranker_class(name)
    chosen = {key: value for key, value in options.items() if key in ranker.options}
    return ranker(task, use_date=use_date, **chosen)


@dataclass(frozen=True)
class RetrieverSpec:
    """One candidate retriever: a ranker name, and for a dense one its own encoder."""

    ranker: str
    checkpoint: str | None = None

    @property
    def label(self) -> str:
        return self.ranker if self.checkpoint is None else f"{self.ranker}={self.checkpoint}"


def parse_retriever_spec(text: str) -> RetrieverSpec:
    """``bm25``, ``recency``, ``contriever`` or ``contriever=FOLDER`` (a trained encoder,
    e.g. a ROPG checkpoint), as ``--retrievers`` takes them."""
    ranker, equals, checkpoint = str(text).partition("=")
    if ranker not in ON_THE_FLY_RANKERS:
        raise LampError(f"retriever {text!r}: {ranker!r} is not one of "
                        f"{', '.join(ON_THE_FLY_RANKERS)}")
    if equals and ranker != "contriever":
        raise LampError(f"retriever {text!r}: only contriever takes an encoder (contriever=DIR)")
    if equals and not checkpoint:
        raise LampError(f"retriever {text!r}: name the encoder after '='")
    return RetrieverSpec(ranker, checkpoint or None)
