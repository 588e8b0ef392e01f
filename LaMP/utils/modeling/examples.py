"""From a LaMP questions file to model examples: choose profile items, build prompts.

Profile items come from the file's own order when it was ranked beforehand (``is_ranked``:
the first k of a merged file) or are ranked on the fly by the retrieval stage's rankers, one
code path for both stages.
"""
from __future__ import annotations

import itertools
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from LaMP.utils.data.fileio import require_regular_file
from LaMP.utils.data.questions import iter_questions
from LaMP.utils.errors import LampError, preview
from LaMP.utils.retrieval import build_ranker
from LaMP.utils.retrieval.rankings import order_profile
from LaMP.utils.tasks import Task

logger = logging.getLogger(__name__)


@dataclass
class Example:
    id: str
    prompt: str
    target: str | None  # the gold output, when the file has one


@dataclass
class ProfileOptions:
    """How each question's profile reaches its prompt (the shared training/evaluation flags)."""

    use_profile: bool = False
    num_retrieved: int = 1
    is_ranked: bool = False
    retriever: str = "bm25"
    # build_ranker's keyword options (cli.arguments.RetrieverFlags.options makes them from
    # the flags); each ranker takes its own.
    ranker_options: Mapping = field(default_factory=dict)

    @property
    def uses_items(self) -> bool:
        return self.use_profile and self.num_retrieved > 0

    def ranker(self, task: Task):
        """The on-the-fly ranker these options choose for ``task`` (a dense one loads here)."""
        return build_ranker(self.retriever, task, **self.ranker_options)


def with_profile_items(questions: Iterable[dict], task: Task, options: ProfileOptions
                       ) -> Iterator[tuple[dict, list[dict]]]:
    """Each question with the profile items its prompt gets, best first."""
    k = options.num_retrieved
    if not options.uses_items:
        for question in questions:
            yield question, []
    elif options.is_ranked:
        for question in questions:
            yield question, question["profile"][:k]
    else:
        ranker = options.ranker(task)
        for question, ranked_ids in ranker.rank(questions):
            yield question, order_profile(question["profile"], ranked_ids, question["id"])[:k]


def _all_or_none_outputs(questions: Iterable[dict], path: str) -> Iterator[dict]:
    """The questions, checked as they stream by: either every one has a gold output or none."""
    first = None
    for question in questions:
        if first is None:
            first = question
        elif ("output" in question) != ("output" in first):
            missing = question if "output" in first else first
            raise LampError(f"{path}: some questions have an output and some do not "
                            f"(e.g. id {missing['id']}); merge the outputs for all of them")
        yield question


def _questions(path: str, task: Task, limit: int | None, require_output: bool) -> Iterator[dict]:
    questions = iter_questions(path, task, require_output=require_output)
    if limit is not None:
        questions = itertools.islice(questions, limit)
    return _all_or_none_outputs(questions, path)


def check_questions(path: str, task: Task, *, limit: int | None = None,
                    require_output: bool = False) -> int:
    """Validate a questions file without building prompts, so that a data mistake is
    reported before a model is loaded; returns the number of questions. Streams the file
    (a second read, cheap next to loading a model, so a pipe is refused up front)."""
    require_regular_file(path, "questions file", "it is checked before the model loads and "
                                                 "read again to build the prompts")
    ids, golds = [], []
    for question in _questions(path, task, limit, require_output):
        ids.append(question["id"])
        golds.append(question.get("output"))
    _check_ids_and_golds(path, task, ids, golds)
    return len(ids)


def _check_ids_and_golds(path: str, task: Task, ids: list[str], golds: list[str | None]) -> None:
    """What a whole file must satisfy beyond each question's own schema."""
    if not ids:
        raise LampError(f"{path}: no questions")
    # Predictions are keyed by id: a repeated id would be written twice (and rejected by the
    # evaluator) or, in training, validate one question under two golds.
    repeated = sorted({qid for qid, count in Counter(ids).items() if count > 1})
    if repeated:
        raise LampError(f"{path}: duplicate question ids: {preview(repeated)}")
    if task.labels and golds[0] is not None:
        # Gold labels the metric cannot score would otherwise surface only after
        # generation (or after a training epoch).
        from LaMP.utils.evaluation.metrics import metric_for
        from LaMP.utils.evaluation.scoring import prepare

        prepare(metric_for(task), ids, golds, golds, path)


def build_examples(path: str, task: Task, prompt_fn: Callable[[str, Sequence[Mapping]], str],
                   options: ProfileOptions, *, limit: int | None = None,
                   require_output: bool = False) -> list[Example]:
    """The examples of a questions (or merged) file; only prompts stay in memory."""
    questions = _questions(path, task, limit, require_output)
    examples = [Example(id=question["id"], prompt=prompt_fn(question["input"], items),
                        target=question.get("output"))
                for question, items in with_profile_items(questions, task, options)]
    # Checked here too, so that a stage can build its examples in its one read of the file
    # (train_llm.py does, before its weights load).
    _check_ids_and_golds(path, task, [e.id for e in examples], [e.target for e in examples])
    logger.info("%s: %d examples, profile %s", path, len(examples),
                f"top {options.num_retrieved} by {'file order' if options.is_ranked else options.retriever}"
                if options.uses_items else "not used")
    return examples
