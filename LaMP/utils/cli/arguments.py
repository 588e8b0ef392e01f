"""Command-line flag groups, each defined once for every script that takes it: profile and
retrieval, model, optimizer, generation, bootstrap."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from LaMP.utils.cli.program import seed_arg
from LaMP.utils.evaluation.metrics import DEFAULT_BOOTSTRAP_SEED, OFFICIAL_ROUGE_SAMPLES
from LaMP.utils.evaluation.scoring import ROUGE_AGGREGATIONS
from LaMP.utils.errors import LampError
from LaMP.utils.retrieval import ON_THE_FLY_RANKERS, RANKERS, parse_retriever_spec
from LaMP.utils.retrieval.base import DEFAULT_BATCH_SIZE, DEFAULT_DENSE_MODEL, TIE_ORDERS
from LaMP.utils.seeds import DEFAULT_SEED
from LaMP.utils.tasks import TASK_HELP, task_arg


def add_profile_arguments(parser: argparse.ArgumentParser, max_length: int = 256) -> None:
    """Flags that choose how profile items reach the prompt (with ``ON_THE_FLY``'s flags)."""
    parser.add_argument("--use_profile", action="store_true",
                        help="personalize: put retrieved profile items into the prompt")
    parser.add_argument("--is_ranked", action="store_true",
                        help="the profiles are already ranked (merge_with_rank.py output): "
                             "take the first --num_retrieved items as they are")
    parser.add_argument("--num_retrieved", type=int, default=1,
                        help="number of profile items in each prompt (0: the bare input)")
    ON_THE_FLY.add(parser)
    add_budget_arguments(parser, max_length)


def add_budget_arguments(parser: argparse.ArgumentParser, max_length: int = 256) -> None:
    """How a prompt is fitted into the model's input."""
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


@dataclass(frozen=True)
class RetrieverFlags:
    """The flags that choose a ranker and set its options, one definition for every script
    that ranks, and the one translation of them into ``build_ranker``'s options.

    Two scripts name two of them differently: ``rank_profiles.py`` (``RANKING``) has
    ``--ranker`` and ``--batch_size``; the model scripts (``ON_THE_FLY``), which rank when
    their data is not ranked beforehand, have ``--retriever`` and, beside their own batch
    size, ``--retriever_batch_size``. ``--device`` and ``--seed`` are every such script's own
    (in a model script they are the model's too).
    """

    ranker: str  # the flag that names the ranker
    alias: str | None  # the same flag under the other script's name (the seed README uses both)
    batch_size: str  # the flag of the dense encoder's batch size
    default: str | None  # the ranker when the flag is left out; None: the flag is required
    purpose: str  # what the ranker is for, the start of the ranker flag's help
    # The rankers the flag takes: the composite ones (rspg) need the flags of `composite`.
    choices: tuple[str, ...] = ON_THE_FLY_RANKERS
    composite: bool = False  # --selector, --retrievers, --retriever_outputs for rspg

    def add(self, parser: argparse.ArgumentParser) -> None:
        names = (self.ranker,) if self.alias is None else (self.ranker, self.alias)
        parser.add_argument(*names, dest=self.ranker.removeprefix("--"),
                            required=self.default is None, default=self.default,
                            choices=self.choices,
                            help=f"{self.purpose}: {', '.join(self.choices)} "
                                 "(docs/retrieval.md, Rankers)")
        parser.add_argument(self.batch_size, type=int, default=DEFAULT_BATCH_SIZE,
                            help="texts per encoder forward pass for contriever (default "
                                 f"{DEFAULT_BATCH_SIZE}; 128 or more suits a GPU)")
        parser.add_argument("--tie_order", default="profile", choices=TIE_ORDERS,
                            help="BM25 ties: 'profile' keeps profile order (default: the same "
                                 "ranking on every machine); 'argsort' is the published code's "
                                 "np.argsort(scores)[::-1] order, which depends on numpy's sort")
        parser.add_argument("--use_date", action="store_true",
                            help="append ' date: <date>' to each profile item's text when "
                                 "ranking")
        parser.add_argument("--contriever_checkpoint", default=None,
                            help="encoder for contriever: a local folder or a hub name "
                                 f"(default {DEFAULT_DENSE_MODEL}, used only if already in the "
                                 "local Hugging Face cache; a name given here may be "
                                 "downloaded)")
        if self.composite:
            parser.add_argument("--selector", default=None,
                                help="rspg: the trained selector (train_selector.py "
                                     "--output_dir)")
            parser.add_argument("--retrievers", nargs="+", default=None, metavar="RETRIEVER",
                                type=_retriever_spec,
                                help="rspg: the candidate retrievers, each bm25, recency, "
                                     "random, contriever (the --contriever_checkpoint encoder) "
                                     "or contriever=DIR (another encoder, e.g. a "
                                     "train_retriever.py run)")
            parser.add_argument("--retriever_outputs", nargs="+", default=None,
                                metavar="PREDICTIONS",
                                help="rspg with an RSPG-Post selector: each candidate's "
                                     "evaluate_llm.py predictions on these questions, in "
                                     "--retrievers order")

    def check(self, parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
        name = self.name(args)
        if args.tie_order != "profile" and name != "bm25" and not (
                self.composite and name == "rspg"):
            parser.error(f"--tie_order applies to {self.ranker} bm25 "
                         + ("(and rspg's bm25 candidate) " if self.composite else "") + "only")
        if self._batch_size(args) < 1:
            parser.error(f"{self.batch_size} must be at least 1")
        if not self.composite:
            return
        if name == "rspg" and not (args.selector and args.retrievers):
            parser.error(f"{self.ranker} rspg needs --selector and --retrievers")
        for flag in ("selector", "retrievers", "retriever_outputs"):
            if name != "rspg" and getattr(args, flag):
                parser.error(f"--{flag} applies to {self.ranker} rspg only")

    def name(self, args: argparse.Namespace) -> str:
        """The ranker the parsed flags name."""
        return getattr(args, self.ranker.removeprefix("--"))

    def options(self, args: argparse.Namespace) -> dict:
        """``build_ranker``'s keyword options from the parsed flags (each ranker takes its
        own and leaves the rest)."""
        checkpoint = args.contriever_checkpoint
        return {"use_date": args.use_date, "tie_order": args.tie_order,
                "model_name": checkpoint or DEFAULT_DENSE_MODEL,
                # A model the user named may be downloaded; the default only comes from the
                # local cache (the project runs offline unless asked).
                "allow_download": checkpoint is not None,
                "batch_size": self._batch_size(args), "device": args.device,
                "seed": args.seed,
                **({"selector": args.selector, "retrievers": args.retrievers or (),
                    "retriever_outputs": args.retriever_outputs or ()}
                   if self.composite else {})}

    def _batch_size(self, args: argparse.Namespace) -> int:
        return getattr(args, self.batch_size.removeprefix("--"))


def add_shard_arguments(parser: argparse.ArgumentParser, verb: str, users: bool = False
                        ) -> None:
    """``--num_shards N --shard_id i``: this run does (``verb``) contiguous slice i of N of
    the questions, or with ``users`` every N-th user in id order from the i-th (shards of
    balanced size whatever the file's order); ``check_shard_arguments`` checks them."""
    what = ("the users into this many shards, every N-th user in id order (e.g. a SLURM "
            "array; default 1)" if users else
            "the questions into this many contiguous slices (default 1)")
    parser.add_argument("--num_shards", type=int, default=1, help=f"split {what}")
    parser.add_argument("--shard_id", type=int, default=0,
                        help=f"which {'shard' if users else 'slice'} to {verb}, "
                             "0 … num_shards-1 (default 0)")


def check_shard_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.num_shards < 1:
        parser.error("--num_shards must be at least 1")
    if not 0 <= args.shard_id < args.num_shards:
        parser.error(f"--shard_id must be in 0 … {args.num_shards - 1}")


def _retriever_spec(text: str) -> str:
    """argparse ``type=`` of ``--retrievers``: a candidate spec, checked while parsing."""
    try:
        parse_retriever_spec(text)
    except LampError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


RANKING = RetrieverFlags("--ranker", "--retriever", "--batch_size", None, "the ranker",
                         choices=RANKERS, composite=True)
ON_THE_FLY = RetrieverFlags("--retriever", "--ranker", "--retriever_batch_size", "bm25",
                            "ranker used on the fly when the data is not pre-ranked")
# collect_feedback.py: the ranker whose top items the LLM's feedback scores.
FIRST_STAGE = RetrieverFlags("--first_stage", None, "--retriever_batch_size", "bm25",
                             "ranker that picks each question's candidate items")


# How an input longer than its share of the budget is cut (docs/deviations.md).
INPUT_TRUNCATIONS = ("share", "tokenizer")
# How the profile items' share of the budget is counted (docs/deviations.md).
PROMPT_BUDGETS = ("exact", "official")


# The seed README names the model --model_addr for evaluate_llm.py and --model_name for
# train_llm.py; each script keeps its own name and takes the other as an alias.
MODEL_FLAGS = ("--model_addr", "--model_name")


def add_model_name_argument(parser: argparse.ArgumentParser, flag: str, help: str) -> None:
    """The required model flag under ``flag`` (one of ``MODEL_FLAGS``), the other spelling
    accepted as an alias."""
    alias = next(other for other in MODEL_FLAGS if other != flag)
    parser.add_argument(flag, alias, dest=flag.removeprefix("--"), required=True,
                        help=f"{help} (also {alias})")


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


def add_bf16_arguments(parser: argparse.ArgumentParser, fp32: str = "train in fp32") -> None:
    """``--bf16`` / ``--no_bf16`` (``args.bf16``: True, False, or None for "where native",
    which ``training.resolve_bf16`` settles once the device is known); ``fp32`` says what
    ``--no_bf16`` keeps in fp32."""
    parser.add_argument("--bf16", dest="bf16", action="store_const", const=True, default=None,
                        help="bf16 autocast, an error where the hardware has no native bf16 "
                             "(default: on for GPUs from Ampere on and CPUs with AVX512-BF16 "
                             "or AMX-BF16, off elsewhere)")
    parser.add_argument("--no_bf16", dest="bf16", action="store_const", const=False,
                        help=f"{fp32} even where bf16 is native")


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


# The paper's recipe for ROPG and RSPG (Salemi et al., SIGIR 2024), and the released code's
# clipping and temperature.
FEEDBACK_STEPS = 1000
FEEDBACK_LEARNING_RATE = 1e-5
FEEDBACK_WARMUP_STEPS = 1000


def add_feedback_training_arguments(parser: argparse.ArgumentParser, groups: str) -> None:
    """How a model learns from the LLM's feedback (train_retriever.py, train_selector.py):
    Adam, a linear warm-up and then a constant rate, one group (``groups``) per step."""
    parser.add_argument("--max_steps", type=int, default=FEEDBACK_STEPS,
                        help=f"optimizer steps (default {FEEDBACK_STEPS:,}, the paper's)")
    parser.add_argument("--learning_rate", type=float, default=FEEDBACK_LEARNING_RATE,
                        help=f"Adam's learning rate after warm-up (default "
                             f"{FEEDBACK_LEARNING_RATE:g}, the paper's)")
    parser.add_argument("--warmup_steps", type=int, default=FEEDBACK_WARMUP_STEPS,
                        help="steps over which the rate rises linearly from 0; constant after "
                             f"(default {FEEDBACK_WARMUP_STEPS:,}, the paper's: with the "
                             "default --max_steps the rate rises for the whole run; 0: "
                             "constant from the start, as the released scripts run)")
    parser.add_argument("--per_device_batch_size", type=int, default=1,
                        help=f"{groups} per optimizer step (default 1, the paper's per GPU)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="τ of the distillation: softmax(scores/τ) is fitted to "
                             "softmax(utilities/τ) (default 1, the released code's)")
    parser.add_argument("--max_grad_norm", type=float, default=1.0,
                        help="clip the gradient to this norm (default 1, the released code's)")
    parser.add_argument("--logging_steps", type=int, default=50,
                        help="log the mean loss every this many steps (0: never)")


def check_feedback_training_arguments(parser: argparse.ArgumentParser,
                                      args: argparse.Namespace) -> None:
    import math

    for flag in ("learning_rate", "temperature", "max_grad_norm"):
        value = getattr(args, flag)
        if not math.isfinite(value) or value <= 0:
            parser.error(f"--{flag} must be a finite number > 0, not {value}")
    if not 1 <= args.max_steps <= UPPER_BOUNDS["max_steps"]:
        parser.error(f"--max_steps must be in 1 … {UPPER_BOUNDS['max_steps']:,}")
    if not 0 <= args.warmup_steps <= UPPER_BOUNDS["max_steps"]:
        parser.error(f"--warmup_steps must be in 0 … {UPPER_BOUNDS['max_steps']:,}")
    if not 1 <= args.per_device_batch_size <= UPPER_BOUNDS["per_device_batch_size"]:
        parser.error(f"--per_device_batch_size must be in 1 … "
                     f"{UPPER_BOUNDS['per_device_batch_size']:,}")
    if args.logging_steps < 0:
        parser.error("--logging_steps must be >= 0")


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
    if getattr(args, "num_retrieved", 0) < 0:
        parser.error("--num_retrieved must be >= 0")
    if args.max_length < 16:
        parser.error("--max_length must be at least 16 tokens")
    for flag, highest in UPPER_BOUNDS.items():
        value = getattr(args, flag, None)  # not every script has every flag
        if value is not None and value > highest:
            parser.error(f"--{flag} must be at most {highest:,}, not {value}")
    if hasattr(args, "retriever"):  # the scripts that rank on the fly
        ON_THE_FLY.check(parser, args)


def profile_options(args: argparse.Namespace, device: str | None = None):
    """The ``ProfileOptions`` that the parsed flags describe; ``device``, when given, is where
    a dense ranker runs instead of ``--device`` (a process's own device in a multi-GPU run)."""
    from LaMP.utils.modeling.examples import ProfileOptions

    ranker_options = ON_THE_FLY.options(args)
    if device is not None:
        ranker_options["device"] = device
    return ProfileOptions(use_profile=args.use_profile, num_retrieved=args.num_retrieved,
                          is_ranked=args.is_ranked, retriever=ON_THE_FLY.name(args),
                          ranker_options=ranker_options)


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
