"""Which torch device a stage runs on: checked against this machine, one GPU per process
under a launcher. Shared by the model wrapper and the dense ranker."""
from __future__ import annotations

import torch

from LaMP.utils.errors import LampError


def resolve_device(device: str | None = None, *, local_rank: int | None = None) -> torch.device:
    """``device`` checked against this machine; ``None`` means cuda when present, else cpu.

    ``local_rank``: this process's index on its machine when a launcher started several;
    CUDA then means that process's own GPU, ``cuda:LOCAL_RANK`` (as the launcher intends),
    not GPU 0 in every process.
    """
    if local_rank is not None:
        return _launched_device(device, local_rank)
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise LampError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise LampError(f"device {device!r} asked for, but CUDA is not available here")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise LampError(f"device {device!r} asked for, but this machine has "
                            f"{torch.cuda.device_count()} CUDA device(s)")
    elif resolved.type == "mps":
        if not torch.backends.mps.is_available():
            raise LampError(f"device {device!r} asked for, but MPS is not available here")
    elif resolved.type != "cpu":
        raise LampError(f"unsupported device {device!r}; use cpu, cuda or cuda:N")
    return resolved


def _launched_device(device: str | None, local_rank: int) -> torch.device:
    if device is not None and device not in ("cpu", "cuda"):
        raise LampError(f"--device {device}: under a launcher use cpu or cuda (each process "
                        "takes GPU LOCAL_RANK; choose GPUs with CUDA_VISIBLE_DEVICES)")
    if device == "cpu" or (device is None and not torch.cuda.is_available()):
        return torch.device("cpu")
    return resolve_device(f"cuda:{local_rank}")  # fewer GPUs than processes: one line
