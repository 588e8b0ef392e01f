"""Train one small PEFT adapter per user on that user's own profile (per-user PEFT, OPPU).

Example (from the LaMP/ folder; a CPU-sized run, see --num_train_epochs and --learning_rate):
    python train_user_peft.py --train_data ../runs/LaMP_7_dev_merged.json --task LaMP-7 \
        --model_name HuggingFaceTB/SmolLM2-135M-Instruct --output_dir ../runs/users_lamp7 \
        --num_train_epochs 3 --learning_rate 1e-3

Users are the questions' ``user_id`` (time split), else each question is its own user (user
split); ``--users`` trains some of them (``most_active:N`` or a file of ids). Each user's
adapter learns from that user's profile items through the ``--recipe``'s per-user template
(``LaMP/utils/modeling/recipes.py``: the LaMP authors' or OPPU's, with their
hyper-parameters as the defaults), optionally with k other items of the same profile
retrieved into each prompt (``--use_profile --num_retrieved k``), optionally on top of a
task-level adapter from train_llm.py merged into the base (``--base_adapter``). Leaves
``{output_dir}/users/<user>/`` (a standard peft folder and ``user.json``) for every user,
``users.json`` and ``args.json``. A rerun skips the users already done; ``--num_shards`` /
``--shard_id`` and ``torchrun`` / ``accelerate launch`` split the users between processes.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path


if importlib.util.find_spec("LaMP") is None:
    # Run from a checkout without `pip install -e .` (as the original README's steps
    # do): make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from LaMP.utils.cli.arguments import (add_bf16_arguments, add_generation_arguments,
                                      add_model_arguments,
                                      add_model_name_argument,
                                      add_optimizer_arguments, add_profile_arguments,
                                      add_shard_arguments, add_task_argument, check_common,
                                      check_generation_arguments, check_optimizer_arguments,
                                      check_shard_arguments, profile_options)
from LaMP.utils.cli.program import ArgumentParser, run, setup_logging
from LaMP.utils.data.fileio import check_outputs, require_regular_file
from LaMP.utils.data.users import users_arg, users_file
from LaMP.utils.errors import LampError
from LaMP.utils.modeling.peft_methods import add_peft_arguments, check_peft_arguments, get_method
from LaMP.utils.modeling.recipes import USER_STAGE, add_recipe_argument, apply_recipe, get_recipe

logger = logging.getLogger(__name__)

SAVE_DTYPES = ("fp32", "bf16")
# Flags that may differ between the runs (and shards) that fill one --output_dir: they do
# not change what a user's adapter is.
RUN_LOCAL_FLAGS = frozenset({"train_data", "output_dir", "num_shards", "shard_id", "device",
                             "cache_dir", "users"})
# Flags newer than some output folders, at the value those folders' runs had.
ADDED_FLAGS = {"bf16": False}


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train_data", required=True,
                        help="questions file (raw or merged with outputs); each user's "
                             "adapter trains on the profile items of the user's questions")
    add_task_argument(parser)
    add_model_name_argument(parser, "--model_name", "base model: a hub name or a local folder")
    parser.add_argument("--output_dir", required=True,
                        help="folder for users/<user>/ (one peft adapter each), users.json "
                             "and args.json; a rerun into it skips the users already done")
    parser.add_argument("--base_adapter", default=None,
                        help="a task-level adapter (train_llm.py's --output_dir) merged into "
                             "the base before per-user training (OPPU's shared + personal "
                             "design); LoRA-family or ia3")
    parser.add_argument("--users", type=users_arg, default=None,
                        help="train only these users: most_active:N (the N with the most "
                             "profile items, equal counts by id) or a file of user ids (a "
                             "JSON list, or one id a line); default: every user of the data")
    # The LaMP authors' per-user recipe: 512 tokens of input.
    add_profile_arguments(parser, max_length=512)
    # The defaults of the optimiser, batch and LoRA flags are the --recipe's row.
    add_optimizer_arguments(
        parser, num_train_epochs=30,
        learning_rate_help="peak learning rate (default: the --recipe's, lamp 5e-5, oppu "
                           "1e-4)",
        epochs_help="epochs over each user's items (default: the --recipe's, lamp 30, oppu 2)",
        max_steps_help="stop each user after this many optimizer steps (overrides epochs; "
                       "-1: off)")
    add_generation_arguments(parser, training=True, decoding=False)
    add_peft_arguments(parser)  # --peft NAME and the flags of its methods
    add_recipe_argument(parser, USER_STAGE)
    # Default (neither flag): bf16 autocast where it is native, as train_llm.py; trainable
    # weights stay fp32. A step of SmolLM2 ran 2.6x faster on an AVX512-BF16 CPU.
    add_bf16_arguments(parser)
    parser.add_argument("--save_dtype", choices=SAVE_DTYPES, default="fp32",
                        help="dtype of the saved adapter weights (fp32: as trained; bf16 "
                             "halves the bytes per user)")
    add_shard_arguments(parser, "train", users=True)
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    apply_recipe(args, USER_STAGE)  # the flags not given take the recipe's values
    check_common(parser, args)
    check_optimizer_arguments(parser, args)
    check_generation_arguments(parser, args)
    check_peft_arguments(parser, args)
    if get_method(args.peft).builder is None:
        parser.error("--peft none trains the whole model: per-user training needs an adapter "
                     "method (one copy of the model per user is what it avoids)")
    check_shard_arguments(parser, args)
    if args.is_ranked:
        parser.error("--is_ranked: a file's ranking orders the profile for its question; "
                     "per-user training retrieves for each profile item among the user's "
                     "other items (leave it out and choose --retriever)")
    recipe = get_recipe(args.recipe)
    if recipe.user_template(args.task) is None:
        if recipe.user_templates is None:
            parser.error(f"{args.task.name} has no per-user training template")
        parser.error(f"--recipe {recipe.name} has no per-user template for {args.task.name} "
                     f"({recipe.missing_templates}); its tasks: "
                     f"{', '.join(recipe.user_templates)}")
    from LaMP.utils.modeling.training import resolve_bf16

    # Settled here, so that args.json and the comparison with a previous run hold what the
    # run does.
    args.bf16 = resolve_bf16(args.bf16, use_cpu=args.device == "cpu")
    return args


def check_previous_run(output_dir: Path, args: argparse.Namespace) -> None:
    """A rerun into --output_dir continues it only with the same settings."""
    from LaMP.utils.modeling.user_store import check_same_run

    check_same_run(output_dir, run_arguments(args), RUN_LOCAL_FLAGS,
                   "per-user adapters trained", added=ADDED_FLAGS)


def run_arguments(args: argparse.Namespace) -> dict:
    """The flags as args.json records them (JSON values, plus which stage wrote it)."""
    from LaMP.utils.data.fileio import plain_run_args

    return {**plain_run_args(args), "stage": "train_user_peft"}


def check_inputs(args: argparse.Namespace) -> None:
    """Fail on user mistakes before anything expensive is loaded."""
    from LaMP.utils.data.fileio import read_json
    from LaMP.utils.modeling.checkpoints import (ADAPTER_CONFIG, check_adapter_folder,
                                                 check_model_folder)
    from LaMP.utils.modeling.peft_methods import method_of_adapter

    require_regular_file(args.train_data, "--train_data",
                         "it is read twice: once for its users, once for their profiles")
    check_previous_run(Path(args.output_dir), args)
    check_model_folder(args.model_name, "--model_name")
    device_of(args)  # an unknown or absent device: one line now
    training_settings(args).check_schedule()
    if args.base_adapter:
        check_adapter_folder(args.base_adapter, "--base_adapter")
        method = method_of_adapter(read_json(Path(args.base_adapter) / ADAPTER_CONFIG))
        if method is None or get_method(method).virtual_tokens:
            raise LampError(f"--base_adapter {args.base_adapter}: a {method or 'unknown'} "
                            "adapter cannot be merged into the base model (LoRA-family and "
                            "ia3 adapters can)")


def shard_of(args: argparse.Namespace) -> tuple[int, int]:
    """(shard, number of shards) of this process: --shard_id of --num_shards, each split
    again among the processes a launcher started."""
    from LaMP.utils.modeling.distributed import launch_from_env

    launch = launch_from_env()
    return (args.shard_id * launch.world_size + launch.rank,
            args.num_shards * launch.world_size)


def device_of(args: argparse.Namespace):
    """This process's device: --device, or under a launcher its own GPU (LOCAL_RANK)."""
    from LaMP.utils.devices import resolve_device
    from LaMP.utils.modeling.distributed import launch_from_env

    launch = launch_from_env()
    return resolve_device(args.device,
                          local_rank=launch.local_rank if launch.distributed else None)


def load_base(args: argparse.Namespace):
    """The LampModel whose model is the base (with --base_adapter merged in), wrapped by
    peft with a first adapter of --peft; fp32 weights (the adapters train in fp32)."""
    import torch

    from LaMP.utils.modeling.model import LampModel, load_model
    from LaMP.utils.modeling.training import add_peft

    device = device_of(args)
    loaded = load_model(args.model_name, device=str(device), adapter=args.base_adapter,
                        chat_template=args.chat_template,
                        trust_remote_code=args.trust_remote_code, cache_dir=args.cache_dir,
                        dtype=torch.float32, lengths=(args.max_length, args.generation_max_length))
    model = loaded.model
    if args.base_adapter:
        model = model.merge_and_unload()  # the task adapter becomes part of the base
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model = add_peft(model, args.peft, vars(args), seq2seq=loaded.is_seq2seq)
    return LampModel(model=model, tokenizer=loaded.tokenizer, is_seq2seq=loaded.is_seq2seq,
                     device=device, chat_template=args.chat_template)


def trained_on_of(args: argparse.Namespace) -> dict:
    """What every user's adapter of this run is trained on top of, as its user.json records
    it: the base model and the task adapter merged into it (digests of their files)."""
    from LaMP.utils.modeling.user_records import adapter_identity, model_identity

    return {"base_model": model_identity(args.model_name),
            "base_adapter": adapter_identity(args.base_adapter) if args.base_adapter else None}


def run_contents() -> tuple[str, ...]:
    """What a run writes inside --output_dir: checked before any work rather than after the
    first user has trained."""
    from LaMP.utils.data.users import USERS_FOLDER, USERS_INDEX

    return f"{USERS_FOLDER}/", USERS_INDEX, "args.json"


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging()
    check_outputs(folders={"--output_dir": args.output_dir},
                  contents={"--output_dir": run_contents()},
                  inputs={"--train_data": args.train_data, "--model_name": args.model_name,
                          "--base_adapter": args.base_adapter, "--users": users_file(args.users),
                          "--contriever_checkpoint": args.contriever_checkpoint})
    check_inputs(args)

    from LaMP.utils.data.fileio import remove_stale_temporaries_in
    from LaMP.utils.data.questions import iter_questions
    from LaMP.utils.data.users import USERS_FOLDER, choose_users, profile_sizes
    from LaMP.utils.modeling.user_records import local_or_name
    from LaMP.utils.modeling.user_store import (check_user_ids, pending_users, save_same_run,
                                                write_users_index)
    from LaMP.utils.modeling.user_training import (check_users_have_items, collect_profiles,
                                                   scan_users, shard_users)

    task = args.task
    template = get_recipe(args.recipe).user_template(task)
    output_dir = Path(args.output_dir)
    shard, num_shards = shard_of(args)
    users = scan_users(args.train_data, task)  # every question validated, before any model
    if args.users:
        in_data = len(users)
        users = choose_users(args.users, users,
                             lambda: profile_sizes(iter_questions(args.train_data, task)),
                             args.train_data)
        logger.info("--users %s: %d of the %d users in %s", args.users, len(users), in_data,
                    args.train_data)
    check_user_ids(users)
    mine = shard_users(users, shard, num_shards)
    trained_on = trained_on_of(args)
    pending = pending_users(output_dir, mine, trained_on)
    logger.info("%d users in %s; shard %d of %d: %d users, %d already done", len(users),
                args.train_data, shard, num_shards, len(mine), len(mine) - len(pending))
    profiles = collect_profiles(args.train_data, task, pending)
    check_users_have_items(task, profiles, args.seed, args.train_data, template)
    # Everything that can fail on this machine (the model, its tokenizer, a dense retriever)
    # is set up before the first file is written.
    setup = TrainingSetup(args) if pending else None

    output_dir.mkdir(parents=True, exist_ok=True)
    save_same_run(output_dir, run_arguments(args), RUN_LOCAL_FLAGS,
                  "per-user adapters trained", added=ADDED_FLAGS)  # the same from every shard
    remove_stale_temporaries_in(output_dir / USERS_FOLDER)
    trained = setup.train(pending, profiles, trained_on) if setup else []
    # What serving needs to rebuild each user's model: the base, and the task adapter
    # merged into it (local paths made absolute: serving runs from anywhere).
    run_record = {"task": task.name, "model_name": local_or_name(args.model_name),
                  "base_adapter": local_or_name(args.base_adapter), "peft": args.peft,
                  "use_profile": args.use_profile, "num_retrieved": args.num_retrieved,
                  "retriever": args.retriever, "save_dtype": args.save_dtype,
                  "bf16": args.bf16,
                  # The recipe and the values it trained with (flags given override it).
                  "recipe": args.recipe, "training": recipe_values(args)}
    index = write_users_index(output_dir, run_record, users)
    logger.info("%d users trained now; %d of the data's %d users have adapters in %s",
                len(trained), len(users) - index["num_missing"], len(users), output_dir)
    return {"users": users, "shard_users": mine, "trained": [r["user"] for r in trained],
            "records": trained, "index": index}


class TrainingSetup:
    """The model (loaded once), the prompt builder, the ranker and the per-user trainer."""

    def __init__(self, args: argparse.Namespace):
        from LaMP.utils.modeling.peft_methods import build_config
        from LaMP.utils.modeling.user_training import UserAdapterTrainer, retrieval_task

        self.args = args
        task = args.task
        self.template = get_recipe(args.recipe).user_template(task)
        lamp_model = load_base(args)
        self.prompt_fn = lamp_model.prompt_builder(task, args.max_length, args.input_truncation,
                                                   args.prompt_budget)
        options = profile_options(args)
        self.num_retrieved = options.num_retrieved if options.uses_items else 0
        self.ranker = options.ranker(retrieval_task(task)) if options.uses_items else None
        base_config = lamp_model.model.get_base_model().config
        self.trainer = UserAdapterTrainer(
            lamp_model,
            lambda: build_config(get_method(args.peft), vars(args),
                                 seq2seq=lamp_model.is_seq2seq, model_config=base_config),
            training_settings(args), seed=args.seed, save_dtype=args.save_dtype)

    def train(self, pending: list[str], profiles: dict, trained_on: dict) -> list[dict]:
        """Train every pending user's adapter in turn; their records (``trained_on``: what
        each record says the adapter was trained on top of)."""
        from tqdm.auto import tqdm

        from LaMP.utils.modeling.user_training import user_examples

        args = self.args
        records = []
        progress = tqdm(pending, desc="users", unit="user")
        for user in progress:
            items = profiles.pop(user)
            examples = user_examples(args.task, user, items, seed=args.seed,
                                     prompt_fn=self.prompt_fn, ranker=self.ranker,
                                     num_retrieved=self.num_retrieved, template=self.template)
            record = self.trainer.train_user(user, examples, args.output_dir,
                                             extra={"profile_items": len(items),
                                                    **trained_on})
            records.append(record)
            progress.set_postfix(loss=record["final_loss"], refresh=False)
            logger.info("user %s: %d items, %d steps, final loss %.4f, %.1f s, %d bytes",
                        user, record["items"], record["steps"], record["final_loss"],
                        record["seconds"], record["bytes"])
        return records


def training_settings(args: argparse.Namespace):
    from LaMP.utils.modeling.user_training import TrainSettings

    return TrainSettings(
        learning_rate=args.learning_rate, weight_decay=args.weight_decay,
        num_train_epochs=args.num_train_epochs, max_steps=args.max_steps,
        batch_size=args.per_device_batch_size, warmup_ratio=args.warmup_ratio,
        lr_scheduler_type=args.lr_scheduler_type, max_length=args.max_length,
        target_max_length=args.generation_max_length, max_grad_norm=args.max_grad_norm,
        bf16=args.bf16)


def recipe_values(args: argparse.Namespace) -> dict:
    """The effective values of the flags a recipe sets (its own, or those given)."""
    from LaMP.utils.modeling.recipes import RECIPE_FLAGS

    return {flag: getattr(args, flag) for flag in RECIPE_FLAGS}


if __name__ == "__main__":
    sys.exit(run(main))
