"""RSPG: a learned choice, per question, among several retrievers' rankings.

A selector is a text encoder with a linear head: it reads, for one question and one
candidate retriever, the question's input and that retriever's top-k profile items (RSPG-Pre),
or those and the answer the LLM gave with them (RSPG-Post), and returns one score. The
question gets the ranking of the retriever scored highest (Salemi et al., SIGIR 2024).
``train_selector.py`` trains one (``LaMP.utils.modeling.feedback_training``); the ``rspg``
ranker here serves it.

The scorer does not know which retriever a candidate came from, only what it retrieved, so
a selector trained with one set of retrievers scores any other set too.

A selector folder holds ``encoder/`` (a Hugging Face encoder and its tokenizer),
``selector_head.safetensors`` (the linear head) and ``selector.json`` (what the texts are
made of: task, mode, k, token limit).
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

from LaMP.utils.data.fileio import atomic_write_json, check_readable, read_json
from LaMP.utils.data.outputs import load_outputs
from LaMP.utils.devices import resolve_device
from LaMP.utils.errors import LampError
from LaMP.utils.retrieval import build_ranker, parse_retriever_spec
from LaMP.utils.retrieval.base import DEFAULT_BATCH_SIZE, DEFAULT_DENSE_MODEL, Ranked, Ranker
from LaMP.utils.retrieval.dense import embed, encoder_max_length, load_encoder
from LaMP.utils.retrieval.rankings import order_profile
from LaMP.utils.tasks import Task

logger = logging.getLogger(__name__)

SELECTOR_MODES = ("pre", "post")  # RSPG-Pre reads the prompt's parts; Post also the answer
SELECTOR_CONFIG = "selector.json"
SELECTOR_HEAD = "selector_head.safetensors"
ENCODER_FOLDER = "encoder"
PLAIN_SEPARATOR = " | "  # between segments, for a tokenizer without a separator token
QUESTIONS_PER_WINDOW = 32  # questions ranked by every retriever before the selector scores them


def separator(tokenizer) -> str:
    """What joins the segments of a selector text: the encoder's own separator token."""
    token = getattr(tokenizer, "sep_token", None)
    return f" {token} " if token else PLAIN_SEPARATOR


def selector_segments(task: Task, question: Mapping, items: Sequence[Mapping],
                      output: str | None = None) -> list[str]:
    """What the selector reads for one question and one retriever's top items, piece by
    piece (the selector joins them with its separator): the input, the answer (RSPG-Post),
    then the items as the prompt writes them, best first. The input and the answer come
    first so that the encoder's length limit cuts the lowest items."""
    rendered = [task.prompt.item.format_map({key: str(value) for key, value in item.items()})
                for item in items]
    head = [question["input"]] + ([output] if output is not None else [])
    return [*head, *(text.strip() for text in rendered)]


class Selector(torch.nn.Module):
    """An encoder and a linear head: one score per text (mean pooling, as the dense ranker
    pools; the paper's Longformer scored its first token)."""

    def __init__(self, encoder, tokenizer, config: Mapping[str, Any]):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.config = dict(config)
        self.head = torch.nn.Linear(encoder.config.hidden_size, 1)
        self.max_length = min(config["max_length"], encoder_max_length(tokenizer, encoder))
        self.sep = separator(tokenizer)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def scores(self, candidates: Sequence[Sequence[str]]) -> torch.Tensor:
        """One score per candidate (its ``selector_segments``), differentiable (call under
        ``torch.inference_mode`` to serve)."""
        texts = [self.sep.join(segments) for segments in candidates]
        pooled = embed(self.encoder, self.tokenizer, texts, self.max_length, self.device)
        return self.head(pooled.to(self.head.weight.dtype)).squeeze(-1)

    def save(self, folder: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        self.encoder.save_pretrained(folder / ENCODER_FOLDER)
        self.tokenizer.save_pretrained(folder / ENCODER_FOLDER)
        save_file({name: tensor.detach().cpu().contiguous()
                   for name, tensor in self.head.state_dict().items()}, folder / SELECTOR_HEAD)
        atomic_write_json(folder / SELECTOR_CONFIG, self.config, indent=2)


def new_selector(model_name: str, config: Mapping[str, Any], *, allow_download: bool = False,
                 cache_dir=None) -> Selector:
    """A selector to train: ``model_name``'s encoder and a fresh head (seed first)."""
    tokenizer, encoder = load_encoder(model_name, torch.float32, cache_dir, allow_download)
    return Selector(encoder, tokenizer, config)


def load_selector(folder: str | os.PathLike, device=None) -> Selector:
    """A trained selector from ``train_selector.py``'s folder, on ``device``, in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise LampError(f"selector {folder}: not a folder (train_selector.py --output_dir)")
    config = read_json(check_readable(folder / SELECTOR_CONFIG, "selector config"),
                       "selector config")
    if not (isinstance(config, dict) and config.get("mode") in SELECTOR_MODES
            and _whole_number(config.get("num_retrieved"), 0)
            and _whole_number(config.get("max_length"), 1) and isinstance(config.get("task"), str)):
        raise LampError(f"{folder / SELECTOR_CONFIG}: not a selector config (needs task, mode "
                        f"one of {', '.join(SELECTOR_MODES)}, num_retrieved and max_length as "
                        "whole numbers)")
    tokenizer, encoder = load_encoder(str(folder / ENCODER_FOLDER), torch.float32)
    selector = Selector(encoder, tokenizer, config)
    head_path = check_readable(folder / SELECTOR_HEAD, "selector head")
    try:
        selector.head.load_state_dict(load_file(head_path))
    except (SafetensorError, RuntimeError, OSError) as error:
        raise LampError(f"{head_path}: not this selector's head "
                        f"({str(error).splitlines()[0][:200]})") from None
    return selector.to(resolve_device(device)).eval()


def _whole_number(value, lowest: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= lowest


def _windows(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while window := list(islice(iterator, size)):
        yield window


class SelectorRanker(Ranker):
    """RSPG: each question gets the ranking of the candidate retriever its selector scores
    highest (ties: the first in ``retrievers``)."""

    name = "rspg"
    options = ("selector", "retrievers", "retriever_outputs", "model_name", "device",
               "batch_size", "cache_dir", "allow_download", "seed", "tie_order")

    def __init__(self, task: Task, *, use_date: bool = False, selector: str | None = None,
                 retrievers: Sequence[str] = (), retriever_outputs: Sequence[str] = (),
                 model_name: str = DEFAULT_DENSE_MODEL, device: str | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE, cache_dir=None,
                 allow_download: bool = False, seed: int = 0, tie_order: str = "profile"):
        super().__init__(task, use_date)
        if not selector:
            raise LampError("the rspg ranker needs a trained selector: --selector DIR "
                            "(train_selector.py --output_dir)")
        specs = [parse_retriever_spec(text) for text in retrievers]
        if len(specs) < 2:
            raise LampError("the rspg ranker chooses among two or more --retrievers")
        if len({spec.label for spec in specs}) != len(specs):
            raise LampError("--retrievers lists a retriever twice")
        self.selector_path = str(selector)
        self.selector = load_selector(selector, device)
        config = self.selector.config
        if config["task"] != task.name:
            raise LampError(f"selector {selector} was trained for {config['task']}, not "
                            f"{task.name}")
        self.mode, self.k = config["mode"], config["num_retrieved"]
        self.specs = specs
        self.outputs: list[dict[str, str]] | None = None
        if self.mode == "post":
            if len(retriever_outputs) != len(specs):
                raise LampError(f"selector {selector} is RSPG-Post: it reads each retriever's "
                                "answers; give --retriever_outputs, one predictions file per "
                                f"--retrievers entry ({len(specs)})")
            files = [load_outputs(path, "predictions file") for path in retriever_outputs]
            for file in files:
                if file.task is not task:
                    raise LampError(f"{file.source}: predictions for {file.task.name}, not "
                                    f"{task.name}")
            self.outputs = [file.outputs for file in files]
            self.output_paths = [str(path) for path in retriever_outputs]
        elif retriever_outputs:
            raise LampError(f"selector {selector} is RSPG-Pre: it reads no answers; leave out "
                            "--retriever_outputs")
        self.batch_size = batch_size
        self.rankers = [build_ranker(spec.ranker, task, use_date=use_date,
                                     model_name=spec.checkpoint or model_name, device=device,
                                     batch_size=batch_size, cache_dir=cache_dir,
                                     allow_download=allow_download or spec.checkpoint is not None,
                                     seed=seed, tie_order=tie_order)
                        for spec in specs]
        self.chosen: Counter[str] = Counter()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "selector": self.selector_path, "mode": self.mode,
                "num_retrieved": self.k, "retrievers": [spec.label for spec in self.specs],
                "chosen": {spec.label: self.chosen[spec.label] for spec in self.specs}}

    def rank(self, questions: Iterable[dict]) -> Iterator[Ranked]:
        for window in _windows(questions, QUESTIONS_PER_WINDOW):
            rankings = [[ranking for _, ranking in ranker.rank(window)]
                        for ranker in self.rankers]
            candidates = [self.candidate(question, r, rankings[r][i])
                          for i, question in enumerate(window) for r in range(len(self.specs))]
            scores = self._score(candidates).view(len(window), len(self.specs))
            # argmax returns the first of equal maxima: ties go to the earlier retriever.
            for i, choice in enumerate(scores.argmax(dim=1).tolist()):
                self.chosen[self.specs[choice].label] += 1
                yield window[i], rankings[choice][i]

    def candidate(self, question: dict, retriever: int, ranking: list[str]) -> list[str]:
        items = order_profile(question["profile"], ranking, question["id"])[:self.k]
        output = None
        if self.outputs is not None:
            output = self.outputs[retriever].get(question["id"])
            if output is None:
                raise LampError(f"{self.output_paths[retriever]}: no answer for question "
                                f"{question['id']} (RSPG-Post reads every retriever's answer)")
        return selector_segments(self.task, question, items, output)

    def _score(self, candidates: list[list[str]]) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([self.selector.scores(candidates[start:start + self.batch_size])
                              .float() for start in range(0, len(candidates), self.batch_size)]
                             ).cpu()
