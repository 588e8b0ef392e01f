"""The on-disk store of a per-user training run: one folder per user and the run's index.

``output_dir``::

    users/<folder>/adapter_config.json       the standard peft folder of one user
    users/<folder>/adapter_model.safetensors  (loads with PeftModel.from_pretrained)
    users/<folder>/user.json                  that user's record (written with the adapter):
                                              its user, what it was trained on top of
                                              (``LaMP.utils.modeling.user_records``), …
    users.json                                the index of every complete user folder
    args.json                                 the run's flags

``<folder>`` is ``LaMP.utils.data.users.user_folder_name(user)``. A user folder appears whole
or not at all (written into a temporary beside it and renamed), so a user whose folder
exists is done; ``users.json`` is rebuilt from the folders (under a lock), never edited,
so concurrent shards cannot lose each other's users. A folder's ``user.json``, not its
name, says whose it is: a folder in one user's place holding another's is never replaced.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from LaMP.utils.data.fileio import atomic_write_json, read_json
from LaMP.utils.data.users import (USER_RECORD, USERS_FOLDER, USERS_INDEX, find_user_folder,
                                   read_user_record, user_adapter_dir, user_folder_candidates,
                                   user_folder_name)
from LaMP.utils.errors import LampError, preview
from LaMP.utils.modeling.checkpoints import adapter_folder_problem

logger = logging.getLogger(__name__)

INDEX_LOCK = ".users.json.lock"  # beside users.json: serialises its rebuilds


def check_user_ids(users: Iterable[str]) -> None:
    """One error line for the first user id no folder can be named after (too long), so that
    every shard refuses the same data before a model loads."""
    for user in users:
        user_folder_name(user)


def user_folder_problem(folder: Path, user: str) -> str | None:
    """Why ``folder`` is not ``user``'s complete adapter folder, or ``None``."""
    if not folder.is_dir():
        return "missing"
    problem = adapter_folder_problem(folder)
    if problem:
        return problem
    record = read_user_record(folder)
    if record is None:
        return f"no valid {USER_RECORD}"
    if record.get("user") != user:
        return f"{USER_RECORD} names user {record.get('user')!r}"
    return None


def other_users_record(folder: Path, user: str) -> str | None:
    """The user ``folder``'s ``user.json`` names when that is not ``user``, else ``None``."""
    record = read_user_record(folder) if folder.is_dir() else None
    return record["user"] if record is not None and record["user"] != user else None


def pending_users(output_dir: str | os.PathLike, users: Iterable[str],
                  trained_on: Mapping | None = None) -> list[str]:
    """The users without a complete adapter folder; an incomplete folder (not one this code
    writes: a copy cut short, a file damaged since) is logged and will be replaced. A folder
    in a user's place that holds another user's adapter is never replaced: one error line,
    as is a done user trained on another base model or task adapter than ``trained_on``
    (this run's ``base_model`` and ``base_adapter``)."""
    pending, foreign, other_base = [], [], []
    for user in users:
        folder = find_user_folder(output_dir, user)
        if folder is None:
            pending.append(user)
            continue
        other = other_users_record(folder, user)
        if other is not None:
            foreign.append((user, folder, other))
            continue
        problem = user_folder_problem(folder, user)
        if problem is None:
            if trained_on is not None and not trained_alike(read_user_record(folder), trained_on):
                other_base.append((user, folder))
            continue
        if problem != "missing":
            logger.warning("%s is incomplete (%s): user %s trains again", folder, problem, user)
        pending.append(user)
    if foreign:
        user, folder, other = foreign[0]
        raise LampError(f"{folder} holds the adapter of user {other!r} (its {USER_RECORD}), "
                        f"not of user {user!r}; move it to {user_adapter_dir(output_dir, other)} "
                        f"or remove it (users whose folder holds another's: "
                        f"{preview([repr(user) for user, _, _ in foreign])})")
    if other_base:
        user, folder = other_base[0]
        raise LampError(f"--output_dir {output_dir}: users trained on another base model or "
                        f"task adapter than --model_name / --base_adapter name now: "
                        f"{preview([repr(user) for user, _ in other_base])} (e.g. {folder}/"
                        f"{USER_RECORD}); choose another --output_dir")
    return pending


def trained_alike(record: Mapping, trained_on: Mapping) -> bool:
    """Whether a user's ``record`` names the base model and task adapter of ``trained_on``
    (a record without them cannot tell: alike)."""
    from LaMP.utils.modeling.user_records import same_model

    if isinstance(record.get("base_model"), dict) and not same_model(
            record["base_model"], trained_on["base_model"]):
        return False
    if "base_adapter" in record:
        mine, theirs = record["base_adapter"], trained_on["base_adapter"]
        if (mine is None) != (theirs is None):
            return False
        if mine is not None and (not isinstance(mine, dict)
                                 or mine.get("sha256") != theirs["sha256"]):
            return False
    return True


def replace_incomplete(folder: Path, user: str) -> None:
    """Remove ``user``'s incomplete folder (``pending_users`` logged it) so that the new
    adapter can take its place; a complete one is another run's work, and another user's
    folder is theirs: an error."""
    if not os.path.lexists(folder):
        return
    if user_folder_problem(folder, user) is None:
        raise LampError(f"{folder}: written by another run at the same time (two runs "
                        "share its folder?)")
    other = other_users_record(folder, user)
    if other is not None:
        raise LampError(f"{folder} holds the adapter of user {other!r} (its {USER_RECORD}), "
                        f"not of user {user!r}; it is not replaced")
    try:
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder)
        else:
            folder.unlink()
    except OSError as error:
        raise LampError(f"{folder}: cannot remove the incomplete adapter "
                        f"({error.strerror or error})") from None


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir() if path.is_file())


def scan_user_records(output_dir: str | os.PathLike) -> dict[str, dict]:
    """The record of every complete user folder under ``output_dir``, by user id (sorted):
    each the folder a lookup of its user finds (``find_user_folder``)."""
    root = Path(output_dir) / USERS_FOLDER
    records = {}
    if root.is_dir():
        for folder in sorted(root.iterdir()):
            if folder.name.startswith(".") or not folder.is_dir():
                continue  # a temporary being written (or left by a kill)
            record = read_user_record(folder)
            if record is None or user_folder_problem(folder, record["user"]) is not None:
                continue
            user = record["user"]
            try:
                names = [candidate.name for candidate in user_folder_candidates(output_dir, user)]
            except LampError:  # an id no folder can be named after: not one we wrote
                continue
            # A folder copied in under another name is not where a lookup goes.
            if folder.name in names and find_user_folder(output_dir, user) == folder:
                records[user] = {**record, "folder": f"{USERS_FOLDER}/{folder.name}"}
    return dict(sorted(records.items()))


@contextlib.contextmanager
def index_lock(output_dir: Path, what: str = USERS_INDEX) -> Iterator[None]:
    """Serialise the rebuilds of ``users.json`` (or another index of the user folders) of
    concurrent processes (shards on one machine, or on several that share the folder): the
    last rebuild then sees every finished user. The lock file stays (``INDEX_LOCK``, hidden): removing it would let a waiter lock
    a file a newcomer no longer sees. Where the lock cannot be taken, the rebuild goes
    unlocked, and a rerun rebuilds the index again."""
    from filelock import FileLock

    lock = FileLock(output_dir / INDEX_LOCK)
    try:
        lock.acquire()
    except OSError as error:
        logger.warning("%s: cannot lock (%s); %s is written unlocked",
                       output_dir / INDEX_LOCK, error.strerror or error, what)
        yield
        return
    try:
        yield
    finally:
        lock.release()


def write_users_index(output_dir: str | os.PathLike, run: Mapping,
                      users_in_data: Sequence[str] | None = None,
                      also: Callable[[dict], None] | None = None) -> dict:
    """Rebuild ``users.json`` from the user folders on disk: ``run`` (model, task, base
    adapter, …) and every complete user's record; with ``users_in_data``, how many of the
    data's users have no adapter yet. ``also(records)``: another file made from the same
    records, written under the same lock (so that it too is last written from them all)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with index_lock(output_dir):
        records = scan_user_records(output_dir)
        index = {**run, "num_users": len(records), "users": records}
        if users_in_data is not None:
            index["num_users_in_data"] = len(users_in_data)
            index["num_missing"] = sum(1 for user in users_in_data if user not in records)
        atomic_write_json(output_dir / USERS_INDEX, index, indent=1)
        if also is not None:
            also(records)
    return index


def read_users_index(output_dir: str | os.PathLike) -> dict:
    """``users.json`` of a per-user training run (``LampError`` naming it if absent or bad)."""
    path = Path(output_dir) / USERS_INDEX
    index = read_json(path, "per-user index")
    if not isinstance(index, dict) or not isinstance(index.get("users"), dict):
        raise LampError(f"{path}: not a per-user index (no \"users\" object)")
    return index


def check_same_run(output_dir: Path, now: Mapping, run_local: frozenset, made: str,
                   added: Mapping | None = None) -> None:
    """A rerun into ``output_dir`` continues the run whose ``args.json`` it holds only with
    the same settings (``now``: the flags as args.json records them, its ``stage`` too;
    ``run_local``: flags that may differ between the runs and shards that fill one folder):
    user folders made otherwise would sit beside each other as if they were one run's.
    ``made``: what the folder holds, for the error. ``added``: flags newer than some folders,
    by their default: an args.json without one was a run at that default."""
    from LaMP.utils.data.fileio import RUN_FILES, TRAINING_RUN_FILES

    if not output_dir.is_dir():
        return
    foreign = [name for name in TRAINING_RUN_FILES + RUN_FILES
               if name != "args.json" and os.path.lexists(output_dir / name)]
    if foreign:
        raise LampError(f"--output_dir {output_dir} holds another stage's run "
                        f"({', '.join(foreign)}); choose another folder")
    if not (output_dir / "args.json").exists():
        return
    saved = read_json(output_dir / "args.json", "arguments file")
    if not isinstance(saved, dict) or saved.get("stage") != now.get("stage"):
        raise LampError(f"--output_dir {output_dir} holds another stage's args.json; choose "
                        "another folder")
    older = [key for key in (added or {}) if key not in saved]  # made before these flags
    saved = {**(added or {}), **saved}
    differ = sorted(key for key in set(saved) | set(now)
                    if key not in run_local and saved.get(key) != now.get(key))
    if differ:
        shown = ", ".join(f"--{key} {saved.get(key)!r} then, {now.get(key)!r} now"
                          for key in differ[:3])
        before = [key for key in differ if key in older]
        why = (f"; it was made before --{before[0]} existed, so it ran at "
               f"{saved[before[0]]!r}" if before else "")
        raise LampError(f"--output_dir {output_dir} holds {made} with other settings "
                        f"({shown}){why}; rerun with the same flags or choose another folder")


SHARD_FLAGS = ("num_shards", "shard_id")  # which process this is, not what the run makes


def save_same_run(output_dir: Path, now: Mapping, run_local: frozenset, made: str,
                  added: Mapping | None = None) -> None:
    """Write ``output_dir``'s args.json (``now`` without the shard flags), checking again
    under the folder's lock what ``check_same_run`` checked before the work began: of two
    processes that both found no args.json (shards started together, on machines that
    resolve a default differently), the later one is refused rather than mixed in."""
    from LaMP.utils.data.fileio import save_run_args

    with index_lock(output_dir, "args.json"):
        check_same_run(output_dir, now, run_local, made, added)
        save_run_args(output_dir / "args.json",
                      {key: value for key, value in now.items() if key not in SHARD_FLAGS})
