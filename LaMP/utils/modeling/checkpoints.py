"""Checks on saved weights and training checkpoints, made before anything loads them.

A run killed while it saves leaves a ``checkpoint-N`` folder with some files missing or cut
short, and a copied model folder can lose its weights the same way. Loading either fails deep
inside torch, safetensors or peft with a traceback (or, for peft, with a hub look-up for a
local folder). These functions read only file sizes and headers, so they answer in
milliseconds and need neither torch nor a network.
"""
from __future__ import annotations

import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

from LaMP.utils.data.fileio import parse_json_bytes, read_json
from LaMP.utils.errors import LampError
from LaMP.utils.modeling.peft_methods import PEFT_METHODS, method_of_adapter

logger = logging.getLogger(__name__)

# Weight files in the order transformers / peft look for them in a folder.
MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
ADAPTER_CONFIG = "adapter_config.json"
TRAINER_STATE = "trainer_state.json"  # the Trainer writes it last, after weights and optimizer
TRAINER_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth")
RUN_ARGS = "lamp_args.json"  # our flags, written into each checkpoint after the Trainer's files
# safetensors refuses headers above 100 MB; a larger length is a damaged file, not a header.
SAFETENSORS_MAX_HEADER = 100_000_000
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why the safetensors file at ``path`` cannot be loaded (truncated, not safetensors),
    or ``None``. Reads the 8-byte header length and the JSON header, and checks that every
    tensor's data offsets lie inside the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            return f"truncated ({size} bytes, shorter than the safetensors header)"
        header_length = int.from_bytes(raw, "little")
        if header_length > min(size - 8, SAFETENSORS_MAX_HEADER):
            return (f"truncated or not safetensors (a {header_length}-byte header announced, "
                    f"{size} bytes in the file)")
        try:
            header = parse_json_bytes(handle.read(header_length), str(path))
        except LampError:
            return "damaged (its safetensors header is not JSON)"
    if not isinstance(header, dict):
        return "damaged (its safetensors header is not a JSON object)"
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets)):
            return f"damaged (tensor {name!r} has no valid data offsets)"
        end = max(end, offsets[1])
    if 8 + header_length + end > size:
        return (f"truncated ({size} bytes; its tensors need {8 + header_length + end})")
    return None


def _torch_file_problem(path: Path) -> str | None:
    """Why a torch.save file is cut short, or ``None``. Current torch writes a zip archive,
    whose directory sits at the end: a truncated one is no longer a readable zip. Files in
    the legacy pickle format (no zip signature) are accepted unchecked."""
    with open(path, "rb") as handle:
        magic = handle.read(2)
    if not magic:
        return "empty"
    if magic == b"PK" and not zipfile.is_zipfile(path):
        return "truncated (an incomplete zip archive)"
    return None


def weight_file_problem(path: Path) -> str | None:
    """Why one weights file (or a sharded index and its shards) cannot be loaded, or ``None``."""
    if path.name.endswith(".index.json"):
        try:
            weight_map = read_json(path)["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (LampError, KeyError, TypeError, AttributeError):
            return f"{path.name} is not a valid shard index"
        for shard in shards:
            shard_path = path.parent / shard
            if not shard_path.is_file():
                return f"shard {shard} listed in {path.name} is missing"
            problem = weight_file_problem(shard_path)
            if problem:
                return problem
        return None
    try:
        problem = (safetensors_problem(path) if path.suffix == ".safetensors"
                   else _torch_file_problem(path))
    except OSError as error:
        problem = f"unreadable ({error.strerror or error})"
    return f"{path.name} is {problem}" if problem else None


def weights_problem(folder: Path, names: Sequence[str]) -> str | None:
    """Why ``folder`` has no loadable weights among ``names`` (first present one wins, as
    in transformers and peft), or ``None``."""
    for name in names:
        if (folder / name).is_file():
            return weight_file_problem(folder / name)
    return f"no weights ({' or '.join(names)})"


def weight_files(folder: Path, names: Sequence[str]) -> list[Path]:
    """The weight files a load of ``folder`` reads: the first of ``names`` present (as in
    transformers and peft) and, for a sharded index, its shards (sorted); ``[]`` if none."""
    for name in names:
        path = folder / name
        if path.is_file():
            if not name.endswith(".index.json"):
                return [path]
            index = read_json(path, "shard index")
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict):
                raise LampError(f"{path}: not a valid shard index (no \"weight_map\" object)")
            return [path] + [folder / shard for shard in sorted(set(map(str, weight_map.values())))]
    return []


def check_model_folder(name_or_path: str, what: str = "model") -> None:
    """For a local model folder, one error line if its weights are missing or damaged;
    hub names pass through (they are checked by the download)."""
    folder = Path(name_or_path)
    try:
        is_model_folder = (folder / "config.json").is_file()
    except OSError as error:  # a name too long, a folder not ours to read
        raise LampError(f"{what} {name_or_path}: {error.strerror or error}") from None
    if not is_model_folder:
        # Not a model folder (a hub name, or a folder transformers reports on itself).
        return
    problem = weights_problem(folder, MODEL_WEIGHTS)
    if problem:
        raise LampError(f"{what} {name_or_path}: {problem}")


def check_adapter_folder(path: str, flag: str = "--adapter") -> None:
    """One error line unless ``path`` is a folder with a peft config and loadable weights
    (without this, peft looks the missing weights up on the hub under the folder's name);
    ``flag``: how the message names where the folder came from."""
    try:
        is_folder = Path(path).is_dir()
    except OSError as error:  # a name too long, a folder not ours to read
        raise LampError(f"{flag} {path}: {error.strerror or error}") from None
    if not is_folder:
        raise LampError(f"{flag} {path} is not a folder (a peft adapter folder, e.g. "
                        "train_llm.py's --output_dir)")
    problem = adapter_folder_problem(path)
    if problem:
        raise LampError(f"{flag} {path}: {problem}")


def adapter_folder_problem(folder: str | os.PathLike) -> str | None:
    """Why the folder ``folder`` holds no loadable peft adapter, or ``None``."""
    folder = Path(folder)
    problem = None
    if not (folder / ADAPTER_CONFIG).is_file():
        problem = f"no {ADAPTER_CONFIG}"
        if (folder / "config.json").is_file():  # e.g. train_llm.py --peft none output
            problem += " (this is a whole model: pass it as the model instead)"
    return problem or adapter_config_problem(folder / ADAPTER_CONFIG) or weights_problem(
        folder, ADAPTER_WEIGHTS)


def _json_problem(path: Path) -> str | None:
    # Through the guarded reader: a hostile config (deep nesting, huge numbers) is a
    # problem to report, not a RecursionError.
    try:
        read_json(path)
    except LampError as error:
        return f"{path.name} is not valid JSON (cut short?): {str(error).split(': ', 1)[-1]}"
    return None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return _is_int(value) or isinstance(value, float)


def _names(value) -> bool:
    """A module-name setting of peft: unset, one name (or regex) or a list of names."""
    return value is None or isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(item, str) for item in value))


# The adapter_config.json fields peft uses unchecked, with what each must be: of another
# type, peft fails with a TypeError/KeyError traceback ('<=' between str and int, "'int'
# object is not iterable") after the base model has loaded.
_ADAPTER_FIELDS = {
    "peft_type": (lambda value: isinstance(value, str), "a string"),
    "r": (lambda value: _is_int(value) and value > 0, "a positive integer"),
    "lora_alpha": (_is_number, "a number"),
    "lora_dropout": (lambda value: _is_number(value) and 0 <= value < 1, "a number in [0, 1)"),
    "target_modules": (_names, "a module name or a list of them"),
    "modules_to_save": (_names, "a module name or a list of them"),
    "base_model_name_or_path": (lambda value: value is None or isinstance(value, str),
                                "a string"),
}


def adapter_config_problem(path: Path) -> str | None:
    """Why ``path`` (an adapter_config.json) cannot configure a peft adapter, or ``None``."""
    problem = _json_problem(path)
    if problem:
        return problem
    config = read_json(path)
    if not isinstance(config, dict):
        return f"{path.name} is not a JSON object"
    for field, (valid, expected) in _ADAPTER_FIELDS.items():
        if field in config and not valid(config[field]):
            return f"{path.name}: {field} must be {expected}, not {config[field]!r:.80}"
    return None


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete Trainer checkpoint, or ``None``: the Trainer state
    (written last) must parse and the weights (adapter or full model) must be whole."""
    if not (folder / TRAINER_STATE).is_file():
        return f"no {TRAINER_STATE}"
    problem = _json_problem(folder / TRAINER_STATE)
    if problem:
        return problem
    names = ADAPTER_WEIGHTS if (folder / ADAPTER_CONFIG).is_file() else MODEL_WEIGHTS
    if (folder / ADAPTER_CONFIG).is_file():
        problem = adapter_config_problem(folder / ADAPTER_CONFIG)
    problem = problem or weights_problem(folder, names)
    for name in TRAINER_FILES:  # written before the state; checked in case of a copy cut short
        if not problem and (folder / name).is_file():
            problem = weight_file_problem(folder / name)
    return problem


def checkpoint_folders(checkpoint_dir: Path) -> list[Path]:
    """The ``checkpoint-N`` folders in ``checkpoint_dir``, newest (largest N) first."""
    if not checkpoint_dir.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in checkpoint_dir.iterdir()
             if (match := _CHECKPOINT.match(path.name)) and path.is_dir()]
    return [path for _, path in sorted(found, reverse=True)]


def last_complete_checkpoint(checkpoint_dir: Path) -> Path:
    """The newest complete checkpoint; incomplete newer ones are logged and skipped."""
    skipped = []
    for folder in checkpoint_folders(checkpoint_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            if skipped:
                logger.warning("resuming from %s", folder.name)
            return folder
        logger.warning("skipping %s: incomplete (%s), e.g. a run killed while saving it",
                       folder, problem)
        skipped.append(folder.name)
    if skipped:
        raise LampError(f"--resume_from_checkpoint last: no complete checkpoint in "
                        f"{checkpoint_dir} (incomplete: {', '.join(skipped)})")
    raise LampError(f"--resume_from_checkpoint last: no checkpoint in {checkpoint_dir}")


def check_checkpoint(folder: Path) -> None:
    """One error line unless ``folder`` is a complete checkpoint (an explicit resume path)."""
    if not os.path.isdir(folder):  # Path.is_dir() raises on a name too long
        raise LampError(f"--resume_from_checkpoint {folder} is not a checkpoint folder")
    problem = checkpoint_problem(folder)
    if problem:
        raise LampError(f"--resume_from_checkpoint {folder}: incomplete checkpoint ({problem}); "
                        "pass an older one or 'last'")


def _read_json(path: Path) -> dict:
    try:
        loaded = read_json(path)
    except LampError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _same_model(a, b) -> bool:
    """Two --model_name values name the same model: equal, or the same local folder."""
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and os.path.isdir(a) and os.path.isdir(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return False


def _sorted_or_none(modules):
    return sorted(modules) if modules else None


def _shown(value) -> str:
    if value is None:
        return "unset"
    return " ".join(sorted(value)) if isinstance(value, list) else str(value)


def resume_differences(checkpoint: Path, now: Mapping, saved_args: Path | None = None
                       ) -> list[str]:
    """``--flag saved (now: value)`` for each flag of the current run (``now``: the parsed
    arguments as a mapping) that the checkpoint was trained with differently.

    What the checkpoint was made with comes from the run arguments saved in it (or in
    ``saved_args``, the run's args.json) and from its adapter_config.json, which peft writes
    with the weights, so a checkpoint of a run that never finished is still checked. An
    unreadable arguments file counts as absent: the weights' own config still speaks.
    """
    recorded = _read_json(saved_args) if saved_args else {}
    recorded.update(_read_json(checkpoint / RUN_ARGS))
    adapter = _read_json(checkpoint / ADAPTER_CONFIG) if (checkpoint / ADAPTER_CONFIG).is_file() \
        else None
    # Every method's shape flags: the table says which flags fix an adapter's shape.
    shape_flags = [flag for method in PEFT_METHODS.values() for flag in method.saved_as]
    before: dict = {}
    for flag in ("model_name", "task", "peft", *dict.fromkeys(shape_flags)):
        if flag in recorded:
            before[flag] = recorded[flag]
    if (checkpoint / TRAINER_STATE).is_file():
        # The folder's own files settle what it holds, whatever the arguments say (an
        # adapter config the table does not know counts as LoRA, the one method whose
        # folders carry no method field).
        before["peft"] = (method_of_adapter(adapter) or "lora") if adapter is not None \
            else "none"
    saved_method = PEFT_METHODS.get(before.get("peft", now.get("peft")))
    if adapter:
        before.setdefault("model_name", adapter.get("base_model_name_or_path"))
        for flag, key in (saved_method.saved_as.items() if saved_method else ()):
            if now.get(flag) is None:
                continue  # unset now: peft's (or the model's) choice, compared as recorded
            if recorded.get(flag) is None:
                # The run left it to peft, which saved what it chose: compare that with
                # what the user names now.
                before[flag] = adapter.get(key)
            else:
                before[flag] = adapter.get(key, recorded[flag])
    now_method = PEFT_METHODS.get(now.get("peft"))
    same_method = saved_method is not None and saved_method is now_method
    compared_shape = set(now_method.saved_as) if same_method else set()
    differences = []
    for flag, old in before.items():
        new = now.get(flag)
        if flag in shape_flags and flag not in compared_shape:
            continue
        if flag == "model_name":
            same = old is None or _same_model(old, new)
        elif flag.endswith("_modules"):
            same = _sorted_or_none(old) == _sorted_or_none(new)
        else:
            same = str(old) == str(new)
        if not same:
            differences.append(f"--{flag} {_shown(old)} (now: {_shown(new)})")
    return differences


def check_resume_compatible(checkpoint: Path, now: Mapping, saved_args: Path | None = None
                            ) -> None:
    """One error line naming the differing flags if ``checkpoint`` was trained otherwise."""
    differences = resume_differences(checkpoint, now, saved_args)
    if differences:
        raise LampError(f"--resume_from_checkpoint {checkpoint} was trained with other flags: "
                        f"{'; '.join(differences)}; resume with the same flags or start a new "
                        "--output_dir")
