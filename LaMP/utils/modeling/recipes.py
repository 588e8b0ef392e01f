"""Published training recipes as one table: adding a recipe is one row (and its tests).

A recipe is what a paper's released code trains with: for per-user training
(``train_user_peft.py``) each task's per-user template and the optimiser and LoRA settings,
and for the task-level adapter (``train_llm.py``) its settings. ``--recipe NAME`` makes a row
the defaults of those flags; a flag given on the command line overrides its row's value
(the flags default to ``UNSET``, and ``apply_recipe`` fills in only those). The effective
values are what the scripts record in args.json.

- ``lamp``: the LaMP authors' per-user PEFT (their repository's ``PEFT/train_peft.py`` and
  ``PEFT/data/datasets.py``): each task's own per-user template (``Task.user_template``), lr
  5e-5 for 30 epochs, LoRA r 8, alpha 32, dropout 0.1. Their code runs the Hugging Face
  Trainer, whose gradient clipping (1.0) it keeps. For ``train_llm.py`` the row is the
  published LaMP fine-tuning defaults that script has always had.
- ``oppu``: OPPU (Tan et al. 2024, "Democratizing Large Language Models via Personalized
  Parameter-Efficient Fine-tuning"; their ``OPPU.py``, ``task_LoRA.py`` and
  ``prompt/prompt.json``): per-user LoRA r 8, alpha 8, dropout 0.05 on the query and value
  projections, lr 1e-4 for 2 epochs in batches of 16, warm-up 0.1, weight decay 0.01,
  clipping 0.3; the task adapter the same but on query, key and value for 3 epochs; the
  per-user examples of ``prompt.json``'s ``OPPU_input`` / ``OPPU_full`` pairs, every field
  cut to its first 768 words as their code cuts it.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Mapping

from LaMP.utils.errors import LampError
from LaMP.utils.tasks import MOVIE_INSTRUCTION, RATING_INSTRUCTION, Task, UserTemplate


class _Unset:
    """The default of a flag a recipe sets: tells "not given" from any value a user types."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset()

USER_STAGE = "user"  # train_user_peft.py: one adapter per user
TASK_STAGE = "task"  # train_llm.py: the task-level adapter


@dataclass(frozen=True)
class Recipe:
    name: str
    help: str
    # Per-user template by task name; None: each task's own (``Task.user_template``, the
    # LaMP authors'). A task missing from the mapping has none under this recipe.
    user_templates: Mapping[str, UserTemplate] | None
    # flag -> value, for each stage (USER_STAGE, TASK_STAGE).
    settings: Mapping[str, Mapping[str, object]]
    # Why a task has no per-user template under this recipe (for the error line).
    missing_templates: str = ""

    def user_template(self, task: Task) -> UserTemplate | None:
        if self.user_templates is None:
            return task.user_template
        return self.user_templates.get(task.name)


# The flags every row sets for every stage (a test holds the rows to it).
RECIPE_FLAGS = ("learning_rate", "num_train_epochs", "per_device_batch_size", "weight_decay",
                "warmup_ratio", "lr_scheduler_type", "max_grad_norm", "lora_r", "lora_alpha",
                "lora_dropout", "lora_target_modules")

# The query, key and value projections, as T5 (q, k, v) and Llama-family models (q_proj, …)
# name them: peft adapts the layers whose names end in any of these.
QKV_MODULES = ("q", "k", "v", "q_proj", "k_proj", "v_proj")

# OPPU cuts every field of a profile item to its first 768 words before the template.
OPPU_FIELD_WORDS = 768
# OPPU's news categorisation instruction lists the categories in its own order.
OPPU_NEWS_INSTRUCTION = (
    "Which category does this article relate to among the following categories? Just answer "
    "with the category name without further explanation. categories: [travel, education, "
    "parents, style & beauty, entertainment, food & drink, science & technology, business, "
    "sports, healthy living, women, politics, crime, culture & arts, religion]")


def _oppu(input: str, target: str, query: str) -> UserTemplate:
    return UserTemplate(input, target=target, query=query, field_words=OPPU_FIELD_WORDS)


_LAMP_USER = {"learning_rate": 5e-5, "num_train_epochs": 30, "per_device_batch_size": 16,
              "weight_decay": 1e-4, "warmup_ratio": 0.05, "lr_scheduler_type": "linear",
              "max_grad_norm": 1.0, "lora_r": 8, "lora_alpha": 32, "lora_dropout": 0.1,
              "lora_target_modules": None}  # None: peft's choice (q and v)
_OPPU_USER = {"learning_rate": 1e-4, "num_train_epochs": 2, "per_device_batch_size": 16,
              "weight_decay": 0.01, "warmup_ratio": 0.1, "lr_scheduler_type": "linear",
              "max_grad_norm": 0.3, "lora_r": 8, "lora_alpha": 8, "lora_dropout": 0.05,
              "lora_target_modules": None}  # peft's choice: q_proj and v_proj, as OPPU's

RECIPES: dict[str, Recipe] = {recipe.name: recipe for recipe in (
    Recipe("lamp", "the LaMP authors' per-user PEFT: each task's own per-user template, lr "
           "5e-5, 30 epochs, LoRA r 8 alpha 32 (train_llm.py: the published LaMP defaults)",
           None, {
               USER_STAGE: _LAMP_USER,
               TASK_STAGE: {**_LAMP_USER, "num_train_epochs": 10, "lora_r": 16,
                            "lora_dropout": 0.05},
           }),
    Recipe("oppu", "OPPU's released code: its per-user templates, lr 1e-4, 2 epochs, LoRA r 8 "
           "alpha 8 on q/v, warm-up 0.1, weight decay 0.01, clipping 0.3 (train_llm.py: its "
           "task adapter, the same on q/k/v for 3 epochs)",
           {
               "LaMP-2": _oppu(MOVIE_INSTRUCTION + "\n description: {description} tag:",
                               target="tag", query="description"),
               "LaMP-2N": _oppu(OPPU_NEWS_INSTRUCTION + "\n article: {text} category:",
                                target="category", query="text"),
               "LaMP-3": _oppu(RATING_INSTRUCTION + " review: {text}\n score:",
                               target="score", query="text"),
               "LaMP-4": _oppu("Generate a headline for the following article.\n article: "
                               "{text} headline:", target="title", query="text"),
               "LaMP-5": _oppu("Generate a title for the following abstract of a paper.\n "
                               "abstract: {abstract} title:", target="title", query="abstract"),
               # The whole tweet is the target: the user's adapter learns to write tweets.
               "LaMP-7": _oppu("tweet:", target="text", query="text"),
           }, {
               USER_STAGE: _OPPU_USER,
               TASK_STAGE: {**_OPPU_USER, "num_train_epochs": 3,
                            "lora_target_modules": list(QKV_MODULES)},
           },
           missing_templates="OPPU's LaMP-1 template writes a 'citation' field LaMP profile "
                             "items do not have, and OPPU has no LaMP-6"),
)}

DEFAULT_RECIPE = "lamp"  # the scripts' defaults: the LaMP authors' recipe


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise LampError(f"unknown recipe {name!r}; valid: {', '.join(RECIPES)}") from None


def add_recipe_argument(parser: argparse.ArgumentParser, stage: str) -> None:
    """``--recipe NAME``; the flags it sets default to ``UNSET`` until ``apply_recipe``."""
    described = "; ".join(f"{recipe.name}: {recipe.help}" for recipe in RECIPES.values())
    parser.add_argument("--recipe", choices=tuple(RECIPES), default=DEFAULT_RECIPE,
                        help=f"the defaults of {', '.join('--' + f for f in RECIPE_FLAGS)}"
                             + (" and the per-user templates" if stage == USER_STAGE else "")
                             + f"; a flag given overrides its value ({described})")
    parser.set_defaults(**{flag: UNSET for flag in RECIPES[DEFAULT_RECIPE].settings[stage]})


def apply_recipe(args: argparse.Namespace, stage: str) -> dict[str, object]:
    """Fill the flags left ``UNSET`` from ``args.recipe``'s row; returns those filled."""
    filled = {}
    for flag, value in get_recipe(args.recipe).settings[stage].items():
        if getattr(args, flag) is UNSET:
            filled[flag] = list(value) if isinstance(value, (list, tuple)) else value
            setattr(args, flag, filled[flag])
    return filled
