"""ROPG feedback: how useful each candidate profile item is to the LLM, item by item.

For each training question, a first-stage ranker picks the top ``n`` profile items; the LLM
answers the question once per item, with that item as the prompt's only profile item; the
task's selection metric of that answer against the gold output (LaMP-3: the normalised
negative absolute error) is the item's utility (Salemi et al., SIGIR 2024). Every answer is
one generation, so a question costs ``n`` generations: this is the expensive stage of ROPG.

Prompts of several questions share generation batches; each question's record is written
(``LaMP.utils.data.feedback``) once its answers are scored, so a stopped run loses at most the
questions of the round in flight.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from LaMP.utils.data.feedback import FeedbackAppender
from LaMP.utils.evaluation.scoring import utilities
from LaMP.utils.modeling.answering import predict
from LaMP.utils.modeling.examples import Example
from LaMP.utils.retrieval.base import Ranker
from LaMP.utils.retrieval.rankings import order_profile
from LaMP.utils.tasks import Task

logger = logging.getLogger(__name__)

PromptFn = Callable[[str, Sequence[Mapping]], str]


@dataclass
class GenerationSettings:
    """``predict``'s keyword arguments: how each one-item answer is produced."""

    max_length: int
    max_new_tokens: int
    num_beams: int = 1
    batch_size: int = 8
    label_scoring: bool = False


def top_candidates(question: dict, ranking: Sequence[str], n: int) -> list[dict]:
    """The first ``n`` items of ``ranking`` with distinct ids (feedback is keyed by item id;
    a profile that repeats an id keeps its best-ranked occurrence)."""
    seen: set[str] = set()
    candidates = []
    for item in order_profile(question["profile"], ranking, question["id"]):
        if item["id"] not in seen:
            seen.add(item["id"])
            candidates.append(item)
            if len(candidates) == n:
                break
    return candidates


def candidate_examples(question: dict, candidates: Sequence[dict], prompt_fn: PromptFn
                       ) -> list[Example]:
    """One example per candidate: the question's prompt with that item alone."""
    return [Example(id=f"{question['id']}/{item['id']}",
                    prompt=prompt_fn(question["input"], [item]), target=question["output"])
            for item in candidates]


def _rounds(ranked: Iterable[tuple[dict, list[str]]], n: int, prompt_fn: PromptFn,
            prompts_per_round: int) -> Iterator[list[tuple[dict, list[dict], list[Example]]]]:
    """Questions with their candidates and examples, gathered until a round holds
    ``prompts_per_round`` prompts (a question is never split across rounds)."""
    round_, prompts = [], 0
    for question, ranking in ranked:
        candidates = top_candidates(question, ranking, n)
        examples = candidate_examples(question, candidates, prompt_fn)
        round_.append((question, candidates, examples))
        prompts += len(examples)
        if prompts >= prompts_per_round:
            yield round_
            round_, prompts = [], 0
    if round_:
        yield round_


def collect_feedback(lamp_model, task: Task, questions: Iterable[dict], ranker: Ranker,
                     appender: FeedbackAppender, prompt_fn: PromptFn,
                     settings: GenerationSettings, *, num_candidates: int,
                     prompts_per_round: int | None = None,
                     progress: Callable[[int], None] | None = None) -> dict:
    """Answer, score and record every question of ``questions`` that ``appender`` does not
    hold yet; returns counts and the time taken. ``questions`` carry gold outputs.
    ``progress(k)``: called after each round with the questions it recorded."""
    todo = (question for question in questions if question["id"] not in appender.done)
    # Enough prompts that the length-sorted batches of one round are full and even.
    prompts_per_round = prompts_per_round or 4 * settings.batch_size
    answered = generations = 0
    started = time.perf_counter()
    for round_ in _rounds(ranker.rank(todo), num_candidates, prompt_fn, prompts_per_round):
        examples = [example for _, _, examples in round_ for example in examples]
        outputs = predict(lamp_model, task, examples, max_length=settings.max_length,
                          max_new_tokens=settings.max_new_tokens, num_beams=settings.num_beams,
                          batch_size=settings.batch_size, label_scoring=settings.label_scoring,
                          progress=False)
        scores = utilities(task, [e.id for e in examples], [e.target for e in examples],
                           outputs, "the gold outputs") if examples else []
        position = 0
        for question, candidates, question_examples in round_:
            end = position + len(question_examples)
            appender.write({"id": question["id"],
                            "candidates": [item["id"] for item in candidates],
                            "utilities": scores[position:end], "outputs": outputs[position:end]})
            position = end
        answered += len(round_)
        generations += len(examples)
        if progress is not None:
            progress(len(round_))
    seconds = time.perf_counter() - started
    return {"answered": answered, "generations": generations, "seconds": seconds,
            "seconds_per_question": seconds / answered if answered else None}
