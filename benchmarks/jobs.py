"""The job graph the long experiments run on: each job runs the repository's scripts in their
own processes and leaves a ``summary.json`` in its folder under ``jobs/``, so a rerun skips
what is done and a killed run costs only the jobs it was running."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench_lora_lamp7 import REPO

logger = logging.getLogger("jobs")


def write_text(path: Path, text: str) -> None:
    """Whole or not at all: a kill never leaves a file a rerun would take as done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_json(path: Path, value) -> None:
    write_text(path, json.dumps(value, indent=2))


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def add_run_arguments(parser, *, generation_batch: int, user_max_steps: bool = True) -> None:
    """The flags every long experiment shares: smoke-run caps, the generation batch, the
    bootstrap and the shards."""
    if user_max_steps:
        parser.add_argument("--user_max_steps", type=int, default=None,
                            help="cap each user's steps (a smoke run)")
    parser.add_argument("--task_max_steps", type=int, default=None,
                        help="cap the task adapter's steps (a smoke run)")
    parser.add_argument("--batch_size", type=int, default=generation_batch,
                        help="generation batch")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="paired bootstrap resamples of each comparison")
    parser.add_argument("--num_shards", type=int, default=1, help="processes sharing the work")
    parser.add_argument("--shard_id", type=int, default=0, help="this process, 0 … N - 1")


def check_run_arguments(parser, args) -> None:
    if not 0 <= args.shard_id < args.num_shards:
        parser.error(f"--shard_id must be in 0 … {args.num_shards - 1}")


def start_logging(log_file: Path) -> None:
    """Progress to the terminal and to ``log_file`` (in a work folder, made if needed)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(), logging.FileHandler(log_file)])


def paired_bootstrap(golds: str, preds_a: str, preds_b: str, out: Path, bootstrap: int,
                     seed: int) -> dict:
    """``eval/compare.py`` of B against A (made once; its JSON kept at ``out``): the metrics'
    differences, 95% intervals and p-values."""
    if not out.exists():
        subprocess.run([sys.executable, str(REPO / "eval" / "compare.py"), "--golds_json",
                        str(golds), "--preds_a", str(preds_a), "--preds_b", str(preds_b),
                        "--task_name", "LaMP_7", "--output_file", str(out), "--bootstrap",
                        str(bootstrap), "--seed", str(seed)], check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    return read_json(out)["metrics"]


@dataclass
class Job:
    name: str
    needs: tuple[str, ...]
    run: Callable[[], None]
    done: Callable[[], bool]
    per_user: bool = False  # every shard trains its share of the users


class JobGraph:
    """Jobs by name, each with the jobs it needs; subclasses add them."""

    def __init__(self, work: Path):
        self.work = work
        self.jobs: dict[str, Job] = {}

    def folder(self, name: str) -> Path:
        return self.work / "jobs" / name

    def summary(self, name: str) -> dict | None:
        path = self.folder(name) / "summary.json"
        return read_json(path) if path.exists() else None

    def add(self, name: str, needs, run, done=None, per_user: bool = False) -> None:
        if name in self.jobs:
            raise ValueError(f"two jobs named {name}")
        self.jobs[name] = Job(name, tuple(needs), run,
                              done or (lambda: self.summary(name) is not None), per_user)

    def log(self, name: str, suffix: str = "") -> Path:
        self.folder(name).mkdir(parents=True, exist_ok=True)
        return self.folder(name) / f"run{suffix}.log"

    def waiting(self) -> list[str]:
        return [name for name, job in self.jobs.items() if not job.done()]

    def _start(self, job: Job) -> float:
        done = sum(1 for other in self.jobs.values() if other.done())
        logger.info("[%d/%d done] %s: starting", done, len(self.jobs), job.name)
        return time.perf_counter()

    def run_parallel(self, workers: int) -> list[str]:
        """Every job, up to ``workers`` at once, each as soon as the jobs it needs are done
        (in the order they were added); a failed job is logged and its dependants wait. The
        names of the jobs not done."""
        running: dict[str, threading.Thread] = {}
        failed: set[str] = set()
        finished = threading.Condition()

        def work(job: Job) -> None:
            started = self._start(job)
            try:
                job.run()
                logger.info("%s: done after %.0f s", job.name, time.perf_counter() - started)
            except BaseException as error:  # noqa: BLE001 - one failed job stops only its own
                logger.error("%s: failed after %.0f s: %s", job.name,
                             time.perf_counter() - started, error)
                failed.add(job.name)
            with finished:
                running.pop(job.name)
                finished.notify_all()

        with finished:
            while True:
                ready = [job for name, job in self.jobs.items()
                         if name not in running and name not in failed and not job.done()
                         and all(self.jobs[need].done() for need in job.needs)]
                for job in ready[:max(0, workers - len(running))]:
                    running[job.name] = threading.Thread(target=work, args=(job,), daemon=True)
                    running[job.name].start()
                if not running:
                    return self.waiting()
                finished.wait()

    def run_shard(self, num_shards: int, shard_id: int) -> list[str]:
        """Every job this shard can do now, in passes until none is left: every N-th job
        that is not per-user, and this shard's share of every per-user job. The names of the
        jobs still waiting (on another shard, or on a failed one)."""
        singles = [name for name, job in self.jobs.items() if not job.per_user]
        mine = {name for position, name in enumerate(singles)
                if position % num_shards == shard_id}
        attempted: set[str] = set()
        while True:
            ran = False
            for name, job in self.jobs.items():
                if name in attempted or job.done():
                    continue
                if not all(self.jobs[need].done() for need in job.needs):
                    continue
                if not job.per_user and name not in mine:
                    continue
                attempted.add(name)
                started = self._start(job)
                job.run()
                logger.info("%s: %s after %.0f s", name,
                            "done" if job.done() else "this shard's share done",
                            time.perf_counter() - started)
                ran = True
            if not ran:
                return self.waiting()
