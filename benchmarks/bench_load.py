"""Benchmark: stream-load a generated ~1 GB LaMP questions file; print wall time and peak memory.

Example:
    python benchmarks/bench_load.py --size_gb 1.0

The file imitates LaMP-3 (product rating), whose train split is the largest published file:
questions with ~100–200 reviews of ~60 words in each profile. It is written to a temporary
folder and deleted afterwards. Loading runs in a fresh subprocess, so its peak resident
memory (ru_maxrss) is the loader's alone; the target is under 300 MB whatever the file size.
``--compare_json_load`` also measures ``json.load`` of the same file, for contrast.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a clone without `pip install -e .`

from LaMP.utils.tasks import get_task  # noqa: E402

TARGET_PEAK_MB = 300
VOCABULARY = ("kettle boils fast lid steam handle sturdy cheap broke returned love great "
              "battery bass comfortable noisy cable fits size quality arrived late box "
              "gift daughter kitchen daily months works fine would buy again").split()

# Each child prints its counts and its own peak resident memory (ru_maxrss, KB on Linux).
STREAM_LOAD = """
import resource, sys
from LaMP.utils.data.questions import iter_questions
from LaMP.utils.tasks import get_task
questions = items = 0
for question in iter_questions(sys.argv[1], get_task("LaMP-3")):
    questions += 1
    items += len(question["profile"])
print(questions, items, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
JSON_LOAD = """
import json, resource, sys
with open(sys.argv[1], "rb") as handle:
    data = json.load(handle)
print(len(data), sum(len(q["profile"]) for q in data),
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def review(rng: random.Random) -> str:
    return " ".join(rng.choices(VOCABULARY, k=rng.randint(40, 80)))


def write_questions(path: Path, size_bytes: int, seed: int) -> int:
    """A LaMP-3-like questions file of at least ``size_bytes``; returns its question count."""
    rng = random.Random(seed)
    instruction = get_task("LaMP-3").input_prefix
    questions = 0
    with open(path, "w", encoding="utf-8") as out:
        out.write("[")
        while out.tell() < size_bytes:
            qid = f"20{questions}"
            profile = [{"text": review(rng), "score": str(rng.randint(1, 5)), "id": f"{qid}{i}",
                        "date": f"20{rng.randint(10, 20)}-0{rng.randint(1, 9)}-15"}
                       for i in range(rng.randint(100, 200))]
            question = {"id": qid, "input": f"{instruction} just answer with 1, 2, 3, 4, or 5 "
                                            f"without further explanation. review: {review(rng)}",
                        "profile": profile}
            out.write((",\n" if questions else "\n") + json.dumps(question))
            questions += 1
        out.write("\n]\n")
    return questions


def measure(code: str, path: Path) -> tuple[float, float, int, int]:
    """Run ``code`` on ``path`` in a fresh interpreter.

    Returns (wall seconds, peak RSS in MB, questions, profile items).
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, str(path)], env=env, check=True,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    questions, items, peak_kb = (int(value) for value in done.stdout.split())
    return seconds, peak_kb / 1024, questions, items


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size_gb", type=float, default=1.0,
                        help="size of the generated questions file in GB (default: 1.0)")
    parser.add_argument("--tmp_dir", default=None,
                        help="where the temporary file goes (default: the system temp folder)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated text")
    parser.add_argument("--compare_json_load", action="store_true",
                        help="also measure json.load of the whole file (needs several GB of "
                             "memory per GB of file)")
    args = parser.parse_args(argv)
    if args.size_gb <= 0:
        parser.error("--size_gb must be > 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.tmp_dir, prefix="bench_load_") as folder:
        path = Path(folder) / "train_questions.json"
        start = time.perf_counter()
        write_questions(path, int(args.size_gb * 1e9), args.seed)
        size_mb = path.stat().st_size / 1e6
        print(f"generated {path.name}: {size_mb:,.0f} MB in {time.perf_counter() - start:.1f} s")
        seconds, peak_mb, questions, items = measure(STREAM_LOAD, path)
        result = {"file_mb": size_mb, "questions": questions, "profile_items": items,
                  "stream_seconds": seconds, "stream_peak_mb": peak_mb}
        print(f"iter_questions (validating, LaMP-3): {seconds:.1f} s wall, "
              f"{size_mb / seconds:.0f} MB/s, peak RSS {peak_mb:.0f} MB "
              f"({questions:,} questions, {items:,} profile items; "
              f"target < {TARGET_PEAK_MB} MB: {'met' if peak_mb < TARGET_PEAK_MB else 'MISSED'})")
        if args.compare_json_load:
            seconds, peak_mb, _, _ = measure(JSON_LOAD, path)
            result.update(json_load_seconds=seconds, json_load_peak_mb=peak_mb)
            print(f"json.load of the whole file: {seconds:.1f} s wall, peak RSS {peak_mb:.0f} MB")
    return result


if __name__ == "__main__":
    main()
