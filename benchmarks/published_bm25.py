"""The published LaMP BM25 ranking, reimplemented for comparison (not used by the toolkit).

Per question: the corpus and query as the published LaMP-7 code builds them, a fresh
``rank_bm25.BM25Okapi`` index over the profile, ``get_top_n`` over the whole profile; the
file read with ``json.load`` and the ranking written with ``json.dump``. It imports only
``json`` and ``rank_bm25`` (the published script also imports torch and transformers, for its
dense ranker), so that timing it as a command is not slowed by imports it would not need.

Example:
    python benchmarks/published_bm25.py questions.json ranking.json
"""
from __future__ import annotations

import json
import sys


def after_colon(text: str) -> str:
    """The LaMP-7 query: the input after its first colon."""
    return text[text.find(":") + 1:].strip()


def published_bm25_rank(dataset: list[dict]) -> dict[str, list[str]]:
    from rank_bm25 import BM25Okapi

    rankings = {}
    for data in dataset:
        profile = data["profile"]
        corpus = [f'{item["text"]}' for item in profile]
        bm25 = BM25Okapi([text.split() for text in corpus])
        ranked = bm25.get_top_n(after_colon(data["input"]).split(), profile, n=len(profile))
        rankings[data["id"]] = [item["id"] for item in ranked]
    return rankings


def published_bm25_file(input_path, output_path) -> dict[str, list[str]]:
    with open(input_path) as handle:
        dataset = json.load(handle)
    rankings = published_bm25_rank(dataset)
    with open(output_path, "w") as handle:
        json.dump(rankings, handle)
    return rankings


if __name__ == "__main__":
    published_bm25_file(*sys.argv[1:3])
