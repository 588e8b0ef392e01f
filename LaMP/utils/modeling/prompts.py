"""Retrieval-augmented prompts: one budgeted builder; tasks supply only their template.

The prompt formats are the published LaMP ones (so results compare with the paper); the
templates themselves live in the task registry (``Task.prompt``). The builder fits them into
``max_length`` tokens *of the model being run*:

- the input keeps at most ``input_share`` (60%) of the budget; a longer input is cut at
  the end;
- the rest is shared equally by the retrieved items. An item's template words count against
  its share and only its long field (``PromptTemplate.truncate_field``) is shortened; what
  an item does not use rolls over to the next item;
- the finished prompt is re-counted and, where sub-word merges across piece boundaries made
  it longer than counted, the last item is shortened further, so it never exceeds the budget.

``input_truncation="tokenizer"`` is the official behaviour instead: the input is never cut,
the items still get only what its (at most 60%) share leaves, and the model's tokenizer cuts
the finished prompt at ``max_length``, so a long input loses its end and what follows it.

``prompt_budget="official"`` sizes the items as the official prompt code does
(docs/deviations.md): every count includes the tokenizer's special tokens; the items' room is the
budget less ``min(input tokens, int(0.6 * budget))``; each of ``n`` items gets
``(room - reserve - 2 * (n - 1) - fixed) // n`` tokens, where ``reserve``, ``fixed`` and
what an item costs besides its long field are the task's fixed constants
(``PromptTemplate.official_*``); the field is cut by the tokenizer's own truncation and
decoded back; an item's unused tokens (or its overrun) roll over to the next; where a
field's allowance is one the tokenizer refuses, the input's share drops by 0.1 and the
items are sized again, down to no share (then the bare input). The finished prompt is not
re-counted: what does not fit is cut by the tokenizer at ``max_length``.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

from LaMP.utils.errors import LampError
from LaMP.utils.tasks import PromptTemplate, Task

INPUT_SHARE = 0.6  # the input keeps at most this share of max_length (the budget's input share)
OFFICIAL_JOINER_TOKENS = 2  # the official code's fixed count for each ", and " between items
MIN_PROMPT_TOKENS = 8  # a budget below this holds no useful prompt: refused as a flag mistake


class TokenCounter:
    """Counts and truncates text in the tokens of one tokenizer (special tokens excluded)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def count(self, text: str) -> int:
        return len(self.ids(text)) if text else 0

    def count_with_specials(self, text: str) -> int:
        """Tokens of ``text`` as the model input counts them: special tokens included."""
        return len(self.tokenizer(text)["input_ids"])

    def truncated_ids(self, text: str, max_length: int) -> list[int] | None:
        """``text``'s ids cut by the tokenizer's own truncation, special tokens included
        (None where the tokenizer refuses ``max_length``, e.g. a negative one)."""
        try:
            return list(self.tokenizer(text, max_length=max_length, truncation=True)["input_ids"])
        except (OverflowError, ValueError):
            return None

    def truncate(self, text: str, max_tokens: int) -> str:
        """The start of ``text`` that fits ``max_tokens`` tokens (unchanged when it fits).

        The cut is made in ``text`` itself at a token boundary, not decoded from the kept
        ids: decoding drops the characters a tokenizer does not know (``<unk>``) and turns a
        character split across byte-level tokens into U+FFFD, which would change the words
        the model sees and can count more tokens than were kept. The cut is re-counted,
        since the start of a word may split into more pieces than it had inside the word.
        """
        if max_tokens <= 0:
            return ""
        if getattr(self.tokenizer, "is_fast", False):
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        else:
            ids, offsets = self.ids(text), None
        if len(ids) <= max_tokens:
            return text
        for keep in range(max_tokens, 0, -1):
            if offsets is not None:
                end = offsets[keep - 1][1]
            else:
                # Without offsets (slow tokenizers such as ByT5's) the decoded length stands
                # in for the end: exact for bytes, short of it where characters were dropped.
                end = len(self.tokenizer.decode(ids[:keep], skip_special_tokens=True))
            cut = text[:end].rstrip()
            if self.count(cut) <= max_tokens:
                return cut
        return ""


class PromptBuilder:
    """Builds the prompt for one input and its retrieved profile items.

    ``reserved`` tokens are kept free for what the model adds around the prompt (special
    tokens, a chat template, a prompt-learning adapter's virtual tokens), so that the
    model's full input fits ``max_length``.
    """

    def __init__(self, task: Task, counter: TokenCounter, max_length: int,
                 reserved: int = 0, input_share: float = INPUT_SHARE,
                 input_truncation: str = "share", prompt_budget: str = "exact"):
        if max_length - reserved < MIN_PROMPT_TOKENS:
            # A user's flag (--max_length too small for the model's chat wrapping): one line.
            raise LampError(f"--max_length {max_length} leaves no room for a prompt "
                            f"({reserved} tokens go to special tokens, chat wrapping and "
                            "virtual tokens)")
        self.task = task
        self.template: PromptTemplate = task.prompt
        self.counter = counter
        self.budget = max_length - reserved
        self.input_share = input_share
        self.input_budget = int(self.budget * input_share)
        self.cut_input = input_truncation == "share"
        self.official = prompt_budget == "official"
        # The official counts include the special tokens the tokenizer adds, so they are
        # part of the budget they are counted against; what the model adds beyond them (a
        # chat template, virtual tokens) stays reserved, as the official code had none.
        self.official_budget = self.budget + counter.count_with_specials("")

    def build(self, text: str, items: Sequence[Mapping[str, str]] = ()) -> str:
        original = text
        if self.cut_input:
            # With no profile the input may use the whole budget; with one it keeps its share.
            text = self.counter.truncate(original, self.input_budget if items else self.budget)
        if not items:
            return text
        if self.official:
            return self._build_official(text, items)
        text_tokens = self.counter.count(text)
        # Officially the items' room is what the input's share leaves, however long it is.
        input_tokens = min(text_tokens, self.input_budget)
        # What the whole input takes beyond its share: over budget on purpose, for the
        # tokenizer to cut (0 when the input was cut to its share).
        excess = text_tokens - input_tokens
        fixed = self.counter.count(self._glue(text, "")) - text_tokens  # suffix/insertion words
        joiner_tokens = self.counter.count(self.template.joiner)
        # Best items first: when an item's template words alone overrun its share, the
        # lowest-ranked item is dropped and the shares are recomputed, rather than letting a
        # worse item take the place of a better one.
        for n in range(len(items), 0, -1):
            available = self.budget - input_tokens - fixed - joiner_tokens * (n - 1)
            fitted = self._fit_items(items[:n], available)
            if len(fitted) == n:
                break
        else:
            # No item fits: the bare input.
            return self.counter.truncate(original, self.budget) if self.cut_input else original
        prompt = self._assemble(text, fitted)
        # Pieces were counted apart; counted together they can differ by a token or two.
        overflow = self.counter.count(prompt) - self.budget - excess
        while fitted and overflow > 0:
            item, length = fitted[-1]
            fitted[-1:] = [(item, length - overflow)] if length > overflow else []
            prompt = self._assemble(text, fitted)
            overflow = self.counter.count(prompt) - self.budget - excess
        return prompt

    def _build_official(self, text: str, items: Sequence[Mapping[str, str]]) -> str:
        template, counter = self.template, self.counter
        budget, count = self.official_budget, counter.count_with_specials
        input_tokens = count(text)
        fixed = count(template.official_fixed) if template.official_fixed else 0
        n = len(items)
        factor = self.input_share
        while factor >= 0:  # 0.6, 0.5, ... in the same float steps as the official code
            room = budget - min(input_tokens, int(factor * budget))
            share = (room - template.official_reserve
                     - OFFICIAL_JOINER_TOKENS * (n - 1) - fixed) // n
            fields = self._official_fields(items, share)
            if fields is not None:
                pieces = [self._render(item, field) for item, field in zip(items, fields)]
                return self._glue(text, template.joiner.join(pieces))
            factor -= 0.1
        return text

    def _official_fields(self, items: Sequence[Mapping[str, str]], share: int
                         ) -> list[str] | None:
        """Each item's long field cut as the official code cuts it, or None where the
        tokenizer refuses an allowance (a negative one, for most tokenizers)."""
        overhead = self.template.official_overhead
        saved, fields = 0, []
        for item in items:
            if isinstance(overhead, int):
                needed = overhead
            else:
                pattern = self._render(item, " ") if overhead is None else overhead.format_map(
                    {key: str(value) for key, value in item.items()})
                needed = self.counter.count_with_specials(pattern)
            ids = self.counter.truncated_ids(str(item[self.template.truncate_field]),
                                             share + saved - needed)
            if ids is None:
                return None
            saved += share - len(ids) - needed
            fields.append(self.counter.tokenizer.decode(ids, skip_special_tokens=True))
        return fields

    def _fit_items(self, items: Sequence[Mapping[str, str]], available: int
                   ) -> list[tuple[Mapping[str, str], int]]:
        """Each item that fits, with the number of tokens its long field may keep; an item
        whose share is used up by its template words is left out and its share rolls over."""
        share = max(available, 0) // len(items)
        carry = 0
        fitted = []
        for item in items:
            allowance = share + carry
            field_budget = allowance - self.counter.count(self._render(item, ""))
            if field_budget <= 0:
                carry = allowance  # nothing of this item fits; its share rolls over
                continue
            field = self._field(item, field_budget)
            fitted.append((item, field_budget))
            carry = allowance - self.counter.count(self._render(item, field))
        return fitted

    def _field(self, item: Mapping[str, str], max_tokens: int) -> str:
        return self.counter.truncate(str(item[self.template.truncate_field]), max_tokens)

    def _assemble(self, text: str, fitted) -> str:
        if not fitted:
            return text
        pieces = [self._render(item, self._field(item, length)) for item, length in fitted]
        return self._glue(text, self.template.joiner.join(pieces))

    def _render(self, item: Mapping[str, str], field_text: str) -> str:
        values = {key: str(value) for key, value in item.items()}
        values[self.template.truncate_field] = field_text
        return self.template.item.format_map(values)

    def _glue(self, text: str, joined: str) -> str:
        template = self.template
        if template.insert_after is not None:
            position = text.find(template.insert_after)
            if position < 0:
                return text  # as published: an input without the word gets no profile items
            end = position + len(template.insert_after)
            # The items are preceded by the same ", and " that joins them (published format).
            return f"{text[:end]}{template.joiner}{joined}{text[end:]}"
        return f"{joined}{template.suffix}{text}"


def make_prompt_fn(task: Task, tokenizer, max_length: int, reserved: int = 0,
                   input_truncation: str = "share", prompt_budget: str = "exact"
                   ) -> Callable[[str, Sequence[Mapping[str, str]]], str]:
    """``prompt(input, items)`` for ``task`` in ``tokenizer``'s tokens."""
    return PromptBuilder(task, TokenCounter(tokenizer), max_length, reserved,
                         input_truncation=input_truncation, prompt_budget=prompt_budget).build
