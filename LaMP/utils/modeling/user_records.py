"""What a per-user adapter was trained on: recorded in its ``user.json``, checked when served.

A user's adapter answers as trained only on the model it was trained on, with the same task
adapter merged in (OPPU's shared + personal design). ``train_user_peft.py`` records both in
every user's own ``user.json``, so that neither a lost ``users.json`` nor a folder copied
between runs can change what serves it::

    "base_model":   {"name": <hub name, or the folder as an absolute path>,
                     "sha256": <digest of its config.json and weight files; null for a hub name>}
    "base_adapter": null, or {"path": <absolute folder>,
                              "sha256": <digest of its adapter_config.json and weights>}

A digest covers the files a load reads (``checkpoints.weight_files``), names and bytes, so a
copy of a model elsewhere is the same model and other weights at the same path are not;
it reads the whole model once (about 2 GB/s here: seconds for a 7B model, whose load reads
the same bytes next). ``same_model`` compares two local folders by digest, anything else
(a hub name on either side) by name.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping

from LaMP.utils.errors import LampError
from LaMP.utils.modeling.checkpoints import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MODEL_WEIGHTS,
                                             weight_files)

MODEL_CONFIG = "config.json"
_CHUNK = 1 << 20  # bytes read at a time while hashing


def local_or_name(path: str | None) -> str | None:
    """A local folder as an absolute path; a hub name (or nothing) as it is."""
    return os.path.abspath(path) if path and os.path.isdir(path) else path


def files_digest(folder: Path, files: list[Path]) -> str:
    """sha256 over each file's name (relative to ``folder``), size and bytes, in order."""
    digest = hashlib.sha256()
    for path in files:
        try:
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                digest.update(f"{path.relative_to(folder)}\0{size}\0".encode())
                while chunk := handle.read(_CHUNK):
                    digest.update(chunk)
        except OSError as error:
            raise LampError(f"{path}: cannot read ({error.strerror or error})") from None
    return digest.hexdigest()


def model_identity(name_or_path: str) -> dict:
    """``{"name", "sha256"}`` of a base model (``sha256``: ``None`` for a hub name)."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        return {"name": name_or_path, "sha256": None}
    files = [folder / MODEL_CONFIG] if (folder / MODEL_CONFIG).is_file() else []
    return {"name": local_or_name(name_or_path),
            "sha256": files_digest(folder, files + weight_files(folder, MODEL_WEIGHTS))}


def adapter_identity(path: str) -> dict:
    """``{"path", "sha256"}`` of a task adapter folder (checked by ``check_adapter_folder``)."""
    folder = Path(path)
    return {"path": os.path.abspath(path),
            "sha256": files_digest(folder, [folder / ADAPTER_CONFIG]
                                   + weight_files(folder, ADAPTER_WEIGHTS))}


def same_model(recorded: Mapping, served: Mapping) -> bool:
    """Whether ``served`` (a ``model_identity``) is the base model ``recorded`` names."""
    if recorded.get("sha256") and served.get("sha256"):
        return recorded["sha256"] == served["sha256"]
    return recorded.get("name") == served.get("name")


def valid_identity(value, keys: tuple[str, str]) -> bool:
    """A recorded identity as this module writes it: an object of two strings (the digest
    may be null)."""
    return (isinstance(value, dict) and isinstance(value.get(keys[0]), str)
            and (value.get(keys[1]) is None or isinstance(value.get(keys[1]), str)))
