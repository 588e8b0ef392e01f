"""An adapter zoo: the LoRA-XS adapters of many users over one shared basis.

A LoRA-XS adapter (``--peft lora_xs``, peft's TinyLoRA with u = r²) changes each adapted
weight W by ΔW = B·R·A: A (r x in) and B (out x r) come from the truncated SVD of W and stay
frozen, R (r x r) is what a user trains. peft stores R as R = Σ_i v_i·P_i (fixed projections
P); the zoo stores R itself, which is the same adapter (v ↦ R is linear) in the coordinates
the clustering and the combinations need: a weighted sum of members' R's is the weighted
sum of their ΔW's, exactly, because every member shares A and B.

A zoo folder (``build_zoo.py``)::

    zoo.json            the members (sorted user ids: the rows), the base model and task
                        adapter they were trained on, the modules, per member its items
                        and loss; optionally the clusters
    basis.safetensors   "<module>.A" and "<module>.B" of every adapted module, once
    vectors.safetensors "R": one row per member, the R of every module flattened, in the
                        order of zoo.json's "modules"

A member (or a combination of members) becomes a plain LoRA folder for serving
(``lora_state``): lora_A = A, lora_B = B·R, scaling 1 (lora_alpha = r), so
``evaluate_llm.py --user_adapters`` stacks zoo adapters like any per-user LoRA.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from LaMP.utils.data.fileio import read_json
from LaMP.utils.errors import LampError, preview
from LaMP.utils.modeling.checkpoints import ADAPTER_CONFIG, ADAPTER_WEIGHTS

logger = logging.getLogger(__name__)

ZOO_INDEX = "zoo.json"
ZOO_BASIS = "basis.safetensors"
ZOO_VECTORS = "vectors.safetensors"
ZOO_FILES = (ZOO_INDEX, ZOO_BASIS, ZOO_VECTORS)
# The weights file of a user's adapter (train_user_peft.py writes safetensors) and of a served one.
ADAPTER_FILE = ADAPTER_WEIGHTS[0]
NULL_MEMBER = "__null__"  # the "no adapter" candidate of --include_null (R = 0)
_PREFIX = "base_model.model."  # peft's prefix of a module's name in a saved state dict
# Two runs' SVD bases of one weight agree to float rounding; a larger difference is another
# base weight (or a sign flip of a singular vector), over which R's do not add up.
BASIS_TOLERANCE = 1e-4


# -- reading LoRA-XS adapters -----------------------------------------------------------------

@dataclass
class XsModule:
    name: str
    A: np.ndarray  # (rank, in)
    B: np.ndarray  # (out, rank)
    R: np.ndarray  # (rank, rank)


def module_order(model_name: str, seq2seq: bool, names: Sequence[str], **load) -> list[str]:
    """``names`` in the order peft numbers them (the model's ``named_modules`` order, from a
    weightless copy of the model): TinyLoRA's trainable vectors are keyed by that number,
    and a saved file's sorted keys (``layers.10`` before ``layers.2``) do not tell it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from LaMP.utils.modeling.model import load_config

    config = load_config(model_name, **load)
    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(config)
    wanted = set(names)
    ordered = [name for name, _ in model.named_modules() if name in wanted]
    if len(ordered) != len(wanted):
        missing = sorted(wanted - set(ordered))
        raise LampError(f"{model_name} has no modules {preview(missing)} that the adapters adapt")
    return ordered


def xs_module_names(folder: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(folder / ADAPTER_FILE), "np") as handle:
        keys = list(handle.keys())
    return sorted(key[len(_PREFIX):-len(".tinylora_A")] for key in keys
                  if key.startswith(_PREFIX) and key.endswith(".tinylora_A"))


def read_xs_adapter(folder: Path, order: Sequence[str]) -> list[XsModule]:
    """The modules of a saved lora_xs adapter in ``order``, each with its A, B and
    R = Σ_i v_i·P_i (computed in float64, stored as float32)."""
    from safetensors.numpy import load_file

    config = read_json(folder / ADAPTER_CONFIG, "adapter config")
    if config.get("peft_type") != "TINYLORA" or config.get("weight_tying", 0.0) != 0.0:
        raise LampError(f"{folder}: not a lora_xs adapter (peft_type "
                        f"{config.get('peft_type')!r}, weight_tying {config.get('weight_tying')!r})")
    try:
        state = {key: value.astype(np.float64) for key, value in
                 load_file(str(folder / ADAPTER_FILE)).items()}
    except Exception as error:  # safetensors raises its own error types for a damaged file
        raise LampError(f"{folder / ADAPTER_FILE}: cannot read ({error})") from None
    modules = []
    for index, name in enumerate(order):
        keys = [f"{_PREFIX}{name}.tinylora_{part}" for part in "ABP"] + [
            f"base_model.tinylora_v.{index}"]
        absent = [key for key in keys if key not in state]
        if absent:
            raise LampError(f"{folder / ADAPTER_FILE}: no {absent[0]} (saved without its "
                            "projections? lora_xs adapters keep them)")
        A, B, P, v = (state[key] for key in keys)
        modules.append(XsModule(name, A.astype(np.float32), B.astype(np.float32),
                                np.einsum("i,ijk->jk", v, P).astype(np.float32)))
    return modules


def same_basis(first: Sequence[XsModule], second: Sequence[XsModule]) -> str | None:
    """The first module whose A or B differ beyond rounding, or ``None``."""
    for one, other in zip(first, second):
        for part in ("A", "B"):
            mine, theirs = getattr(one, part), getattr(other, part)
            if mine.shape != theirs.shape:
                return one.name
            scale = max(float(np.abs(mine).max(initial=0.0)), 1e-12)
            if float(np.abs(mine - theirs).max(initial=0.0)) > BASIS_TOLERANCE * scale:
                return one.name
    return None


# -- the zoo on disk --------------------------------------------------------------------------

@dataclass
class Zoo:
    index: dict  # zoo.json
    basis: dict[str, np.ndarray]  # "<module>.A" / "<module>.B"
    vectors: np.ndarray  # (members, dimension)

    @property
    def users(self) -> list[str]:
        return list(self.index["users"])

    @property
    def modules(self) -> list[dict]:
        return self.index["modules"]

    def row(self, user: str) -> int:
        return self.index["users"].index(user)

    def vector_of(self, members: Sequence[str], weights: Sequence[float]) -> np.ndarray:
        """Σ_j w_j·R_j over ``members`` (``NULL_MEMBER``: zero)."""
        total = np.zeros(self.vectors.shape[1], dtype=np.float64)
        for member, weight in zip(members, weights):
            if member != NULL_MEMBER:
                total += float(weight) * self.vectors[self.row(member)].astype(np.float64)
        return total


def flatten(modules: Sequence[XsModule]) -> np.ndarray:
    return np.concatenate([module.R.reshape(-1) for module in modules]).astype(np.float32)


def module_records(modules: Sequence[XsModule]) -> list[dict]:
    records, offset = [], 0
    for module in modules:
        rank = module.R.shape[0]
        records.append({"name": module.name, "rank": rank, "in": module.A.shape[1],
                        "out": module.B.shape[0], "offset": offset})
        offset += rank * rank
    return records


def write_zoo(folder: Path, index: Mapping, basis: Mapping[str, np.ndarray],
              vectors: np.ndarray) -> None:
    """The three zoo files, into ``folder`` (the caller makes it atomically)."""
    from safetensors.numpy import save_file

    from LaMP.utils.data.fileio import atomic_write_json

    save_file({key: np.ascontiguousarray(value) for key, value in basis.items()},
              str(folder / ZOO_BASIS))
    save_file({"R": np.ascontiguousarray(vectors, dtype=np.float32)}, str(folder / ZOO_VECTORS))
    atomic_write_json(folder / ZOO_INDEX, dict(index), indent=1)


def read_zoo(folder: str | Path, flag: str = "--zoo") -> Zoo:
    """A zoo folder, checked: its rows are its users, every module's basis is there."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    for name in ZOO_FILES:
        if not (folder / name).is_file():
            raise LampError(f"{flag} {folder}: no {name} (not a build_zoo.py folder)")
    index = read_json(folder / ZOO_INDEX, "zoo index")
    if not isinstance(index, dict) or not isinstance(index.get("users"), list) \
            or not isinstance(index.get("modules"), list):
        raise LampError(f"{flag} {folder}/{ZOO_INDEX}: no \"users\" and \"modules\" lists")
    try:
        basis = load_file(str(folder / ZOO_BASIS))
        vectors = load_file(str(folder / ZOO_VECTORS))["R"]
    except Exception as error:  # safetensors' own error types
        raise LampError(f"{flag} {folder}: cannot read its weights ({error})") from None
    dimension = sum(module["rank"] ** 2 for module in index["modules"])
    if vectors.shape != (len(index["users"]), dimension):
        raise LampError(f"{flag} {folder}: {ZOO_VECTORS} holds {vectors.shape}, not "
                        f"{len(index['users'])} users x {dimension}")
    absent = [m["name"] for m in index["modules"]
              if f"{m['name']}.A" not in basis or f"{m['name']}.B" not in basis]
    if absent:
        raise LampError(f"{flag} {folder}: {ZOO_BASIS} lacks modules {preview(absent)}")
    return Zoo(index=index, basis=basis, vectors=vectors)


def check_zoo_fits(zoo: Zoo, args) -> None:
    """The zoo's base model is --model_addr, its task adapter is unchanged, and it was
    clustered when --use_clusters asks for it."""
    from LaMP.utils.modeling.user_records import (adapter_identity, local_or_name,
                                                  model_identity, same_model)

    recorded = zoo.index["base_model"]
    served = {"name": local_or_name(args.model_addr), "sha256": None}
    if recorded.get("sha256"):
        served = model_identity(args.model_addr)
    if not same_model(recorded, served):
        raise LampError(f"--zoo {args.zoo}: its adapters were trained on {recorded['name']}, "
                        f"not on --model_addr {args.model_addr}")
    adapter = zoo.index.get("base_adapter")
    if adapter and adapter.get("sha256") and \
            adapter_identity(adapter["path"])["sha256"] != adapter["sha256"]:
        raise LampError(f"--zoo {args.zoo}: task adapter {adapter['path']} has other files "
                        "than the zoo was trained on top of")
    tasks = zoo.index.get("tasks") or []
    if tasks and args.task.name not in tasks:
        raise LampError(f"--zoo {args.zoo}: its adapters were trained for {', '.join(tasks)}, "
                        f"not {args.task.name}")
    if getattr(args, "use_clusters", False) and "clusters" not in zoo.index:
        raise LampError(f"--use_clusters: --zoo {args.zoo} has no clusters (build it with "
                        "--cluster)")


# -- serving: a zoo vector as a plain LoRA ------------------------------------------------------

def lora_rank(zoo: Zoo) -> int:
    return max(module["rank"] for module in zoo.modules)


def lora_state(zoo: Zoo, vector: np.ndarray) -> dict[str, np.ndarray]:
    """peft LoRA weights with lora_B·lora_A = B·R·A for every module (scaling 1): a module
    whose SVD rank is below the zoo's (a narrow weight) is padded with zeros, which adds
    nothing, so that every module has one rank and the adapter stacks."""
    rank = lora_rank(zoo)
    state = {}
    for module in zoo.modules:
        r, name = module["rank"], module["name"]
        R = vector[module["offset"]:module["offset"] + r * r].reshape(r, r).astype(np.float64)
        A = np.zeros((rank, module["in"]), dtype=np.float32)
        B = np.zeros((module["out"], rank), dtype=np.float32)
        A[:r] = zoo.basis[f"{name}.A"]
        B[:, :r] = (zoo.basis[f"{name}.B"].astype(np.float64) @ R).astype(np.float32)
        state[f"{_PREFIX}{name}.lora_A.weight"] = A
        state[f"{_PREFIX}{name}.lora_B.weight"] = B
    return state


def lora_config(zoo: Zoo) -> dict:
    """The adapter_config.json of a zoo member served as LoRA."""
    from peft import LoraConfig, TaskType

    rank = lora_rank(zoo)
    config = LoraConfig(task_type=TaskType(zoo.index["task_type"]), r=rank, lora_alpha=rank,
                        lora_dropout=0.0, target_modules=sorted(zoo.index["target_modules"]))
    # peft keeps target_modules as a set; its save_pretrained writes sets as lists.
    saved = {key: sorted(value) if isinstance(value, set) else value
             for key, value in config.to_dict().items()}
    saved["inference_mode"] = True
    saved["base_model_name_or_path"] = zoo.index["base_model"]["name"]
    return saved


def write_lora(folder: Path, zoo: Zoo, vector: np.ndarray) -> None:
    from safetensors.numpy import save_file

    from LaMP.utils.data.fileio import atomic_write_json

    save_file(lora_state(zoo, vector), str(folder / ADAPTER_FILE), metadata={"format": "pt"})
    atomic_write_json(folder / ADAPTER_CONFIG, lora_config(zoo), indent=1)


class ZooAdapter:
    """One LoRA adapter on a loaded model whose lora_A is the zoo's basis and whose lora_B
    is set to B·R of whichever zoo vector ``use`` is given: trying a member costs copying
    its lora_B, not loading a folder."""

    NAME = "zoo"

    def __init__(self, lamp_model, zoo: Zoo):
        import torch
        from peft import LoraConfig, get_peft_model

        config = lora_config(zoo)
        peft_config = LoraConfig(task_type=config["task_type"], r=config["r"],
                                 lora_alpha=config["lora_alpha"], lora_dropout=0.0,
                                 target_modules=config["target_modules"])
        self.zoo = zoo
        self.lamp_model = lamp_model
        lamp_model.model = get_peft_model(lamp_model.model, peft_config, adapter_name=self.NAME)
        lamp_model.model.eval()
        self.layers = {}
        for name, module in lamp_model.model.get_base_model().named_modules():
            if hasattr(module, "lora_A") and self.NAME in module.lora_A:
                self.layers[name] = module
        state = lora_state(zoo, np.zeros(zoo.vectors.shape[1]))
        with torch.no_grad():
            for module in zoo.modules:
                layer = self.layers[module["name"]]
                weight = layer.lora_A[self.NAME].weight
                weight.copy_(torch.from_numpy(state[f"{_PREFIX}{module['name']}.lora_A.weight"])
                             .to(weight))

    def use(self, vector: np.ndarray) -> None:
        import torch

        state = lora_state(self.zoo, vector)
        with torch.no_grad():
            for module in self.zoo.modules:
                weight = self.layers[module["name"]].lora_B[self.NAME].weight
                weight.copy_(torch.from_numpy(state[f"{_PREFIX}{module['name']}.lora_B.weight"])
                             .to(weight))


def run_made_with(root: str | Path) -> dict:
    """What a per-user training run's examples were made with, as its users.json says (or,
    for a run stopped before it, its args.json): ``task``, ``recipe`` (whose per-user
    template; a run from before recipes used LaMP's) and ``retrieved`` (profile items in
    each prompt). One error line for a recipe this project does not know."""
    from LaMP.utils.data.fileio import read_json
    from LaMP.utils.data.users import USERS_INDEX
    from LaMP.utils.modeling.recipes import DEFAULT_RECIPE, RECIPES

    root = Path(root)
    made, source = {}, root
    for name in (USERS_INDEX, "args.json"):
        if (root / name).is_file():
            made = read_json(root / name, "per-user run record")
            source = root / name
            break
    if not isinstance(made, dict):
        raise LampError(f"{source}: not a per-user run's record (a JSON object)")
    recipe = made.get("recipe", DEFAULT_RECIPE)
    if not isinstance(recipe, str) or recipe not in RECIPES:
        raise LampError(f"{source}: recipe {recipe!r} is none of {', '.join(RECIPES)}")
    retrieved = made.get("num_retrieved") if made.get("use_profile") else 0
    return {"task": made.get("task") if isinstance(made.get("task"), str) else None,
            "recipe": recipe, "retrieved": retrieved if isinstance(retrieved, int) else 1}


def zoo_recipe(zoo: Zoo, flag: str = "--zoo") -> str:
    """The recipe the zoo's members learned from: zoo.json's, or for a zoo built before it
    was recorded, their runs' (one error line where those are gone or disagree)."""
    from LaMP.utils.modeling.recipes import RECIPES

    recipe = zoo.index.get("recipe")
    if recipe is not None:
        if not isinstance(recipe, str) or recipe not in RECIPES:
            raise LampError(f"{flag}: zoo.json's recipe {recipe!r} is none of "
                            f"{', '.join(RECIPES)}")
        return recipe
    members = zoo.index.get("members")
    runs = sorted({m.get("run") for m in members.values() if isinstance(m, dict)}
                  if isinstance(members, dict) else set())
    if not runs or not all(isinstance(run, str) and Path(run).is_dir() for run in runs):
        raise LampError(f"{flag}: zoo.json does not say which recipe its members learned "
                        "from, and their training runs are gone; rebuild it with build_zoo.py")
    recipes = sorted({run_made_with(run)["recipe"] for run in runs})
    if len(recipes) > 1:
        raise LampError(f"{flag}: its members' runs used different recipes "
                        f"({', '.join(recipes)}); rebuild it with build_zoo.py")
    return recipes[0]


def zoo_template(zoo: Zoo, task, flag: str = "--zoo"):
    """The per-user template the zoo's members learned from (``zoo_recipe``'s, for
    ``task``): a new user's support set and the gates' training examples use it too."""
    from LaMP.utils.modeling.recipes import get_recipe

    name = zoo_recipe(zoo, flag)
    template = get_recipe(name).user_template(task)
    if template is None:
        raise LampError(f"{flag}: its members' recipe {name!r} has no per-user template for "
                        f"{task.name}")
    return template


def load_zoo_model(args, zoo: Zoo):
    """The zoo's base model (its task adapter merged in, float32) with one ``ZooAdapter`` slot,
    and its prompt builder: (the LampModel, the slot, the prompt function)."""
    import torch

    from LaMP.utils.modeling.model import load_model

    adapter = zoo.index.get("base_adapter")
    loaded = load_model(args.model_addr, device=args.device,
                        adapter=adapter["path"] if adapter else None,
                        chat_template=args.chat_template,
                        trust_remote_code=args.trust_remote_code, cache_dir=args.cache_dir,
                        dtype=torch.float32, lengths=(args.max_length, args.generation_max_length))
    if adapter:
        loaded.model = loaded.model.merge_and_unload()
    slot = ZooAdapter(loaded, zoo)
    prompt_fn = loaded.prompt_builder(args.task, args.max_length, args.input_truncation,
                                      args.prompt_budget)
    return loaded, slot, prompt_fn


def example_losses(lamp_model, features: Sequence[dict], batch_size: int) -> np.ndarray:
    """Each example's mean token cross-entropy of its target under the model as it is."""
    import torch

    from LaMP.utils.modeling.training import PaddingCollator

    collate = PaddingCollator(lamp_model.tokenizer.pad_token_id)
    losses = []
    model = lamp_model.model
    with torch.inference_mode():
        for start in range(0, len(features), batch_size):
            batch = {key: value.to(lamp_model.device) for key, value in
                     collate(features[start:start + batch_size]).items()}
            labels = batch.pop("labels")
            if lamp_model.is_seq2seq:
                logits = model(**batch, labels=labels).logits
            else:
                logits = model(**batch).logits[:, :-1]
                labels = labels[:, 1:]
            token = torch.nn.functional.cross_entropy(
                logits.float().transpose(1, 2), labels, reduction="none", ignore_index=-100)
            counted = (labels != -100).sum(dim=1).clamp(min=1)
            losses.extend((token.sum(dim=1) / counted).tolist())
    return np.asarray(losses, dtype=np.float64)


# -- choosing a member --------------------------------------------------------------------------

def select_member(candidates: Sequence[str], loss_of: Callable[[str], float],
                  utility_of: Callable[[str], float] | None, shortlist: int
                  ) -> tuple[str, dict[str, float], dict[str, float]]:
    """The winner among ``candidates``: the ``shortlist`` lowest support losses, then (with
    ``utility_of``) the highest support utility among them, ties to the lower loss, then to
    the earlier candidate. Returns (winner, losses of all, utilities of the shortlist)."""
    if not candidates:
        raise LampError("no zoo member to choose from (the zoo holds only the user's own "
                        "adapter?)")
    losses = {member: float(loss_of(member)) for member in candidates}
    ranked = sorted(candidates, key=lambda member: (losses[member], candidates.index(member)))
    short = ranked[:shortlist]
    if utility_of is None:
        return short[0], losses, {}
    utilities = {member: float(utility_of(member)) for member in short}
    winner = min(short, key=lambda member: (-utilities[member], losses[member],
                                            short.index(member)))
    return winner, losses, utilities


def cluster_candidates(clusters: Sequence[Mapping], loss_of: Callable[[str], float],
                       excluded: str | None) -> tuple[list[str], dict[str, float]]:
    """The members of the cluster whose representative (its medoid, or its most central
    member other than ``excluded``) has the lowest loss; and those representatives' losses."""
    representatives = {}
    for number, cluster in enumerate(clusters):
        usable = [member for member in cluster["members"] if member != excluded]
        if usable:
            representatives[number] = usable[0]  # members are stored most central first
    losses = {representatives[n]: float(loss_of(representatives[n])) for n in representatives}
    best = min(representatives, key=lambda n: (losses[representatives[n]], n))
    return ([m for m in clusters[best]["members"] if m != excluded], losses)


# -- LoRA-hub: a weighted sum of members -------------------------------------------------------

LORAHUB_BOUND = 1.5  # each weight's range, ±; LoRA-hub's setting
LORAHUB_L1 = 0.05  # the weight of mean |w| in the objective; LoRA-hub's setting


def lorahub_members(candidates: Sequence[str], count: int, seed: int) -> list[str]:
    """``count`` of ``candidates`` (all, if fewer) drawn uniformly with ``seed``, in the
    candidates' order."""
    import random

    if count >= len(candidates):
        return list(candidates)
    drawn = set(random.Random(seed).sample(range(len(candidates)), count))
    return [member for number, member in enumerate(candidates) if number in drawn]


def lorahub_objective(zoo: Zoo, members: Sequence[str],
                      loss_of_vector: Callable[[np.ndarray], float]
                      ) -> Callable[[np.ndarray], float]:
    """w ↦ support loss of Σ_j w_j·R_j + LORAHUB_L1·mean|w|. Summing R's over the shared
    basis is summing the members' ΔW's, so the objective scores the combined adapter itself."""
    def objective(weights) -> float:
        weights = np.asarray(weights, dtype=np.float64)
        return float(loss_of_vector(zoo.vector_of(members, weights))) + \
            LORAHUB_L1 * float(np.abs(weights).mean())
    return objective


Minimiser = Callable[[Callable[[np.ndarray], float], int, int, int], np.ndarray]


def nevergrad_minimiser() -> Minimiser:
    """(objective, dimension, budget, seed) ↦ the weights nevergrad's NGOpt recommends
    after ``budget`` evaluations, from w = 0, within ±LORAHUB_BOUND. nevergrad is an optional
    extra, imported only here."""
    try:
        import nevergrad
    except ImportError:
        raise LampError("--method lorahub needs nevergrad, which is not installed: "
                        "pip install nevergrad") from None

    def minimise(objective, dimension: int, budget: int, seed: int) -> np.ndarray:
        space = nevergrad.p.Array(init=np.zeros(dimension), lower=-LORAHUB_BOUND,
                                  upper=LORAHUB_BOUND)
        space.random_state = np.random.RandomState(seed % 2 ** 32)
        optimiser = nevergrad.optimizers.NGOpt(parametrization=space, budget=budget)
        return np.asarray(optimiser.minimize(objective).value, dtype=np.float64)
    return minimise


def lorahub_weights(objective: Callable[[np.ndarray], float], dimension: int, budget: int,
                    seed: int, minimise: Minimiser) -> list[float]:
    """The minimiser's weights, held to ±LORAHUB_BOUND (an optimiser's recommendation may
    sit a rounding outside its bounds)."""
    weights = np.asarray(minimise(objective, dimension, budget, seed), dtype=np.float64)
    assert weights.shape == (dimension,), weights.shape
    return [float(w) for w in np.clip(weights, -LORAHUB_BOUND, LORAHUB_BOUND)]


# -- clustering (numpy) --------------------------------------------------------------------------

def normalised(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


def kmeans(points: np.ndarray, k: int, seed: int, iterations: int = 100
           ) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding from ``seed``: (labels, centres)."""
    rng = np.random.default_rng(seed)
    n = len(points)
    centres = [points[rng.integers(n)]]
    for _ in range(1, k):
        distance = np.min([((points - c) ** 2).sum(axis=1) for c in centres], axis=0)
        total = distance.sum()
        choice = rng.integers(n) if total <= 0 else rng.choice(n, p=distance / total)
        centres.append(points[choice])
    centres = np.array(centres, dtype=np.float64)
    labels = np.full(n, -1)
    for _ in range(iterations):
        distance = ((points[:, None, :] - centres[None]) ** 2).sum(axis=2)
        new = distance.argmin(axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            if (labels == j).any():
                centres[j] = points[labels == j].mean(axis=0)
    return labels, centres


def silhouette(points: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette (euclidean); a point alone in its cluster scores 0, as in scikit-learn."""
    distance = np.sqrt(np.maximum(((points[:, None] - points[None]) ** 2).sum(axis=2), 0.0))
    scores = np.zeros(len(points))
    clusters = np.unique(labels)
    for i in range(len(points)):
        own = labels == labels[i]
        if own.sum() <= 1:
            continue
        inside = distance[i, own].sum() / (own.sum() - 1)
        outside = min(distance[i, labels == c].mean() for c in clusters if c != labels[i])
        scores[i] = (outside - inside) / max(inside, outside) if max(inside, outside) > 0 else 0.0
    return float(scores.mean())


def cluster_zoo(users: Sequence[str], vectors: np.ndarray, *, k: int | None, seed: int,
                k_max: int = 10) -> dict:
    """k-means on the L2-normalised R's; K given, or the K in 2 … k_max (below the number of
    members) with the best silhouette (ties to the smaller K). Each cluster lists its members
    most central first (the sum of distances to the others, in the clustering space): the
    first is its medoid."""
    points = normalised(vectors.astype(np.float64))
    n = len(points)
    if k is not None:
        if not 1 <= k <= n:
            raise LampError(f"--num_clusters {k}: must be in 1 … {n} (the zoo's members)")
        choices = [k]
    else:
        choices = list(range(2, min(k_max, n - 1) + 1))
        if not choices:
            raise LampError(f"a zoo of {n} members is too small to choose K by silhouette "
                            "(needs 3); give --num_clusters")
    best = None
    for candidate in choices:
        labels, _ = kmeans(points, candidate, seed)
        score = silhouette(points, labels) if len(np.unique(labels)) > 1 else 0.0
        if best is None or score > best[0] + 1e-12:
            best = (score, candidate, labels)
    score, chosen, labels = best
    distance = np.sqrt(np.maximum(((points[:, None] - points[None]) ** 2).sum(axis=2), 0.0))
    clusters = []
    for label in sorted(np.unique(labels)):
        rows = np.flatnonzero(labels == label)
        centrality = distance[np.ix_(rows, rows)].sum(axis=1)
        order = sorted(range(len(rows)), key=lambda j: (centrality[j], users[rows[j]]))
        members = [users[rows[j]] for j in order]
        clusters.append({"medoid": members[0], "members": members})
    return {"k": chosen, "silhouette": score, "seed": seed, "chosen_by":
            "given" if k is not None else "silhouette", "clusters": clusters}
