"""The model wrapper: any Hugging Face seq2seq or causal LM, loaded once, used in batches.

Which kind a model is comes from its config (``is_encoder_decoder``). Causal models pad on
the left for generation and have the prompt removed from what they return; with
``chat_template`` the prompt is sent as a user turn through the tokenizer's chat template.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from LaMP.utils.errors import LampError

logger = logging.getLogger(__name__)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it (half the memory, fp32's range); fp32 elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def is_seq2seq_config(config) -> bool:
    return bool(getattr(config, "is_encoder_decoder", False))


def load_config(name_or_path: str, *, trust_remote_code: bool = False,
                cache_dir: str | None = None):
    """The model's config: it says whether the model is seq2seq or causal."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                          cache_dir=cache_dir)
    except (OSError, ValueError) as error:
        raise LampError(f"cannot load model {name_or_path!r}: {str(error).splitlines()[0]}") from None


def load_tokenizer(name_or_path: str, *, seq2seq: bool, chat_template: bool = False,
                   trust_remote_code: bool = False, cache_dir: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                              cache_dir=cache_dir)
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise LampError(f"--chat_template: the tokenizer of {name_or_path} has no chat template")
    if tokenizer.pad_token is None:
        # Causal LMs often ship without a pad token; padding is masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token
    if not seq2seq:
        tokenizer.padding_side = "left"  # generation continues from the last real token
    return tokenizer


def load_pretrained(name_or_path: str, *, config=None, dtype: torch.dtype | None = None,
                    trust_remote_code: bool = False, cache_dir: str | None = None,
                    quantization_config=None):
    """(model, is_seq2seq) for a hub name or a local folder; the class comes from the config."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if config is None:
        config = load_config(name_or_path, trust_remote_code=trust_remote_code,
                             cache_dir=cache_dir)
    seq2seq = is_seq2seq_config(config)
    model_class = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    extra = {"quantization_config": quantization_config} if quantization_config else {}
    model = model_class.from_pretrained(name_or_path, config=config, dtype=dtype,
                                        trust_remote_code=trust_remote_code,
                                        cache_dir=cache_dir, **extra)
    return model, seq2seq


def load_model_and_tokenizer(name_or_path: str, *, chat_template: bool = False,
                             dtype: torch.dtype | None = None, trust_remote_code: bool = False,
                             cache_dir: str | None = None, quantization_config=None):
    """(model, tokenizer, is_seq2seq); the tokenizer is checked before the weights load."""
    options = dict(trust_remote_code=trust_remote_code, cache_dir=cache_dir)
    config = load_config(name_or_path, **options)
    seq2seq = is_seq2seq_config(config)
    tokenizer = load_tokenizer(name_or_path, seq2seq=seq2seq, chat_template=chat_template,
                               **options)
    model, _ = load_pretrained(name_or_path, config=config, dtype=dtype,
                               quantization_config=quantization_config, **options)
    return model, tokenizer, seq2seq


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

    def prompt_builder(self, task, max_length: int):
        """``prompt(input, items)`` for ``task``, counted in this model's tokens so that the
        model input (special tokens and chat wrapping included) fits ``max_length``."""
        from LaMP.utils.prompts import make_prompt_fn

        return make_prompt_fn(task, self.tokenizer, max_length, reserved=self.prompt_overhead())

    def prompt_overhead(self) -> int:
        """Tokens the model input adds around a prompt (special tokens, chat wrapping)."""
        if self.chat_template:
            return len(self.tokenizer(self.wrap(""), add_special_tokens=False)["input_ids"])
        return len(self.tokenizer("", add_special_tokens=True)["input_ids"])

    def encode(self, prompts: Sequence[str], max_length: int):
        texts = [self.wrap(p) for p in prompts]
        # Prompts are built to fit; truncation is only the last guard of the length limit.
        return self.tokenizer(texts, padding=True, truncation=True, max_length=max_length,
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
                 num_beams: int = 1, batch_size: int = 8, progress: bool = True) -> list[str]:
        """Greedy (num_beams=1) or beam-search outputs for each prompt, in input order.

        Prompts are grouped by length so that batches carry little padding.
        """
        self.model.eval()
        config = self.generation_config(max_new_tokens, num_beams)
        order = _longest_first(self.prompt_lengths(prompts))
        outputs: list[str] = [""] * len(prompts)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        for batch in tqdm(batches, desc="generating", unit="batch", disable=not progress):
            encoded = self.encode([prompts[i] for i in batch], max_length).to(self.device)
            generated = self.model.generate(**encoded, generation_config=config)
            if not self.is_seq2seq:
                generated = generated[:, encoded["input_ids"].shape[1]:]
            texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
            for i, text in zip(batch, texts):
                outputs[i] = text.strip()
        return outputs

    # -- label scoring -----------------------------------------------------------------
    @torch.inference_mode()
    def score_labels(self, prompts: Sequence[str], labels: Sequence[str], *, max_length: int,
                     batch_size: int = 8, progress: bool = True) -> list[str]:
        """For each prompt, the label the model finds most likely (sum of token log-probs).

        Each label is scored followed by the end-of-sequence token, so that a label that is
        the start of another ("comedy" / "dark comedy" aside, e.g. "1" / "10") is not
        favoured for being a prefix.
        """
        self.model.eval()
        label_ids = [self._label_ids(label) for label in labels]
        best: list[str] = []
        per_batch = max(1, batch_size // max(1, len(labels)))
        batches = [list(range(i, min(i + per_batch, len(prompts))))
                   for i in range(0, len(prompts), per_batch)]
        for batch in tqdm(batches, desc="scoring labels", unit="batch", disable=not progress):
            scores = self._label_log_likelihoods([prompts[i] for i in batch], label_ids, max_length)
            best.extend(labels[j] for j in scores.argmax(dim=1).tolist())
        return best

    def _label_ids(self, label: str) -> list[int]:
        ids = self.tokenizer(label, add_special_tokens=False)["input_ids"]
        return ids + [self.tokenizer.eos_token_id]

    def _label_log_likelihoods(self, prompts, label_ids, max_length) -> torch.Tensor:
        n_prompts, n_labels = len(prompts), len(label_ids)
        longest = max(len(ids) for ids in label_ids)
        targets = torch.full((n_labels, longest), -100, dtype=torch.long)
        for j, ids in enumerate(label_ids):
            targets[j, :len(ids)] = torch.tensor(ids)
        targets = targets.repeat(n_prompts, 1).to(self.device)  # row = prompt * n_labels + label
        if self.is_seq2seq:
            encoded = self.encode(prompts, max_length).to(self.device)
            encoded = {key: value.repeat_interleave(n_labels, dim=0) for key, value in encoded.items()}
            logits = self.model(**encoded, labels=targets).logits
        else:
            logits, targets = self._causal_logits(prompts, label_ids, max_length)
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        mask = targets != -100
        picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (picked * mask).sum(dim=1).view(n_prompts, n_labels)

    def _causal_logits(self, prompts, label_ids, max_length):
        """Logits aligned with label targets for prompt+label sequences (right-padded)."""
        prompt_ids = [self.tokenizer(self.wrap(p), add_special_tokens=not self.chat_template,
                                     truncation=True, max_length=max_length)["input_ids"]
                      for p in prompts]
        sequences = [(ids + label, len(label)) for ids in prompt_ids for label in label_ids]
        width = max(len(sequence) for sequence, _ in sequences)
        input_ids = torch.full((len(sequences), width), self.tokenizer.pad_token_id)
        attention = torch.zeros((len(sequences), width), dtype=torch.long)
        targets = torch.full((len(sequences), width), -100)
        for row, (sequence, span) in enumerate(sequences):
            # Right padding keeps every sequence at positions 0…n-1, as when run alone.
            input_ids[row, :len(sequence)] = torch.tensor(sequence)
            attention[row, :len(sequence)] = 1
            targets[row, len(sequence) - span:len(sequence)] = torch.tensor(sequence[-span:])
        logits = self.model(input_ids=input_ids.to(self.device),
                            attention_mask=attention.to(self.device)).logits
        # The token at position t is predicted by the logits at t - 1.
        return logits[:, :-1], targets[:, 1:].to(self.device)


def _longest_first(lengths: Sequence[int]) -> list[int]:
    # Stable: equal lengths keep input order, so batches are the same on every run.
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def load_model(name_or_path: str, *, device: str | None = None, adapter: str | None = None,
               chat_template: bool = False, trust_remote_code: bool = False,
               cache_dir: str | None = None, dtype: torch.dtype | None = None) -> LampModel:
    """Load a model (and optionally a peft adapter) for inference, once."""
    device = torch.device(device or default_device())
    dtype = dtype or default_dtype(device)
    model, tokenizer, seq2seq = load_model_and_tokenizer(
        name_or_path, chat_template=chat_template, dtype=dtype,
        trust_remote_code=trust_remote_code, cache_dir=cache_dir)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.to(device).eval()
    logger.info("loaded %s (%s, %s) on %s%s", name_or_path,
                "seq2seq" if seq2seq else "causal", dtype, device,
                f" with adapter {adapter}" if adapter else "")
    return LampModel(model=model, tokenizer=tokenizer, is_seq2seq=seq2seq, device=device,
                     chat_template=chat_template)
