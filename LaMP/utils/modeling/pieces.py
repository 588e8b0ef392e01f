"""Personalized Pieces (Tan et al., EMNLP 2024) over an adapter zoo.

Sharers are zoo members. Each sharer's adapter gets, per adapted module, a gate vector g
(the module's input width): the module's LoRA branch reads x·σ(x·g) instead of x, and only g
trains, on the sharer's own profile with their adapter fixed (``train_zoo_gates.py``). For a
new user, every module scores every sharer by the user's history: the mean, over the
answer positions of the user's support examples, of LN(x)·LN(g) / √width, x being the
module's input on the base model; the module keeps its ``top_k`` best sharers and adds their
pieces with softmax(score / temperature) weights. No gradient step for the new user.

A piece here is a member's R of one module: the zoo's modules share A and B, so the weighted
sum of R's is the weighted sum of the pieces' ΔW exactly (Per-Pcs, with plain LoRA pieces,
adds the A's and the B's). A gates folder (``train_zoo_gates.py --output_dir``)::

    gates.json                 the zoo it was trained on (a digest), the modules, bf16, the
                               sharers, and those still pending (to train: another shard's)
    users/<user>/gate.safetensors   "<module>": g, per module; user.json: the sharer's record
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from LaMP.utils.errors import LampError, preview

GATES_INDEX = "gates.json"
GATE_FILE = "gate.safetensors"
# Seq2seq modules whose input is the encoder's output (T5, BART/Marian), by name ending.
CROSS_ATTENTION_INPUTS = ("EncDecAttention.k", "EncDecAttention.v", "encoder_attn.k_proj",
                          "encoder_attn.v_proj")


def zoo_digest(folder: str | Path) -> str:
    """sha256 of a zoo's index and vectors: gates belong to the members they were trained on."""
    from LaMP.utils.modeling.user_records import files_digest
    from LaMP.utils.modeling.zoo import ZOO_INDEX, ZOO_VECTORS

    folder = Path(folder)
    return files_digest(folder, [folder / ZOO_INDEX, folder / ZOO_VECTORS])


# -- the gates on a model ----------------------------------------------------------------------

def gated(x, g):
    """A module's input as its gated LoRA branch reads it: x·σ(x·g), one gate per token."""
    import torch

    return x * torch.sigmoid(x @ g.to(x.dtype)).unsqueeze(-1)


class Gates:
    """One trainable gate per module of a ``ZooAdapter`` slot (zeros: σ = ½ at the start, as
    Per-Pcs resets them), applied to the input of the slot's LoRA branch by forward
    pre-hooks; ``remove`` takes them off."""

    def __init__(self, slot, device):
        import torch

        self.slot = slot
        self.params = {}
        self._handles = []
        for module in slot.zoo.modules:
            name = module["name"]
            self.params[name] = torch.nn.Parameter(torch.zeros(module["in"], device=device))
            branch = slot.layers[name].lora_A[slot.NAME]
            self._handles.append(branch.register_forward_pre_hook(
                lambda _, inputs, g=self.params[name]: (gated(inputs[0], g), *inputs[1:])))

    def reset(self) -> None:
        import torch

        with torch.no_grad():
            for parameter in self.params.values():
                parameter.zero_()

    def values(self) -> dict[str, np.ndarray]:
        return {name: p.detach().cpu().numpy().astype(np.float32)
                for name, p in self.params.items()}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


# -- reading a gates folder ------------------------------------------------------------------

@dataclass
class SharerGates:
    sharers: list[str]  # sorted ids
    gates: dict[str, np.ndarray]  # module -> (sharers, width)


def read_gates(folder: str | Path, zoo, zoo_folder: str | Path, flag: str = "--gates"
               ) -> SharerGates:
    """A gates folder, checked against ``zoo``: trained on this zoo's members, every sharer
    a member with a gate for every module of the zoo's width."""
    from safetensors.numpy import load_file

    from LaMP.utils.data.fileio import read_json
    from LaMP.utils.data.users import find_user_folder, read_user_record

    folder = Path(folder)
    if not (folder / GATES_INDEX).is_file():
        raise LampError(f"{flag} {folder}: no {GATES_INDEX} (not a train_zoo_gates.py folder)")
    index = read_json(folder / GATES_INDEX, "gates index")
    sharers = checked_sharers(index, f"{flag} {folder}/{GATES_INDEX}")
    pending = checked_pending(index, f"{flag} {folder}/{GATES_INDEX}")
    if pending:
        raise LampError(f"{flag} {folder}: {len(pending)} sharers still to train (another "
                        f"shard's, or a stopped run's: {preview(pending)}); finish "
                        "train_zoo_gates.py first")
    if not sharers:
        raise LampError(f"{flag} {folder}/{GATES_INDEX}: no sharers")
    if index.get("zoo_sha256") != zoo_digest(zoo_folder):
        raise LampError(f"{flag} {folder}: its gates were trained on another zoo (or on this "
                        f"zoo's members before they changed) than --zoo {zoo_folder}")
    members = set(zoo.users)
    strangers = [user for user in sharers if user not in members]
    if strangers:
        raise LampError(f"{flag} {folder}: sharers that are no zoo member: {preview(strangers)}")
    per_module = {module["name"]: [] for module in zoo.modules}
    for user in sorted(sharers):
        found = find_user_folder(folder, user)
        record = read_user_record(found) if found else None
        path = found / GATE_FILE if found else None
        if path is None or not path.is_file() or not record or record.get("user") != user:
            raise LampError(f"{flag} {folder}: no {GATE_FILE} for sharer {user!r} (or its "
                            "folder's user.json names another user)")
        try:
            state = load_file(str(path))
        except Exception as error:  # safetensors' own error types
            raise LampError(f"{path}: cannot read ({error})") from None
        for module in zoo.modules:
            g = state.get(module["name"])
            if g is None or g.shape != (module["in"],) or not np.isfinite(g).all():
                raise LampError(f"{path}: no finite gate of width {module['in']} for module "
                                f"{module['name']}")
            per_module[module["name"]].append(g.astype(np.float32))
    return SharerGates(sorted(sharers), {name: np.stack(rows) for name, rows in
                                         per_module.items()})


def cluster_sharers(users: Sequence[str], embeddings: np.ndarray, sizes: Mapping[str, int],
                    k: int, seed: int) -> dict:
    """Per-Pcs's sharers: k-means (seeded k-means++) on the users' L2-normalised profile
    embeddings, and in each cluster the most active user (the most profile items, ties to the
    smaller id). A cluster k-means leaves empty has no sharer, so there may be fewer than k.
    Returns {"sharers": sorted ids, "clusters": [{"sharer", "members"}]} (members sorted)."""
    from LaMP.utils.modeling.zoo import kmeans, normalised

    if not 1 <= k <= len(users):
        raise LampError(f"clusters:{k}: must be in 1 … {len(users)} (the zoo members in the "
                        "data)")
    labels, _ = kmeans(normalised(np.asarray(embeddings, dtype=np.float64)), k, seed)
    clusters = []
    for label in sorted(set(labels.tolist())):
        members = sorted(users[i] for i in np.flatnonzero(labels == label))
        sharer = min(members, key=lambda user: (-sizes[user], user))
        clusters.append({"sharer": sharer, "members": members})
    clusters.sort(key=lambda cluster: cluster["sharer"])
    return {"sharers": sorted(c["sharer"] for c in clusters), "clusters": clusters}


def checked_pending(index, source: str) -> list[str]:
    """A gates index's sharers still to train ("pending": a list of ids; none if absent)."""
    pending = index.get("pending", []) if isinstance(index, dict) else None
    if not isinstance(pending, list) or not all(isinstance(u, str) for u in pending):
        raise LampError(f"{source}: not a gates index (its \"pending\", if any, lists user "
                        "ids)")
    return pending


def checked_sharers(index, source: str) -> list[str]:
    """A gates index's sharers: a JSON object whose "sharers" is a list of distinct ids."""
    sharers = index.get("sharers") if isinstance(index, dict) else None
    if not isinstance(sharers, list) or not all(isinstance(u, str) for u in sharers) \
            or len(set(sharers)) != len(sharers):
        raise LampError(f"{source}: not a gates index (an object whose \"sharers\" lists "
                        "distinct user ids)")
    return sharers


# -- scoring and assembling -------------------------------------------------------------------

def layer_norm(rows: np.ndarray) -> np.ndarray:
    """Each row centred and scaled to unit variance (no affine part), as Per-Pcs normalises
    hidden states and gates before their dot product."""
    rows = np.asarray(rows, dtype=np.float64)
    centred = rows - rows.mean(axis=-1, keepdims=True)
    return centred / np.sqrt((centred ** 2).mean(axis=-1, keepdims=True) + 1e-5)


def example_scores(states: np.ndarray, gates: np.ndarray) -> np.ndarray:
    """One example's score of every sharer: the mean over its positions ``states``
    (positions x width) of LN(x)·LN(g) / √width, for each row g of ``gates``."""
    width = gates.shape[1]
    return (layer_norm(states) @ layer_norm(gates).T).mean(axis=0) / math.sqrt(width)


def top_pieces(scores: np.ndarray, top_k: int, temperature: float) -> tuple[list[int], list[float]]:
    """The ``top_k`` best-scored sharers (ties: the earlier) and their softmax weights."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))[:top_k]
    chosen = np.asarray([scores[i] for i in order], dtype=np.float64) / temperature
    weights = np.exp(chosen - chosen.max())
    return order, (weights / weights.sum()).tolist()


def assemble(zoo, pieces: Mapping[str, Mapping]) -> np.ndarray:
    """The zoo vector whose every module's R is Σ w_j·R_j over that module's pieces
    (``{module: {"members": [...], "weights": [...]}}``)."""
    vector = np.zeros(zoo.vectors.shape[1], dtype=np.float64)
    for module in zoo.modules:
        start, size = module["offset"], module["rank"] ** 2
        chosen = pieces[module["name"]]
        for member, weight in zip(chosen["members"], chosen["weights"]):
            row = zoo.vectors[zoo.row(member)].astype(np.float64)
            vector[start:start + size] += float(weight) * row[start:start + size]
    return vector


def record_vector(zoo, record: Mapping) -> np.ndarray:
    """The zoo vector a personalize_from_zoo.py record gives its user: its pieces assembled
    module by module, or the weighted sum of its members."""
    if record.get("pieces"):
        return assemble(zoo, record["pieces"])
    return zoo.vector_of(record["members"], record["weights"])


def choose_pieces(module_scores: Mapping[str, np.ndarray], sharers: Sequence[str],
                  top_k: int, temperature: float) -> dict[str, dict]:
    """Per module, its pieces: the best ``top_k`` of ``sharers`` by that module's scores."""
    pieces = {}
    for name, scores in module_scores.items():
        order, weights = top_pieces(scores, top_k, temperature)
        pieces[name] = {"members": [sharers[i] for i in order], "weights": weights}
    return pieces


class HistoryScorer:
    """Every module's input on the model as it is, at the answer positions of a user's
    support examples, scored against the sharers' gates (``example_scores``), averaged over
    the examples: the scores ``choose_pieces`` takes."""

    def __init__(self, lamp_model, slot, batch_size: int):
        self.lamp_model, self.slot, self.batch_size = lamp_model, slot, batch_size

    def positions(self, name: str, batch: dict):
        """Which positions of module ``name``'s input stand for the answer: in a causal
        model those that predict an answer token (the next label is set); in a seq2seq
        decoder the label positions; in its encoder, and in the decoder's cross-attention
        keys and values (which read the encoder's output), every real input token."""
        labels = batch["labels"]
        if not self.lamp_model.is_seq2seq:
            following = labels[:, 1:] != -100
            return np.concatenate([following.cpu().numpy(),
                                   np.zeros((labels.shape[0], 1), dtype=bool)], axis=1)
        if name.startswith("encoder.") or ".encoder." in f".{name}" or \
                any(name.endswith(part) for part in CROSS_ATTENTION_INPUTS):
            return batch["attention_mask"].bool().cpu().numpy()
        return (labels != -100).cpu().numpy()

    def scores(self, features: Sequence[dict], gates: Mapping[str, np.ndarray],
               candidates: Sequence[int]) -> dict[str, np.ndarray]:
        import torch

        from LaMP.utils.modeling.training import PaddingCollator

        collate = PaddingCollator(self.lamp_model.tokenizer.pad_token_id)
        totals = {name: np.zeros(len(candidates)) for name in gates}
        counted = {name: 0 for name in gates}  # examples with an answer position
        captured: dict[str, np.ndarray] = {}
        handles = [self.slot.layers[name].lora_A[self.slot.NAME].register_forward_pre_hook(
            lambda _, inputs, name=name: captured.__setitem__(
                name, inputs[0].detach().float().cpu().numpy())) for name in gates]
        chosen = {name: rows[list(candidates)] for name, rows in gates.items()}
        try:
            with torch.inference_mode():
                for start in range(0, len(features), self.batch_size):
                    batch = collate(features[start:start + self.batch_size])
                    device_batch = {key: value.to(self.lamp_model.device)
                                    for key, value in batch.items()}
                    captured.clear()
                    self.lamp_model.model(**device_batch)
                    for name in gates:
                        where = self.positions(name, batch)
                        states = captured[name]
                        if where.shape != states.shape[:2]:
                            raise LampError(f"module {name}: its input has {states.shape[1]} "
                                            f"positions, the answer mask {where.shape[1]}: "
                                            "its input comes from neither the prompt nor the "
                                            "answer (a module Personalized Pieces cannot score)")
                        for row in range(states.shape[0]):
                            picked = states[row][where[row]]
                            if len(picked):
                                totals[name] += example_scores(picked, chosen[name])
                                counted[name] += 1
        finally:
            for handle in handles:
                handle.remove()
        silent = [name for name, count in counted.items() if count == 0]
        if silent:
            raise LampError(f"no support example has an answer token left after truncation "
                            f"(modules {preview(silent)}): nothing to score the sharers by; "
                            "raise --max_length or --generation_max_length")
        return {name: total / counted[name] for name, total in totals.items()}
