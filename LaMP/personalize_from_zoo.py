"""Give each user of a questions file an adapter from a zoo of other users' adapters, with no
gradient step.

Example (from the LaMP/ folder):
    python personalize_from_zoo.py --validation_data ../runs/LaMP_7_dev_merged.json \
        --task LaMP-7 --model_addr HuggingFaceTB/SmolLM2-135M-Instruct \
        --zoo ../runs/zoo --output_dir ../runs/zoo_dev --method select

The support set of a user is their profile, as per-user training sees it (the per-user
template of the recipe the zoo's members learned from). ``--method select``: every
candidate's loss on the support set, the ``--shortlist`` lowest re-ranked by the task metric
on the support set (greedy answers), the best one wins; ``--use_clusters`` scores each
cluster's medoid first and then only the best cluster's members. ``--method random``: a
seeded uniform choice. ``--method lorahub``:
``--lorahub_adapters`` members drawn with the seed, weighted by nevergrad's NGOpt (weights in
±1.5, ``--lorahub_budget`` evaluations of support loss + 0.05·mean|w|); the user gets their
weighted sum. A user who is a member of the zoo is never given their own adapter. Leaves
``users/<user>/`` (a plain LoRA folder and ``user.json``), ``users.json`` (served unchanged by
``evaluate_llm.py --user_adapters``), ``selection.json`` (each user's choice, losses and
weights: ``eval/zoo_bound.py`` reads it) and ``args.json``; a rerun skips the users already done,
and ``--num_shards`` / ``--shard_id`` split the users between processes that share the folder.
``--method pieces``: Personalized Pieces over the sharers of ``--gates``
(``train_zoo_gates.py``): each module takes the ``--pieces_top_k`` sharers whose gates best
match the user's history and adds their pieces with softmax weights.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import time
from pathlib import Path


if importlib.util.find_spec("LaMP") is None:
    # Run from a checkout without `pip install -e .`: make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from LaMP.utils.cli.arguments import (add_bf16_arguments, add_generation_arguments,
                                      add_model_arguments,
                                      add_model_name_argument, add_profile_arguments,
                                      add_shard_arguments, add_task_argument, check_common,
                                      check_generation_arguments, check_shard_arguments)
from LaMP.utils.cli.program import ArgumentParser, run, setup_logging
from LaMP.utils.errors import LampError

logger = logging.getLogger(__name__)

METHODS = ("select", "random", "lorahub", "pieces")
SHORTLIST = 15  # the losses' shortlist the metric re-ranks (the fork's setting)
LORAHUB_ADAPTERS = 20  # members a LoRA-hub combination draws (LoRA-hub's setting)
LORAHUB_BUDGET = 40  # objective evaluations of the weight search (LoRA-hub's setting)
PIECES_TOP_K = 3  # pieces per module (Per-Pcs's setting)
SELECTION = "selection.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--validation_data", required=True,
                        help="questions whose users get an adapter (raw or merged); each "
                             "user's profile is their support set")
    add_model_name_argument(parser, "--model_addr",
                            "the base model the zoo was trained on: a hub name or a local folder")
    add_task_argument(parser)
    parser.add_argument("--zoo", required=True, help="a build_zoo.py --output_dir")
    parser.add_argument("--output_dir", required=True,
                        help="folder for users/<user>/, users.json, selection.json and "
                             "args.json; a rerun into it skips the users already done")
    parser.add_argument("--method", choices=METHODS, default="select",
                        help="select: support loss shortlist, then the task metric; random: "
                             "a seeded uniform choice among the other users' adapters; "
                             "lorahub: a weighted sum of drawn members, the weights searched "
                             "by nevergrad (pip install nevergrad); pieces: per module, the "
                             "sharers' pieces whose gates fit the user's history best "
                             "(Personalized Pieces; needs --gates)")
    parser.add_argument("--shortlist", type=int, default=SHORTLIST,
                        help=f"select: the lowest-loss candidates re-ranked by the metric "
                             f"(default {SHORTLIST})")
    parser.add_argument("--rerank_metric", choices=("task", "none"), default="task",
                        help="select: re-rank the shortlist by the task's selection metric on "
                             "the support set (task), or take the lowest loss (none)")
    parser.add_argument("--support_items", type=int, default=None,
                        help="use at most this many of a user's profile items as the support "
                             "set, drawn with --seed and the user id (default: all; a cost knob: "
                             "every candidate is scored on every support item)")
    parser.add_argument("--include_null", action="store_true",
                        help="also consider no adapter at all (the base model) as a candidate")
    parser.add_argument("--use_clusters", action="store_true",
                        help="select: score the zoo's cluster medoids first, then the members "
                             "of the best cluster only (build_zoo.py --cluster)")
    parser.add_argument("--lorahub_adapters", type=int, default=LORAHUB_ADAPTERS,
                        help=f"lorahub: how many of the other users' adapters the combination "
                             f"draws, seeded by --seed and the user id (default "
                             f"{LORAHUB_ADAPTERS})")
    parser.add_argument("--lorahub_budget", type=int, default=LORAHUB_BUDGET,
                        help=f"lorahub: evaluations of the support objective the weight search "
                             f"makes (default {LORAHUB_BUDGET})")
    parser.add_argument("--gates", default=None,
                        help="pieces: the sharers' gates, a train_zoo_gates.py --output_dir "
                             "trained on --zoo")
    parser.add_argument("--pieces_top_k", type=int, default=PIECES_TOP_K,
                        help=f"pieces: sharers whose pieces each module adds (default "
                             f"{PIECES_TOP_K}, Per-Pcs's)")
    parser.add_argument("--pieces_temperature", type=float, default=1.0,
                        help="pieces: temperature of the softmax over a module's top scores "
                             "(default 1)")
    add_profile_arguments(parser)
    add_generation_arguments(parser, training=False)
    add_shard_arguments(parser, "personalize", users=True)
    # Default: bf16 autocast where it is native, as the training scripts. SmolLM2's support
    # pass ran 2.7x faster on an AVX512-BF16 CPU (benchmarks/bench_zoo_scoring.py).
    add_bf16_arguments(parser, fp32="score candidates and answer the support set in fp32")
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    check_common(parser, args)
    check_generation_arguments(parser, args)
    check_shard_arguments(parser, args)
    if args.support_items is not None and args.support_items < 1:
        parser.error("--support_items must be >= 1")
    if args.shortlist < 1:
        parser.error("--shortlist must be >= 1")
    if args.use_clusters and args.method != "select":
        parser.error("--use_clusters goes with --method select")
    if args.lorahub_adapters < 1 or args.lorahub_budget < 1:
        parser.error("--lorahub_adapters and --lorahub_budget must be >= 1")
    if args.include_null and args.method == "lorahub":
        parser.error("--include_null: lorahub's weights reach the base model already (all "
                     "zero); leave it out")
    if (args.method == "pieces") != (args.gates is not None):
        parser.error("--method pieces and --gates go together")
    if args.pieces_top_k < 1 or not args.pieces_temperature > 0:
        parser.error("--pieces_top_k must be >= 1 and --pieces_temperature > 0")
    if args.include_null and args.method == "pieces":
        parser.error("--include_null: pieces assemble sharers' pieces, with no null piece; "
                     "leave it out")
    if args.is_ranked:
        parser.error("--is_ranked: the support examples are the profile items themselves; "
                     "leave it out")
    from LaMP.utils.modeling.training import resolve_bf16

    args.bf16 = resolve_bf16(args.bf16, use_cpu=args.device == "cpu")  # as args.json says
    return args


class Personalizer:
    """The model (loaded once, with the zoo's adapter slot), the support examples' maker and
    the choice of each user's member."""

    def __init__(self, args: argparse.Namespace, zoo, minimise=None, gates=None):
        from LaMP.utils.evaluation.metrics import metric_for  # noqa: F401 (fails early)
        from LaMP.utils.modeling.zoo import load_zoo_model, zoo_template

        self.args, self.zoo, self.minimise, self.gates = args, zoo, minimise, gates
        self.template = zoo_template(zoo, args.task)  # the members' own
        self.lamp_model, self.slot, self.prompt_fn = load_zoo_model(args, zoo)

    def autocast(self):
        """The precision of every pass that chooses: bf16 autocast with ``--bf16`` (weights
        and the zoo's vectors stay fp32), else fp32."""
        import torch

        return torch.autocast(self.lamp_model.device.type, dtype=torch.bfloat16,
                              enabled=bool(getattr(self.args, "bf16", False)))

    def support(self, user: str, items):
        """The user's support examples: every usable profile item, or ``--support_items``
        of them drawn with the seed and the user id (kept in profile order)."""
        import random

        from LaMP.utils.modeling.user_training import derived_seed, user_examples

        examples = user_examples(self.args.task, user, items, seed=self.args.seed,
                                 prompt_fn=self.prompt_fn, template=self.template)
        cap = self.args.support_items
        if cap and len(examples) > cap:
            kept = sorted(random.Random(derived_seed(self.args.seed, user, "support"))
                          .sample(range(len(examples)), cap))
            examples = [examples[i] for i in kept]
        return examples

    def choose(self, user: str, examples) -> dict:
        import random

        from LaMP.utils.modeling.user_training import derived_seed
        from LaMP.utils.modeling.zoo import NULL_MEMBER, cluster_candidates, select_member

        args, zoo = self.args, self.zoo
        own = user if user in zoo.users else None
        candidates = [member for member in zoo.users if member != own]
        features = self.features(examples)
        loss_of = lambda member: self.support_loss(member, features)  # noqa: E731
        record = {"method": args.method}
        if args.use_clusters:
            candidates, record["medoid_losses"] = cluster_candidates(
                zoo.index["clusters"]["clusters"], loss_of, own)
        if args.include_null:
            candidates = candidates + [NULL_MEMBER]
        if not candidates:
            raise LampError(f"--zoo {args.zoo}: no member but user {user!r}'s own adapter")
        if args.method == "lorahub":
            return {**record, **self.combine(user, candidates, features, examples),
                    "excluded_own": own is not None}
        if args.method == "pieces":
            return {**record, **self.pieces(user, own, features, examples),
                    "excluded_own": own is not None}
        if args.method == "random":
            winner = random.Random(derived_seed(args.seed, user)).choice(candidates)
            utilities = {}
        else:
            utility_of = (lambda member: self.support_utility(member, examples)) \
                if args.rerank_metric == "task" else None
            winner, losses, utilities = select_member(candidates, loss_of, utility_of,
                                                      args.shortlist)
            record["support_losses"] = losses
            record["support_utilities"] = utilities
        utility = utilities.get(winner)
        if utility is None:
            utility = self.support_utility(winner, examples)
        record.update({"members": [winner], "weights": [1.0],
                       "candidates": len(candidates) + len(record.get("medoid_losses", {})),
                       "support_size": len(examples), "support_error": 1.0 - utility,
                       "excluded_own": own is not None})
        return record

    def combine(self, user: str, candidates, features, examples) -> dict:
        """LoRA-hub: the weights of drawn members that minimise the support objective."""
        from LaMP.utils.modeling.user_training import derived_seed
        from LaMP.utils.modeling.zoo import lorahub_members, lorahub_objective, lorahub_weights

        args, zoo = self.args, self.zoo
        seed = derived_seed(args.seed, user)
        members = lorahub_members(candidates, args.lorahub_adapters, seed)
        objective = lorahub_objective(zoo, members,
                                      lambda vector: self.vector_loss(vector, features))
        weights = lorahub_weights(objective, len(members), args.lorahub_budget, seed,
                                  self.minimise)
        vector = zoo.vector_of(members, weights)
        # A search over the support set is no choice among N fixed adapters: the certificate
        # (eval/zoo_bound.py) does not cover it, so no number of candidates is recorded.
        return {"members": members, "weights": weights, "candidates": None,
                "budget": args.lorahub_budget, "objective": objective(weights),
                "support_size": len(examples),
                "support_error": 1.0 - self.vector_utility(vector, examples)}

    def pieces(self, user: str, own: str | None, features, examples) -> dict:
        """Personalized Pieces: every module's best-scored sharers, other than the user."""
        import numpy as np

        from LaMP.utils.modeling.pieces import HistoryScorer, assemble, choose_pieces

        args, gates = self.args, self.gates
        positions = [i for i, sharer in enumerate(gates.sharers) if sharer != own]
        if not positions:
            raise LampError(f"--gates {args.gates}: no sharer but user {user!r}")
        sharers = [gates.sharers[i] for i in positions]
        self.slot.use(np.zeros(self.zoo.vectors.shape[1]))  # the history on the base model
        scores = HistoryScorer(self.lamp_model, self.slot, args.per_device_batch_size).scores(
            features, gates.gates, positions)
        pieces = choose_pieces(scores, sharers, args.pieces_top_k, args.pieces_temperature)
        vector = assemble(self.zoo, pieces)
        used = sorted({member for piece in pieces.values() for member in piece["members"]})
        # Weighted by the user's own data, module by module: no choice among N fixed
        # adapters, so no number of candidates (eval/zoo_bound.py does not cover it).
        return {"members": used, "weights": None, "pieces": pieces, "candidates": None,
                "sharers": len(sharers), "support_size": len(examples),
                "support_error": 1.0 - self.vector_utility(vector, examples)}

    def features(self, examples):
        from LaMP.utils.modeling.training import training_features

        return training_features(self.lamp_model, examples, max_length=self.args.max_length,
                                 target_max_length=self.args.generation_max_length)

    def support_loss(self, member: str, features) -> float:
        return self.vector_loss(self.zoo.vector_of([member], [1.0]), features)

    def support_utility(self, member: str, examples) -> float:
        return self.vector_utility(self.zoo.vector_of([member], [1.0]), examples)

    def vector_loss(self, vector, features) -> float:
        """The mean support loss of the zoo vector ``vector`` (Σ w_j·R_j)."""
        from LaMP.utils.modeling.zoo import example_losses

        self.slot.use(vector)
        return float(example_losses(self.lamp_model, features,
                                    self.args.per_device_batch_size).mean())

    def vector_utility(self, vector, examples) -> float:
        """The mean per-example task metric (higher better, in [0, 1]) of the zoo vector's
        greedy answers to the support prompts."""
        from LaMP.utils.evaluation.scoring import utilities
        from LaMP.utils.modeling.answering import predict

        self.slot.use(vector)
        args = self.args
        answers = predict(self.lamp_model, args.task, examples, max_length=args.max_length,
                          max_new_tokens=args.generation_max_length, num_beams=1,
                          batch_size=args.per_device_batch_size,
                          label_scoring=args.label_scoring, progress=False)
        scores = utilities(args.task, [e.id for e in examples], [e.target for e in examples],
                           answers, "the support set")
        return sum(scores) / len(scores)


def write_user(output_dir: Path, zoo, user: str, record: dict, trained_on: dict) -> dict:
    """``user``'s folder: the chosen combination as a plain LoRA, and its user.json."""
    from LaMP.utils.data.fileio import atomic_folder, atomic_write_json
    from LaMP.utils.data.users import USER_RECORD, user_adapter_dir
    from LaMP.utils.modeling.pieces import record_vector
    from LaMP.utils.modeling.user_store import replace_incomplete
    from LaMP.utils.modeling.zoo import write_lora

    folder = user_adapter_dir(output_dir, user)
    replace_incomplete(folder, user)
    full = {"user": user, "items": record["support_size"], **trained_on, "zoo": record}
    with atomic_folder(folder) as temporary:
        write_lora(temporary, zoo, record_vector(zoo, record))
        atomic_write_json(temporary / USER_RECORD, full, indent=1)
    return full


def run_contents() -> tuple[str, ...]:
    from LaMP.utils.data.users import USERS_FOLDER, USERS_INDEX

    return f"{USERS_FOLDER}/", USERS_INDEX, SELECTION, "args.json"


STAGE = "personalize_from_zoo"  # args.json's "stage": what made the folder
# Flags that may differ between the runs that fill one --output_dir (users of other files).
RUN_LOCAL_FLAGS = frozenset({"validation_data", "output_dir", "device", "cache_dir",
                             "num_shards", "shard_id"})
# Flags newer than some output folders: one made without them ran at these values.
ADDED_FLAGS = {"gates": None, "pieces_top_k": PIECES_TOP_K, "pieces_temperature": 1.0,
               "support_items": None, "bf16": False}


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging()
    from LaMP.utils.data.fileio import (atomic_write_json, check_outputs, check_readable,
                                        plain_run_args, remove_stale_temporaries_in)
    from LaMP.utils.data.users import USERS_FOLDER
    from LaMP.utils.modeling.checkpoints import check_model_folder
    from LaMP.utils.modeling.user_store import (check_same_run, check_user_ids, pending_users,
                                                save_same_run, write_users_index)
    from LaMP.utils.modeling.user_training import (check_users_have_items, collect_profiles,
                                                   scan_users, shard_users)
    from LaMP.utils.modeling.zoo import check_zoo_fits, read_zoo, zoo_template

    from LaMP.utils.modeling.zoo import nevergrad_minimiser

    # Before any file or model: without the optional extra the method cannot run.
    minimise = nevergrad_minimiser() if args.method == "lorahub" else None
    check_readable(args.validation_data, "--validation_data")
    check_outputs(folders={"--output_dir": args.output_dir},
                  contents={"--output_dir": run_contents()},
                  inputs={"--validation_data": args.validation_data, "--zoo": args.zoo,
                          "--model_addr": args.model_addr, "--gates": args.gates})
    check_model_folder(args.model_addr, "--model_addr")
    zoo = read_zoo(args.zoo)
    check_zoo_fits(zoo, args)
    gates = None
    if args.gates:
        from LaMP.utils.modeling.pieces import read_gates

        gates = read_gates(args.gates, zoo, args.zoo)
    task = args.task
    users = scan_users(args.validation_data, task)
    check_user_ids(users)
    output_dir = Path(args.output_dir)
    # Users chosen otherwise (another method, zoo or seed) never join a run's folder.
    # The zoo's digest too: users chosen from a zoo since rebuilt at the same path (other
    # members, another template) must not join this folder's. A folder from before the
    # digest was recorded is taken to be of this zoo, as it was then.
    from LaMP.utils.modeling.pieces import zoo_digest

    digest = zoo_digest(args.zoo)
    settings = {**plain_run_args(args), "stage": STAGE, "zoo_sha256": digest}
    added = {**ADDED_FLAGS, "zoo_sha256": digest}
    check_same_run(output_dir, settings, RUN_LOCAL_FLAGS, "users personalized", added=added)
    trained_on = {"base_model": zoo.index["base_model"],
                  "base_adapter": zoo.index.get("base_adapter")}
    mine = shard_users(users, args.shard_id, args.num_shards)
    pending = pending_users(output_dir, mine, trained_on)
    logger.info("%d users in %s; shard %d of %d: %d users, %d already done", len(users),
                args.validation_data, args.shard_id, args.num_shards, len(mine),
                len(mine) - len(pending))
    profiles = collect_profiles(args.validation_data, task, pending)
    check_users_have_items(task, profiles, args.seed, args.validation_data,
                           zoo_template(zoo, task))
    personalizer = Personalizer(args, zoo, minimise, gates) if pending else None

    output_dir.mkdir(parents=True, exist_ok=True)
    save_same_run(output_dir, settings, RUN_LOCAL_FLAGS, "users personalized",
                  added=added)  # the same file from every shard
    remove_stale_temporaries_in(output_dir / USERS_FOLDER)
    from tqdm.auto import tqdm

    done = []
    for user in tqdm(pending, desc="users", unit="user"):
        started = time.perf_counter()
        examples = personalizer.support(user, profiles.pop(user))
        with personalizer.autocast():
            record = personalizer.choose(user, examples)
        record["seconds"] = round(time.perf_counter() - started, 3)  # the user's whole cost
        write_user(output_dir, zoo, user, record, trained_on)
        done.append(user)
        logger.info("user %s: %s (support error %.4f over %d items)", user,
                    f"pieces of {', '.join(record['members'])}" if record.get("pieces") else
                    " + ".join(f"{w:g}·{m}" for m, w in zip(record["members"], record["weights"])),
                    record["support_error"], record["support_size"])
    run_record = {"task": task.name, "model_name": zoo.index["base_model"]["name"],
                  "base_adapter": (zoo.index.get("base_adapter") or {}).get("path"),
                  "peft": "lora", "zoo": str(Path(args.zoo).resolve()), "method": args.method,
                  "bf16": args.bf16}
    selection = {"task": task.name, "zoo": run_record["zoo"], "method": args.method,
                 "bf16": args.bf16}

    def write_selection(records: dict) -> None:  # under users.json's lock: shards share it
        selection["users"] = {user: record["zoo"] for user, record in records.items()
                              if "zoo" in record}
        atomic_write_json(output_dir / SELECTION, selection, indent=1)

    index = write_users_index(output_dir, run_record, users, also=write_selection)
    return {"users": users, "shard_users": mine, "chosen": done, "index": index,
            "selection": selection}


if __name__ == "__main__":
    sys.exit(run(main))
