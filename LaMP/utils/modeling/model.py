"""The model wrapper: any Hugging Face seq2seq or causal LM, loaded once, used in batches.

Which kind a model is comes from its config (``is_encoder_decoder``). Causal models pad on
the left for generation and have the prompt removed from what they return; with
``chat_template`` the prompt is sent as a user turn through the tokenizer's chat template.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from LaMP.utils.devices import resolve_device
from LaMP.utils.errors import LampError
from LaMP.utils.modeling.checkpoints import check_adapter_folder, check_model_folder

logger = logging.getLogger(__name__)


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it (half the memory, fp32's range); fp32 elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def is_local(name_or_path: str) -> bool:
    """A local folder: loaded with ``local_files_only`` so that a file missing there is an
    error about the folder, never a hub look-up under the folder's name."""
    return os.path.isdir(name_or_path)


def is_seq2seq_config(config) -> bool:
    return bool(getattr(config, "is_encoder_decoder", False))


# Encoders that transformers also maps to a causal-LM head (BertLMHeadModel, …) are causal
# only when their config says so; as encoders every position sees the whole text, the
# target included, so training would teach nothing and generation would not work. They are
# the models with both a masked-LM and a causal-LM head and no seq2seq one, and
# bert-generation (a BERT with no masked-LM head in transformers' tables).
_ENCODER_ALSO = ("bert-generation",)
_DECODER_FLAG = {"xlm": "causal"}  # XLM's causal-LM checkpoints set causal; others is_decoder


def _encoder_types() -> frozenset[str]:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)

    both = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) & set(MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    return frozenset(both - set(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)) | set(_ENCODER_ALSO)


def generation_problem(config, trust_remote_code: bool = False) -> str | None:
    """Why a model of this config cannot generate text as a seq2seq or causal LM, or None.

    Decided from the config alone, before any weights load: the architecture must have a
    seq2seq or causal-LM class in transformers (or, with ``trust_remote_code``, one named
    in the config's ``auto_map``), and an encoder must be configured as a decoder."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)

    model_type = getattr(config, "model_type", None) or type(config).__name__
    seq2seq = is_seq2seq_config(config)
    wanted, table = (("AutoModelForSeq2SeqLM", MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
                     if seq2seq else ("AutoModelForCausalLM", MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
    if trust_remote_code and wanted in (getattr(config, "auto_map", None) or {}):
        return None
    if model_type not in table:
        return (f"its type, {model_type}, has no {'seq2seq' if seq2seq else 'causal'} "
                "language-model head in transformers: it cannot generate text (use a "
                "seq2seq or causal LM)")
    flag = _DECODER_FLAG.get(model_type, "is_decoder")
    if not seq2seq and model_type in _encoder_types() and not getattr(config, flag, False):
        return (f"its type, {model_type}, is an encoder ({flag} is not set in its config): "
                "its attention sees the whole text, so it cannot generate text (use a seq2seq "
                "or causal LM)")
    return None


def load_config(name_or_path: str, *, trust_remote_code: bool = False,
                cache_dir: str | None = None, lengths: tuple[int, int] | None = None):
    """The model's config: it says whether the model is seq2seq or causal. A model that is
    neither (an encoder such as BERT) is refused here, before anything else loads, and so
    are ``lengths`` (``--max_length``, ``--generation_max_length``) its positions cannot
    hold."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                            cache_dir=cache_dir,
                                            local_files_only=is_local(name_or_path))
    except (OSError, ValueError) as error:
        raise LampError(f"cannot load model {name_or_path!r}: {str(error).splitlines()[0]}") from None
    problem = generation_problem(config, trust_remote_code) or (
        lengths is not None and positions_problem(config, *lengths))
    if problem:
        raise LampError(f"model {name_or_path!r}: {problem}")
    return config


def positions_problem(config, max_length: int, new_tokens: int) -> str | None:
    """Why ``max_length`` prompt tokens and ``new_tokens`` generated ones overflow the
    positions the model has (its ``max_position_embeddings`` or ``n_positions``; a causal
    model reads both in one sequence, a seq2seq model each on its own side), or None.
    Models with relative positions (T5) state no limit."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions",
                                                                        None)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        return None
    if is_seq2seq_config(config):
        needed, what = max(max_length, new_tokens), (
            f"--max_length {max_length} or --generation_max_length {new_tokens}")
    else:
        needed, what = max_length + new_tokens, (
            f"--max_length {max_length} + --generation_max_length {new_tokens} = "
            f"{max_length + new_tokens} tokens")
    if needed <= limit:
        return None
    return f"{what} exceed its {limit} positions; lower the flag"


def load_tokenizer(name_or_path: str, *, seq2seq: bool, chat_template: bool = False,
                   trust_remote_code: bool = False, cache_dir: str | None = None):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                                  cache_dir=cache_dir,
                                                  local_files_only=is_local(name_or_path))
    except (OSError, ValueError) as error:
        raise LampError(f"cannot load the tokenizer of {name_or_path!r}: "
                        f"{str(error).splitlines()[0]}") from None
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise LampError(f"--chat_template: the tokenizer of {name_or_path} has no chat template")
    if tokenizer.eos_token_id is None:
        # Every target (training, label scoring) ends in it and generation stops at it: a
        # tokenizer without one (BERT's WordPiece) would fail deep inside training.
        raise LampError(f"model {name_or_path!r}: its tokenizer "
                        f"({type(tokenizer).__name__}) has no end-of-sequence token "
                        "(eos_token), so no answer could end (use a seq2seq or causal LM's "
                        "tokenizer)")
    if tokenizer.pad_token is None:
        # Causal LMs often ship without a pad token; padding is masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token
    if not seq2seq:
        tokenizer.padding_side = "left"  # generation continues from the last real token
    return tokenizer


def load_pretrained(name_or_path: str, *, config=None, dtype: torch.dtype | None = None,
                    trust_remote_code: bool = False, cache_dir: str | None = None,
                    quantization_config=None, device_map=None):
    """(model, is_seq2seq) for a hub name or a local folder; the class comes from the config."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if config is None:
        config = load_config(name_or_path, trust_remote_code=trust_remote_code,
                             cache_dir=cache_dir)
    seq2seq = is_seq2seq_config(config)
    model_class = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    extra = {"quantization_config": quantization_config} if quantization_config else {}
    if device_map is not None:
        extra["device_map"] = device_map
    # Missing or cut-short weights in a local folder: one line now, not a traceback from
    # safetensors (or a hub look-up) once loading has started.
    check_model_folder(name_or_path)
    try:
        model = model_class.from_pretrained(name_or_path, config=config, dtype=dtype,
                                            trust_remote_code=trust_remote_code,
                                            cache_dir=cache_dir,
                                            local_files_only=is_local(name_or_path), **extra)
    except torch.OutOfMemoryError:
        raise  # not a mistake in the input; the traceback says where memory ran out
    except (OSError, ValueError, RuntimeError) as error:  # RuntimeError: weights of another shape
        raise LampError(f"cannot load the weights of {name_or_path!r}: "
                        f"{str(error).splitlines()[0]}") from None
    return model, seq2seq


def load_model_and_tokenizer(name_or_path: str, *, chat_template: bool = False,
                             dtype: torch.dtype | None = None, trust_remote_code: bool = False,
                             cache_dir: str | None = None, quantization_config=None,
                             device_map=None, lengths: tuple[int, int] | None = None):
    """(model, tokenizer, is_seq2seq); the tokenizer is checked before the weights load."""
    config, tokenizer, seq2seq = load_config_and_tokenizer(
        name_or_path, chat_template=chat_template, trust_remote_code=trust_remote_code,
        cache_dir=cache_dir, lengths=lengths)
    model, _ = load_pretrained(name_or_path, config=config, dtype=dtype,
                               quantization_config=quantization_config, device_map=device_map,
                               trust_remote_code=trust_remote_code, cache_dir=cache_dir)
    return model, tokenizer, seq2seq


def load_config_and_tokenizer(name_or_path: str, *, chat_template: bool = False,
                              trust_remote_code: bool = False, cache_dir: str | None = None,
                              lengths: tuple[int, int] | None = None):
    """(config, tokenizer, is_seq2seq): all that building prompts needs, without weights."""
    options = dict(trust_remote_code=trust_remote_code, cache_dir=cache_dir)
    config = load_config(name_or_path, lengths=lengths, **options)
    seq2seq = is_seq2seq_config(config)
    tokenizer = load_tokenizer(name_or_path, seq2seq=seq2seq, chat_template=chat_template,
                               **options)
    return config, tokenizer, seq2seq


@dataclass
class LampModel:
    model: torch.nn.Module
    tokenizer: object
    is_seq2seq: bool
    device: torch.device
    chat_template: bool = False

    # -- prompts -----------------------------------------------------------------------
    def wrap(self, prompt: str) -> str:
        """The text the model actually reads for ``prompt``."""
        if not self.chat_template:
            return prompt
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)

    def prompt_builder(self, task, max_length: int, input_truncation: str = "share",
                       prompt_budget: str = "exact", virtual_tokens: int | None = None):
        """``prompt(input, items)`` for ``task``, counted in this model's tokens so that the
        model input (special tokens and chat wrapping included) fits ``max_length``
        (``input_truncation="tokenizer"``: a long input is left for ``encode`` to cut;
        ``prompt_budget="official"``: the items sized by the official code's constants).
        ``virtual_tokens``: the positions adapters loaded later will put ahead of each
        prompt (per-user serving), instead of those of the adapter loaded now."""
        from LaMP.utils.modeling.prompts import make_prompt_fn

        if virtual_tokens is None:
            virtual_tokens = self.virtual_tokens
        return make_prompt_fn(task, self.tokenizer, max_length,
                              reserved=self.prompt_overhead() + virtual_tokens,
                              input_truncation=input_truncation,
                              prompt_budget=prompt_budget)

    def prompt_overhead(self) -> int:
        """Tokens the model input adds around a prompt (special tokens, chat wrapping)."""
        if self.chat_template:
            return len(self.tokenizer(self.wrap(""), add_special_tokens=False)["input_ids"])
        return len(self.tokenizer("", add_special_tokens=True)["input_ids"])

    @property
    def virtual_tokens(self) -> int:
        """Positions a prompt-learning adapter puts ahead of every prompt (0 otherwise);
        they count against ``max_length`` like the prompt's own tokens."""
        from LaMP.utils.modeling.peft_methods import virtual_tokens

        return virtual_tokens(self.model)

    def encode(self, prompts: Sequence[str], max_length: int):
        texts = [self.wrap(p) for p in prompts]
        # Prompts are built to fit; truncation is only the last guard of the length limit.
        return self.tokenizer(texts, padding=True, truncation=True,
                              max_length=max_length - self.virtual_tokens,
                              add_special_tokens=not self.chat_template, return_tensors="pt")

    def prompt_lengths(self, prompts: Sequence[str]) -> list[int]:
        texts = [self.wrap(p) for p in prompts]
        encoded = self.tokenizer(texts, add_special_tokens=not self.chat_template)
        return [len(ids) for ids in encoded["input_ids"]]

    # -- generation --------------------------------------------------------------------
    def generation_config(self, max_new_tokens: int, num_beams: int):
        config = copy.deepcopy(self.model.generation_config)
        config.update(do_sample=False, temperature=None, top_p=None, top_k=None,
                      num_beams=num_beams, max_new_tokens=max_new_tokens, max_length=None,
                      pad_token_id=self.tokenizer.pad_token_id)
        if config.eos_token_id is None:
            config.eos_token_id = self.tokenizer.eos_token_id
        return config

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], *, max_length: int, max_new_tokens: int,
                 num_beams: int = 1, batch_size: int = 8, progress: bool = True,
                 synced_gpus: bool = False,
                 adapter_names: Sequence[str] | None = None) -> list[str]:
        """Greedy (num_beams=1) or beam-search outputs for each prompt, in input order.

        Prompts are grouped by length so that batches carry little padding. ``synced_gpus``:
        the weights are sharded over processes (FSDP, DeepSpeed ZeRO-3), so every forward
        pass is a collective; each process keeps stepping until all have finished.
        ``adapter_names``: per prompt, the peft adapter it goes through (``"__base__"``:
        none), so that one batch serves many users (peft's mixed-adapter batches).
        """
        if not prompts:
            return []  # e.g. a process whose share of a small evaluation set is empty
        self.model.eval()
        config = self.generation_config(max_new_tokens, num_beams)
        order = _longest_first(self.prompt_lengths(prompts))
        outputs: list[str] = [""] * len(prompts)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        with _top_level_gathered(self.model):
            for batch in tqdm(batches, desc="generating", unit="batch", disable=not progress):
                rows = None if adapter_names is None else [adapter_names[i] for i in batch]
                self._generate_batch(prompts, batch, max_length, config, synced_gpus, outputs,
                                     rows)
        return outputs

    def _generate_batch(self, prompts, batch, max_length, config, synced_gpus, outputs,
                        adapter_names=None):
        encoded = self.encode([prompts[i] for i in batch], max_length).to(self.device)
        if adapter_names is not None:
            from LaMP.utils.modeling.user_serving import rows_through

            with rows_through(self.model, adapter_names, num_beams=config.num_beams):
                generated = self.model.generate(**encoded, generation_config=config,
                                                synced_gpus=synced_gpus)
            prompt_columns = 0 if self.is_seq2seq else encoded["input_ids"].shape[1]
        elif self.is_seq2seq or not self.virtual_tokens:
            generated = self.model.generate(**encoded, generation_config=config,
                                            synced_gpus=synced_gpus)
            # A causal model returns the prompt ahead of its answer.
            prompt_columns = 0 if self.is_seq2seq else encoded["input_ids"].shape[1]
        else:
            generated, prompt_columns = self._generate_after_virtual_tokens(
                encoded, config, synced_gpus)
        generated = generated[:, prompt_columns:]
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        for i, text in zip(batch, texts):
            outputs[i] = text.strip()

    def _generate_after_virtual_tokens(self, encoded, config, synced_gpus):
        """A causal prompt-learning model's answers, its virtual tokens put in as label
        scoring puts them; (generated ids, how many leading columns are not the answer).

        Not peft's own ``generate``: it drops the position ids of prompt tuning and p-tuning,
        so that a left-padded prompt (in a batch with longer ones) is read at other positions
        than it was trained at and its answer depends on its batch; and under transformers 5
        its prefix-tuning answers differ from greedy decoding by the adapter's own forward
        pass even for a single prompt (tests/test_peft_methods.py checks ours against it)."""
        n_prompts = encoded["input_ids"].shape[0]
        model, prefix = self._virtual_prefix(encoded, n_prompts)
        inputs = dict(prefix.inputs)
        if prefix.cache_rows is not None:
            # Every row's prefix is the same, so beams need only more rows of it.
            inputs["past_key_values"] = prefix.cache_rows(n_prompts * config.num_beams)
            # ``generate`` takes a filled cache to hold the first ids already: stand-ins for
            # the virtual positions go first (they are never read, only skipped).
            ids = inputs["input_ids"]
            inputs["input_ids"] = torch.cat([torch.full((n_prompts, self.virtual_tokens),
                                                        self.tokenizer.pad_token_id,
                                                        dtype=ids.dtype, device=ids.device),
                                             ids], dim=1)
        generated = model.generate(**inputs, attention_mask=prefix.cache_mask,
                                   generation_config=config, synced_gpus=synced_gpus)
        # Given embeddings, ``generate`` returns the new tokens alone; given ids, the prompt too.
        return generated, inputs["input_ids"].shape[1] if "input_ids" in inputs else 0

    # -- label scoring -----------------------------------------------------------------
    @torch.inference_mode()
    def score_labels(self, prompts: Sequence[str], labels: Sequence[str], *, max_length: int,
                     batch_size: int = 8, progress: bool = True,
                     adapter_names: Sequence[str] | None = None) -> list[str]:
        """For each prompt, the label the model finds most likely (sum of token log-probs).

        Each label is scored followed by the end-of-sequence token, so that a label that is
        the start of another (e.g. "1" / "10") is not favoured for being a prefix. Each
        prompt is read once: causal models continue its key/value cache with every label,
        seq2seq models reuse its encoding. ``adapter_names``: per prompt, its peft adapter
        (as in ``generate``).
        """
        if not prompts:
            return []
        self.model.eval()
        label_ids = [self._label_ids(label) for label in labels]
        # Each prompt fans out into one row per label; keep that fan-out's memory bounded.
        per_batch = max(1, min(batch_size, LABEL_ROWS_PER_BATCH // len(labels)))
        order = _longest_first(self.prompt_lengths(prompts))
        batches = [order[i:i + per_batch] for i in range(0, len(order), per_batch)]
        best: list[str] = [""] * len(prompts)
        with _top_level_gathered(self.model):
            for batch in tqdm(batches, desc="scoring labels", unit="batch",
                              disable=not progress):
                encoded = self.encode([prompts[i] for i in batch], max_length).to(self.device)
                rows = None if adapter_names is None else [adapter_names[i] for i in batch]
                scores = self._label_log_likelihoods(encoded, label_ids, rows)
                for i, j in zip(batch, scores.argmax(dim=1).tolist()):
                    best[i] = labels[j]
        return best

    def _label_ids(self, label: str) -> list[int]:
        ids = self.tokenizer(label, add_special_tokens=False)["input_ids"]
        return ids + [self.tokenizer.eos_token_id]

    def _label_log_likelihoods(self, encoded, label_ids, adapter_names=None) -> torch.Tensor:
        """(prompts, labels) summed log-probabilities of each label after each prompt.

        A prompt-learning adapter (prompt tuning, p-tuning, prefix tuning) adds its virtual
        tokens in its own forward pass, which knows nothing of a cache continued label by
        label (it would add them again). Its virtual tokens are therefore put in once, here,
        as that forward pass does (``_virtual_prefix``), and the base model runs the rest.
        ``adapter_names``: per prompt, its peft adapter; its label rows use the same one.
        """
        from LaMP.utils.modeling.user_serving import rows_through

        n_prompts, n_labels = encoded["input_ids"].shape[0], len(label_ids)
        per_label = None if adapter_names is None else [
            name for name in adapter_names for _ in range(n_labels)]
        model, prefix = self._virtual_prefix(encoded, n_prompts)
        if self.is_seq2seq:
            from transformers.modeling_outputs import BaseModelOutput

            with rows_through(self.model, adapter_names):
                hidden = model.get_encoder()(attention_mask=prefix.encoder_mask,
                                             **prefix.inputs).last_hidden_state
            targets = _padded(label_ids, IGNORE).repeat(n_prompts, 1).to(self.device)
            extra = {}
            if prefix.cache_rows is not None:  # prefix tuning: the decoder's trained keys
                extra["past_key_values"] = prefix.cache_rows(n_prompts * n_labels)
            with rows_through(self.model, per_label):
                logits = model(
                    encoder_outputs=BaseModelOutput(last_hidden_state=hidden.repeat_interleave(n_labels, 0)),
                    attention_mask=prefix.encoder_mask.repeat_interleave(n_labels, 0),
                    labels=targets, **extra).logits
            return _summed_log_probs(logits, targets).view(n_prompts, n_labels)

        # ``mask``: every position the cache will hold (virtual ones included);
        # ``read``: the positions this first pass returns logits for.
        mask, read = prefix.cache_mask, prefix.encoder_mask
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, mask.shape[1] - read.shape[1]:]
        extra = {}
        if prefix.cache_rows is not None:
            extra["past_key_values"] = prefix.cache_rows(n_prompts)
        with rows_through(self.model, adapter_names):
            out = model(attention_mask=mask, position_ids=positions, use_cache=True,
                        **prefix.inputs, **extra)
        # The prompt's last real token predicts every label's first token.
        last = read.shape[1] - 1 - read.flip(1).argmax(dim=1)
        first = torch.log_softmax(out.logits[torch.arange(n_prompts), last].float(), dim=-1)
        scores = first[:, [ids[0] for ids in label_ids]]
        longest = max(len(ids) for ids in label_ids)
        if longest == 1:
            return scores
        # The rest of each label, read after the cached prompt: token t predicts token t+1.
        prompt_lengths = mask.sum(dim=1)
        cache = out.past_key_values
        cache.batch_repeat_interleave(n_labels)
        inputs = _padded([ids[:-1] for ids in label_ids], self.tokenizer.pad_token_id)
        targets = _padded([ids[1:] for ids in label_ids], IGNORE)
        inputs, targets = (t.repeat(n_prompts, 1).to(self.device) for t in (inputs, targets))
        steps = torch.arange(longest - 1, device=self.device)
        with rows_through(self.model, per_label):
            logits = model(
                input_ids=inputs,
                attention_mask=torch.cat([mask.repeat_interleave(n_labels, 0),
                                          torch.ones_like(inputs)], dim=1),
                position_ids=prompt_lengths.repeat_interleave(n_labels)[:, None] + steps,
                past_key_values=cache, use_cache=True).logits
        return scores + _summed_log_probs(logits, targets).view(n_prompts, n_labels)

    def _virtual_prefix(self, encoded, n_prompts: int):
        """(the model to run, a ``_Prefix``) for a batch of encoded prompts: the model itself
        when it adds no virtual tokens, else its base model with the adapter's virtual
        tokens put in as the adapter's forward pass puts them (trained embeddings ahead of
        the input, or trained keys and values ahead of every layer's cache)."""
        from LaMP.utils.modeling.peft_methods import prompt_learning_kind

        mask = encoded["attention_mask"]
        kind = prompt_learning_kind(self.model)
        if kind is None:
            return self.model, _Prefix(inputs={"input_ids": encoded["input_ids"]},
                                       encoder_mask=mask, cache_mask=mask)
        n_virtual = self.virtual_tokens
        peft_model, base = self.model, self.model.get_base_model()
        widened = torch.cat([torch.ones((n_prompts, n_virtual), dtype=mask.dtype,
                                        device=mask.device), mask], dim=1)
        if kind == "cache":
            # Only causal models read the prefix as positions ahead of the prompt; an
            # encoder-decoder's prefix sits in the decoder's self-attention alone.
            return base, _Prefix(inputs={"input_ids": encoded["input_ids"]}, encoder_mask=mask,
                                 cache_mask=mask if self.is_seq2seq else widened,
                                 cache_rows=lambda rows: peft_model.get_prompt(batch_size=rows))
        embeds = peft_model.word_embeddings(encoded["input_ids"])
        # Seq2seq prompt learning returns encoder and decoder prompts; the encoder's come first.
        virtual = peft_model.get_prompt(batch_size=n_prompts)[:, :n_virtual].to(embeds.dtype)
        return base, _Prefix(inputs={"inputs_embeds": torch.cat([virtual, embeds], dim=1)},
                             encoder_mask=widened, cache_mask=widened)


@dataclass
class _Prefix:
    """What the first pass of label scoring reads: ``inputs`` (ids or embeddings),
    ``encoder_mask`` (the mask over those inputs), ``cache_mask`` (over every position a
    causal model's cache holds after it) and ``cache_rows`` (rows -> the adapter's trained
    cache, for prefix tuning; else ``None``)."""

    inputs: dict
    encoder_mask: torch.Tensor
    cache_mask: torch.Tensor
    cache_rows: object = None


IGNORE = -100  # target positions that are not scored (PyTorch's cross-entropy default)
LABEL_ROWS_PER_BATCH = 128  # prompt x label rows per label-scoring batch (bounds cache copies)


@contextlib.contextmanager
def _top_level_gathered(model: torch.nn.Module):
    """Under FSDP2 a sharded module gathers its own weights in a hook on its forward.
    ``generate`` and ``get_encoder`` reach the inner model without calling the top-level
    module (a peft wrapper, say), so its weights (embeddings, head, final norm; the layers
    keep gathering themselves) are gathered here for the whole call. A no-op otherwise."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        FSDPModule = ()
    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()  # collective: every process predicts the same batches (sharded mode)
    try:
        yield
    finally:
        model.reshard()


def _padded(rows: Sequence[Sequence[int]], fill: int) -> torch.Tensor:
    width = max(1, max(len(row) for row in rows))
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _summed_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per row, the sum of log p(target) over the positions whose target is not IGNORE."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (targets != IGNORE)).sum(dim=1)


def _longest_first(lengths: Sequence[int]) -> list[int]:
    # Stable: equal lengths keep input order, so batches are the same on every run.
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def load_model(name_or_path: str, *, device: str | None = None, adapter: str | None = None,
               chat_template: bool = False, trust_remote_code: bool = False,
               cache_dir: str | None = None, dtype: torch.dtype | None = None,
               lengths: tuple[int, int] | None = None) -> LampModel:
    """Load a model (and optionally a peft adapter) for inference, once; ``lengths``: the
    prompt and generation lengths it must hold (``load_config``)."""
    device = resolve_device(device)
    dtype = dtype or default_dtype(device)
    if adapter:
        # Before the base model loads; and peft would look a local folder's missing weights
        # up on the hub under the folder's name.
        check_adapter_folder(adapter)
    model, tokenizer, seq2seq = load_model_and_tokenizer(
        name_or_path, chat_template=chat_template, dtype=dtype,
        trust_remote_code=trust_remote_code, cache_dir=cache_dir, lengths=lengths)
    if adapter:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, adapter, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as error:  # RuntimeError: shape mismatch
            raise LampError(f"cannot load adapter {adapter} onto {name_or_path}: "
                            f"{str(error).splitlines()[0]}") from None
        except (KeyError, TypeError) as error:
            # peft indexes its config unchecked: an unknown peft_type is a KeyError, a field
            # of another type a TypeError (check_adapter_folder catches the common ones).
            raise LampError(f"cannot load adapter {adapter} onto {name_or_path}: its "
                            f"adapter_config.json does not suit peft ({type(error).__name__}: "
                            f"{str(error).splitlines()[0] if str(error) else ''})") from None
    model.to(device).eval()
    logger.info("loaded %s (%s, %s) on %s%s", name_or_path,
                "seq2seq" if seq2seq else "causal", dtype, device,
                f" with adapter {adapter}" if adapter else "")
    return LampModel(model=model, tokenizer=tokenizer, is_seq2seq=seq2seq, device=device,
                     chat_template=chat_template)
