"""Time ``eval/eval_all.py`` on zips of all seven tasks at dev size, as a user runs it.

Example:
    python benchmarks/bench_eval.py --repeats 3

It writes a golds zip and a predictions zip (LaMP-1 2,500, LaMP-2 1,410, LaMP-3 2,500,
LaMP-4 1,925, LaMP-5 2,500, LaMP-6 1,500, LaMP-7 1,500 examples; ``--scale`` shrinks or grows
them), runs ``python eval/eval_all.py`` in a fresh interpreter ``--repeats`` times, and prints
the wall time of each run and the peak memory of all. One more run under ``-X importtime``
says where the start-up time goes and whether torch or transformers were imported. Generation
texts are the real LaMP-4/LaMP-7 dev golds and predictions when ../shared/lamp-real is present
(LaMP-5 and LaMP-6 borrow LaMP-4's headline pairs), otherwise generated words of similar
lengths.
Target: under 5 s on the 2-core development machine, without importing torch.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from LaMP.utils.tasks import MOVIE_TAGS

REPO = Path(__file__).resolve().parents[1]
LAMP_REAL = Path(os.environ.get("LAMP_REAL_DIR", REPO.parent / "shared" / "lamp-real"))
TARGET_SECONDS = 5.0  # a whole dev set's scoring should feel instant

# dev-set sizes of the user split (LaMP-2: the movie-tagging dev set)
DEV_SIZES = {"LaMP_1": 2500, "LaMP_2": 1410, "LaMP_3": 2500, "LaMP_4": 1925, "LaMP_5": 2500,
             "LaMP_6": 1500, "LaMP_7": 1500}
# mean words per gold text when no real text is at hand: headline, title, subject, tweet
GENERATED_WORDS = {"LaMP_4": 10, "LaMP_5": 11, "LaMP_6": 6, "LaMP_7": 17}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of eval_all (each a fresh interpreter)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiplies every task's dev size (1.0: about 13,800 examples)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--work_dir", default=None,
                        help="folder for the zips and results (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.scale <= 0:
        parser.error("--repeats must be >= 1 and --scale > 0")
    return args


def read_pairs(golds_path: Path, preds_path: Path) -> list[tuple[str, str]]:
    golds = {e["id"]: e["output"] for e in json.loads(golds_path.read_bytes())["golds"]}
    preds = {e["id"]: e["output"] for e in json.loads(preds_path.read_bytes())["golds"]}
    return [(golds[qid], preds[qid]) for qid in sorted(golds) if qid in preds]


def real_text_pairs() -> dict[str, list[tuple[str, str]]]:
    """(gold, prediction) pools from the real dev files, by task; empty when absent."""
    pools = {}
    for task in ("LaMP_4", "LaMP_7"):
        golds = LAMP_REAL / task / "dev" / "dev_outputs.json"
        preds = LAMP_REAL / "predictions" / f"{task}_dev_flant5_preds.json"
        if golds.exists() and preds.exists():
            pools[task] = read_pairs(golds, preds)
    if "LaMP_4" in pools:
        # scholarly titles are headline-length; email subjects are shorter
        pools["LaMP_5"] = pools["LaMP_4"]
        pools["LaMP_6"] = [(" ".join(g.split()[:7]), " ".join(p.split()[:7]))
                           for g, p in pools["LaMP_4"]]
    return pools


def generated_pair(rng: random.Random, vocabulary: list[str], mean_words: int) -> tuple[str, str]:
    gold = [rng.choice(vocabulary) for _ in range(max(1, int(rng.gauss(mean_words, 3))))]
    # a prediction shares about half its words with the gold, partly in order
    pred = [word if rng.random() < 0.5 else rng.choice(vocabulary) for word in gold
            if rng.random() < 0.85]
    return " ".join(gold), " ".join(pred)


def synthesize(scale: float, seed: int) -> tuple[dict, dict]:
    """Golds and predictions documents for the seven tasks: {file name: document}."""
    rng = random.Random(seed)
    pools = real_text_pairs()
    vocabulary = [f"w{i}" for i in range(3000)] + ["the", "a", "of", "to", "and", "in"] * 50
    golds, preds = {}, {}
    for number, (task, size) in enumerate(DEV_SIZES.items(), start=1):
        size = max(1, round(size * scale))
        gold_entries, pred_entries = [], []
        for row in range(size):
            qid = f"{number}0{row}"  # LaMP's scheme: task digit, split digit, row
            if task == "LaMP_1":
                gold = rng.choice(["[1]", "[2]"])
                pred = rng.choice(["[1]", "[2]", "[1]", "[2]", " [1]", "I think [2]"])
            elif task == "LaMP_2":
                gold = rng.choice(MOVIE_TAGS)
                pred = gold if rng.random() < 0.4 else rng.choice([*MOVIE_TAGS, "horror"])
            elif task == "LaMP_3":
                gold = str(rng.randint(1, 5))
                pred = rng.choice([gold, str(rng.randint(1, 5)), "4.5", "five"])
            elif task in pools:
                gold, pred = pools[task][row % len(pools[task])]
            else:
                gold, pred = generated_pair(rng, vocabulary, GENERATED_WORDS[task])
            gold_entries.append({"id": qid, "output": gold})
            pred_entries.append({"id": qid, "output": pred})
        rng.shuffle(pred_entries)  # predictions need not come in gold order
        golds[task] = {"task": task, "golds": gold_entries}
        preds[task] = {"task": task, "golds": pred_entries}
    return golds, preds


def write_zip(path: Path, documents: dict, folder: str) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for task, document in documents.items():
            archive.writestr(f"{folder}/{task}/dev_outputs.json", json.dumps(document))
        archive.writestr(f"__MACOSX/{folder}/._junk.json", b"\x00\x05\x16\x07")
    return path


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


# Runs a script with some packages made unimportable, as if they were not installed.
HIDING_LAUNCHER = """
import atexit, resource, runpy, sys
# RUSAGE_CHILDREN in the parent is already raised by the earlier runs: report our own peak
atexit.register(lambda: print("peak_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                              file=sys.stderr))
HIDDEN = set(sys.argv[1].split(","))
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ImportError(f"{name} hidden by bench_eval")
sys.meta_path.insert(0, Hide())
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_eval_all(argv: list[str], python_flags: list[str] = (), hide: tuple[str, ...] = ()
                 ) -> tuple[float, subprocess.CompletedProcess]:
    """Run eval_all.py in a fresh interpreter; returns (wall seconds, the finished process)."""
    launcher = ["-c", HIDING_LAUNCHER, ",".join(hide)] if hide else []
    start = time.perf_counter()
    process = subprocess.run([sys.executable, *python_flags, *launcher,
                              str(REPO / "eval" / "eval_all.py"), *argv],
                             cwd=REPO, env=child_env(), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit(f"eval_all failed:\n{process.stderr}")
    return seconds, process


def import_profile(stderr: str) -> tuple[dict[str, float], float]:
    """Seconds spent importing each top-level package, from ``-X importtime`` output.

    Only outermost imports count (nested ones are indented and already inside their parent's
    cumulative time), so nothing is counted twice.
    """
    packages: dict[str, float] = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or line.count("|") != 2:
            continue
        _, cumulative, name = line[len("import time:"):].split("|")
        if not cumulative.strip().isdigit() or name.startswith("  "):
            continue
        top = name.strip().split(".")[0]
        packages[top] = packages.get(top, 0.0) + int(cumulative) / 1e6
    return packages, sum(packages.values())


def loaded_anywhere(stderr: str, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` (top-level packages) ``-X importtime`` saw imported, at any depth."""
    seen = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            seen.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    # -X importtime also lists imports that failed (nltk tries scipy whether or not it is
    # there): count only packages that are installed.
    return [name for name in names
            if name in seen and importlib.util.find_spec(name) is not None]


# Run in a fresh interpreter: where one eval_all run spends its time, phase by phase.
PHASES = """
import json, sys, time
start = time.perf_counter()
from LaMP.utils.data.outputs import read_outputs_zip
from LaMP.utils.evaluation.scoring import score_files
imported = time.perf_counter()
golds, preds = read_outputs_zip(sys.argv[1]), read_outputs_zip(sys.argv[2])
read = time.perf_counter()
import rouge_score.rouge_scorer
rouge = time.perf_counter()
scoring = {}
for task in golds:
    begin = time.perf_counter()
    score_files(golds[task], preds[task], task)
    scoring[task.file_name] = time.perf_counter() - begin
print(json.dumps({"import LaMP.utils (numpy)": imported - start, "read both zips": read - imported,
                  "import rouge_score (nltk)": rouge - read, "scoring": scoring}))
"""


def phase_profile(golds_zip: Path, preds_zip: Path) -> dict:
    process = subprocess.run([sys.executable, "-c", PHASES, str(golds_zip), str(preds_zip)],
                             cwd=REPO, env=child_env(), capture_output=True, text=True, check=True)
    return json.loads(process.stdout)


def main(argv=None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work_dir or scratch)
        work.mkdir(parents=True, exist_ok=True)
        golds, preds = synthesize(args.scale, args.seed)
        golds_zip = write_zip(work / "golds.zip", golds, "LaMP_dev_golds")
        preds_zip = write_zip(work / "preds.zip", preds, "my_predictions")
        total = sum(len(doc["golds"]) for doc in preds.values())
        source = "real LaMP-4/7 texts" if real_text_pairs() else "generated words"
        # other work on the machine inflates every wall time below
        print("load average (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
        print(f"data: {total:,} predictions over 7 tasks ({source}); golds.zip "
              f"{golds_zip.stat().st_size / 1e6:.1f} MB, preds.zip "
              f"{preds_zip.stat().st_size / 1e6:.1f} MB")
        eval_argv = ["--golds_zip", str(golds_zip), "--preds_zip", str(preds_zip),
                     "--temp_dir", str(work / "unused"), "--output_file",
                     str(work / "results.json"), "--require_all"]

        walls = []
        for repeat in range(args.repeats):
            seconds, _ = run_eval_all(eval_argv)
            walls.append(seconds)
            print(f"run {repeat + 1}: wall {seconds:.2f} s")
        # ru_maxrss of children: the largest resident set of any finished child, in KiB on Linux
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

        _, traced = run_eval_all(eval_argv, ["-X", "importtime"])
        packages, import_seconds = import_profile(traced.stderr)
        heavy = loaded_anywhere(traced.stderr, ("torch", "transformers"))
        # nltk (under rouge_score) imports these when they are installed; requirements.txt
        # does not ask for them, so a fresh clone does not pay for them
        optional = loaded_anywhere(traced.stderr, ("sklearn", "scipy"))
        phases = phase_profile(golds_zip, preds_zip)
        # requirements.txt installs neither: time the run a fresh clone gets, too
        without_optional, without_optional_peak_mib = [], 0.0
        for _ in range(args.repeats if optional else 0):
            seconds, process = run_eval_all(eval_argv, hide=tuple(optional))
            without_optional.append(seconds)
            peak_line = [line for line in process.stderr.splitlines()
                         if line.startswith("peak_kib ")][-1]
            without_optional_peak_mib = max(without_optional_peak_mib,
                                            int(peak_line.split()[1]) / 1024)
        results = json.loads((work / "results.json").read_text(encoding="utf-8"))

    best = min(walls)
    print(f"wall: best {best:.2f} s, median {sorted(walls)[len(walls) // 2]:.2f} s "
          f"(target < {TARGET_SECONDS:.0f} s: {'met' if best < TARGET_SECONDS else 'MISSED'})")
    print(f"peak memory (max RSS of a run): {peak_mib:.0f} MiB")
    print(f"torch/transformers imported: {', '.join(heavy) if heavy else 'no'}")
    print(f"imports (under -X importtime, which adds its own overhead): {import_seconds:.2f} s; "
          "largest:")
    for name, seconds in sorted(packages.items(), key=lambda item: -item[1])[:8]:
        print(f"  {name:<24} {seconds:.2f} s")
    print(f"scikit-learn/scipy imported through nltk: {', '.join(optional) if optional else 'no'}")
    if without_optional:
        print(f"wall with {' and '.join(optional)} hidden (as installed from requirements.txt): "
              + ", ".join(f"{seconds:.2f} s" for seconds in without_optional)
              + f"; peak memory {without_optional_peak_mib:.0f} MiB")
    print("phases (one more fresh interpreter):")
    scoring = phases.pop("scoring")
    for name, seconds in phases.items():
        print(f"  {name:<28} {seconds:.2f} s")
    print(f"  {'scoring, all tasks':<28} {sum(scoring.values()):.2f} s ("
          + ", ".join(f"{task} {seconds:.2f}" for task, seconds in scoring.items()) + ")")
    print("scores: " + ", ".join(
        f"{task} {next(iter(v for k, v in result.items() if k not in ('count', 'invalid'))):.3f}"
        for task, result in results.items()))
    return {"predictions": total, "wall_seconds": walls, "peak_mib": peak_mib,
            "heavy_imports": heavy, "import_seconds": import_seconds, "imports": packages,
            "phases": {**phases, "scoring": scoring}, "wall_without_optional": without_optional,
            "peak_mib_without_optional": without_optional_peak_mib}


if __name__ == "__main__":
    main()
