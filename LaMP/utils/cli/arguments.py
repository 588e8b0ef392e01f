"""Command-line flag groups, each defined once for every script that takes it: profile and
retrieval, model, optimizer, generation, bootstrap."""
from __future__ import annotations

import argparse

from LaMP.utils.cli.program import seed_arg
from LaMP.utils.evaluation.metrics import DEFAULT_BOOTSTRAP_SEED, OFFICIAL_ROUGE_SAMPLES
from LaMP.utils.evaluation.scoring import ROUGE_AGGREGATIONS
from LaMP.utils.retrieval import RANKERS
from LaMP.utils.retrieval.base import DEFAULT_DENSE_MODEL, TIE_ORDERS
from LaMP.utils.seeds import DEFAULT_SEED
from LaMP.utils.tasks import TASK_HELP, task_arg


def add_profile_arguments(parser: argparse.ArgumentParser, max_length: int = 256) -> None:
    """Flags that choose how profile items reach the prompt."""
    parser.add_argument("--use_profile", action="store_true",
                        help="personalize: put retrieved profile items into the prompt")
    parser.add_argument("--retriever", default="bm25", choices=RANKERS,
                        help="ranker used on the fly when the data is not pre-ranked")
    parser.add_argument("--is_ranked", action="store_true",
                        help="the profiles are already ranked (merge_with_rank.py output): "
                             "take the first --num_retrieved items as they are")
    parser.add_argument("--num_retrieved", type=int, default=1,
                        help="number of profile items in each prompt (0: the bare input)")
    parser.add_argument("--use_date", action="store_true",
                        help="on-the-fly ranking: add each item's date to its text")
    parser.add_argument("--contriever_checkpoint", default=None,
                        help="encoder for --retriever contriever: a local folder or a hub name "
                             f"(default {DEFAULT_DENSE_MODEL}, used only if already in the "
                             "local Hugging Face cache; a name given here may be downloaded)")
    parser.add_argument("--max_length", type=int, default=max_length,
                        help="token budget of the model input: instruction, profile and all")
    parser.add_argument("--input_truncation", default="share", choices=INPUT_TRUNCATIONS,
                        help="with profile items, 'share' cuts an input longer than 60%% of "
                             "the budget to that share (default: every prompt fits, items "
                             "included); 'tokenizer' leaves it whole and the tokenizer cuts "
                             "the finished prompt at --max_length, as the official code does")
    parser.add_argument("--prompt_budget", default="exact", choices=PROMPT_BUDGETS,
                        help="how profile items share the budget: 'exact' counts every piece "
                             "in the model's tokens (default: the prompt fits --max_length); "
                             "'official' sizes them by the official code's fixed constants "
                             "(docs/deviations.md), the tokenizer cutting any excess")


def add_tie_order_argument(parser: argparse.ArgumentParser) -> None:
    """How BM25 orders profile items with equal scores (docs/deviations.md)."""
    parser.add_argument("--tie_order", default="profile", choices=TIE_ORDERS,
                        help="BM25 ties: 'profile' keeps profile order (default: the same "
                             "ranking on every machine); 'argsort' is the published code's "
                             "np.argsort(scores)[::-1] order, which depends on numpy's sort")


# How an input longer than its share of the budget is cut (README, "Known deviations").
INPUT_TRUNCATIONS = ("share", "tokenizer")
# How the profile items' share of the budget is counted (README, "Known deviations").
PROMPT_BUDGETS = ("exact", "official")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that say how the model is loaded and run."""
    parser.add_argument("--chat_template", action="store_true",
                        help="send each prompt as a user turn through the tokenizer's chat "
                             "template (instruction-tuned causal models)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="allow model code from the hub (off: only transformers' own)")
    parser.add_argument("--cache_dir", default=None,
                        help="Hugging Face cache folder for downloaded models")
    add_seed_argument(parser, "seed for everything stochastic (initialisation, shuffling, the "
                              "random ranker)")


def add_optimizer_arguments(parser: argparse.ArgumentParser, *, num_train_epochs: float,
                            learning_rate_help: str, epochs_help: str = "training epochs",
                            max_steps_help: str = "stop after this many optimizer steps "
                                                  "(overrides epochs; -1: off)") -> None:
    """How an adapter (or model) is optimised: the flags train_llm.py and train_user_peft.py
    share, with the defaults and help each script gives its own recipe."""
    parser.add_argument("--learning_rate", type=float, default=5e-5, help=learning_rate_help)
    parser.add_argument("--weight_decay", type=float, default=1e-4, help="AdamW weight decay")
    parser.add_argument("--num_train_epochs", type=float, default=num_train_epochs,
                        help=epochs_help)
    parser.add_argument("--lr_scheduler_type", default="linear",
                        help="learning-rate schedule after warm-up (transformers' names)")
    parser.add_argument("--warmup_ratio", type=float, default=0.05,
                        help="share of the training steps spent warming the learning rate up")
    parser.add_argument("--max_steps", type=int, default=-1, help=max_steps_help)
    # 1.0: the Hugging Face Trainer's default, under which the LaMP authors' code trains.
    parser.add_argument("--max_grad_norm", type=float, default=1.0,
                        help="clip each step's gradient to this total norm (0: no clipping)")


def add_generation_arguments(parser: argparse.ArgumentParser, *, training: bool,
                             decoding: bool = True) -> None:
    """How answers are produced, one definition for every script that produces them:
    lengths and batch size (with ``training``, their help says what they also mean for
    training), and with ``decoding`` the beam width and label scoring."""
    parser.add_argument("--generation_max_length", type=int, default=128,
                        help="most tokens of a target (training) and of an answer (evaluation)"
                        if training else "most new tokens generated per answer")
    parser.add_argument("--per_device_batch_size", type=int, default=16,
                        help="examples per device per step, training and evaluation"
                        if training else "prompts per generation batch")
    if not decoding:
        return
    parser.add_argument("--generation_num_beams", type=int, default=4,
                        help="beam width" + (" of evaluation generation" if training else "")
                        + " (1: greedy decoding)")
    parser.add_argument("--label_scoring", action="store_true",
                        help="classification/rating tasks: answer with the label the model "
                             "finds most likely instead of free text"
                             + (" (in evaluation)" if training else ""))


def check_generation_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The flags of ``add_generation_arguments`` checked while parsing (``args.task``: the
    parsed task, for label scoring)."""
    for flag in ("generation_max_length", "per_device_batch_size", "generation_num_beams"):
        if getattr(args, flag, 1) < 1:
            parser.error(f"--{flag} must be >= 1")
    if getattr(args, "label_scoring", False) and not args.task.labels:
        parser.error(f"--label_scoring needs a task with labels; {args.task.name} has none")


def check_optimizer_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every number of ``add_optimizer_arguments`` checked while parsing: a bad one would
    otherwise surface only after the model has loaded (the optimizer rejects a negative
    learning rate) or train on nonsense (nan)."""
    import math

    for flag in ("learning_rate", "weight_decay", "num_train_epochs", "warmup_ratio",
                 "max_grad_norm"):
        if not math.isfinite(getattr(args, flag)):
            parser.error(f"--{flag} must be a finite number, not {getattr(args, flag)}")
    if args.learning_rate <= 0:
        parser.error("--learning_rate must be > 0")
    if args.weight_decay < 0:
        parser.error("--weight_decay must be >= 0")
    if args.max_grad_norm < 0:
        parser.error("--max_grad_norm must be >= 0 (0: no clipping)")
    if args.max_steps != -1 and args.max_steps < 1:
        parser.error("--max_steps must be >= 1 (or -1: train for --num_train_epochs)")
    if args.num_train_epochs <= 0 and args.max_steps <= 0:
        parser.error("--num_train_epochs must be > 0 (or set --max_steps)")
    if not 0 <= args.warmup_ratio < 1:
        parser.error("--warmup_ratio must be in [0, 1)")


# Upper bounds of the integer flags, checked while parsing. Without them a mistyped 10**20
# ends, after the model has loaded, in a traceback from the tokenizer ("int too big to
# convert"), from generate() or from a C++ allocation, or in a run that never ends.
MAX_TOKENS = 131_072  # the longest context of the models this pipeline is run with (128K)
UPPER_BOUNDS = {
    "max_length": MAX_TOKENS,
    "generation_max_length": MAX_TOKENS,
    "generation_num_beams": 128,  # far past any useful beam width; memory grows with it
    "per_device_batch_size": 65_536,  # more questions than most LaMP dev splits hold
    # Larger than the hidden size of the largest models: such a rank is no longer low-rank.
    "lora_r": 16_384,
    # Ten million optimizer steps is far past any LaMP run (the largest train split has
    # about 20,000 questions); beyond it a typo trains for ever.
    "max_steps": 10_000_000,
    "num_train_epochs": 10_000,  # the same for epochs (1e300 trained until killed)
}


def check_common(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validate the shared flags before any model is loaded."""
    if args.num_retrieved < 0:
        parser.error("--num_retrieved must be >= 0")
    if args.max_length < 16:
        parser.error("--max_length must be at least 16 tokens")
    for flag, highest in UPPER_BOUNDS.items():
        value = getattr(args, flag, None)  # not every script has every flag
        if value is not None and value > highest:
            parser.error(f"--{flag} must be at most {highest:,}, not {value}")


def profile_options(args: argparse.Namespace):
    """The ``ProfileOptions`` that the parsed flags describe."""
    from LaMP.utils.modeling.examples import ProfileOptions

    return ProfileOptions(use_profile=args.use_profile, num_retrieved=args.num_retrieved,
                          is_ranked=args.is_ranked, retriever=args.retriever,
                          use_date=args.use_date,
                          retriever_model=args.contriever_checkpoint or DEFAULT_DENSE_MODEL,
                          allow_download=args.contriever_checkpoint is not None,
                          device=args.device, seed=args.seed)


def add_task_argument(parser: argparse.ArgumentParser, flag: str = "--task") -> None:
    """The one task of a run, in any spelling the registry knows (the evaluators call the
    flag --task_name, as the official scripts do)."""
    parser.add_argument(flag, required=True, type=task_arg, help=f"the task: {TASK_HELP}")


def add_seed_argument(parser: argparse.ArgumentParser, help: str,
                      default: int | None = DEFAULT_SEED) -> None:
    """``--seed``, checked while parsing (``seed_arg``); ``help`` says what it seeds."""
    parser.add_argument("--seed", type=seed_arg, default=default, help=help)


def add_bootstrap_arguments(parser: argparse.ArgumentParser, default: int = 0,
                            help: str = "add 95%% confidence intervals from N bootstrap "
                                        "resamples (0: none)") -> None:
    """The evaluators' ``--bootstrap N`` and ``--seed`` flags (compare.py: paired resamples,
    1,000 by default)."""
    parser.add_argument("--bootstrap", type=int, default=default, metavar="N", help=help)
    add_seed_argument(parser, "seed of the bootstrap resampling (fixed so results repeat)",
                      default=DEFAULT_BOOTSTRAP_SEED)


def add_rouge_aggregation_argument(parser) -> None:
    """``--rouge_aggregation``: ours (the plain mean) or the official bootstrap median."""
    parser.add_argument("--rouge_aggregation", default="mean", choices=ROUGE_AGGREGATIONS,
                        help="ROUGE over examples: 'mean' (default: exact and repeatable) or "
                             "'bootstrap_median', the official evaluator's median of "
                             f"{OFFICIAL_ROUGE_SAMPLES:,} bootstrap means, seeded by --seed; "
                             "other metrics are the same either way")


# The most bootstrap resamples a run may ask for: 100,000 already resolves a p-value to 1e-5;
# more changes no reported digit, and a mistyped 10**20 would otherwise run for ever.
MAX_BOOTSTRAP = 100_000


def check_bootstrap_arguments(parser, args, minimum: int = 0) -> None:
    """``--bootstrap`` in ``minimum`` … ``MAX_BOOTSTRAP`` (compare.py needs at least one)."""
    if not minimum <= args.bootstrap <= MAX_BOOTSTRAP:
        parser.error(f"--bootstrap must be in {minimum} … {MAX_BOOTSTRAP:,}")
