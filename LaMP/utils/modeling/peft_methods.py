"""The PEFT methods train_llm.py offers, as one table: adding a method is one row (and its tests).

Each row says how to build the method's peft config from the parsed flags (a builder named
``"module:function"``, imported only when the method is chosen, so that this module, the
flag parsing and the resume checks import neither torch nor peft), which flags it reads (the
flags that set the adapter's shape, which a resume must match), whether it adds virtual
tokens ahead of the prompt (these count against ``--max_length``) and which model kinds peft
supports it for.

How the virtual tokens reach the model differs: prompt tuning and p-tuning prepend trained
embeddings to the input; prefix tuning hands every attention layer trained keys and values
(``past_key_values``). ``LampModel`` asks ``prompt_learning_kind`` which of the two a loaded
model uses, so generation, label scoring and the prompt budget need no per-method branches.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Mapping

from LaMP.utils.errors import LampError
from LaMP.utils.modeling.prompts import MIN_PROMPT_TOKENS


@dataclass(frozen=True)
class PeftMethod:
    name: str
    help: str
    # "module:function" -> (options, *, seq2seq, model_config) -> a peft config; None: the
    # whole model trains (no adapter).
    builder: str | None
    # The flags the builder reads; they fix the adapter's shape, so a resume must match them.
    flags: tuple[str, ...] = ()
    # Trained positions ahead of the prompt (--num_virtual_tokens of them).
    virtual_tokens: bool = False
    seq2seq: bool = True  # peft supports it for encoder-decoder models
    causal: bool = True  # ... and for decoder-only ones
    # What its adapter_config.json holds (peft_type plus distinguishing switches): how the
    # method of a saved adapter or checkpoint is recognised.
    signature: Mapping[str, object] = field(default_factory=dict)
    # flag -> the adapter_config.json key that records it (resume checks read these).
    saved_as: Mapping[str, str] = field(default_factory=dict)
    # peft answers a batch whose rows use different adapters of this method (adapter_names=,
    # per-user serving); peft refuses it for DoRA and IA3's layers would ignore the names.
    mixed_batches: bool = False


_LORA_FLAGS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
_LORA_SAVED = {"lora_r": "r", "lora_alpha": "lora_alpha", "lora_target_modules": "target_modules"}
_BUILDERS = "LaMP.utils.modeling.peft_methods"

PEFT_METHODS: dict[str, PeftMethod] = {m.name: m for m in (
    PeftMethod("lora", "low-rank updates of the attention (and chosen) layers",
               f"{_BUILDERS}:lora_config", _LORA_FLAGS,
               signature={"peft_type": "LORA", "use_dora": False, "use_rslora": False},
               saved_as=_LORA_SAVED, mixed_batches=True),
    PeftMethod("dora", "LoRA with weight decomposition: direction by LoRA, magnitude apart",
               f"{_BUILDERS}:dora_config", _LORA_FLAGS,
               signature={"peft_type": "LORA", "use_dora": True}, saved_as=_LORA_SAVED),
    PeftMethod("rslora", "rank-stabilised LoRA: updates scaled by alpha / sqrt(r)",
               f"{_BUILDERS}:rslora_config", _LORA_FLAGS,
               signature={"peft_type": "LORA", "use_rslora": True}, saved_as=_LORA_SAVED,
               mixed_batches=True),
    PeftMethod("lora_xs", "LoRA-XS: each weight's truncated SVD gives frozen r-dimensional "
               "bases, only an r x r matrix between them trains (peft's TinyLoRA with u = r^2 "
               "and no tying; --lora_alpha plays no part)",
               f"{_BUILDERS}:lora_xs_config", ("lora_r", "lora_dropout", "lora_target_modules"),
               signature={"peft_type": "TINYLORA"},
               saved_as={"lora_r": "r", "lora_target_modules": "target_modules"}),
    PeftMethod("ia3", "learned rescaling of keys, values and feed-forward activations",
               f"{_BUILDERS}:ia3_config", ("ia3_target_modules", "ia3_feedforward_modules"),
               signature={"peft_type": "IA3"},
               saved_as={"ia3_target_modules": "target_modules",
                         "ia3_feedforward_modules": "feedforward_modules"}),
    PeftMethod("prompt_tuning", "trained embeddings of --num_virtual_tokens put before the "
               "prompt", f"{_BUILDERS}:prompt_tuning_config",
               ("num_virtual_tokens", "prompt_tuning_init", "prompt_tuning_init_text"),
               virtual_tokens=True, signature={"peft_type": "PROMPT_TUNING"},
               saved_as={"num_virtual_tokens": "num_virtual_tokens"}),
    PeftMethod("prefix_tuning", "trained keys and values of --num_virtual_tokens positions "
               "in every attention layer", f"{_BUILDERS}:prefix_tuning_config",
               ("num_virtual_tokens", "prefix_projection", "prompt_encoder_hidden_size"),
               virtual_tokens=True, signature={"peft_type": "PREFIX_TUNING"},
               saved_as={"num_virtual_tokens": "num_virtual_tokens",
                         "prefix_projection": "prefix_projection"}),
    PeftMethod("p_tuning", "virtual-token embeddings produced by a small trained MLP",
               f"{_BUILDERS}:p_tuning_config",
               ("num_virtual_tokens", "prompt_encoder_hidden_size"),
               virtual_tokens=True, signature={"peft_type": "P_TUNING"},
               saved_as={"num_virtual_tokens": "num_virtual_tokens",
                         "prompt_encoder_hidden_size": "encoder_hidden_size"}),
    PeftMethod("none", "full fine-tuning: every weight trains, the whole model is saved", None),
)}

# Defaults, each with its reason (the flags below use them).
NUM_VIRTUAL_TOKENS = 20  # the prompt-tuning and P-tuning papers' small setting; 20 of the
#                          default --max_length 256 leaves most of the budget to the profile
PROMPT_TUNING_INIT = "random"  # peft's default; "text" needs --prompt_tuning_init_text


def get_method(name: str) -> PeftMethod:
    try:
        return PEFT_METHODS[name]
    except KeyError:
        raise LampError(f"unknown PEFT method {name!r}; valid: {', '.join(PEFT_METHODS)}") from None


def add_peft_arguments(parser: argparse.ArgumentParser) -> None:
    """--peft and the flags its methods read."""
    described = "; ".join(f"{m.name}: {m.help}" for m in PEFT_METHODS.values())
    parser.add_argument("--peft", choices=tuple(PEFT_METHODS), default="lora",
                        help=f"what trains ({described})")
    parser.add_argument("--lora_r", type=int, default=16,
                        help="LoRA rank (lora, dora, rslora; lora_xs: the rank of the SVD bases)")
    parser.add_argument("--lora_alpha", type=int, default=32,
                        help="LoRA scaling numerator (the update is scaled by alpha / r; "
                             "rslora: alpha / sqrt(r))")
    parser.add_argument("--lora_dropout", type=float, default=0.05, help="dropout on LoRA inputs")
    parser.add_argument("--lora_target_modules", nargs="+", default=None,
                        help="layer names to adapt (default: peft's choice for the architecture)")
    # None: peft's choice for the architecture, as for LoRA.
    parser.add_argument("--ia3_target_modules", nargs="+", default=None,
                        help="ia3: layers whose outputs are rescaled (default: peft's choice "
                             "for the architecture)")
    parser.add_argument("--ia3_feedforward_modules", nargs="+", default=None,
                        help="ia3: those of --ia3_target_modules that are feed-forward layers "
                             "(their inputs are rescaled instead)")
    parser.add_argument("--num_virtual_tokens", type=int, default=NUM_VIRTUAL_TOKENS,
                        help="prompt_tuning, prefix_tuning, p_tuning: trained positions ahead "
                             "of the prompt; they count against --max_length")
    parser.add_argument("--prompt_tuning_init", default=PROMPT_TUNING_INIT,
                        choices=("random", "sample_vocab", "text"),
                        help="prompt_tuning: start the virtual tokens random, as embeddings "
                             "of random vocabulary words, or as --prompt_tuning_init_text")
    parser.add_argument("--prompt_tuning_init_text", default=None,
                        help="prompt_tuning with --prompt_tuning_init text: the words whose "
                             "embeddings start the virtual tokens")
    # Off as in peft: the prefix itself trains, with far fewer parameters than an MLP.
    parser.add_argument("--prefix_projection", action="store_true",
                        help="prefix_tuning: produce the prefix with a trained two-layer MLP "
                             "(the prefix-tuning paper's reparameterisation)")
    # None: the model's own width, as the P-tuning paper's encoder keeps it.
    parser.add_argument("--prompt_encoder_hidden_size", type=int, default=None,
                        help="p_tuning (and prefix_tuning with --prefix_projection): width of "
                             "the MLP that produces the virtual tokens (default: the model's "
                             "hidden size)")


def check_peft_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flag values no method could use: reported before any model loads."""
    for flag in ("lora_r", "lora_alpha", "num_virtual_tokens"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1")
    if not 0 <= args.lora_dropout < 1:  # a nan fails this too
        parser.error(f"--lora_dropout must be in [0, 1), not {args.lora_dropout}")
    if args.prompt_encoder_hidden_size is not None and args.prompt_encoder_hidden_size < 1:
        parser.error("--prompt_encoder_hidden_size must be >= 1")
    room = getattr(args, "max_length", None)
    if get_method(args.peft).virtual_tokens and room is not None \
            and args.num_virtual_tokens > room - MIN_PROMPT_TOKENS:
        parser.error(f"--num_virtual_tokens {args.num_virtual_tokens} leaves no room for a "
                     f"prompt within --max_length {room}")
    if args.peft == "prompt_tuning":
        if args.prompt_tuning_init == "text" and not args.prompt_tuning_init_text:
            parser.error("--prompt_tuning_init text needs --prompt_tuning_init_text")
    if args.ia3_feedforward_modules and args.ia3_target_modules:
        extra = sorted(set(args.ia3_feedforward_modules) - set(args.ia3_target_modules))
        if extra:
            parser.error(f"--ia3_feedforward_modules {' '.join(extra)}: not among "
                         "--ia3_target_modules")


def check_supported(method: PeftMethod, *, seq2seq: bool, model_name: str) -> None:
    """One line when peft does not offer ``method`` for this kind of model."""
    if (seq2seq and not method.seq2seq) or (not seq2seq and not method.causal):
        kind = "seq2seq" if seq2seq else "causal"
        raise LampError(f"--peft {method.name} is not available for {kind} models such as "
                        f"{model_name}")


def build_config(method: PeftMethod, options: Mapping, *, seq2seq: bool, model_config):
    """The peft config of ``method`` from ``options`` (the parsed flags as a mapping)."""
    import importlib

    module_name, _, function = method.builder.partition(":")
    return getattr(importlib.import_module(module_name), function)(
        options, seq2seq=seq2seq, model_config=model_config)


def method_of_adapter(adapter_config: Mapping) -> str | None:
    """The table's name for a saved adapter_config.json, or ``None`` when no row matches."""
    for method in PEFT_METHODS.values():
        if method.signature and all(adapter_config.get(key, False) == value
                                    for key, value in method.signature.items()):
            return method.name
    return None


def planned_virtual_tokens(name: str, options: Mapping) -> int:
    """The virtual tokens method ``name`` will put ahead of every prompt with these flags:
    known before the model loads (``virtual_tokens`` reads them off a loaded model)."""
    return int(options["num_virtual_tokens"]) if get_method(name).virtual_tokens else 0


def virtual_tokens(model) -> int:
    """Positions a (peft) model puts ahead of every input: 0 unless it is prompt learning."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return 0
    return int(config.num_virtual_tokens)


def prompt_learning_kind(model) -> str | None:
    """How a prompt-learning peft model adds its virtual tokens: ``"embeddings"`` (prepended
    to the input), ``"cache"`` (keys and values in every layer) or ``None`` (no virtual
    tokens)."""
    if not virtual_tokens(model):
        return None
    peft_type = str(getattr(model.active_peft_config.peft_type, "value",
                            model.active_peft_config.peft_type))
    return "cache" if peft_type == "PREFIX_TUNING" else "embeddings"


# -- builders (imported through the table's names) -----------------------------------------

def _task_type(seq2seq: bool):
    from peft import TaskType

    return TaskType.SEQ_2_SEQ_LM if seq2seq else TaskType.CAUSAL_LM


def _modules(names):
    return list(names) if names else None


def _hidden_size(model_config, options: Mapping) -> int:
    if options.get("prompt_encoder_hidden_size"):
        return options["prompt_encoder_hidden_size"]
    for key in ("hidden_size", "d_model", "n_embd"):
        if getattr(model_config, key, None):
            return getattr(model_config, key)
    raise LampError("the model's hidden size is unknown: set --prompt_encoder_hidden_size")


def lora_config(options: Mapping, *, seq2seq: bool, model_config, **switches):
    from peft import LoraConfig

    return LoraConfig(task_type=_task_type(seq2seq), r=options["lora_r"],
                      lora_alpha=options["lora_alpha"], lora_dropout=options["lora_dropout"],
                      target_modules=_modules(options.get("lora_target_modules")), **switches)


def dora_config(options: Mapping, *, seq2seq: bool, model_config):
    return lora_config(options, seq2seq=seq2seq, model_config=model_config, use_dora=True)


def rslora_config(options: Mapping, *, seq2seq: bool, model_config):
    return lora_config(options, seq2seq=seq2seq, model_config=model_config, use_rslora=True)


def lora_xs_config(options: Mapping, *, seq2seq: bool, model_config):
    """LoRA-XS as peft's TinyLoRA: ΔW = B·R·A with A, B from the truncated SVD of the base
    weight (frozen) and R = Σ_i v_i·P_i for fixed random P_i (r x r). With u = r² and no
    weight tying, v ↦ R is a linear map from r² numbers onto the r x r matrices, invertible
    for Gaussian P (almost surely; ``LaMP.utils.modeling.zoo`` checks it), so the adapters
    are exactly LoRA-XS's, reparameterised. The projections are saved with the adapter:
    regenerated from a seed they would depend on the torch build."""
    from peft import TinyLoraConfig

    rank = options["lora_r"]
    return TinyLoraConfig(task_type=_task_type(seq2seq), r=rank, u=rank * rank,
                          weight_tying=0.0, tinylora_dropout=options["lora_dropout"],
                          target_modules=_modules(options.get("lora_target_modules")),
                          save_projection=True)


def ia3_config(options: Mapping, *, seq2seq: bool, model_config):
    from peft import IA3Config

    return IA3Config(task_type=_task_type(seq2seq),
                     target_modules=_modules(options.get("ia3_target_modules")),
                     feedforward_modules=_modules(options.get("ia3_feedforward_modules")))


def prompt_tuning_config(options: Mapping, *, seq2seq: bool, model_config):
    from peft import PromptTuningConfig, PromptTuningInit

    init = PromptTuningInit[options.get("prompt_tuning_init", PROMPT_TUNING_INIT).upper()]
    text = {}
    if init is PromptTuningInit.TEXT:
        # peft embeds the words with the model's own tokenizer (loaded from --model_name).
        text = {"prompt_tuning_init_text": options["prompt_tuning_init_text"],
                "tokenizer_name_or_path": options["model_name"]}
    return PromptTuningConfig(task_type=_task_type(seq2seq),
                              num_virtual_tokens=options["num_virtual_tokens"],
                              prompt_tuning_init=init, **text)


def prefix_tuning_config(options: Mapping, *, seq2seq: bool, model_config):
    from peft import PrefixTuningConfig

    projection = bool(options.get("prefix_projection"))
    return PrefixTuningConfig(
        task_type=_task_type(seq2seq), num_virtual_tokens=options["num_virtual_tokens"],
        prefix_projection=projection,
        encoder_hidden_size=_hidden_size(model_config, options) if projection else None)


def p_tuning_config(options: Mapping, *, seq2seq: bool, model_config):
    from peft import PromptEncoderConfig

    return PromptEncoderConfig(task_type=_task_type(seq2seq),
                               num_virtual_tokens=options["num_virtual_tokens"],
                               encoder_hidden_size=_hidden_size(model_config, options))
