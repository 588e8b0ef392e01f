"""Whose question is it: the user behind a LaMP question, and where their adapter lives.

The time-split files name a question's author in ``user_id``; in the user split every question
is a different user, so the question's own id stands for its user (as the LaMP authors' per-user
PEFT code and OPPU treat it). Per-user adapters are kept as ``<root>/users/<folder>/`` with a
folder name that is safe for any id a file may hold.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping
from urllib.parse import quote

from LaMP.utils.errors import LampError

USERS_FOLDER = "users"  # <output_dir>/users/<user>/: one standard peft folder per user
USERS_INDEX = "users.json"  # <output_dir>/users.json: the run and every complete user's record
MAX_NAME_BYTES = 255  # the longest file name of common file systems (ext4, xfs, NTFS)


def user_of(question: Mapping) -> str:
    """The question's user: its ``user_id`` when the data has one, else its own id."""
    user = question.get("user_id")
    return str(question["id"] if user is None else user)


def user_folder_name(user: str) -> str:
    """A file name for ``user`` that cannot leave the users folder or hide: characters other
    than letters, digits, ``-``, ``_`` and ``.`` are %-escaped, and so is a leading dot."""
    name = quote(user, safe="")
    if not name or name.startswith("."):
        name = "%2E" + name[1:] if name else "%00"
    if len(name.encode()) > MAX_NAME_BYTES:
        raise LampError(f"user id {user[:40]!r}… is too long for a folder name "
                        f"({len(name.encode())} bytes escaped, at most {MAX_NAME_BYTES})")
    return name


def user_adapter_dir(root: str | Path, user: str) -> Path:
    """Where ``user``'s adapter is saved under a per-user training run's output folder."""
    return Path(root) / USERS_FOLDER / user_folder_name(user)
