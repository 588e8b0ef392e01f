"""Per-user PEFT: one small adapter per user, trained on that user's profile alone.

The pieces ``train_user_peft.py`` runs, each usable on its own (a benchmark or the serving side
calls them too):

- **Users.** ``scan_users`` reads a questions file once and returns its users, sorted
  (``LaMP.utils.data.users.user_of``: the ``user_id`` of the time split, else the question's own
  id); ``shard_users`` gives a process its share (every ``num_shards``-th user in that sorted
  order, so shards are balanced and partition the users whatever the file order);
  ``collect_profiles`` reads the file again and keeps the profile items of the users asked
  for (a time-split user's questions each carry a profile: the items are joined by id).
- **Examples.** ``user_examples`` turns a user's items into training examples through a
  per-user template (a recipe's, ``LaMP.utils.modeling.recipes``; by default the task's
  own, ``Task.user_template``); with retrieval, each example's prompt
  carries the k items of the *same user's* other items that the ranker finds for it, built
  by the one prompt builder.
- **Training.** ``UserAdapterTrainer`` holds the base model (loaded once) inside a peft
  wrapper; for each user it adds a freshly initialised adapter in place of the previous
  user's (which is deleted), trains it with a plain AdamW loop (each step's gradient
  clipped, as the Hugging Face Trainer clips it) and saves it as a standard
  peft folder, so that nothing of one user reaches the next (no deep copy of the model
  either). Initialisation, dropout and shuffling
  are seeded from ``--seed`` and the user id alone: a user's adapter is the same whichever
  other users a process trained before it, and whatever the sharding.
- **On disk**: the user folders and ``users.json``, in ``LaMP.utils.modeling.user_store``.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from LaMP.utils.data.fileio import atomic_folder, atomic_write_json
from LaMP.utils.data.questions import iter_questions
from LaMP.utils.data.users import USER_RECORD, user_adapter_dir, user_of
from LaMP.utils.errors import LampError, preview
from LaMP.utils.modeling.examples import Example
from LaMP.utils.modeling.user_store import folder_bytes, replace_incomplete
from LaMP.utils.tasks import Task, UserTemplate

logger = logging.getLogger(__name__)

ADAPTER_NAME = "user"  # the peft adapter name while a user trains (never saved: folders are standard)


# -- users and their items -----------------------------------------------------------------

def scan_users(path: str | os.PathLike, task: Task) -> list[str]:
    """The users of a questions file, sorted; every question is validated on the way (so a
    data mistake is reported before a model loads). Questions name their user all or none
    (a file of both splits would give question ids and user ids one namespace), a user id
    is a string or an integer, and question ids are distinct (``7`` and ``"7"`` are one)."""
    from collections import Counter

    from LaMP.utils.data.questions import as_id

    users: set[str] = set()
    ids: Counter = Counter()
    with_user = without_user = None
    for question in iter_questions(path, task):
        ids[question["id"]] += 1
        if question.get("user_id") is None:
            without_user = without_user or question["id"]
        else:
            with_user = with_user or question["id"]
            if as_id(question["user_id"]) is None:
                raise LampError(f"{path}: question {question['id']}: \"user_id\" must be a "
                                f"string or an integer, not {question['user_id']!r:.60}")
        if with_user is not None and without_user is not None:
            raise LampError(f"{path}: some questions name their user_id and some do not (e.g. "
                            f"{with_user} does, {without_user} does not); use one split's file")
        users.add(user_of(question))
    if not users:
        raise LampError(f"{path}: no questions")
    repeated = sorted(qid for qid, count in ids.items() if count > 1)
    if repeated:
        raise LampError(f"{path}: duplicate question ids: {preview(repeated)}")
    return sorted(users)


def shard_users(users: Sequence[str], shard_id: int, num_shards: int) -> list[str]:
    """Shard ``shard_id``'s users: every ``num_shards``-th of the sorted users. The shards
    are disjoint, together hold every user and differ in size by at most one."""
    if not 0 <= shard_id < num_shards:
        raise LampError(f"shard id {shard_id} is not in 0 … {num_shards - 1}")
    return sorted(users)[shard_id::num_shards]


def collect_profiles(path: str | os.PathLike, task: Task, wanted: Iterable[str]
                     ) -> dict[str, list[dict]]:
    """The profile items of each ``wanted`` user, by item id in first-seen order: a user of
    the time split has several questions whose profiles overlap."""
    wanted = set(wanted)
    profiles: dict[str, dict[str, dict]] = {user: {} for user in wanted}
    for question in iter_questions(path, task):
        user = user_of(question)
        if user in profiles:
            items = profiles[user]
            for item in question["profile"]:
                items.setdefault(item["id"], item)
    return {user: list(items.values()) for user, items in profiles.items()}


def derived_seed(seed: int, *keys: str) -> int:
    """A 63-bit seed from ``seed`` and ``keys`` (a user id, an item id): the same on every
    machine and in every process, unlike Python's salted ``hash``."""
    digest = hashlib.blake2b("\x00".join((str(seed), *keys)).encode("utf-8", "surrogatepass"),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def template_of(task: Task) -> UserTemplate:
    if task.user_template is None:
        raise LampError(f"{task.name} has no per-user training template")
    return task.user_template


def item_examples(task: Task, user: str, items: Sequence[Mapping], seed: int,
                  template: UserTemplate | None = None
                  ) -> list[tuple[Mapping, tuple[str, str, str]]]:
    """Each usable item with its ``(input, target, query)`` through ``template`` (default:
    the task's own); a template's random choice (the shown share of a LaMP-7 tweet) is
    seeded by ``seed``, the user and the item id."""
    template = template or template_of(task)
    made = []
    for item in items:
        rng = (random.Random(derived_seed(seed, user, str(item["id"])))
               if template.split is not None else None)
        example = template.example(item, rng)
        if example is not None:
            made.append((item, example))
    return made


def check_users_have_items(task: Task, profiles: Mapping[str, Sequence[Mapping]], seed: int,
                           path: str | os.PathLike, template: UserTemplate | None = None
                           ) -> None:
    """One error naming the users whose profile gives no training example."""

    empty = sorted(user for user, items in profiles.items()
                   if not item_examples(task, user, items, seed, template))
    if empty:
        raise LampError(f"{path}: users with no profile item a {task.name} per-user "
                        f"example can be made from: {preview(empty)}")


def retrieval_task(task: Task) -> Task:
    """``task`` as the ranker of per-user examples sees it: a question's input is its query
    already (the template's query field), not an input to find the query in."""
    from dataclasses import replace

    return replace(task, query_fn=_as_query)


def _as_query(text: str) -> str:
    return text


def user_examples(task: Task, user: str, items: Sequence[Mapping], *, seed: int,
                  prompt_fn: Callable[[str, Sequence[Mapping]], str], ranker=None,
                  num_retrieved: int = 0, template: UserTemplate | None = None
                  ) -> list[Example]:
    """The training examples of one user: each usable profile item through ``template``
    (default: the task's per-user template). With ``ranker`` (built for
    ``retrieval_task(task)``) and ``num_retrieved`` k > 0, each prompt also carries the best
    k of the user's *other* items for that item's query (never the item itself)."""
    made = item_examples(task, user, items, seed, template)
    retrieved: list[list[Mapping]] = [[] for _ in made]
    if ranker is not None and num_retrieved > 0:
        from LaMP.utils.retrieval.rankings import order_profile

        # Each item is a question whose input is its query, searched among the other items.
        questions = [{"id": f"{user}/{item['id']}", "input": query,
                      "profile": [other for other in items if other is not item]}
                     for item, (_, _, query) in made]
        for position, (question, ranked) in enumerate(ranker.rank(questions)):
            retrieved[position] = order_profile(question["profile"], ranked,
                                                question["id"])[:num_retrieved]
    return [Example(id=str(item["id"]), prompt=prompt_fn(text, others), target=target)
            for (item, (text, target, _)), others in zip(made, retrieved)]


# -- training ------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainSettings:
    """How each user's adapter trains (the script's flags)."""

    learning_rate: float
    weight_decay: float
    num_train_epochs: float
    max_steps: int  # -1: train num_train_epochs
    batch_size: int
    warmup_ratio: float
    lr_scheduler_type: str
    max_length: int
    target_max_length: int
    max_grad_norm: float = 0.0  # the total gradient norm each step is clipped to; 0: none
    bf16: bool = False  # forward passes under bf16 autocast (the parameters stay fp32)

    def scheduler(self, optimizer, total_steps: int):
        from transformers import get_scheduler

        return get_scheduler(self.lr_scheduler_type, optimizer,
                             num_warmup_steps=int(self.warmup_ratio * total_steps),
                             num_training_steps=total_steps)

    def check_schedule(self) -> None:
        """One error line for a --lr_scheduler_type transformers does not know or cannot
        build from a warm-up and a step count alone, before any model loads."""
        import torch

        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        try:
            schedule = self.scheduler(optimizer, 10)
            optimizer.step()
            schedule.step()  # one that needs a metric (reduce_lr_on_plateau) fails here
        except (ValueError, TypeError, KeyError) as error:
            raise LampError(f"--lr_scheduler_type {self.lr_scheduler_type}: "
                            f"{str(error).splitlines()[0] if str(error) else type(error).__name__}"
                            ) from None

    def total_steps(self, n_examples: int) -> int:
        if self.max_steps > 0:
            return self.max_steps
        return max(1, math.ceil(self.num_train_epochs * math.ceil(n_examples / self.batch_size)))


def fit_parameters(lamp_model, parameters: list, features: Sequence[dict],
                   settings: TrainSettings, seed: int) -> tuple[int, float | None]:
    """A plain AdamW loop over ``features`` stepping ``parameters`` (the rest of the model
    fixed), with a seeded shuffle per epoch, each step's gradient clipped to
    ``max_grad_norm`` as the Hugging Face Trainer clips it; returns the steps taken and the
    mean loss of the last epoch's steps."""
    import torch

    from LaMP.utils.modeling.training import PaddingCollator

    model = lamp_model.model
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate,
                                  weight_decay=settings.weight_decay)
    total = settings.total_steps(len(features))
    scheduler = settings.scheduler(optimizer, total)
    collate = PaddingCollator(lamp_model.tokenizer.pad_token_id)
    generator = torch.Generator().manual_seed(seed)
    device = lamp_model.device
    batches_per_epoch = math.ceil(len(features) / settings.batch_size)
    recent: list[float] = []
    model.train()
    order: list[int] = []
    for step in range(total):
        position = step % batches_per_epoch
        if position == 0:
            order = torch.randperm(len(features), generator=generator).tolist()
            recent = []
        rows = order[position * settings.batch_size:(position + 1) * settings.batch_size]
        batch = {key: value.to(device)
                 for key, value in collate([features[row] for row in rows]).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16):
            loss = model(**batch).loss
        loss.backward()
        if settings.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        recent.append(float(loss.detach()))
    model.eval()
    return total, (sum(recent) / len(recent) if recent else None)


class UserAdapterTrainer:
    """Trains one fresh adapter per user on one loaded model, saving each as a peft folder.

    ``lamp_model.model`` is the peft-wrapped base (``training.add_peft``); ``make_config()``
    returns a new peft config for each user's adapter (peft fills a config in when it builds
    an adapter, so one object cannot serve twice). A user's adapter is added beside the
    previous user's, made the active one, and the previous one is deleted before anything
    trains: peft cannot add a prefix-tuning adapter to a model left without any.
    """

    def __init__(self, lamp_model, make_config: Callable[[], object], settings: TrainSettings,
                 *, seed: int, save_dtype: str = "fp32"):
        self.lamp_model = lamp_model
        self.model = lamp_model.model
        self.make_config = make_config
        self.settings = settings
        self.seed = seed
        self.save_dtype = save_dtype
        self.adapters_made = 0
        self._current = self.model.active_adapter  # the one add_peft made

    # one user, start to end
    def train_user(self, user: str, examples: Sequence[Example], output_dir: str | os.PathLike,
                   extra: Mapping | None = None) -> dict:
        """Train ``user``'s adapter on ``examples`` and save it; returns its record."""
        from LaMP.utils.modeling.training import training_features

        started = time.perf_counter()
        seed = derived_seed(self.seed, user)
        self.fresh_adapter(seed)
        features = training_features(self.lamp_model, examples,
                                     max_length=self.settings.max_length,
                                     target_max_length=self.settings.target_max_length)
        steps, final_loss = self.fit(features, seed)
        folder = user_adapter_dir(output_dir, user)
        replace_incomplete(folder, user)
        with atomic_folder(folder) as temporary:
            self.save_adapter(temporary)
            record = {"user": user, "items": len(examples), "steps": steps,
                      "final_loss": final_loss, "seed": seed, **(extra or {}),
                      "bytes": folder_bytes(temporary),
                      "seconds": round(time.perf_counter() - started, 3)}
            atomic_write_json(temporary / USER_RECORD, record, indent=1)
        return record

    def fresh_adapter(self, seed: int) -> None:
        """Replace the model's adapter by a new one initialised from ``seed`` alone."""
        import torch

        self.adapters_made += 1
        name = f"{ADAPTER_NAME}{self.adapters_made % 2}"  # never the name still in use
        torch.manual_seed(seed)
        self.model.add_adapter(name, self.make_config())
        self.model.set_adapter(name)
        previous, self._current = self._current, name
        self.model.delete_adapter(previous)
        # Re-seeded after the set-up: the draws of training (dropout) must not depend on
        # what creating this adapter or deleting the last one drew.
        torch.manual_seed(seed)

    def trainable_parameters(self) -> list:
        return [parameter for parameter in self.model.parameters() if parameter.requires_grad]

    def fit(self, features: Sequence[dict], seed: int) -> tuple[int, float | None]:
        """``fit_parameters`` of the current adapter's trainable parameters."""
        return fit_parameters(self.lamp_model, self.trainable_parameters(), features,
                              self.settings, seed)

    def save_adapter(self, folder: Path) -> None:
        """The current adapter as a standard peft folder (adapter_config.json and
        adapter_model.safetensors), its weights in ``save_dtype``."""
        import torch
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        from LaMP.utils.modeling.user_records import local_or_name

        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[self.save_dtype]
        state = get_peft_model_state_dict(self.model, adapter_name=self._current)
        state = {key: (value.detach().to(dtype) if value.is_floating_point() else value.detach())
                 .contiguous().cpu() for key, value in state.items()}
        save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = self.model.peft_config[self._current].to_dict()
        config["inference_mode"] = True  # as peft saves it: loaded for inference by default
        # The model the adapter belongs to, as get_peft_model records it (add_adapter does not).
        # A local folder as an absolute path: serving may run from another folder.
        config["base_model_name_or_path"] = local_or_name(
            getattr(self.model.get_base_model(), "name_or_path", None))
        # Sets sorted (peft writes them in hash order, which differs between processes): the
        # same adapter is the same bytes in every run.
        config = {key: sorted(value) if isinstance(value, set) else value
                  for key, value in sorted(config.items())}
        atomic_write_json(folder / "adapter_config.json", config, indent=2)
