"""Whose question is it: the user behind a LaMP question, and where their adapter lives.

The time-split files name a question's author in ``user_id``; in the user split every question
is a different user, so the question's own id stands for its user (as the LaMP authors' per-user
PEFT code and OPPU treat it). Per-user adapters are kept as ``<root>/users/<folder>/``, each
with a ``user.json`` that names its user.

The folder name (``user_folder_name``) is one-to-one for every string, and stays so on a file
system that ignores case (macOS, Windows): lower-case letters, digits, ``-`` and ``_`` stand
for themselves, and so does ``.`` except as the first character; every other character (upper
case letters too, and ``%``) is written as ``%XX`` per UTF-8 byte, hex digits in upper case.
Two names that differ only in case would have to differ in a literal letter, and only lower
case letters are literal. The empty id is ``%empty``, which no other id gives (an escape is
``%`` and two upper-case hex digits).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping
from urllib.parse import quote

from LaMP.utils.data.fileio import read_json
from LaMP.utils.errors import LampError

USERS_FOLDER = "users"  # <output_dir>/users/<user>/: one standard peft folder per user
USERS_INDEX = "users.json"  # <output_dir>/users.json: the run and every complete user's record
USER_RECORD = "user.json"  # inside each user's folder: who it is and how it was trained
# A user.json is a few hundred bytes; anything far larger is not ours.
MAX_RECORD_BYTES = 1_000_000
MAX_NAME_BYTES = 255  # the longest file name of common file systems (ext4, xfs, APFS, NTFS)
EMPTY_ID_NAME = "%empty"
_LITERAL = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")


def user_of(question: Mapping) -> str:
    """The question's user: its ``user_id`` when the data has one, else its own id."""
    user = question.get("user_id")
    return str(question["id"] if user is None else user)


def user_folder_name(user: str) -> str:
    """The folder name of ``user``'s adapter: one-to-one, case-proof, never hidden and never
    leaving the users folder (see the module's description); an id whose name would pass
    ``MAX_NAME_BYTES`` is one error line."""
    if not user:
        return EMPTY_ID_NAME
    parts = []
    for position, char in enumerate(user):
        if char in _LITERAL and not (position == 0 and char == "."):
            parts.append(char)
        else:
            # surrogatepass: a lone surrogate (JSON allows "\ud800") is still one name.
            parts.extend(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))
    return _checked("".join(parts), user)


def quoted_folder_name(user: str) -> str | None:
    """The id through ``urllib.parse.quote`` (letters of both cases, digits and ``-_.~``
    kept), a leading dot escaped and the empty id ``%00``: the names of folders written
    that way, which are read too. ``None`` for an id it cannot encode (a lone surrogate)."""
    try:
        name = quote(user, safe="")
    except UnicodeEncodeError:
        return None
    if not name or name.startswith("."):
        name = "%2E" + name[1:] if name else "%00"
    return name if len(name.encode()) <= MAX_NAME_BYTES else None


def _checked(name: str, user: str) -> str:
    if len(name.encode()) > MAX_NAME_BYTES:
        raise LampError(f"user id {user[:40]!r}… is too long for a folder name "
                        f"({len(name.encode())} bytes escaped, at most {MAX_NAME_BYTES})")
    return name


def user_adapter_dir(root: str | Path, user: str) -> Path:
    """Where ``user``'s adapter is saved under a per-user training run's output folder."""
    return Path(root) / USERS_FOLDER / user_folder_name(user)


def user_folder_candidates(root: str | Path, user: str) -> list[Path]:
    """The folders that may hold ``user``'s adapter: ``user_adapter_dir``, then the
    ``quoted_folder_name`` one where that differs."""
    folders = [user_adapter_dir(root, user)]
    quoted = quoted_folder_name(user)
    if quoted is not None and quoted != folders[0].name:
        folders.append(folders[0].with_name(quoted))
    return folders


def read_user_record(folder: Path) -> dict | None:
    """``folder``'s ``user.json`` when it is a JSON object naming a user (a string), else
    ``None``."""
    try:
        record = read_json(folder / USER_RECORD, USER_RECORD, max_bytes=MAX_RECORD_BYTES)
    except LampError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("user"), str) else None


def find_user_folder(root: str | Path, user: str) -> Path | None:
    """``user``'s folder under ``root``: the first candidate whose ``user.json`` names
    ``user``; else the first that exists (damaged, or another user's: the caller says
    which); ``None`` where there is none. The record decides, not the name, so that a
    folder named like ``user``'s but holding someone else's adapter is never taken for it
    (a name written the ``quoted_folder_name`` way may be another id's
    ``user_folder_name``, and a file system that ignores case finds ``A`` for ``a``)."""
    candidates = user_folder_candidates(root, user)
    for folder in candidates:
        record = read_user_record(folder) if folder.is_dir() else None
        if record is not None and record["user"] == user:
            return folder
    return next((folder for folder in candidates if os.path.lexists(folder)), None)


# -- choosing users ------------------------------------------------------------------------

MOST_ACTIVE = "most_active:"  # --users most_active:N: the N users with the longest profiles
MAX_IDS_FILE_BYTES = 100_000_000  # far more ids than any LaMP split has users


def users_arg(text: str) -> str:
    """argparse ``type=`` of ``--users``: ``most_active:N`` (N >= 1) or a file name, kept
    as written (args.json records it so)."""
    import argparse

    if text.startswith(MOST_ACTIVE):
        count = text[len(MOST_ACTIVE):]
        if not (count.isascii() and count.isdigit() and int(count) >= 1):
            raise argparse.ArgumentTypeError(f"{text!r}: most_active:N needs a whole number "
                                             "N >= 1")
    elif not text:
        raise argparse.ArgumentTypeError("give most_active:N or a file of user ids")
    return text


def users_file(spec: str | None) -> str | None:
    """The ids file ``--users`` names, or ``None`` (``most_active:N``, or no flag)."""
    return None if spec is None or spec.startswith(MOST_ACTIVE) else spec


def read_user_ids(path: str | os.PathLike, flag: str = "--users") -> list[str]:
    """The user ids of a file, in its order without repeats: a JSON list of strings and
    integers (as the LaMP authors' ``--user_ids``), or one id a line (blank lines skipped,
    each line stripped)."""
    from LaMP.utils.data.fileio import check_readable, parse_json_bytes
    from LaMP.utils.data.questions import as_id

    path = check_readable(path, flag)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_IDS_FILE_BYTES + 1)
    except OSError as error:
        raise LampError(f"{flag} {path}: cannot read ({error.strerror})") from None
    if len(data) > MAX_IDS_FILE_BYTES:
        raise LampError(f"{flag} {path}: more than {MAX_IDS_FILE_BYTES:,} bytes is too large "
                        "to be a file of user ids")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise LampError(f"{flag} {path}: not UTF-8 text") from None
    if text.lstrip().startswith("["):
        listed = parse_json_bytes(data, f"{flag} {path}")
        ids = [as_id(value) for value in listed]
        if None in ids:
            bad = listed[ids.index(None)]
            raise LampError(f"{flag} {path}: a user id must be a string or an integer, not "
                            f"{bad!r:.60}")
    else:
        ids = [line.strip() for line in text.splitlines() if line.strip()]
    if not ids:
        raise LampError(f"{flag} {path}: no user ids")
    return list(dict.fromkeys(ids))


def profile_sizes(questions) -> dict[str, int]:
    """How many distinct profile items (by id) each user of ``questions`` has: a time-split
    user's questions share items, which count once."""
    items: dict[str, set[str]] = {}
    for question in questions:
        items.setdefault(user_of(question), set()).update(
            str(item["id"]) for item in question["profile"])
    return {user: len(ids) for user, ids in items.items()}


def most_active_users(sizes: Mapping[str, int], count: int) -> list[str]:
    """The ``count`` users with the most profile items, most first; equal sizes in the
    sorted order of their ids (as strings)."""
    return sorted(sizes, key=lambda user: (-sizes[user], user))[:count]


def choose_users(spec: str, users: list[str], sizes=None, source: str = "the data"
                 ) -> list[str]:
    """The users ``--users spec`` picks among ``users`` (every user of ``source``), sorted:
    ``most_active:N`` reads ``sizes()`` (``profile_sizes`` of the data), a file its ids,
    each of which must be a user of the data."""
    from LaMP.utils.errors import preview

    if spec.startswith(MOST_ACTIVE):
        count = int(spec[len(MOST_ACTIVE):])
        if count > len(users):
            raise LampError(f"--users {spec}: {source} has {len(users)} users")
        return sorted(most_active_users(sizes(), count))
    ids = read_user_ids(spec)
    known = set(users)
    unknown = [user for user in ids if user not in known]
    if unknown:
        raise LampError(f"--users {spec}: ids that are no user of {source}: {preview(unknown)}")
    return sorted(ids)
