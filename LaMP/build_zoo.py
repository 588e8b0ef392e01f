"""Gather per-user LoRA-XS adapters into one adapter zoo (shared basis, one row per user).

Example (from the LaMP/ folder; the runs are train_user_peft.py --peft lora_xs outputs):
    python build_zoo.py --user_adapters ../runs/users_a ../runs/users_b \
        --output_dir ../runs/zoo --cluster

Every user folder of every run (``users/<folder>/`` with its ``user.json``) becomes one row
of the zoo, users sorted by id; a user found in two runs, adapters trained on another base
model, task adapter or SVD basis, or of another method than lora_xs, are one error line.
Writes ``zoo.json``, ``basis.safetensors`` (each module's A and B, once) and
``vectors.safetensors`` (every user's r x r matrices, one row each) into a new
``--output_dir``, which appears whole (see ``LaMP/utils/modeling/zoo.py``).
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path


if importlib.util.find_spec("LaMP") is None:
    # Run from a checkout without `pip install -e .`: make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from LaMP.utils.cli.arguments import add_seed_argument
from LaMP.utils.cli.program import ArgumentParser, run, setup_logging
from LaMP.utils.errors import LampError, preview

logger = logging.getLogger(__name__)

MAX_CLUSTERS = 10  # the largest K the silhouette search tries


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--user_adapters", nargs="+", required=True,
                        help="train_user_peft.py --peft lora_xs output folders (users/<user>/ "
                             "and users.json each); their users become the zoo's members")
    parser.add_argument("--output_dir", required=True,
                        help="the zoo folder to create (new or empty): zoo.json, "
                             "basis.safetensors, vectors.safetensors")
    parser.add_argument("--cluster", action="store_true",
                        help="also cluster the members: k-means on their L2-normalised r x r "
                             "matrices, K by silhouette unless --num_clusters")
    parser.add_argument("--num_clusters", type=int, default=None,
                        help="K of the k-means (implies --cluster; default: the K in 2 … "
                             "--max_clusters with the best silhouette)")
    parser.add_argument("--max_clusters", type=int, default=MAX_CLUSTERS,
                        help=f"the largest K the silhouette search tries (default {MAX_CLUSTERS})")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="allow model code from the hub when reading the base model's "
                             "config (its module order)")
    parser.add_argument("--cache_dir", default=None,
                        help="Hugging Face cache folder for a hub base model's config")
    add_seed_argument(parser, "seed of the k-means seeding")
    args = parser.parse_args(argv)
    if args.num_clusters is not None:
        if args.num_clusters < 1:
            parser.error("--num_clusters must be >= 1")
        args.cluster = True
    if args.max_clusters < 2:
        parser.error("--max_clusters must be >= 2")
    return args


def gather_users(roots: list[str]) -> dict[str, dict]:
    """Every complete user folder's record under ``roots`` (``folder``: absolute), by user;
    a user in two runs is one error line."""
    from LaMP.utils.data.fileio import check_readable
    from LaMP.utils.modeling.user_store import scan_user_records
    from LaMP.utils.modeling.zoo import run_made_with

    found: dict[str, dict] = {}
    twice = []
    for root in roots:
        check_readable(root, "--user_adapters", folder=True)
        records = scan_user_records(root)
        if not records:
            raise LampError(f"--user_adapters {root}: no complete user folder (users/<user>/ "
                            "with user.json)")
        # What the run's record says and user.json does not: the task (a zoo serves one),
        # the recipe whose per-user template made the examples, and whether the prompts
        # carried retrieved items.
        made = run_made_with(root)
        for user, record in records.items():
            if user in found:
                twice.append(user)
            found[user] = {**record, "folder": str((Path(root) / record["folder"]).resolve()),
                           "run": str(Path(root).resolve()), **made}
    if twice:
        raise LampError(f"--user_adapters: users in more than one run: "
                        f"{preview(sorted(map(repr, twice)))}; a zoo holds one adapter per user")
    return dict(sorted(found.items()))


def check_trained_alike(records: dict[str, dict]) -> tuple[dict, dict | None]:
    """The one base model and task adapter every record names (one error line otherwise)."""
    from LaMP.utils.modeling.user_records import same_model, valid_identity

    model = adapter = None
    first = None
    for user, record in records.items():
        if not valid_identity(record.get("base_model"), ("name", "sha256")) or \
                "base_adapter" not in record:
            raise LampError(f"{record['folder']}/user.json: does not record the base model and "
                            "task adapter it was trained on; train the user again")
        if first is None:
            first, model, adapter = user, record["base_model"], record["base_adapter"]
            continue
        theirs = record["base_adapter"]
        if not same_model(model, record["base_model"]) or (adapter is None) != (theirs is None) \
                or (adapter is not None and adapter.get("sha256") != theirs.get("sha256")):
            raise LampError(f"--user_adapters: users {first!r} and {user!r} were trained on "
                            "different base models or task adapters; a zoo shares one basis")
    return model, adapter


def read_members(records: dict[str, dict], args: argparse.Namespace, model: dict):
    """Each user's modules, all in peft's order and over one basis."""
    from LaMP.utils.data.fileio import read_json
    from LaMP.utils.modeling.checkpoints import ADAPTER_CONFIG
    from LaMP.utils.modeling.zoo import module_order, read_xs_adapter, same_basis, xs_module_names

    configs = {}
    for user, record in records.items():
        config = read_json(Path(record["folder"]) / ADAPTER_CONFIG, "adapter config")
        if config.get("peft_type") != "TINYLORA":
            raise LampError(f"{record['folder']}: a {config.get('peft_type')} adapter; a zoo "
                            "holds lora_xs adapters (train_user_peft.py --peft lora_xs)")
        configs[user] = config
    shape_keys = ("r", "task_type", "fan_in_fan_out", "weight_tying")
    first = next(iter(configs))
    for user, config in configs.items():
        differ = [key for key in shape_keys if config.get(key) != configs[first].get(key)]
        if differ:
            raise LampError(f"--user_adapters: users {first!r} and {user!r} have adapters of "
                            f"different {differ[0]} ({configs[first].get(differ[0])!r}, "
                            f"{config.get(differ[0])!r})")
    names = xs_module_names(Path(records[first]["folder"]))
    order = module_order(model["name"], configs[first].get("task_type") == "SEQ_2_SEQ_LM", names,
                         trust_remote_code=args.trust_remote_code, cache_dir=args.cache_dir)
    members = {}
    for user, record in records.items():
        if xs_module_names(Path(record["folder"])) != names:
            raise LampError(f"--user_adapters: users {first!r} and {user!r} adapt different "
                            "modules")
        members[user] = read_xs_adapter(Path(record["folder"]), order)
        if user != first:
            module = same_basis(members[first], members[user])
            if module is not None:
                raise LampError(f"--user_adapters: users {first!r} and {user!r} have different "
                                f"SVD bases for {module} (trained on other base weights); a zoo "
                                "shares one basis")
    return configs[first], members


def one_recipe(records: dict[str, dict]) -> str:
    """The recipe every member's examples were made with (the template a new user's support
    set and the gates' training must use too); one error line for mixed recipes or members
    trained with retrieved items, which support sets do not carry."""
    recipes = sorted({record["recipe"] for record in records.values()})
    if len(recipes) > 1:
        raise LampError(f"--user_adapters: runs of different recipes ({', '.join(recipes)}); "
                        "a zoo's members must have learned from one per-user template")
    retrieved = sorted({record["run"] for record in records.values() if record["retrieved"]})
    if retrieved:
        raise LampError(f"--user_adapters {retrieved[0]}: trained with retrieved profile items "
                        "in each prompt (--use_profile); a zoo's support sets carry none, so "
                        "train its members without it")
    return recipes[0]


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging()
    from LaMP.utils.data.fileio import atomic_folder, check_fresh_folder, check_outputs

    check_outputs(folders={"--output_dir": args.output_dir},
                  inputs={"--user_adapters": args.user_adapters})
    check_fresh_folder(args.output_dir, "--output_dir")
    records = gather_users(args.user_adapters)
    model, adapter = check_trained_alike(records)

    import numpy as np

    from LaMP.utils.modeling.zoo import cluster_zoo, flatten, module_records, write_zoo

    config, members = read_members(records, args, model)
    users = list(members)
    first = members[users[0]]
    vectors = np.stack([flatten(members[user]) for user in users])
    basis = {}
    for module in first:
        basis[f"{module.name}.A"], basis[f"{module.name}.B"] = module.A, module.B
    index = {"users": users, "base_model": model, "base_adapter": adapter,
             "task_type": config.get("task_type"), "rank": config.get("r"),
             "target_modules": sorted(config.get("target_modules") or []),
             "modules": module_records(first),
             "members": {user: {"items": records[user].get("items"),
                                "final_loss": records[user].get("final_loss"),
                                "run": records[user]["run"]} for user in users}}
    tasks = sorted({str(records[u].get("task")) for u in users if records[u].get("task")})
    if len(tasks) > 1:
        raise LampError(f"--user_adapters: runs of different tasks ({', '.join(tasks)}); a zoo "
                        "serves one task")
    if tasks:
        index["tasks"] = tasks
    index["recipe"] = one_recipe(records)
    if args.cluster:
        index["clusters"] = cluster_zoo(users, vectors, k=args.num_clusters, seed=args.seed,
                                        k_max=args.max_clusters)
    target = Path(args.output_dir)
    if target.is_dir():  # an empty folder (check_fresh_folder): atomic_folder takes its place
        target.rmdir()
    with atomic_folder(target) as temporary:
        write_zoo(temporary, index, basis, vectors)
    logger.info("zoo of %d users (%d numbers each) in %s%s", len(users), vectors.shape[1],
                target, f", {index['clusters']['k']} clusters" if args.cluster else "")
    return index


if __name__ == "__main__":
    sys.exit(run(main))
