"""Rankings as data: checking that one orders a profile, applying it, reading ranking files,
counting questions and cutting them into shards."""
from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Iterator, Mapping, Sequence

from LaMP.utils.data.fileio import check_readable
from LaMP.utils.data.jsoninput import RepeatedKeys
from LaMP.utils.data.questions import as_id, open_json_stream
from LaMP.utils.errors import LampError, preview


def ranking_problem(profile_ids: Sequence[str], ranking: Sequence[str]) -> str | None:
    """What is wrong with ``ranking`` as an order of ``profile_ids`` (``None``: nothing)."""
    remaining: dict[str, int] = defaultdict(int)
    for item_id in profile_ids:
        remaining[item_id] += 1
    unknown, repeated = [], []
    for item_id in ranking:
        if item_id not in remaining:
            unknown.append(item_id)
        elif remaining[item_id] == 0:
            repeated.append(item_id)
        else:
            remaining[item_id] -= 1
    missing = [item_id for item_id in profile_ids if remaining.get(item_id, 0) > 0]
    problems = []
    if unknown:
        problems.append(f"ids not in its profile: {preview(unknown)}")
    if repeated:
        problems.append(f"ids ranked more than once: {preview(repeated)}")
    if missing:
        # A profile id listed twice in the profile counts twice here, once per occurrence.
        problems.append(f"profile items left out: {preview(dict.fromkeys(missing))}")
    return "; ".join(problems) or None


def order_profile(profile: list[dict], ranked_ids: Sequence[str],
                  question_id: str = "?") -> list[dict]:
    """The profile items in ranked order; the ranking must list every item exactly once.

    A profile that repeats an id must list it as often in the ranking; its occurrences are
    then placed in profile order.
    """
    index = {item["id"]: position for position, item in enumerate(profile)}
    if len(ranked_ids) == len(index) == len(profile) and index.keys() == set(ranked_ids):
        return [profile[index[item_id]] for item_id in ranked_ids]  # distinct ids, permuted
    problem = ranking_problem([item["id"] for item in profile], ranked_ids)
    if problem is not None:
        raise LampError(f"the ranking of question {question_id} does not order its profile: "
                        f"{problem}")
    positions: dict[str, list[int]] = defaultdict(list)
    for position, item in enumerate(profile):
        positions[item["id"]].append(position)
    queues = {item_id: iter(places) for item_id, places in positions.items()}
    return [profile[next(queues[item_id])] for item_id in ranked_ids]


class Rankings(Mapping[str, list[str]]):
    """Question id -> ranked profile ids, stored compactly (each ranking as its JSON text).

    A train split's ranking has millions of ids; as Python lists they would take ~65 bytes
    each, as text ~10. A ranking is decoded when it is looked up.
    """

    def __init__(self) -> None:
        self._text: dict[str, str] = {}
        self._source: dict[str, str] = {}

    def __getitem__(self, question_id: str) -> list[str]:
        return json.loads(self._text[question_id])

    def __contains__(self, question_id: object) -> bool:
        return question_id in self._text

    def __iter__(self) -> Iterator[str]:
        return iter(self._text)

    def __len__(self) -> int:
        return len(self._text)

    def add(self, question_id: str, ranking: list[str], source: str) -> None:
        if question_id in self._text:
            where = ("twice in " + source if self._source[question_id] == source
                     else f"in {self._source[question_id]} and {source}")
            raise LampError(f"question {question_id} is ranked {where}")
        self._text[question_id] = json.dumps(ranking, ensure_ascii=False)
        self._source[question_id] = source


def load_rankings(paths: Sequence[str | os.PathLike]) -> Rankings:
    """Read one ranking file, or several shard files to combine: ``{question id: [ids]}``.

    Files are streamed. A question ranked twice (within a file or across shard files) is an
    error naming it; so is a malformed entry.
    """
    import ijson

    rankings = Rankings()
    for path in paths:
        path = check_readable(path, "ranking file")
        keys = RepeatedKeys()  # a question twice at the top is Rankings.add's to name
        with open_json_stream(path, b"{", "a JSON object {question id: [profile ids]}") as handle:
            try:
                for question_id, ranking in keys.watched(
                        ijson.kvitems(handle, "", map_type=keys.map_type)):
                    if keys.found:
                        keys.check(ranking, str(path), (question_id,))
                    ids = ([as_id(item_id) for item_id in ranking] if isinstance(ranking, list)
                           else None)
                    if ids is None or None in ids:
                        raise LampError(f"{path}: the ranking of question {question_id} must be "
                                        "a list of profile ids (strings)")
                    rankings.add(question_id, ids, str(path))
            except ijson.JSONError as error:
                raise LampError(f"{path}: malformed JSON "
                                f"({str(error).splitlines()[0][:200]})") from None
    return rankings


def count_questions(path: str | os.PathLike) -> int:
    """How many questions a questions file holds (a streamed pass that builds only ids)."""
    import ijson

    with open_json_stream(path, b"[", "a JSON list of questions") as handle:
        try:
            # use_float: as in iter_questions, so that both passes agree on what they accept
            return sum(1 for _ in ijson.items(handle, "item.id", use_float=True))
        except ijson.JSONError as error:
            reason = str(error).splitlines()[0][:200]
            raise LampError(f"{path}: malformed JSON ({reason})") from None


def shard_range(total: int, num_shards: int, shard_id: int) -> range:
    """Question positions of shard ``shard_id``: contiguous slices whose sizes differ by at
    most one. Contiguous, so that a user's questions (adjacent in LaMP files) mostly share a
    shard and its embedding cache."""
    if not 0 <= shard_id < num_shards:
        raise LampError(f"shard id {shard_id} is not in 0 … {num_shards - 1}")
    return range(total * shard_id // num_shards, total * (shard_id + 1) // num_shards)
