"""Answering every question with its own user's adapter (per-user PEFT serving).

A per-user training run leaves one standard peft folder per user under
``<root>/users/<user>/`` (``LaMP.utils.data.users``). Serving loads the base model once and the
users' adapters onto it in groups of at most ``max_loaded`` (released between groups, so
memory stays bounded however many users there are). Methods whose peft layers take
``adapter_names`` (plain LoRA and rsLoRA: the table's ``mixed_batches``) answer a group's
questions in batches that mix users, each row through its own user's adapter (and
``"__base__"`` for a user answered by the base model): stacked (``LaMP.utils.modeling.lora_stack``:
weights read into one tensor per layer, batched products) where the adapters allow it, else
through peft's ``adapter_names``; the others (DoRA, which peft refuses
to mix; IA3, whose layers would silently ignore the names; prompt learning, whose virtual
tokens are one per model call) are answered user by user. Users without an adapter are
either an error or, with ``missing="base"``, answered by the base model.

Before the model loads, every folder is checked to be its user's (its ``user.json`` names
the user), trained on the model served and on one task adapter (``user_records``), and to
hold exactly the weights its config makes on the model (``adapter_fit``): so whichever way
a batch is served, the same folders are taken, with the same meaning.
"""
from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from LaMP.utils.data.fileio import check_readable, read_json
from LaMP.utils.data.questions import as_id, iter_questions
from LaMP.utils.data.users import (USER_RECORD, USERS_FOLDER, USERS_INDEX, find_user_folder,
                                   read_user_record, user_adapter_dir, user_of)
from LaMP.utils.errors import LampError, preview
from LaMP.utils.modeling.checkpoints import ADAPTER_CONFIG, check_adapter_folder
from LaMP.utils.modeling.peft_methods import PEFT_METHODS, PeftMethod, method_of_adapter

logger = logging.getLogger(__name__)

# 64 LoRA r 8 adapters of SmolLM2-135M (q, v) take about 70 MB in fp32, of a 7B model about
# 1 GB in bf16: small beside the model, and enough users per group that a group fills many
# mixed batches (a larger group saves little: each batch runs one LoRA product per adapter
# it holds, not per adapter loaded).
MAX_LOADED_ADAPTERS = 64
BASE = "__base__"  # peft's name, in adapter_names, for rows the base model answers
MISSING_CHOICES = ("error", "base")


def question_users(path: str, task, limit: int | None = None) -> list[tuple[str, str]]:
    """(question id, user) of each question of ``path`` (its first ``limit``), in file order;
    a ``user_id`` that is neither a string nor an integer is one error line."""
    pairs = []
    questions = iter_questions(path, task)
    for index, question in enumerate(itertools.islice(questions, limit)):
        user_id = question.get("user_id")
        if user_id is not None and as_id(user_id) is None:
            raise LampError(f'{path}: question {index} (id {question["id"]}): "user_id" must '
                            f"be a string or an integer, not {user_id!r:.60}")
        pairs.append((question["id"], user_of(question)))
    return pairs


@dataclass(frozen=True)
class UserAdapters:
    """Which adapter answers each user: ``folders[user]`` is the user's peft folder, or
    ``None`` for a user answered by the base model. ``method``: the adapters' method (one
    for all, so that they load onto one model); ``None`` when no user has an adapter."""

    root: Path
    folders: Mapping[str, Path | None]
    method: PeftMethod | None
    virtual_tokens: int = 0  # the most virtual tokens an adapter puts ahead of a prompt
    task_type: str | None = None  # peft's SEQ_2_SEQ_LM or CAUSAL_LM, as the configs say
    # The task-level adapter the users' adapters were trained on top of (OPPU: shared +
    # personal), as the run's users.json records it; merged into the model before serving.
    base_adapter: str | None = None

    @property
    def adapter_folders(self) -> list[Path]:
        return [folder for folder in self.folders.values() if folder is not None]


def check_user_adapters_root(root: str | Path, flag: str = "--user_adapters") -> Path:
    """``root`` is a per-user training run's folder (it has ``users/``), or a one-line
    LampError; cheap, so callers check it before they load anything."""
    root = Path(root)
    if not _is_dir(root):
        try:
            os.stat(root)
        except OSError as error:
            if error.errno not in (errno.ENOENT, errno.ENOTDIR):
                check_readable(root, flag, folder=True)  # names why it cannot be looked at
        raise LampError(f"{flag} {root} is not a folder (train_user_peft.py's --output_dir, "
                        f"holding {USERS_FOLDER}/<user>/ adapter folders)")
    if not _is_dir(root / USERS_FOLDER):
        raise LampError(f"{flag} {root} has no {USERS_FOLDER}/ folder (a per-user training "
                        f"run keeps one adapter per user in {USERS_FOLDER}/<user>/)")
    return root


def _is_dir(path: str | Path) -> bool:
    try:
        return Path(path).is_dir()
    except OSError:  # a name too long: check_readable names it
        return False


def find_user_adapters(root: str | Path, users: Sequence[str], *, missing: str = "error",
                       flag: str = "--user_adapters", model: str | None = None,
                       fit=None) -> UserAdapters:
    """Each of ``users``' adapter folder under ``root``, checked as ``--adapter`` is (config
    and weights loadable, without loading them), and checked to be that user's: its
    ``user.json`` must name the user. A user without a folder is an error naming the user
    and the folder expected, unless ``missing="base"``. All adapters must be of one peft
    method and task type (they are loaded onto one model) and trained on top of one task
    adapter (``trained_on_of``), and, with ``model`` (the ``--model_addr`` to serve them
    on), on that base model. With ``fit`` (an ``adapter_fit.AdapterFit`` of that model),
    each folder's weights must be those its config makes on it: every way of serving then
    accepts and refuses the same folders."""
    root = check_user_adapters_root(root, flag)
    if missing not in MISSING_CHOICES:
        raise LampError(f"unknown missing-adapter policy {missing!r}; valid: "
                        f"{', '.join(MISSING_CHOICES)}")
    folders: dict[str, Path | None] = {}
    records: dict[str, dict] = {}
    absent = []
    for user in dict.fromkeys(users):
        folder = find_user_folder(root, user)
        if folder is None:
            folders[user] = None
            absent.append(user)
            continue
        label = f"{flag} (user {user!r}) {folder}"
        check_adapter_folder(str(folder), flag=f"{flag} (user {user!r})")
        record = read_user_record(folder)
        if record is None:
            raise LampError(f"{label}: no valid {USER_RECORD} (train_user_peft.py names each "
                            "folder's user there; a folder without it is not served)")
        if record["user"] != user:
            raise LampError(f"{label}: its {USER_RECORD} names user {record['user']!r}: "
                            "another user's adapter is not served for this one")
        folders[user], records[user] = folder, record
    if absent and missing == "error":
        first = absent[0]
        raise LampError(f"{flag} {root}: no adapter for user {first!r} (expected "
                        f"{user_adapter_dir(root, first)}/); users without one: "
                        f"{preview(absent)} of {len(folders)}; train them first or pass "
                        "--missing_user_adapter base to answer them with the base model")
    if absent:
        logger.warning("users without an adapter under %s, answered by the base model: %s "
                       "of %d", root, preview(absent), len(folders))
    method, virtual, task_type = _one_method(root, folders, flag)
    if fit is not None:
        check_task_type(task_type, fit.seq2seq, root)
        for user, folder in folders.items():
            if folder is not None:
                fit.check(folder, f"user {user!r}'s adapter {folder}")
    index = _run_index(root, flag)
    base_model, base_adapter = trained_on_of(records, index, root, flag, folders)
    if model is not None:
        _check_base_model(model, base_model, flag)
    return UserAdapters(root=root, folders=folders, method=method, virtual_tokens=virtual,
                        task_type=task_type, base_adapter=base_adapter)


def _run_index(root: Path, flag: str) -> dict | None:
    """``users.json`` of the run, or ``None`` where there is none."""
    if not (root / USERS_INDEX).exists():
        return None
    index = read_json(root / USERS_INDEX, "per-user index")
    if not isinstance(index, dict):
        raise LampError(f"{flag} {root}: {USERS_INDEX} is not a JSON object")
    return index


def trained_on_of(records: Mapping[str, Mapping], index: Mapping | None, root: Path,
                  flag: str = "--user_adapters",
                  folders: Mapping[str, Path | None] | None = None
                  ) -> tuple[dict[str, dict], str | None]:
    """(base model by user, the task adapter folder to merge or ``None``) the users'
    adapters were trained on top of, from each one's ``user.json``; a record without these
    fields takes the run's ``users.json``, and for the base model then the adapter's own
    ``base_model_name_or_path`` (in ``folders[user]``). The users must agree on one task
    adapter, and so must ``users.json`` where it names one; the task adapter must be the
    one they were trained on (its digest, where recorded). Each disagreement is one error
    line."""
    from LaMP.utils.modeling.user_records import adapter_identity, local_or_name, valid_identity

    models: dict[str, dict] = {}
    adapters: dict[str, dict | None] = {}
    for user, record in records.items():
        label = f"{flag} (user {user!r}) {USER_RECORD}"
        if "base_model" in record:
            if not valid_identity(record["base_model"], ("name", "sha256")):
                raise LampError(f"{label}: \"base_model\" is not a recorded model "
                                f"({record['base_model']!r:.80})")
            models[user] = record["base_model"]
        elif index is not None and isinstance(index.get("model_name"), str):
            models[user] = {"name": index["model_name"], "sha256": None}
        elif folders is not None and folders.get(user) is not None:
            named = read_json(folders[user] / ADAPTER_CONFIG).get("base_model_name_or_path")
            if isinstance(named, str) and named:
                models[user] = {"name": local_or_name(named), "sha256": None}
        if "base_adapter" in record:
            if not (record["base_adapter"] is None
                    or valid_identity(record["base_adapter"], ("path", "sha256"))):
                raise LampError(f"{label}: \"base_adapter\" is not a recorded adapter "
                                f"({record['base_adapter']!r:.80})")
            adapters[user] = record["base_adapter"]
        elif index is not None:
            adapters[user] = _index_adapter(index, root, flag)
        else:
            raise LampError(f"{label} does not record the task adapter it was trained on top "
                            f"of (\"base_adapter\"), and {root} has no {USERS_INDEX} to say; "
                            "train the user again")
    if not adapters:  # nobody has an adapter: the run's index alone says
        adapter = _index_adapter(index, root, flag) if index is not None else None
        return models, adapter["path"] if adapter else None
    by_path: dict[str, str] = {}  # each path and digest with the first user naming it
    digests: dict[str, str] = {}
    for user, adapter in adapters.items():
        by_path.setdefault(_adapter_name(adapter), user)
        if adapter and adapter.get("sha256"):
            digests.setdefault(adapter["sha256"], user)
    if len(by_path) > 1 or len(digests) > 1:
        if len(by_path) > 1:
            shown = "; ".join(f"{path} for user {user!r}"
                              for path, user in list(by_path.items())[:2])
        else:
            first, second = list(digests.values())[:2]
            shown = f"{next(iter(by_path))} with other files for {first!r} than for {second!r}"
        raise LampError(f"{flag} {root}: the users were trained on top of different task "
                        f"adapters ({shown}); serve one run's users at a time")
    user = next(iter(digests.values()), next(iter(adapters)))
    adapter = adapters[user]
    if index is not None and "base_adapter" in index:
        named = _index_adapter(index, root, flag)
        if _adapter_name(named) != _adapter_name(adapter):
            raise LampError(f"{flag} {root}: {USERS_INDEX} names task adapter "
                            f"{_adapter_name(named)}, user {user!r}'s {USER_RECORD} "
                            f"{_adapter_name(adapter)}")
    if adapter is None:
        return models, None
    what = f"{flag} (the base adapter its users were trained on)"
    check_adapter_folder(adapter["path"], flag=what)
    if adapter.get("sha256") and adapter_identity(adapter["path"])["sha256"] != adapter["sha256"]:
        raise LampError(f"{what} {adapter['path']}: its files differ from those user {user!r} "
                        f"was trained on top of (another sha256 than its {USER_RECORD} "
                        "records)")
    return models, adapter["path"]


def _adapter_name(adapter: Mapping | None) -> str:
    return "none" if adapter is None else str(adapter["path"])


def _index_adapter(index: Mapping, root: Path, flag: str) -> dict | None:
    """The task adapter ``users.json`` names, as a record's (no digest), or ``None``."""
    base = index.get("base_adapter")
    if base is not None and not isinstance(base, str):
        raise LampError(f"{flag} {root}: {USERS_INDEX} names no usable base adapter ({base!r})")
    return None if base is None else {"path": base, "sha256": None}


def _check_base_model(model: str, trained_on: Mapping[str, Mapping], flag: str) -> None:
    """One error line naming the users whose adapter was trained on another base model than
    ``model`` (``user_records.same_model``); the served model's digest is read only when a
    record has one to compare with."""
    from LaMP.utils.modeling.user_records import local_or_name, model_identity, same_model

    if not trained_on:
        return
    served = {"name": local_or_name(model), "sha256": None}
    if any(recorded.get("sha256") for recorded in trained_on.values()):
        served = model_identity(model)
    other = [user for user, recorded in trained_on.items() if not same_model(recorded, served)]
    if other:
        recorded = trained_on[other[0]]
        how = "other weights" if recorded.get("sha256") and served["sha256"] else "another name"
        raise LampError(f"{flag}: user {other[0]!r}'s adapter was trained on base model "
                        f"{recorded['name']}, not on --model_addr {model} ({how}); users "
                        f"trained on another model: {preview(map(repr, other))} of "
                        f"{len(trained_on)}")


def _one_method(root: Path, folders: Mapping[str, Path | None], flag: str
                ) -> tuple[PeftMethod | None, int, str | None]:
    """The adapters' common method, their most virtual tokens and their task type; adapters
    of two methods (or task types) are one error line naming a user of each."""
    kinds: dict[tuple, str] = {}
    virtual = 0
    for user, folder in folders.items():
        if folder is None:
            continue
        config = read_json(folder / ADAPTER_CONFIG)
        # A LoRA config the table does not tell apart counts as LoRA, as resume checks do.
        name = method_of_adapter(config) or ("lora" if config.get("peft_type") == "LORA"
                                             else str(config.get("peft_type")))
        kinds.setdefault((name, config.get("task_type")), user)
        virtual = max(virtual, int(config.get("num_virtual_tokens") or 0))
    if len(kinds) > 1:
        shown = "; ".join(f"{name} ({task_type or 'no task type'}) for user {user!r}"
                          for (name, task_type), user in kinds.items())
        raise LampError(f"{flag} {root}: the adapters are of different kinds ({shown}); "
                        "serve one kind per run")
    if not kinds:
        return None, 0, None
    (name, task_type), user = next(iter(kinds.items()))
    if name not in PEFT_METHODS:
        raise LampError(f"{flag} {root}: user {user!r}'s adapter is {name}, not a method of "
                        f"the table ({', '.join(m for m in PEFT_METHODS if m != 'none')})")
    return PEFT_METHODS[name], virtual, task_type


def check_task_type(task_type: str | None, seq2seq: bool, root: Path) -> None:
    """One error line unless adapters of ``task_type`` (peft's) suit a seq2seq (or causal)
    model: peft would wrap the model in the other kind's class and fail mid-generation."""
    wanted = "SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM"
    if task_type not in (None, wanted):
        raise LampError(f"the adapters under {root} are for {task_type} models; this model "
                        f"is {'seq2seq' if seq2seq else 'causal'} ({wanted})")


def users_together(users: Sequence[str]) -> list[int]:
    """Indices of ``users`` with each user's questions side by side, users in order of first
    appearance (stable): contiguous slices of it give each launched process whole users,
    so that it loads only its own users' adapters."""
    first = {user: index for index, user in reversed(list(enumerate(users)))}
    return sorted(range(len(users)), key=lambda i: first[users[i]])


def predict_per_user(lamp_model, task, examples: Sequence, users: Sequence[str],
                     adapters: UserAdapters, *, max_loaded: int = MAX_LOADED_ADAPTERS,
                     label_scoring: bool = False, progress: bool = True,
                     stacked: bool = True, **settings) -> list[str]:
    """One output per example, each from its user's adapter (``users[i]`` is example i's
    user). ``lamp_model`` holds the base model without an adapter; the users' adapters are
    put onto it (and taken off again) here. ``stacked``: mixed batches of LoRA adapters go
    through ``LoraStack`` (their weights stacked per layer, two batched products per layer)
    where the adapters allow it, else through peft's own mixed batches. ``settings``:
    ``predict``'s keyword arguments."""
    from LaMP.utils.modeling.answering import predict

    if len(users) != len(examples):
        raise ValueError("one user per example expected")
    check_task_type(adapters.task_type, lamp_model.is_seq2seq, adapters.root)
    outputs: list[str] = [""] * len(examples)
    rows: dict[str, list[int]] = {}
    for index, user in enumerate(users):
        rows.setdefault(user, []).append(index)
    with_adapter = [user for user in rows if adapters.folders.get(user) is not None]
    on_base = [user for user in rows if adapters.folders.get(user) is None]
    mixed = adapters.method is not None and adapters.method.mixed_batches

    def answer(model, indices: list[int], names: list[str] | None = None) -> None:
        texts = predict(model, task, [examples[i] for i in indices],
                        label_scoring=label_scoring, progress=progress,
                        adapter_names=names, **settings)
        for i, text in zip(indices, texts):
            outputs[i] = text

    base_rows = [i for user in on_base for i in rows[user]]
    if base_rows and not (mixed and with_adapter):
        # Before any adapter is on the model: the base model as it was loaded.
        answer(lamp_model, base_rows)
        base_rows = []
    if not with_adapter:
        return outputs
    groups = [with_adapter[i:i + max_loaded] for i in range(0, len(with_adapter), max_loaded)]
    use_stack = mixed and stacked and _stackable(adapters)
    pool = None
    for number, group in enumerate(groups, 1):
        logger.info("adapter group %d of %d: %d user(s)", number, len(groups), len(group))
        indices = [i for user in group for i in rows[user]]
        if use_stack:
            stack = _stack_of(lamp_model, adapters, group, number)
            if stack is not None:
                names, stack = stack
                with _stacked(lamp_model.model, stack):
                    # The base model's rows ride along in the first group's batches.
                    answer(lamp_model, indices + base_rows,
                           [names[users[i]] for i in indices] + [BASE] * len(base_rows))
                base_rows = []
                continue
            use_stack = False  # this group and the rest through peft
        pool = pool or _AdapterPool(lamp_model, adapters)
        names = pool.load(group)
        served = pool.lamp_model
        if mixed:
            answer(served, indices + base_rows,
                   [names[users[i]] for i in indices] + [BASE] * len(base_rows))
            base_rows = []
        else:
            for user in group:
                pool.activate(names[user])
                answer(served, rows[user])
    if pool is not None:
        pool.unload()
    return outputs


def _stackable(adapters: UserAdapters) -> bool:
    """Whether the users' adapters can go through ``LoraStack`` at all (logged if not)."""
    from LaMP.utils.modeling.lora_stack import LoraStack

    why_not = LoraStack.unsupported(adapters.adapter_folders)
    if why_not is not None:
        logger.info("mixed batches through peft (the adapters cannot be stacked: %s)", why_not)
    return why_not is None


def _stack_of(lamp_model, adapters: UserAdapters, group: Sequence[str], number: int):
    """``(names, stack)``: the group's adapters stacked on the model under names ``u<N>``,
    or None (logged) where this group cannot be stacked."""
    from LaMP.utils.modeling.lora_stack import LoraStack, NotStackable

    names = {user: f"u{n}" for n, user in enumerate(group)}
    try:
        stack = LoraStack(lamp_model.model,
                          {names[user]: adapters.folders[user] for user in group},
                          {names[user]: f"user {user!r}'s adapter {adapters.folders[user]}"
                           for user in group})
    except NotStackable as why:
        logger.info("mixed batches through peft from group %d on (%s)", number, why)
        return None
    return names, stack


class _AdapterPool:
    """The users' adapters on one peft model, a group at a time. Adapter names are ``u<N>``
    (a user id may hold characters peft module names cannot)."""

    def __init__(self, lamp_model, adapters: UserAdapters):
        self.base = lamp_model
        self.adapters = adapters
        self.peft_model = None
        self.loaded: dict[str, str] = {}  # user -> adapter name
        self.counter = itertools.count()

    @property
    def lamp_model(self):
        return replace(self.base, model=self.peft_model)

    def load(self, users: Sequence[str]) -> dict[str, str]:
        """Make exactly ``users``' adapters the loaded ones; returns user -> adapter name."""
        for user in [user for user in self.loaded if user not in users]:
            self._delete(self.loaded.pop(user))
        for user in users:
            if user not in self.loaded:
                self.loaded[user] = self._load_one(user)
        # peft builds new adapter layers in training mode (dropout on); once per group.
        self.peft_model.eval()
        self.activate(self.loaded[users[0]])
        return dict(self.loaded)

    def activate(self, name: str) -> None:
        # After a delete, peft's active adapter may be one no longer loaded.
        self.peft_model.set_adapter(name)

    def unload(self) -> None:
        for name in self.loaded.values():
            self._delete(name)
        self.loaded.clear()

    def _delete(self, name: str) -> None:
        with warnings.catch_warnings():
            # peft names the adapter it activates instead of a deleted active one; the next
            # group's first adapter is activated right after (``load``).
            warnings.filterwarnings("ignore", message=".* was active which is now deleted")
            self.peft_model.delete_adapter(name)

    def _load_one(self, user: str) -> str:
        from peft import PeftModel

        folder = str(self.adapters.folders[user])
        name = f"u{next(self.counter)}"
        options = dict(adapter_name=name, torch_device=str(self.base.device),
                       local_files_only=True)
        try:
            if self.peft_model is None:
                self.peft_model = PeftModel.from_pretrained(self.base.model, folder, **options)
            else:
                self.peft_model.load_adapter(folder, **options)
        except (OSError, ValueError, RuntimeError) as error:  # RuntimeError: shape mismatch
            raise LampError(f"cannot load user {user!r}'s adapter {folder}: "
                            f"{str(error).splitlines()[0]}") from None
        except (KeyError, TypeError) as error:  # as load_model: a config peft cannot use
            raise LampError(f"cannot load user {user!r}'s adapter {folder}: its "
                            f"{ADAPTER_CONFIG} does not suit peft ({type(error).__name__}: "
                            f"{str(error).splitlines()[0] if str(error) else ''})") from None
        return name


_STACK_ATTRIBUTE = "lamp_lora_stack"  # set on a base model while a LoraStack serves it


@contextlib.contextmanager
def _stacked(model, stack) -> Iterator[None]:
    setattr(model, _STACK_ATTRIBUTE, stack)
    try:
        yield
    finally:
        delattr(model, _STACK_ATTRIBUTE)


@contextlib.contextmanager
def rows_through(model, names: Sequence[str] | None, num_beams: int = 1) -> Iterator[None]:
    """Inside, row i of every forward pass of ``model`` (a peft model) goes through adapter
    ``names[i]``; with ``num_beams``, generation's beams of prompt i too (an encoder still
    reads one row per prompt). peft's own ``forward``/``generate`` take ``adapter_names``
    for this, but ``generate`` sees the beam count only as its own argument (not in a
    generation config), and label scoring runs the encoder alone and continues a cache,
    which go around ``forward``: so peft's hooks are put in here, around the whole call.
    ``None``: a no-op."""
    if names is None:
        yield
        return
    stack = getattr(model, _STACK_ATTRIBUTE, None)
    if stack is not None:  # a LoraStack lays out beams and label rows itself
        with stack.rows(names, BASE):
            yield
        return
    with model._enable_peft_forward_hooks(adapter_names=list(names), num_beams=num_beams):
        yield
