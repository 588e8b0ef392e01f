"""Predicting with a loaded model and writing LaMP prediction files (shared by both stages)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from LaMP.utils.modeling.distributed import Launch, contiguous_slice, gather_in_order
from LaMP.utils.errors import LampError
from LaMP.utils.modeling.examples import Example
from LaMP.utils.data.outputs import write_outputs
from LaMP.utils.evaluation.scoring import score_outputs
from LaMP.utils.tasks import Task
from LaMP.utils.modeling.answering import predict  # noqa: F401  (callers import it from here)
from LaMP.utils.modeling.user_serving import (MAX_LOADED_ADAPTERS, UserAdapters, predict_per_user,
                                     users_together)

logger = logging.getLogger(__name__)


def predict_in_slices(lamp_model, task: Task, examples: Sequence[Example], launch: Launch,
                      *, sharded: bool = False, progress: bool = True,
                      users: Sequence[str] | None = None, user_adapters: UserAdapters | None = None,
                      max_loaded_adapters: int = MAX_LOADED_ADAPTERS,
                      stacked_adapters: bool = True, **settings) -> list[str]:
    """``predict`` with the examples split over the launched processes: each answers its
    contiguous slice and every process gets all outputs, in example order. ``settings`` are
    ``predict``'s keyword arguments. One process (no launcher): ``predict`` itself.

    ``sharded``: the weights are split over the processes (FSDP, DeepSpeed ZeRO-3), so each
    forward pass needs every process. Slices are then topped up to one length (with copies
    of an example, whose answers are dropped) so that all run the same batches, and
    generation keeps every process stepping until the longest answer is done.

    ``user_adapters``: each example is answered with its user's adapter (``users[i]``, see
    ``user_serving.predict_per_user``, at most ``max_loaded_adapters`` on the model at once;
    ``stacked_adapters``: LoRA adapters stacked per layer where they allow it).
    The examples are sliced with each user's questions together, so that a process loads
    only its own users' adapters; the outputs come back in example order all the same.
    """
    examples = list(examples)
    order = list(range(len(examples)))
    if user_adapters is not None:
        if sharded:
            raise LampError("per-user adapters cannot be served from weights sharded over "
                            "the processes; run data-parallel (without FSDP / ZeRO-3)")
        order = users_together(users)
    mine = [order[i] for i in range(len(order))[contiguous_slice(len(examples), launch.rank,
                                                                 launch.world_size)]]
    answered = len(mine)
    if sharded and launch.distributed and examples:
        longest = -(-len(examples) // launch.world_size)  # the first slice is the longest
        mine = mine + [mine[-1] if mine else 0] * (longest - answered)
    progress = progress and launch.is_main
    if user_adapters is not None:
        texts = predict_per_user(lamp_model, task, [examples[i] for i in mine],
                                 [users[i] for i in mine], user_adapters,
                                 max_loaded=max_loaded_adapters, progress=progress,
                                 stacked=stacked_adapters, **settings)
    else:
        texts = predict(lamp_model, task, [examples[i] for i in mine], progress=progress,
                        synced_gpus=sharded and launch.distributed, **settings)
    gathered = gather_in_order(texts[:answered], launch)
    outputs: list[str] = [""] * len(examples)
    for index, text in zip(order, gathered):
        outputs[index] = text
    return outputs


def score_predictions(task: Task, examples: Sequence[Example], predictions: Sequence[str],
                      source: str) -> dict | None:
    """Metrics of the predictions when the examples carry gold outputs, else ``None``."""
    if not examples or examples[0].target is None:
        return None
    return score_outputs(task, [e.id for e in examples], [e.target for e in examples],
                         list(predictions), source)


def write_predictions(output_dir: str | Path, task: Task, examples: Sequence[Example],
                      predictions: Sequence[str], name: str = "predictions.json") -> dict | None:
    """Write the LaMP predictions file; return the metrics when golds are known."""
    output_dir = Path(output_dir)
    # Scored first: a problem with the golds must not leave a predictions file without results.
    results = score_predictions(task, examples, predictions, "the gold outputs")
    path = write_outputs(output_dir / name, task,
                         ((example.id, prediction) for example, prediction in zip(examples, predictions)))
    logger.info("wrote %s", path)
    return results
