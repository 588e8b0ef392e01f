"""One output per example from a loaded model: generated text, or the most likely label.
Below both the slicing over processes (predict.py) and per-user serving (user_serving.py)."""
from __future__ import annotations

from typing import Sequence

from LaMP.utils.modeling.examples import Example
from LaMP.utils.tasks import Task


def predict(lamp_model, task: Task, examples: Sequence[Example], *, max_length: int,
            max_new_tokens: int, num_beams: int = 1, batch_size: int = 8,
            label_scoring: bool = False, progress: bool = True,
            synced_gpus: bool = False, adapter_names: Sequence[str] | None = None) -> list[str]:
    """One output per example: generated text, or the most likely label.

    ``synced_gpus``: the weights are sharded over the launched processes (see
    ``LampModel.generate``); label scoring needs nothing more, as it runs the same passes
    for every batch. ``adapter_names``: the peft adapter each example goes through (a
    batch then mixes adapters); ``None``: the model's active one for all.
    """
    prompts = [example.prompt for example in examples]
    if label_scoring:
        return lamp_model.score_labels(prompts, task.labels, max_length=max_length,
                                       batch_size=batch_size, progress=progress,
                                       adapter_names=adapter_names)
    return lamp_model.generate(prompts, max_length=max_length, max_new_tokens=max_new_tokens,
                               num_beams=num_beams, batch_size=batch_size, progress=progress,
                               synced_gpus=synced_gpus, adapter_names=adapter_names)
