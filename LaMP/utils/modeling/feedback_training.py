"""Learning from the LLM's feedback: ROPG trains a dense retriever, RSPG a selector.

Both learn from groups: one question and a few candidates (profile items for ROPG, retrievers'
results for RSPG), each with its utility to the LLM, higher better. The model scores every
candidate of a group; the objective compares the scores with the utilities:

* ``kd`` (ROPG-KD, and RSPG): the model's distribution ``softmax(scores / τ)`` is fitted to
  ``softmax(utilities / τ)`` by minimising ``KL(target ‖ model)``. The released ROPG code
  passes the already-softmaxed model probabilities to ``CrossEntropyLoss``, which applies a
  second softmax; here the log-probabilities go in once, so the loss is the KL divergence
  (0 exactly when the two distributions agree).
* ``rl`` (ROPG-RL): REINFORCE on one item sampled from ``softmax(scores)``, rewarded with its
  utility less the utility of the first stage's top item: ``-(u[s] - u[0]) · log p(s)``.

The optimiser is the paper's: Adam, learning rate 1e-5 warmed up linearly over the first
1,000 steps and constant after, gradient norm clipped at 1, one group per step.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from LaMP.utils.data.outputs import OutputsFile
from LaMP.utils.errors import LampError, preview
from LaMP.utils.evaluation.scoring import utilities
from LaMP.utils.retrieval.dense import embed
from LaMP.utils.retrieval.rankings import Rankings, order_profile
from LaMP.utils.retrieval.selector import Selector, selector_segments
from LaMP.utils.tasks import Task

logger = logging.getLogger(__name__)

OBJECTIVES = ("kd", "rl")


def distillation_loss(scores: torch.Tensor, target_utilities: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """``KL(softmax(u / τ) ‖ softmax(s / τ))`` of one group's scores ``s`` and utilities ``u``."""
    log_model = torch.log_softmax(scores.float() / temperature, dim=-1)
    log_target = torch.log_softmax(target_utilities.float() / temperature, dim=-1)
    return torch.nn.functional.kl_div(log_model, log_target, log_target=True,
                                      reduction="sum")


def reward(target_utilities: torch.Tensor, sampled: int) -> torch.Tensor:
    """ROPG-RL's reward of the sampled item: its utility over the first stage's top item's."""
    return target_utilities[sampled] - target_utilities[0]


def reinforce_loss(scores: torch.Tensor, target_utilities: torch.Tensor,
                   sampled: int) -> torch.Tensor:
    """``-(u[s] - u[0]) · log softmax(scores)[s]``: descending it raises the probability of an
    item better than the top one and lowers that of a worse one."""
    log_probs = torch.log_softmax(scores.float(), dim=-1)
    return -reward(target_utilities.to(log_probs.device).float(), sampled) * log_probs[sampled]


def sample_item(scores: torch.Tensor, generator: torch.Generator) -> int:
    """One index drawn from ``softmax(scores)`` (no gradient flows through the draw)."""
    probs = torch.softmax(scores.detach().float().cpu(), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


# -- groups -------------------------------------------------------------------------------

@dataclass
class Group:
    """One question's candidates and their utilities. ``texts``: for ROPG each item's text
    (and ``query``, the question's), for RSPG each retriever's ``selector_segments``."""

    id: str
    texts: list
    utilities: list[float]
    query: str | None = None


def retriever_groups(task: Task, questions: Iterable[dict], records: Mapping[str, dict],
                     use_date: bool = False, source: str = "--feedback") -> list[Group]:
    """ROPG's groups: each question with feedback, its query and its candidates' texts as the
    dense ranker sees them. Questions without feedback are left out; feedback for a question
    the data lacks, or for an item its profile lacks, is an error (files that do not match)."""
    groups, seen = [], set()
    for question in questions:
        record = records.get(question["id"])
        if record is None:
            continue
        seen.add(question["id"])
        profile = {item["id"]: item for item in question["profile"]}
        missing = [item_id for item_id in record["candidates"] if item_id not in profile]
        if missing:
            raise LampError(f"{source}: question {question['id']}: candidates its profile lacks "
                            f"({preview(missing)}); feedback made from other data?")
        if len(record["candidates"]) < 2:
            continue  # one candidate: nothing to rank
        texts = task.corpus([profile[item_id] for item_id in record["candidates"]], use_date)
        groups.append(Group(question["id"], texts, list(record["utilities"]),
                            task.query(question["input"], question["id"])))
    _check_covered(records, seen, source)
    return groups


def _check_covered(records: Mapping[str, dict], seen: set[str], source: str) -> None:
    unknown = [qid for qid in records if qid not in seen]
    if unknown:
        raise LampError(f"{source}: feedback for questions --train_data does not hold: "
                        f"{preview(unknown)}")


def selector_groups(task: Task, questions: Iterable[dict], rankings: Sequence[Rankings],
                    predictions: Sequence[OutputsFile], *, num_retrieved: int,
                    post: bool) -> list[Group]:
    """RSPG's groups: per question, what the selector reads of each retriever
    (``selector_segments``) and the utility of that retriever's answer (``predictions``)
    against the gold."""
    questions = list(questions)
    for which, ranking in enumerate(rankings):
        missing = [q["id"] for q in questions if q["id"] not in ranking]
        if missing:
            raise LampError(f"--rankings {which + 1}: no ranking for {preview(missing)} "
                            "questions of --train_data")
    for file in predictions:
        missing = [q["id"] for q in questions if q["id"] not in file.outputs]
        if missing:
            raise LampError(f"{file.source}: no prediction for {preview(missing)} questions "
                            "of --train_data")
    ids = [q["id"] for q in questions]
    golds = [q["output"] for q in questions]
    per_retriever = [utilities(task, ids, golds, [file.outputs[qid] for qid in ids],
                               "--train_data") for file in predictions]
    groups = []
    for row, question in enumerate(questions):
        texts = []
        for ranking, file in zip(rankings, predictions):
            items = order_profile(question["profile"], ranking[question["id"]],
                                  question["id"])[:num_retrieved]
            texts.append(selector_segments(task, question, items,
                                           file.outputs[question["id"]] if post else None))
        groups.append(Group(question["id"], texts, [u[row] for u in per_retriever]))
    return groups


# -- the loop -----------------------------------------------------------------------------

@dataclass
class TrainSettings:
    """How ``train_groups`` optimises (the flags of ``add_feedback_training_arguments`` carry
    the paper's defaults and their reasons)."""

    max_steps: int
    learning_rate: float
    warmup_steps: int
    batch_size: int  # groups per step
    max_grad_norm: float
    seed: int
    logging_steps: int = 0  # log the mean loss every this many steps (0: never)


def train_groups(model: torch.nn.Module, groups: Sequence[Group],
                 group_loss: Callable[[Group, torch.Generator], torch.Tensor],
                 settings: TrainSettings, progress: bool = True) -> list[float]:
    """Optimise ``model`` for ``settings.max_steps`` steps of ``batch_size`` groups each, in a
    seeded shuffled order (every group once per pass); returns each step's mean loss."""
    from transformers import get_constant_schedule_with_warmup

    if not groups:
        raise LampError("nothing to train on: no question has two or more candidates")
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=settings.learning_rate)
    schedule = get_constant_schedule_with_warmup(optimizer, settings.warmup_steps)
    order_rng = np.random.default_rng(settings.seed)
    sampler = torch.Generator().manual_seed(settings.seed)
    order: list[int] = []
    losses = []
    model.train()
    from tqdm import tqdm

    for step in tqdm(range(settings.max_steps), desc="training", unit="step",
                     disable=not progress):
        batch = []
        while len(batch) < settings.batch_size:
            if not order:
                order = order_rng.permutation(len(groups)).tolist()
            batch.append(groups[order.pop()])
        optimizer.zero_grad(set_to_none=True)
        loss = sum(group_loss(group, sampler) for group in batch) / len(batch)
        if not torch.isfinite(loss):
            raise LampError(f"the loss is {loss.item()} at step {step + 1}: lower "
                            "--learning_rate or raise --temperature")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if settings.logging_steps and (step + 1) % settings.logging_steps == 0:
            recent = losses[-settings.logging_steps:]
            logger.info("step %d: loss %.4f (mean of the last %d)", step + 1,
                        sum(recent) / len(recent), len(recent))
    model.eval()
    return losses


def retriever_loss(model, tokenizer, max_length: int, device, objective: str,
                   temperature: float) -> Callable[[Group, torch.Generator], torch.Tensor]:
    """The loss of one ROPG group: the query and the candidates in one forward pass, scored
    by the dot product of their mean-pooled embeddings (the dense ranker's scores)."""
    if objective not in OBJECTIVES:
        raise LampError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")

    def loss(group: Group, generator: torch.Generator) -> torch.Tensor:
        scores = retriever_scores(model, tokenizer, group, max_length, device)
        target = torch.tensor(group.utilities, device=scores.device)
        if objective == "kd":
            return distillation_loss(scores, target, temperature)
        return reinforce_loss(scores, target, sample_item(scores, generator))

    return loss


def retriever_scores(model, tokenizer, group: Group, max_length: int, device) -> torch.Tensor:
    vectors = embed(model, tokenizer, [group.query, *group.texts], max_length, device)
    return vectors[1:] @ vectors[0]


def selector_loss(selector: Selector, temperature: float
                  ) -> Callable[[Group, torch.Generator], torch.Tensor]:
    def loss(group: Group, generator: torch.Generator) -> torch.Tensor:
        scores = selector.scores(group.texts)
        return distillation_loss(scores, torch.tensor(group.utilities, device=scores.device),
                                 temperature)

    return loss


def mean_distillation_loss(score: Callable[[Group], torch.Tensor], groups: Sequence[Group],
                           temperature: float = 1.0) -> float:
    """The mean KL over ``groups`` of the model's distribution to the utilities' (how far
    the model is from the feedback; lower is closer)."""
    if not groups:
        return math.nan
    total = 0.0
    with torch.inference_mode():
        for group in groups:
            scores = score(group)
            total += float(distillation_loss(scores, torch.tensor(group.utilities,
                                                                  device=scores.device),
                                             temperature))
    return total / len(groups)
