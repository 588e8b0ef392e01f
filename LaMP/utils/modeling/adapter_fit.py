"""Does an adapter folder's weights file hold what its config makes on this model?

peft loads an adapter by building the layers its ``adapter_config.json`` describes and then
copying the weights file in; a weight of another shape is an error, but a weight with no
layer, or a layer with no weight, is only a warning (the layer keeps its initial values).
Serving LoRA adapters stacked (``lora_stack``) reads the weights file directly instead. So a
config edited after training (another ``r``, other ``target_modules``) could be refused by
one path, served with another meaning by the other. Both go through this check first: the
weights must be exactly, name for name and shape for shape, what peft saves for that config
on this model. What that is comes from peft itself: the config applied to the model built on
the ``meta`` device (no memory, no weights read), once per distinct config.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Mapping

from LaMP.utils.data.fileio import read_json
from LaMP.utils.errors import LampError
from LaMP.utils.modeling.checkpoints import ADAPTER_CONFIG, ADAPTER_WEIGHTS

WEIGHTS, LEGACY_WEIGHTS = ADAPTER_WEIGHTS  # as peft looks for them
# Config fields that change what a layer computes from its weights but not which weights it
# has, or their shapes: configs that differ only in these share one expectation.
_SHAPE_FREE = frozenset({
    "base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping",
    "lora_alpha", "alpha_pattern", "lora_dropout", "use_rslora", "init_lora_weights",
    "init_ia3_weights", "prompt_tuning_init", "prompt_tuning_init_text",
    "tokenizer_name_or_path", "tokenizer_kwargs"})


def peft_config_of(folder: Path, label: str):
    """The peft config object of ``folder``'s ``adapter_config.json``, as peft reads it."""
    from peft import PeftConfig

    try:
        return PeftConfig.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise LampError(f"cannot load {label}: its {ADAPTER_CONFIG} does not suit peft "
                        f"({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''})") from None


def weight_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in ``folder``'s adapter weights (a safetensors file's
    header only; a legacy ``.bin`` is loaded); ``ValueError`` for a file that is neither."""
    import pickle

    from safetensors import SafetensorError, safe_open

    try:
        if (folder / WEIGHTS).is_file():
            with safe_open(str(folder / WEIGHTS), framework="pt") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        import torch

        state = torch.load(folder / LEGACY_WEIGHTS, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, SafetensorError, pickle.UnpicklingError, EOFError) as error:
        raise ValueError(str(error).splitlines()[0] if str(error) else type(error).__name__
                         ) from None
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise ValueError(f"{LEGACY_WEIGHTS} does not hold a dict of tensors")
    return {str(key): tuple(value.shape) for key, value in state.items()}


class AdapterFit:
    """Checks adapter folders against one base model, given by its transformers config."""

    def __init__(self, model_config, *, seq2seq: bool, trust_remote_code: bool = False):
        self.model_config = model_config
        self.seq2seq = seq2seq
        self.trust_remote_code = trust_remote_code
        self._expected: dict[str, dict[str, tuple[int, ...]] | str] = {}

    def check(self, folder: Path, label: str) -> None:
        """One error line, starting ``cannot load <label>: ``, unless ``folder``'s weights
        are those its config makes on the model."""
        config = read_json(Path(folder) / ADAPTER_CONFIG)
        key = json.dumps({k: v for k, v in sorted(config.items()) if k not in _SHAPE_FREE},
                         default=str)
        if key not in self._expected:
            self._expected[key] = self._expected_shapes(Path(folder), label)
        expected = self._expected[key]
        if isinstance(expected, str):
            raise LampError(f"cannot load {label}: {expected}")
        try:
            found = weight_shapes(Path(folder))
        except ValueError as error:
            raise LampError(f"cannot load {label}: {error}") from None
        problem = shapes_problem(expected, found)
        if problem:
            raise LampError(f"cannot load {label}: {problem}")

    def _expected_shapes(self, folder: Path, label: str) -> dict[str, tuple[int, ...]] | str:
        """What peft saves for this config on the model, or why peft cannot apply it."""
        import torch
        from peft import get_peft_model, get_peft_model_state_dict
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        peft_config = peft_config_of(folder, label)
        # Initial values do not change shapes; a data-driven start (PiSSA's SVD, a prompt
        # from text) would need real weights or a tokenizer.
        if hasattr(peft_config, "init_lora_weights"):
            peft_config.init_lora_weights = False
        if hasattr(peft_config, "prompt_tuning_init"):
            peft_config.prompt_tuning_init = "RANDOM"
        peft_config.inference_mode = True
        model_class = AutoModelForSeq2SeqLM if self.seq2seq else AutoModelForCausalLM
        try:
            with torch.device("meta"):
                skeleton = model_class.from_config(copy.deepcopy(self.model_config),
                                                   trust_remote_code=self.trust_remote_code)
                adapted = get_peft_model(skeleton, peft_config)
            state = get_peft_model_state_dict(adapted)
        except (ValueError, KeyError, TypeError, RuntimeError, AttributeError) as error:
            # peft's own words: "Target modules {...} not found in the base model", …
            return (f"its {ADAPTER_CONFIG} does not apply to this model "
                    f"({str(error).splitlines()[0] if str(error) else type(error).__name__})")
        return {name: tuple(value.shape) for name, value in state.items()}


def shapes_problem(expected: Mapping[str, tuple], found: Mapping[str, tuple]) -> str | None:
    """The first difference between the weights a config makes and those a file holds."""
    for name in sorted(set(expected) | set(found)):
        if name not in found:
            return (f"no weight {name}, which its {ADAPTER_CONFIG} makes on this model (a "
                    "config edited since, or an adapter of another base model?)")
        if name not in expected:
            return (f"weight {name} is not one its {ADAPTER_CONFIG} makes on this model (a "
                    "config edited since, or an adapter of another base model?)")
        if tuple(expected[name]) != tuple(found[name]):
            return (f"weight {name} is {tuple(found[name])}; its {ADAPTER_CONFIG} makes it "
                    f"{tuple(expected[name])} on this model (another r, or another base "
                    "model?)")
    return None
