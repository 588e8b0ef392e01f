"""Dense ranking: any Hugging Face encoder, mean pooling over the attention mask, dot product.

This is the published Contriever ranker made fast without changing what it computes:

* the model and tokenizer load once, not once per question, and run under
  ``torch.inference_mode()`` (in half precision on a GPU: bfloat16 where supported);
* texts from many questions share batches; within a window of texts, batches are formed
  from texts of similar length, so little compute goes to padding;
* embeddings of profile items are cached (LRU) and reused: in the time split one user's
  profile recurs in many questions.

Embeddings are pooled and compared in float32. A text's embedding can differ in the last bits
with the batch it was encoded in, so a dense ranking is reproducible for a given input, batch
size and device, and may differ from another run only between items whose scores are
within rounding of each other.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from LaMP.utils.devices import resolve_device
from LaMP.utils.errors import LampError
from LaMP.utils.retrieval.base import (DEFAULT_BATCH_SIZE, DEFAULT_DENSE_MODEL, Ranked, Ranker,
                                       batched_by_cost, ranked_ids)
from LaMP.utils.tasks import Task

logger = logging.getLogger(__name__)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors that the mask keeps (padding excluded), in float32."""
    mask = attention_mask.unsqueeze(-1).to(torch.float32)
    summed = (hidden.to(torch.float32) * mask).sum(dim=1)
    # A text that tokenises to nothing pools to the zero vector rather than 0/0.
    return summed / mask.sum(dim=1).clamp(min=1.0)


class EmbeddingCache:
    """Least-recently-used store of item embeddings, bounded in number of entries."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._store: OrderedDict[Any, np.ndarray] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key) -> np.ndarray | None:
        vector = self._store.get(key)
        if vector is None:
            self.misses += 1
        else:
            self.hits += 1
            self._store.move_to_end(key)
        return vector

    def put(self, key, vector: np.ndarray) -> None:
        if self.capacity <= 0:
            return
        self._store[key] = vector
        self._store.move_to_end(key)
        while len(self._store) > self.capacity:
            self._store.popitem(last=False)

    def __contains__(self, key) -> bool:
        return key in self._store  # a peek: neither counts nor refreshes the entry

    def __len__(self) -> int:
        return len(self._store)


def cache_key(item_id: str, text: str) -> tuple[str, bytes]:
    """Cache key of a profile item: its id and a digest of the exact text encoded.

    The id alone is not enough: LaMP files reuse item ids across questions for different
    texts (the LaMP-7 dev set has over a thousand such ids), and ``--use_date`` changes the
    text of every item.
    """
    return item_id, hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class DenseRanker(Ranker):
    """Ranks by the dot product of mean-pooled encoder embeddings of query and items."""

    name = "contriever"
    options = ("model_name", "device", "batch_size", "cache_dir", "allow_download")

    def __init__(self, task: Task, *, use_date: bool = False,
                 model_name: str = DEFAULT_DENSE_MODEL, device: str | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE,
                 cache_dir: str | os.PathLike | None = None, allow_download: bool = False,
                 window_batches: int = 64, cache_size: int = 100_000):
        super().__init__(task, use_date)
        if batch_size < 1:
            raise LampError(f"batch size must be at least 1, got {batch_size}")
        self.model_name = str(model_name)
        self.device = resolve_device(device)
        self.batch_size = batch_size
        # Texts gathered before encoding: the more, the closer in length each batch's texts
        # (less padding); memory grows with it only by the texts and their embeddings.
        self.window = window_batches * batch_size
        # Up to 100k embeddings (about 300 MB at Contriever's 768 dimensions in float32):
        # enough for every profile item of a time-split user to stay cached between questions.
        self.cache = EmbeddingCache(cache_size)
        if self.device.type == "cuda":
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            self.dtype = torch.float32  # half precision on a CPU is slow and less exact
        self.tokenizer, self.model = load_encoder(self.model_name, self.dtype, cache_dir,
                                                  allow_download)
        self.model.to(self.device).eval()
        self.max_length = encoder_max_length(self.tokenizer, self.model)
        logger.info("dense ranker: %s on %s (%s), batch size %d, max length %d",
                    self.model_name, self.device, str(self.dtype).removeprefix("torch."),
                    batch_size, self.max_length)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "model": self.model_name, "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."), "batch_size": self.batch_size}

    def rank(self, questions: Iterable[dict]) -> Iterator[Ranked]:
        # A window closes once it holds enough texts to encode (queries and items not yet
        # cached); the cache is consulted as each question arrives, after earlier windows.
        for window in batched_by_cost(map(self._prepare, questions), self._texts_to_encode,
                                      self.window):
            yield from self._flush(window)

    def _prepare(self, question: dict) -> tuple[dict, str, list, list[str]]:
        query = self.task.query(question["input"], question["id"])
        texts = self.task.corpus(question["profile"], self.use_date)
        keys = [cache_key(item["id"], text) for item, text in zip(question["profile"], texts)]
        return question, query, keys, texts

    def _texts_to_encode(self, entry) -> int:
        return 1 + sum(key not in self.cache for key in entry[2])

    def _flush(self, pending) -> Iterator[Ranked]:
        """Encode what a window of questions needs, then rank each of them."""
        vectors: dict[Any, np.ndarray | None] = {}
        new_keys, new_texts = [], []
        for _, _, keys, texts in pending:
            for key, text in zip(keys, texts):
                if key not in vectors:
                    vectors[key] = self.cache.get(key)
                    if vectors[key] is None:
                        new_keys.append(key)
                        new_texts.append(text)
        queries = [query for _, query, _, _ in pending]
        embeddings = self.encode(queries + new_texts)
        for key, vector in zip(new_keys, embeddings[len(queries):]):
            vector = vector.copy()  # not a view: a cached row must not pin the whole window
            vectors[key] = vector
            self.cache.put(key, vector)
        for (question, _, keys, _), query_vector in zip(pending, embeddings):
            if not keys:
                yield question, []
                continue
            scores = np.stack([vectors[key] for key in keys]) @ query_vector
            yield question, ranked_ids(question["profile"], scores)

    def encode(self, texts: list[str]) -> np.ndarray:
        """Mean-pooled float32 embeddings of ``texts``, in their order."""
        dimension = self.model.config.hidden_size
        output = np.empty((len(texts), dimension), dtype=np.float32)
        # Longest first: batches of similar length, and an out-of-memory error shows at once.
        order = sorted(range(len(texts)), key=lambda index: len(texts[index]), reverse=True)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch_index = order[start:start + self.batch_size]
                pooled = embed(self.model, self.tokenizer, [texts[index] for index in batch_index],
                               self.max_length, self.device)
                output[batch_index] = pooled.cpu().numpy()
        return output


def embed(model, tokenizer, texts: list[str], max_length: int, device) -> torch.Tensor:
    """Mean-pooled float32 embeddings of ``texts`` in one forward pass: the dense ranker's
    computation, and (with gradients, outside inference mode) what ROPG trains."""
    tokens = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                       return_tensors="pt").to(device)
    return mean_pool(model(**tokens).last_hidden_state, tokens["attention_mask"])


def profile_embeddings(task: Task, profiles: dict[str, list], model, tokenizer, device,
                       batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """One row per user of ``profiles`` (in its order): the mean of the user's items'
    embeddings (their retrieval text, mean-pooled, float32), texts encoded shortest first in
    batches of ``batch_size``."""
    texts, owner = [], []
    for row, items in enumerate(profiles.values()):
        texts.extend(task.corpus(items))
        owner.extend([row] * len(items))
    max_length = encoder_max_length(tokenizer, model)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    vectors = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            vectors[chosen] = embed(model, tokenizer, [texts[i] for i in chosen], max_length,
                                    device).float().cpu().numpy()
    sums = np.zeros((len(profiles), vectors.shape[1]), dtype=np.float64)
    np.add.at(sums, np.asarray(owner, dtype=np.int64), vectors)
    counts = np.bincount(np.asarray(owner, dtype=np.int64), minlength=len(profiles))
    return sums / np.maximum(counts, 1)[:, None]


def encoder_max_length(tokenizer, model) -> int:
    """The most tokens a text keeps: the tokenizer's and the position table's limit, 512
    where neither is set (a tokenizer without a limit says ~1e30)."""
    limits = [limit for limit in (getattr(tokenizer, "model_max_length", None),
                                  getattr(model.config, "max_position_embeddings", None))
              if isinstance(limit, int) and 0 < limit < 1_000_000]
    return min(limits) if limits else 512


def load_encoder(model_name: str, dtype: torch.dtype, cache_dir=None, allow_download: bool = False):
    """Tokenizer and model, from a local folder or the Hugging Face cache (or hub, if allowed)."""
    local_only = not allow_download
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name, cache_dir=cache_dir,
                                                  local_files_only=local_only)
        model = AutoModel.from_pretrained(model_name, cache_dir=cache_dir,
                                          local_files_only=local_only, dtype=dtype)
    except (OSError, ValueError) as error:
        hint = ("" if allow_download or os.path.isdir(model_name) else
                "; downloads are off unless the model is named explicitly "
                "(e.g. --contriever_checkpoint facebook/contriever) or given as a local folder")
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LampError(f"cannot load the encoder {model_name!r}: {reason[:300]}{hint}") from None
    return tokenizer, model
