"""Predicting with a loaded model and writing LaMP prediction files (shared by both stages)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from LaMP.utils.distributed import Launch, contiguous_slice, gather_in_order
from LaMP.utils.examples import Example
from LaMP.utils.outputs import write_outputs
from LaMP.utils.scoring import score_outputs
from LaMP.utils.tasks import Task

logger = logging.getLogger(__name__)


def predict(lamp_model, task: Task, examples: Sequence[Example], *, max_length: int,
            max_new_tokens: int, num_beams: int = 1, batch_size: int = 8,
            label_scoring: bool = False, progress: bool = True,
            synced_gpus: bool = False) -> list[str]:
    """One output per example: generated text, or the most likely label.

    ``synced_gpus``: the weights are sharded over the launched processes (see
    ``LampModel.generate``); label scoring needs nothing more, as it runs the same passes
    for every batch.
    """
    prompts = [example.prompt for example in examples]
    if label_scoring:
        return lamp_model.score_labels(prompts, task.labels, max_length=max_length,
                                       batch_size=batch_size, progress=progress)
    return lamp_model.generate(prompts, max_length=max_length, max_new_tokens=max_new_tokens,
                               num_beams=num_beams, batch_size=batch_size, progress=progress,
                               synced_gpus=synced_gpus)


def predict_in_slices(lamp_model, task: Task, examples: Sequence[Example], launch: Launch,
                      *, sharded: bool = False, progress: bool = True, **settings) -> list[str]:
    """``predict`` with the examples split over the launched processes: each answers its
    contiguous slice and every process gets all outputs, in example order. ``settings`` are
    ``predict``'s keyword arguments. One process (no launcher): ``predict`` itself.

    ``sharded``: the weights are split over the processes (FSDP, DeepSpeed ZeRO-3), so each
    forward pass needs every process. Slices are then topped up to one length (with copies
    of an example, whose answers are dropped) so that all run the same batches, and
    generation keeps every process stepping until the longest answer is done.
    """
    examples = list(examples)
    mine = examples[contiguous_slice(len(examples), launch.rank, launch.world_size)]
    answered = len(mine)
    if sharded and launch.distributed and examples:
        longest = -(-len(examples) // launch.world_size)  # the first slice is the longest
        mine = mine + [mine[-1] if mine else examples[0]] * (longest - answered)
    texts = predict(lamp_model, task, mine, progress=progress and launch.is_main,
                    synced_gpus=sharded and launch.distributed, **settings)
    return gather_in_order(texts[:answered], launch)


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
