"""Many LoRA adapters on one base model, each batch row through its own user's adapter.

peft serves a batch that mixes adapters (``adapter_names``) by looping, in every adapted
layer at every step, over the adapters the batch holds (a product per adapter), and it loads
an adapter by building a new LoRA module into every adapted layer. Here the adapters' weights
are read straight from their files into one tensor per adapted ``Linear`` and per matrix
(adapters × rank × features), and a forward hook on each such ``Linear`` adds every row's
LoRA term with two batched products:

    out[i] += scale[a] * (x[i] @ A[a]^T) @ B[a]^T,   a = the adapter of row i

which is peft's own term in eval mode (dropout is off when answering), for plain LoRA
(``lora_alpha / r``) and rsLoRA (``lora_alpha / sqrt(r)``). Slot 0 holds zeros: the rows the
base model answers. Adapters of different ranks are padded with zero rows and columns, which
add nothing.

What it takes is checked, and anything else is served by peft's own path: plain LoRA or
rsLoRA, every other config field unset (no DoRA, aLoRA, biases, rank or alpha patterns,
other trained modules, PiSSA-style initialisations that rewrite the base weights, nor any
variant peft adds later: ``stackable`` is a whitelist), only ``nn.Linear`` layers, not
embeddings or convolutions (from the weights: ``NotStackable``). Serving has checked the
weights against the config first (``adapter_fit``), as peft's own path needs them: the
scale is the config's (``r``, ``lora_alpha``, ``use_rslora``), and weights of another rank
than its ``r`` are refused here too. Memory: the stacked
weights, and per batch each adapted layer's A and B gathered for its rows (rows × features ×
rank, twice).
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

from LaMP.utils.data.fileio import read_json
from LaMP.utils.errors import LampError
from LaMP.utils.modeling.adapter_fit import LEGACY_WEIGHTS, WEIGHTS
from LaMP.utils.modeling.checkpoints import ADAPTER_CONFIG
_PREFIX = "base_model.model."  # peft's prefix of the base model's module names
_MATRICES = (".lora_A.weight", ".lora_B.weight")


class NotStackable(Exception):
    """These adapters adapt layers the stack does not handle (embeddings, convolutions):
    serve them through peft."""


# Config fields that do not change what a LoRA layer computes from its A and B at inference
# (which modules are adapted shows in the weights themselves).
_ANY_VALUE = frozenset({
    "peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "use_rslora",
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version",
    "megatron_core", "qalora_group_size"})
# Initialisations that only choose the starting A and B (PiSSA, OLoRA, CorDA, LoftQ… also
# rewrite the base weights when peft loads the adapter, which a stack cannot do).
_PLAIN_INITS = (True, False, "gaussian")
# The reasons named for the usual variants; any other field set to something is refused too.
_NAMED = {"use_dora": "DoRA", "lora_bias": "a LoRA bias", "bias": "trained biases",
          "rank_pattern": "per-module ranks", "alpha_pattern": "per-module alphas",
          "modules_to_save": "other trained modules", "fan_in_fan_out": "fan_in_fan_out weights",
          "layer_replication": "replicated layers",
          "alora_invocation_tokens": "activated LoRA (aLoRA)",
          "trainable_token_indices": "trained token embeddings"}


def stackable(config: Mapping) -> str | None:
    """Why an adapter with this ``adapter_config.json`` cannot be stacked, or ``None``.

    A whitelist, so that a LoRA variant peft adds later goes through peft's own layers
    rather than being served as plain LoRA: every field outside ``_ANY_VALUE`` must be unset
    (None, False, empty), ``bias`` ``"none"``, the initialisation a plain one."""
    if config.get("peft_type") != "LORA":
        return f"a {config.get('peft_type')} adapter, not LoRA"
    init = config.get("init_lora_weights", True)
    if not any(init is plain or init == plain for plain in _PLAIN_INITS):
        return f"init_lora_weights {init!r:.40} (peft changes the base weights for it)"
    for key, value in config.items():
        if key in _ANY_VALUE or key == "init_lora_weights" or (key == "bias" and value == "none"):
            continue
        if value not in (None, False, "", 0) and value != {} and value != []:
            return _NAMED.get(key, f"{key} = {value!r:.40}")
    return None


# peft's LoraConfig defaults, for a config that leaves r or lora_alpha out.
DEFAULT_R = 8
DEFAULT_ALPHA = 8


def _scale(config: Mapping) -> float:
    """peft's scaling of a LoRA term, from the config (never from the weights' shapes: a
    config whose r the weights do not have is refused, as peft refuses it)."""
    rank = config.get("r", DEFAULT_R)
    alpha = float(config.get("lora_alpha", DEFAULT_ALPHA))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / WEIGHTS).exists():
        from safetensors.torch import load_file

        return load_file(str(folder / WEIGHTS))
    return torch.load(folder / LEGACY_WEIGHTS, map_location="cpu", weights_only=True)


class LoraStack:
    """The LoRA adapters of ``folders`` (name -> peft folder) stacked onto ``model``'s
    ``nn.Linear`` layers; ``rows(names)`` routes each batch row through its adapter.

    ``unsupported(folders)`` says whether a set of adapters can be stacked at all.
    """

    def __init__(self, model: torch.nn.Module, folders: Mapping[str, Path],
                 labels: Mapping[str, str] | None = None):
        """``labels[name]``: how errors name that adapter (default ``adapter <folder>``)."""
        self.slots = {name: slot for slot, name in enumerate(folders, 1)}
        modules = dict(model.named_modules())
        # module name -> {slot: (A, B, scale)}
        found: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor, float]]] = {}
        for name, folder in folders.items():
            folder = Path(folder)
            label = (labels or {}).get(name, f"adapter {folder}")
            config = read_json(folder / ADAPTER_CONFIG)
            try:
                weights = _read_weights(folder)
            except (OSError, RuntimeError, ValueError) as error:
                raise LampError(f"cannot load {label}: "
                                f"{str(error).splitlines()[0] if str(error) else error}") from None
            pairs: dict[str, dict[str, torch.Tensor]] = {}
            embedding = next((key for key in weights if ".lora_embedding_" in key), None)
            if embedding is not None:  # (peft then saves the embedding layer too)
                raise NotStackable(f"{folder}: LoRA on an embedding ({embedding})")
            for key, tensor in weights.items():
                matrix = next((m for m in _MATRICES if key.endswith(m)), None)
                if matrix is None or not key.startswith(_PREFIX):
                    raise LampError(f"cannot load {label}: weight {key} is not a "
                                    "LoRA matrix of the base model")
                pairs.setdefault(key[len(_PREFIX):-len(matrix)], {})[matrix] = tensor
            for module_name, pair in pairs.items():
                layer = modules.get(module_name)
                if layer is not None and not isinstance(layer, torch.nn.Linear):
                    raise NotStackable(f"{folder}: {module_name} is a "
                                       f"{type(layer).__name__}, not a Linear layer")
                if layer is None or len(pair) != 2:
                    raise LampError(f"cannot load {label}: {module_name} is not a "
                                    "linear layer of this model with both LoRA matrices")
                a, b = pair[_MATRICES[0]], pair[_MATRICES[1]]
                if a.shape[0] != config.get("r", DEFAULT_R) or b.shape[1] != a.shape[0]:
                    raise LampError(
                        f"cannot load {label}: the LoRA matrices of {module_name} "
                        f"({tuple(a.shape)}, {tuple(b.shape)}) are not of rank r "
                        f"{config.get('r', DEFAULT_R)}, as its {ADAPTER_CONFIG} says")
                if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
                    raise LampError(
                        f"cannot load {label}: the LoRA matrices of {module_name} "
                        f"({tuple(a.shape)}, {tuple(b.shape)}) do not fit the layer "
                        f"({layer.in_features} -> {layer.out_features}); an adapter of "
                        "another base model?")
                found.setdefault(module_name, {})[self.slots[name]] = (a, b, _scale(config))
        self.layers: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]] = {}
        for module_name, per_slot in found.items():
            layer = modules[module_name]
            rank = max(a.shape[0] for a, _, _ in per_slot.values())
            # LoRA terms in float32 unless the layer itself is in a wider type: as peft
            # keeps adapters of a bf16/fp16 (or quantized) model in float32.
            dtype = torch.float32
            if layer.weight.is_floating_point() and layer.weight.element_size() > 4:
                dtype = layer.weight.dtype
            options = dict(dtype=dtype, device=layer.weight.device)
            stack_a = torch.zeros(len(self.slots) + 1, rank, layer.in_features, **options)
            stack_b = torch.zeros(len(self.slots) + 1, layer.out_features, rank, **options)
            # Applied after the products, as peft does (not folded into B: other rounding).
            scales = torch.zeros(len(self.slots) + 1, **options)
            for slot, (a, b, scale) in per_slot.items():
                stack_a[slot, :a.shape[0]] = a.to(**options)
                stack_b[slot, :, :b.shape[1]] = b.to(**options)
                scales[slot] = scale
            # peft rounds the term of a quantized (bitsandbytes) layer to the output's type
            # before adding it; a float layer's it adds in the wider type.
            self.layers[module_name] = (stack_a, stack_b, scales,
                                        not layer.weight.is_floating_point())
        self._by_name = modules

    @staticmethod
    def unsupported(folders: Sequence[Path]) -> str | None:
        """Why these adapters cannot be stacked (the first reason found), or ``None``."""
        for folder in folders:
            why = stackable(read_json(Path(folder) / ADAPTER_CONFIG))
            if why is not None:
                return f"{folder}: {why}"
        return None

    @contextlib.contextmanager
    def rows(self, names: Sequence[str], base: str) -> Iterator[None]:
        """Inside, row i of every forward pass goes through adapter ``names[i]`` (``base``:
        none). A pass with k times as many rows (beams, one row per label) repeats each
        prompt's adapter k times, as generation and label scoring lay their rows out."""
        slots = torch.tensor([0 if name == base else self.slots[name] for name in names])
        handles = []
        for module_name, stacks in self.layers.items():
            handles.append(self._by_name[module_name].register_forward_hook(
                _LayerRows(*stacks, slots)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


class _LayerRows:
    """The forward hook of one adapted layer: its rows' A and B gathered once per row count
    (a batch's passes all have the same), then two batched products per pass."""

    def __init__(self, stack_a: torch.Tensor, stack_b: torch.Tensor, scales: torch.Tensor,
                 round_first: bool, slots: torch.Tensor):
        self.stack_a, self.stack_b, self.scales, self.slots = stack_a, stack_b, scales, slots
        self.round_first = round_first
        self.gathered: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __call__(self, module, inputs, output):
        x = inputs[0]
        rows = x.shape[0]
        if rows not in self.gathered:
            if rows % len(self.slots):
                raise RuntimeError(f"a pass of {rows} rows for {len(self.slots)} prompts")
            slots = self.slots.repeat_interleave(rows // len(self.slots)).to(x.device)
            # (rows, in, r) and (rows, r, out): ready for x @ A^T @ B^T.
            self.gathered[rows] = (self.stack_a[slots].transpose(1, 2).contiguous(),
                                   self.stack_b[slots].transpose(1, 2).contiguous(),
                                   self.scales[slots].view(rows, 1, 1))
        a_t, b_t, scales = self.gathered[rows]
        flat = x.reshape(rows, -1, x.shape[-1]).to(a_t.dtype)
        delta = torch.bmm(torch.bmm(flat, a_t), b_t) * scales
        delta = delta.reshape(output.shape)
        if self.round_first:
            return output + delta.to(output.dtype)
        # Added in the wider type, then rounded once, as peft adds its term.
        return (output + delta).to(output.dtype)
