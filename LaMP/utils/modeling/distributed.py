"""Data-parallel prediction under a launcher (``torchrun``, ``accelerate launch``).

A launcher starts one process per device and tells each who it is through the
``torch.distributed`` environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``). Each process
answers a contiguous slice of the questions; the slices are gathered in rank order, so the
joined list is in question order and the same as one process would produce. Only the main
process writes files. Without a launcher everything here is a no-op for one process.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Sequence, TypeVar

from LaMP.utils.errors import LampError

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Launch:
    """Who this process is among those a launcher started (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise LampError(f"environment variable {name}={value!r} is not a number "
                        "(it is set by torchrun / accelerate launch)") from None


def launch_from_env() -> Launch:
    """This process's place among the launched ones, read from the launcher's environment."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise LampError(f"inconsistent launcher environment: RANK={rank}, "
                        f"WORLD_SIZE={world_size}, LOCAL_RANK={local_rank}")
    return Launch(rank=rank, world_size=world_size, local_rank=local_rank)


def contiguous_slice(n_items: int, rank: int, world_size: int) -> slice:
    """The part of ``range(n_items)`` process ``rank`` handles (contiguous, sizes ±1).

    Contiguous (not strided) so that joining the slices in rank order restores the input
    order; with fewer items than processes the last ones get empty slices.
    """
    base, extra = divmod(n_items, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def init_process_group(launch: Launch, device) -> bool:
    """Join the launched processes (gloo on CPU, nccl on CUDA) unless already joined.

    Returns whether this call created the group (the caller then destroys it at the end).
    """
    if not launch.distributed:
        return False
    import torch
    import torch.distributed as dist

    if dist.is_initialized():  # e.g. accelerate or a caller already set it up
        return False
    if device.type == "cuda":
        # NCCL moves gathered objects through the current device: make it this process's.
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    try:
        dist.init_process_group(backend=backend, rank=launch.rank, world_size=launch.world_size)
    except ValueError as error:  # WORLD_SIZE set by hand, without the rendezvous variables
        raise LampError(f"cannot join the {launch.world_size} launched processes: "
                        f"{str(error).splitlines()[0]} (start the run with torchrun or "
                        "accelerate launch)") from None
    logger.info("process %d of %d joined the %s group on %s", launch.rank, launch.world_size,
                backend, device)
    return True


def gather_in_order(mine: Sequence[T], launch: Launch) -> list[T]:
    """Every process's ``mine`` joined in rank order, returned to every process."""
    if not launch.distributed:
        return list(mine)
    import torch.distributed as dist

    parts: list = [None] * launch.world_size
    dist.all_gather_object(parts, list(mine))
    return [item for part in parts for item in part]


def synchronize(created: bool) -> None:
    """Wait until every process of the group this process created is here: gloo aborts a
    process (``terminate called without an active exception``) that destroys its group while
    another still finishes a collective with it. Call it once the work succeeded (a process
    that failed never arrives, and the others would wait for it)."""
    if created:
        import torch.distributed as dist

        dist.barrier()


_left_a_group: list[bool] = []  # set once this process has destroyed a group it created


def end_process_group(created: bool) -> None:
    """Leave the group this process created (and only that one)."""
    if created:
        import torch.distributed as dist

        dist.destroy_process_group()
        _left_a_group.append(True)


def exit_process(status: int) -> None:
    """End a script's process with ``status``. A process that was in a gloo group skips the
    interpreter's teardown (after flushing the logs and streams): there gloo's threads
    abort it now and then (``terminate called without an active exception``, exit status
    -6, with no Python frame left), and the launcher then stops every other process."""
    if _left_a_group:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
