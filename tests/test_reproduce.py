"""The grid runner (LaMP/reproduce.py) on the bundled sample with a tiny random model."""
from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, SAMPLE
from LaMP import reproduce
from LaMP.utils.errors import LampError
from LaMP.utils.grid.plan import COMPLETE, Planner, Runner, expand_cells
from LaMP.utils.grid.schema import load_grid

DATA_ROOT = SAMPLE.parent  # data/sample: {split}/LaMP_k/{set}_questions.json
MODEL_FLAGS = {"max_length": 64, "generation_max_length": 4, "generation_num_beams": 1,
               "per_device_batch_size": 8, "chat_template": True, "device": "cpu"}


def write_grid(folder: Path, model: str, **overrides) -> Path:
    grid = {"name": "tiny", "tasks": ["LaMP-7"], "models": {"tiny": model},
            "methods": {"zero_shot": {}}, "retrievers": ["bm25", "recency"], "k": [0, 1, 2],
            "subset": {"seed": 0, "skip": 4, "count": 6},
            "flags": {"model": MODEL_FLAGS}, "baseline": {"retriever": "none"}}
    grid.update(overrides)
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False), encoding="utf-8")
    return path


def run_grid(grid: Path, runs: Path, *extra: str) -> dict:
    return reproduce.main(["--grid", str(grid), "--data_root", str(DATA_ROOT),
                           "--runs_dir", str(runs), *extra])


def complete_folders(runs: Path) -> set[str]:
    return {path.parent.name for path in (runs / "tiny" / "stages").glob(f"*/{COMPLETE}")}


@pytest.fixture(scope="module")
def tiny_grid_run(tmp_path_factory, tiny_llama):
    folder = tmp_path_factory.mktemp("grid")
    grid = write_grid(folder, str(tiny_llama))
    result = run_grid(grid, folder / "runs")
    return folder, grid, result


def test_grid_runs_every_cell_and_shares_each_ranking(tiny_grid_run):
    folder, grid, result = tiny_grid_run
    # k = 0 needs no retriever: one cell instead of one per retriever.
    assert sorted(result["cells"]) == sorted(
        f"LaMP_7.user.tiny.zero_shot.{name}" for name in
        ("none.k0", "bm25.k1", "bm25.k2", "recency.k1", "recency.k2"))
    executed = result["executed"]
    # One subset, one ranking per retriever (shared by k = 1 and 2), a merge per ranking plus
    # the unranked one, and an evaluation and a score per cell.
    kinds = [name.split("-")[0] for name in executed]
    assert {kind: kinds.count(kind) for kind in set(kinds)} == {
        "subset": 1, "rank": 2, "merge": 3, "evaluate": 5, "score": 5}
    root = folder / "runs" / "tiny"
    for cell in result["cells"]:
        results = json.loads((root / cell / "score" / "results.json").read_text())
        assert results["count"] == 6
        assert (root / cell / "evaluate" / "args.json").exists()
        assert json.loads((root / cell / "cell.json").read_text())["cell"] == cell
    bm25 = {os.readlink(root / f"LaMP_7.user.tiny.zero_shot.bm25.k{k}" / "rank")
            for k in (1, 2)}
    assert len(bm25) == 1  # both cells link the same ranking folder
    # A complete grid run again runs nothing.
    assert run_grid(grid, folder / "runs")["executed"] == []


def test_subset_is_the_seeded_slice_of_the_benchmark(tiny_grid_run):
    folder, _, _ = tiny_grid_run
    subset = next((folder / "runs" / "tiny" / "stages").glob("subset-*"))
    kept = [q["id"] for q in json.loads((subset / "questions.json").read_text())]
    questions = json.loads((SAMPLE / "LaMP_7" / "dev_questions.json").read_text())
    random.Random(0).shuffle(questions)  # what benchmarks/bench_lora_lamp7.py does
    assert kept == [q["id"] for q in questions[4:10]]
    golds = json.loads((subset / "outputs.json").read_text())
    assert [g["id"] for g in golds["golds"]] == kept


def test_killed_grid_resumes_without_rerunning_complete_stages(tmp_path, tiny_llama,
                                                               monkeypatch):
    from LaMP import evaluate_llm

    grid = write_grid(tmp_path, str(tiny_llama), retrievers=["bm25"], k=[0, 1, 2])
    real_main = evaluate_llm.main
    calls = []

    def killed_on_second_call(argv):
        calls.append(argv)
        if len(calls) == 2:
            output = Path(argv[argv.index("--output_dir") + 1])
            (output / "predictions.json").write_text("half written")
            raise KeyboardInterrupt  # what Ctrl-C or a kill does in the middle of a stage
        return real_main(argv)

    monkeypatch.setattr(evaluate_llm, "main", killed_on_second_call)
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, tmp_path / "runs")
    done_before = complete_folders(tmp_path / "runs")
    assert any(name.startswith("evaluate-") for name in done_before)
    monkeypatch.setattr(evaluate_llm, "main", real_main)
    result = run_grid(grid, tmp_path / "runs")
    assert not set(result["executed"]) & done_before
    assert result["complete"] == 3 and not result["failures"]
    # The interrupted evaluation was run again from scratch: its file is whole JSON now.
    for cell in result["cells"]:
        json.loads((tmp_path / "runs" / "tiny" / cell / "evaluate" / "predictions.json")
                   .read_text())


def test_shards_cover_every_cell_exactly_once(tiny_grid_run):
    folder, grid, result = tiny_grid_run
    shards = [run_grid(grid, folder / "runs", "--dry_run", "--num_shards", "2",
                       "--shard_id", str(i))["cells"] for i in (0, 1)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(result["cells"])
    assert shards[0] and shards[1]


def test_dry_run_commands_run_by_a_shell_give_the_same_results(tiny_grid_run, tmp_path,
                                                               capsys):
    folder, grid, result = tiny_grid_run
    capsys.readouterr()
    run_grid(grid, tmp_path / "runs", "--dry_run")
    script = capsys.readouterr().out
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-e"], input=script, text=True, cwd=REPO, env=env,
                          capture_output=True)
    assert done.returncode == 0, done.stderr[-2000:]
    ours = sorted((folder / "runs" / "tiny" / "stages").glob("score-*/results.json"))
    theirs = sorted((tmp_path / "runs" / "tiny" / "stages").glob("score-*/results.json"))
    assert [p.parent.name for p in ours] == [p.parent.name for p in theirs] and len(ours) == 5
    for mine, shell in zip(ours, theirs):
        assert mine.read_bytes() == shell.read_bytes()


def test_launcher_runs_model_stages_in_a_process_of_their_own(tiny_grid_run, tmp_path):
    folder, grid, _ = tiny_grid_run
    small = write_grid(tmp_path, str(yaml.safe_load(grid.read_text())["models"]["tiny"]),
                       retrievers=["bm25"], k=[1])
    result = run_grid(small, tmp_path / "runs", "--launcher", sys.executable)
    (cell,) = result["cells"]
    args = json.loads((tmp_path / "runs" / "tiny" / cell / "evaluate" / "stage.json").read_text())
    assert args["command"].startswith(sys.executable + " LaMP/evaluate_llm.py ")
    theirs = (tmp_path / "runs" / "tiny" / cell / "score" / "results.json").read_bytes()
    assert theirs == (folder / "runs" / "tiny" / cell / "score" / "results.json").read_bytes()


def fake_predictions(runner: Runner, cells, by_retriever: dict) -> None:
    """Write an evaluation's outputs by hand (the numbers the test wants) and mark it done."""
    for cell in cells:
        answers = by_retriever.get(cell.axes["retriever"])
        if answers is None:
            continue
        evaluate = [run for run in cell.runs if run.stage.name == "evaluate"][0]
        golds = json.loads((SAMPLE / "LaMP_3" / "dev_outputs.json").read_text())["golds"]
        out = runner.folder(evaluate)
        out.mkdir(parents=True)
        (out / "predictions.json").write_text(json.dumps({"task": "LaMP_3", "golds": [
            {"id": g["id"], "output": answers(g["output"])} for g in golds]}))
        (out / COMPLETE).write_text("{}")


def test_collect_writes_tables_with_bold_markers_and_missing_cells(tmp_path):
    grid_path = write_grid(tmp_path, str(tmp_path / "no_model"), tasks=["LaMP-3"], k=[0, 1],
                           subset=None)
    grid = load_grid(grid_path)
    cells = [Planner(grid, DATA_ROOT).plan(cell) for cell in expand_cells(grid)]
    runner = Runner(tmp_path / "runs" / "tiny")
    # no profile: always "1" (far from most golds); bm25: the gold itself; recency: not run.
    fake_predictions(runner, cells, {"none": lambda gold: "1", "bm25": lambda gold: gold})
    with pytest.raises(LampError, match=r"^1 of 3 cells failed \(first: "
                                        r"LaMP_3\.user\.tiny\.zero_shot\.recency\.k1: evaluate: "):
        run_grid(grid_path, tmp_path / "runs")
    tables = tmp_path / "runs" / "tiny" / "tables"
    markdown = (tables / "results.md").read_text()
    mae = next(line for line in markdown.splitlines() if line.startswith("| LaMP-3 | MAE"))
    cells_text = [text.strip() for text in mae.strip("|").split("|")]
    assert cells_text[2] != "0.0000" and not cells_text[2].startswith("**")  # no profile
    assert cells_text[3] == "**0.0000**†"  # best, and significantly better than no profile
    assert cells_text[4] == "—"  # recency did not complete
    latex = (tables / "results.tex").read_text()
    assert r"\textbf{0.0000}$^\dagger$" in latex and r"\toprule" in latex and "---" in latex
    rows = (tables / "results.csv").read_text().splitlines()
    assert rows[0].split(",")[:6] == ["task", "metric", "none k=0", "none k=0 p", "bm25 k=1",
                                      "bm25 k=1 p"]
    mae_row = next(row.split(",") for row in rows if row.startswith("LaMP-3,MAE"))
    assert float(mae_row[4]) == 0.0 and float(mae_row[5]) < 0.05
    for png in ("metric_vs_k.png", "methods.png"):
        assert (tables / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --collect alone runs nothing and writes the same table.
    (tables / "results.md").unlink()
    reproduce.main(["--grid", str(grid_path), "--data_root", str(DATA_ROOT), "--runs_dir",
                    str(tmp_path / "runs"), "--collect"])
    assert (tables / "results.md").read_text() == markdown


def test_reference_numbers_sit_beside_ours_with_the_difference(tmp_path):
    grid_path = write_grid(tmp_path, "none", tasks=["LaMP-3"], k=[1], retrievers=["none", "bm25"],
                           subset=None, reference={"source": "a paper", "values": {
                               "LaMP-3": {"MAE": {"bm25": 0.25}}}})
    grid = load_grid(grid_path)
    cells = [Planner(grid, DATA_ROOT).plan(cell) for cell in expand_cells(grid)]
    runner = Runner(tmp_path / "runs" / "tiny")
    fake_predictions(runner, cells, {"none": lambda gold: "1", "bm25": lambda gold: gold})
    run_grid(grid_path, tmp_path / "runs")
    markdown = (tmp_path / "runs" / "tiny" / "tables" / "results.md").read_text()
    assert "| task | metric | none | bm25 | bm25 (paper) | bm25 Δ |" in markdown
    assert "| **0.0000**† | 0.250 | -0.2500 |" in markdown
    assert "| **0.0000**† | — | — |" in markdown
    assert "a paper" in markdown


def error_line(grid_text: str, tmp_path: Path, *extra: str) -> tuple[int, str]:
    path = tmp_path / "bad.yaml"
    path.write_text(grid_text, encoding="utf-8")
    done = subprocess.run([sys.executable, str(REPO / "LaMP" / "reproduce.py"), "--grid",
                           str(path), "--data_root", str(DATA_ROOT), "--runs_dir",
                           str(tmp_path / "runs"), "--dry_run", *extra],
                          capture_output=True, text=True, cwd=tmp_path)
    return done.returncode, done.stderr


GOOD = "tasks: [LaMP-7]\nmodels: {m: some/model}\nmethods: {zero_shot: {}}\n"


@pytest.mark.parametrize("text, message", [
    (GOOD + "retriever: [bm25]\n", "grid: unknown key 'retriever' (valid: name, "),
    (GOOD.replace("LaMP-7", "LaMP-9"), "tasks: unknown task 'LaMP-9'"),
    (GOOD + "retrievers: [bm26]\n", "retrievers.bm26.ranker: 'bm26' is not one of bm25, "),
    (GOOD + "k: [1, -2]\n", "k: -2 is not a whole number >= 0"),
    (GOOD.replace("{zero_shot: {}}", "{lora: {stage: finetune}}"),
     "methods.lora.stage: 'finetune' is not one of evaluate, train"),
    (GOOD + "flags: {modle: {}}\n", "flags: unknown key 'modle' (valid: subset, rank, "),
    (GOOD + "flags: {model: {--num_retrieved: 2}}\n", "flags.model: '--num_retrieved' is not "),
    (GOOD + "exclude: [{retriever: bm25}]\n", "exclude[0].retriever: 'bm25' is not in the "),
    (GOOD + "baseline: {method: lora}\n", "baseline.method: 'lora' is not in the grid's"),
    (GOOD + "reference: {values: {LaMP-7: {accuracy: {none: 1}}}}\n",
     "reference.values.LaMP-7: unknown key 'accuracy' (valid: rouge-1, rouge-L)"),
    ("tasks: [LaMP-7\n", "not valid YAML at line 2"),
    ("- a\n- b\n", "grid: expected a mapping, found list"),
    (GOOD.replace("models: {m: some/model}\n", ""), "models: required key is missing"),
    (GOOD.replace("[LaMP-7]", "[LaMP-7, LaMP-1]") + "splits: [user, time]\n",
     "4 (first: " + str(DATA_ROOT / "time" / "LaMP_7" / "dev_questions.json")),
])
def test_a_bad_grid_is_one_error_line_naming_the_key(tmp_path, text, message):
    status, stderr = error_line(text, tmp_path)
    assert status == 2 and stderr.count("\n") == 1 and stderr.startswith("error: "), stderr
    assert message in stderr, stderr
    assert not (tmp_path / "runs").exists()


def test_a_flag_the_stage_does_not_know_fails_before_anything_runs(tmp_path):
    status, stderr = error_line(GOOD + "flags: {model: {num_beams: 4}}\n", tmp_path)
    assert status == 2 and stderr.count("\n") == 1, stderr
    assert "the evaluate stage of cell LaMP_7.user.m.zero_shot.none.k0 refuses its flags: " \
           "unrecognized arguments: --num_beams 4" in stderr


def test_shipped_grids_plan_and_every_stage_accepts_its_flags(tmp_path, monkeypatch):
    from LaMP.utils.grid import plan

    # Packaged models stand for themselves here: parsing flags needs no model on disk.
    monkeypatch.setattr(plan, "resolve_model", lambda spec: spec)
    names = set()
    for path in sorted((REPO / "LaMP" / "configs").glob("*.yaml")):
        grid = load_grid(path)
        cells = [Planner(grid, tmp_path).plan(cell) for cell in expand_cells(grid)]
        reproduce.check_stage_flags(grid, cells, Runner(tmp_path / grid.name))
        names.add(grid.name)
        assert len({cell.name for cell in cells}) == len(cells)
        if grid.name == "cpu_lamp7":  # 1 cell for k = 0, 4 retrievers x 3 k
            assert len(cells) == 13 and len({run.key for cell in cells for run in cell.runs
                                             if run.stage.name == "rank"}) == 4
        if grid.name == "lamp_finetune":  # one retriever per task and split, two methods
            assert len(cells) == 7 * 2 * 2
    assert names >= {"demo", "cpu_lamp7", "ropg_table3", "lamp_finetune", "deviations_lamp7"}


def test_the_demo_grid_runs_with_a_tiny_model(tmp_path, tiny_llama):
    demo = yaml.safe_load((REPO / "LaMP" / "configs" / "demo.yaml").read_text())
    demo["models"] = {"smollm2": str(tiny_llama)}
    demo["tasks"] = ["LaMP-3", "LaMP-7"]
    demo["methods"]["lora"]["flags"]["max_steps"] = 1
    demo["exclude"][0]["task"] = ["LaMP-3"]
    grid = tmp_path / "demo.yaml"
    grid.write_text(yaml.safe_dump(demo, sort_keys=False))
    result = reproduce.main(["--grid", str(grid), "--runs_dir", str(tmp_path / "runs"),
                             "--data_root", str(DATA_ROOT), "--limit", "3"])
    assert result["complete"] == 3 and not result["failures"]
    markdown = (tmp_path / "runs" / "demo" / "tables" / "results.md").read_text()
    assert "| task | metric | zero_shot | lora |" in markdown
    assert any(line.startswith("| LaMP-3 | MAE |") and line.endswith("| — |")
               for line in markdown.splitlines())  # LoRA only on LaMP-7

def test_a_train_method_trains_scores_and_resumes_from_its_checkpoint(tmp_path, tiny_llama):
    grid = write_grid(tmp_path, str(tiny_llama), retrievers=["bm25"], k=[1], methods={
        "zero_shot": {},
        "lora": {"stage": "train", "flags": {"max_steps": 2, "learning_rate": 1e-3,
                                             "save_total_limit": 1, "logging_steps": 1}}},
        baseline={"method": "zero_shot"})
    result = run_grid(grid, tmp_path / "runs", "--limit", "6")
    root = tmp_path / "runs" / "tiny"
    lora = root / "LaMP_7.user.tiny.lora.bm25.k1"
    assert (lora / "train" / "adapter_model.safetensors").exists()
    assert json.loads((lora / "score" / "results.json").read_text())["count"] == 6
    trained = json.loads((lora / "train" / "args.json").read_text())
    assert trained["max_steps"] == 2 and trained["num_retrieved"] == 1
    train_data = json.loads(Path(trained["train_data"]).read_text())
    assert len(train_data) == 6  # --limit keeps the first 6 training questions too
    assert "| task | metric | zero_shot | lora |" in (root / "tables" / "results.md").read_text()
    # A training stage killed after its last checkpoint resumes from it instead of starting
    # again (its folder is not cleared).
    (lora / "train" / COMPLETE).unlink()
    again = run_grid(grid, tmp_path / "runs", "--limit", "6")
    assert [name.split("-")[0] for name in again["executed"]] == ["train"]
    stage = json.loads((lora / "train" / "stage.json").read_text())
    assert stage["argv"][-2:] == ["--resume_from_checkpoint", "last"]
    assert (lora / "train" / COMPLETE).exists() and not again["failures"]
    assert result["failures"] == {}


def test_make_subset_keeps_file_order_without_a_seed_and_refuses_a_short_file(tmp_path):
    from LaMP.utils import make_subset

    source = SAMPLE / "LaMP_7"
    common = ["--questions_addr", str(source / "dev_questions.json"),
              "--outputs_addr", str(source / "dev_outputs.json"),
              "--output_questions_addr", str(tmp_path / "q.json"),
              "--output_outputs_addr", str(tmp_path / "o.json")]
    make_subset.main([*common, "--skip", "2", "--count", "3"])
    questions = json.loads((source / "dev_questions.json").read_text())
    assert [q["id"] for q in json.loads((tmp_path / "q.json").read_text())] == \
        [q["id"] for q in questions[2:5]]
    (tmp_path / "q.json").unlink()
    (tmp_path / "o.json").unlink()
    with pytest.raises(LampError, match=r"24 questions, fewer than --skip 20 \+ --count 5$"):
        make_subset.main([*common, "--skip", "20", "--count", "5"])
    assert not (tmp_path / "q.json").exists() and not (tmp_path / "o.json").exists()


def test_make_subset_refuses_a_pipe_it_would_read_twice(tmp_path):
    """The questions are counted, then read again: a pipe (empty the second time) is one
    error line before anything is written, not a traceback on a missing question."""
    from LaMP.utils import make_subset
    from LaMP.utils.errors import LampError

    fifo = tmp_path / "questions.fifo"
    os.mkfifo(fifo)
    with pytest.raises(LampError, match="is a pipe"):
        make_subset.main(["--questions_addr", str(fifo),
                          "--outputs_addr", str(SAMPLE / "LaMP_7" / "dev_outputs.json"),
                          "--output_questions_addr", str(tmp_path / "q.json"),
                          "--output_outputs_addr", str(tmp_path / "o.json"), "--count", "1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["questions.fifo"]


def test_a_grid_reads_each_task_from_its_download_folder(tmp_path):
    """LaMP-2N lies in raw_data/{split}/LaMP_2_old/ (download_data.py's folder for it, as in
    the sample), not under its file name."""
    from LaMP.utils.grid.schema import parse_grid
    from LaMP.utils.tasks import get_task

    grid = parse_grid({"name": "g", "tasks": ["LaMP-2N", "LaMP-7"], "models": {"m": "m"},
                       "methods": {"zero_shot": {}}, "retrievers": ["bm25"], "k": [1]},
                      "g", "g")
    planner = Planner(grid, SAMPLE.parent)
    paths = [planner.data_file("questions", "user", get_task(name), "dev").path
             for name in ("LaMP-2N", "LaMP-7")]
    assert [Path(path) for path in paths] == [
        SAMPLE / "LaMP_2_old" / "dev_questions.json", SAMPLE / "LaMP_7" / "dev_questions.json"]
    assert all(Path(path).exists() for path in paths)


# Folder names a shell would read as commands, expansions, globs and several lines if a
# printed line left them unquoted (each payload makes a folder that must never appear): one
# a shell runs in part, one that is not even shell syntax.
HOSTILE = ["we ird $(mkdir PWNED1) `mkdir PWNED2` 'q\" $LOG *\nline2 ü→é 🙂",
           "x ;mkdir PWNED3; \\ & | > x < \"$(mkdir PWNED4)\" \t\nü"]
FAKE_PROGRAM = '#!/bin/bash\nprintf "%s\\0" "${0##*/}" "$#" "$@" >> "$LOG"\n'


def calls_logged(log: Path) -> list[list[str]]:
    """The fake programs' calls: each its name and argv, as the shell passed them."""
    fields, calls = log.read_bytes().decode().split("\0")[:-1], []
    while fields:
        name, count = fields[0], int(fields[1])
        calls.append([name, *fields[2:2 + count]])
        fields = fields[2 + count:]
    return calls


@pytest.mark.parametrize("hostile", HOSTILE)
def test_every_dry_run_line_pasted_into_bash_runs_only_what_it_says(tmp_path, capsys, hostile):
    """Paths with spaces, quotes, $(), backticks, a newline and unicode, in the data, the
    model, the runs folder and the launcher: bash (with only the fake programs and mkdir on
    PATH) runs each stage command with exactly the planned argv, and mkdir makes exactly the
    stage folders."""
    hostile = tmp_path / hostile
    data_root = hostile / "data"
    shutil.copytree(SAMPLE / "LaMP_7", data_root / "user" / "LaMP_7")
    runs = hostile / "runs"
    bin_dir, log, cwd = tmp_path / "bin", tmp_path / "calls.log", tmp_path / "cwd"
    bin_dir.mkdir()
    cwd.mkdir()
    for name in ("python", "launch"):
        (bin_dir / name).write_text(FAKE_PROGRAM)
        (bin_dir / name).chmod(0o755)
    (bin_dir / "mkdir").symlink_to(shutil.which("mkdir"))
    launcher = shlex.join([str(bin_dir / "launch"), "--num_processes", "2", "$(mkdir PWNED5)"])
    grid_path = write_grid(tmp_path, str(hostile / "model"), retrievers=["bm25"], k=[0, 1],
                           subset={"count": 2}, methods={
                               "zero_shot": {}, "lora": {"stage": "train"}})
    capsys.readouterr()
    reproduce.main(["--grid", str(grid_path), "--data_root", str(data_root), "--runs_dir",
                    str(runs), "--dry_run", "--launcher", launcher])
    script = capsys.readouterr().out
    assert not runs.exists()
    done = subprocess.run(["/bin/bash", "-e"], input=script, text=True, capture_output=True,
                          cwd=cwd, env={"PATH": str(bin_dir), "LOG": str(log)})
    everything = [path.name for path in tmp_path.rglob("*")]
    assert not [name for name in everything if name.startswith("PWNED")]
    assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]
    assert os.listdir(cwd) == []
    assert subprocess.run(["/bin/bash", "-n"], input=script, text=True).returncode == 0

    grid = load_grid(grid_path)
    cells = [Planner(grid, data_root.resolve()).plan(cell) for cell in expand_cells(grid)]
    runner = Runner(runs.resolve() / "tiny", launcher=launcher)
    runs_in_order = list({run.key: run for cell in reproduce.shard(cells, 1, 0)
                          for run in cell.runs}.values())
    assert calls_logged(log) == [
        (["launch", *shlex.split(launcher)[1:]] if run.stage.launched else ["python"])
        + [run.stage.script, *runner.argv(run)] for run in runs_in_order]
    assert {"subset", "rank", "merge", "evaluate", "train", "score"} == {
        run.stage.name for run in runs_in_order}
    made = {path for path in runs.rglob("*") if path.is_dir()}
    stage_folders = {runner.folder(run) for run in runs_in_order}
    assert made == stage_folders | {runs / "tiny", runs / "tiny" / "stages"}
    assert not [path for path in runs.rglob("*") if not path.is_dir()]


@pytest.mark.parametrize("launcher, message", [
    ("no-such-launcher-here --num_processes 4",
     "no-such-launcher-here is not a command on PATH"),
    ("accelerate launch --config_file 'my config.yaml", "does not split as a shell would "
                                                         "split it (No closing quotation)"),
    ("accelerate launch \\", "does not split as a shell would split it (No escaped character)"),
    ("", "names no command"),
    ("   ", "names no command"),
    ("/no/such/dir/torchrun", "/no/such/dir/torchrun is not an executable file"),
    (str(REPO), f"{REPO} is not an executable file"),  # a folder
    (str(REPO / "README.md"), f"{REPO / 'README.md'} is not an executable file"),
])
def test_a_launcher_that_cannot_start_is_one_error_line_even_in_a_dry_run(tmp_path, launcher,
                                                                          message):
    status, stderr = error_line(GOOD, tmp_path, "--launcher", launcher)
    assert status == 2 and stderr.count("\n") == 1, stderr
    assert stderr == f"error: --launcher {launcher!r}: {message}\n"
    assert not (tmp_path / "runs").exists()


def test_a_launcher_that_stops_being_a_program_fails_its_stage_in_one_line(tmp_path):
    """Executable but not a program (no #! line): its stage fails with the reason; the rest
    of the grid is unaffected."""
    launcher = tmp_path / "launch"
    launcher.write_bytes(b"\x00\x01 not a program")
    launcher.chmod(0o755)
    grid = write_grid(tmp_path, "some/model", retrievers=["none"], k=[0], subset=None)
    with pytest.raises(LampError, match=rf"^1 of 1 cells failed \(first: LaMP_7\.user\.tiny\."
                                        rf"zero_shot\.none\.k0: evaluate: --launcher "
                                        rf"{launcher}: cannot run \(Exec format error\)\)"):
        run_grid(grid, tmp_path / "runs", "--launcher", str(launcher))
    merges = list((tmp_path / "runs" / "tiny" / "stages").glob(f"merge-*/{COMPLETE}"))
    assert len(merges) == 1


@pytest.fixture
def scored_lamp3(tmp_path):
    """A LaMP-3 grid (no profile, bm25 k=1) whose two cells are complete, written by hand:
    their predictions, and results.json as eval_task.py writes it."""
    grid_path = write_grid(tmp_path, "some/model", tasks=["LaMP-3"], retrievers=["bm25"],
                           k=[0, 1], subset=None)
    grid = load_grid(grid_path)
    cells = [Planner(grid, DATA_ROOT).plan(cell) for cell in expand_cells(grid)]
    runner = Runner(tmp_path / "runs" / "tiny")
    fake_predictions(runner, cells, {"none": lambda gold: "1", "bm25": lambda gold: gold})
    for cell, mae in zip(sorted(cells, key=lambda cell: cell.axes["k"]), (1.5, 0.0)):
        folder = runner.folder(cell.score)
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({"MAE": mae, "RMSE": mae + 0.25,
                                                         "count": 20}))
        (folder / COMPLETE).write_text("{}")
    bm25 = next(cell for cell in cells if cell.axes["k"] == 1)
    return grid_path, runner, bm25


def collect_table(grid_path: Path, tmp_path: Path) -> tuple[dict, str]:
    result = run_grid(grid_path, tmp_path / "runs", "--collect")
    return result, (tmp_path / "runs" / "tiny" / "tables" / "results.md").read_text()


def mae_cells(markdown: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith("| LaMP-3 | MAE"))
    return [text.strip() for text in line.strip("|").split("|")][2:]


def test_collect_of_whole_results_shows_both_cells(scored_lamp3, tmp_path):
    result, markdown = collect_table(scored_lamp3[0], tmp_path)
    assert mae_cells(markdown) == ["1.5000", "**0.0000**†"]
    assert result["complete"] == 2 and result["damaged"] == {}


@pytest.mark.parametrize("damage, reason", [
    (b'{"MAE": 0.0, "RMSE"', "malformed JSON"),
    (b"", "malformed JSON"),
    (b"\xff\xfe{}", "UTF-8"),
    (b"[0.0, 0.25]", "expected an object of metrics, found list"),
    (b'"0.0"', "expected an object of metrics, found str"),
    (b'{"MAE": "0.0", "RMSE": 0.25}', "MAE is '0.0', not a finite number"),
    (b'{"MAE": true, "RMSE": 0.25}', "MAE is 'True', not a finite number"),
    (b'{"MAE": NaN, "RMSE": 0.25}', "NaN is not a JSON number"),
    (b'{"MAE": 1e999, "RMSE": 0.25}', "the number 1e999 is too large"),
    (b'{"MAE": {"mean": 0.0}, "RMSE": 0.25}', "MAE is \"{'mean': 0.0}\", not a finite number"),
    (b'{"RMSE": 0.25}', "no 'MAE'"),
    (None, "does not exist"),
    ("folder", "is a directory, not a file"),
    ("loop", "symlink loop"),
])
def test_collect_leaves_out_a_cell_whose_results_are_damaged(scored_lamp3, tmp_path, capsys,
                                                             damage, reason):
    grid_path, runner, bm25 = scored_lamp3
    results = runner.folder(bm25.score) / "results.json"
    results.unlink()
    if isinstance(damage, bytes):
        results.write_bytes(damage)
    elif damage == "folder":
        results.mkdir()
    elif damage == "loop":
        results.symlink_to(results.name)  # a link to itself
    result, markdown = collect_table(grid_path, tmp_path)
    assert mae_cells(markdown) == ["**1.5000**", "—"]
    assert result["complete"] == 1 and list(result["damaged"]) == [bm25.name]
    assert str(results) in result["damaged"][bm25.name]
    assert reason in result["damaged"][bm25.name]
    warned = [line for line in capsys.readouterr().err.splitlines() if " WARNING " in line]
    assert any(f"cell {bm25.name} is left out of the tables: " in line and str(results) in line
               and reason in line for line in warned), warned


@pytest.mark.parametrize("damage", ["garbled", "missing", "folder", "other ids"])
def test_collect_keeps_a_value_whose_predictions_cannot_be_read_but_drops_its_test(
        scored_lamp3, tmp_path, capsys, damage):
    """The significance test reads the evaluation's predictions again: where they are
    damaged the value stays (it is in results.json) and the dagger goes, with a warning."""
    grid_path, runner, bm25 = scored_lamp3
    evaluate = next(run for run in bm25.runs if run.stage.name == "evaluate")
    predictions = runner.folder(evaluate) / "predictions.json"
    if damage == "garbled":
        predictions.write_bytes(b'{"task": "LaMP_3", "golds": [')
    elif damage == "missing":
        predictions.unlink()
    elif damage == "folder":
        predictions.unlink()
        predictions.mkdir()
    else:
        predictions.write_text(json.dumps({"task": "LaMP_3", "golds": [
            {"id": "not-an-id", "output": "1"}]}))
    result, markdown = collect_table(grid_path, tmp_path)
    assert mae_cells(markdown) == ["1.5000", "**0.0000**"]
    assert result["complete"] == 2 and result["damaged"] == {}
    warned = [line for line in capsys.readouterr().err.splitlines() if " WARNING " in line]
    assert any(f"cell {bm25.name}: no significance test against it: " in line
               and str(predictions) in line for line in warned), warned


def test_collect_of_a_damaged_stage_through_the_command_line_has_no_traceback(scored_lamp3,
                                                                            tmp_path):
    grid_path, runner, bm25 = scored_lamp3
    (runner.folder(bm25.score) / "results.json").write_bytes(b"\x00garbled")
    done = subprocess.run([sys.executable, str(REPO / "LaMP" / "reproduce.py"), "--grid",
                           str(grid_path), "--data_root", str(DATA_ROOT), "--runs_dir",
                           str(tmp_path / "runs"), "--collect"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "1 of 2 cells complete; 1 damaged, left out (see the warnings)" in done.stdout
    assert f"cell {bm25.name} is left out of the tables" in done.stderr


def test_a_file_where_the_tables_go_is_one_error_line(scored_lamp3, tmp_path):
    grid_path, runner, _ = scored_lamp3
    (runner.root / "tables").write_text("mine")
    with pytest.raises(LampError, match=r"^cannot make the folder .*tables \(it or a folder "
                                        r"above it is a file\)$"):
        collect_table(grid_path, tmp_path)
    assert (runner.root / "tables").read_text() == "mine"


@pytest.mark.parametrize("in_the_way", ["file", "folder"])
def test_something_else_where_a_cell_links_its_stage_is_kept_and_named(tmp_path, in_the_way):
    grid = load_grid(write_grid(tmp_path, "some/model", retrievers=["none"], k=[0],
                                subset=None))
    (cell,) = [Planner(grid, DATA_ROOT).plan(cell) for cell in expand_cells(grid)]
    runner = Runner(tmp_path / "runs" / "tiny")
    link = runner.root / cell.name / "merge"
    link.parent.mkdir(parents=True)
    if in_the_way == "file":
        link.write_text("mine")
    else:
        link.mkdir()
    with pytest.raises(LampError, match=rf"^{link} is in the way of the cell's link to its "
                                        r"merge stage; it is not a link the runner made"):
        reproduce.link_cell(cell, runner)
    assert link.exists() and not link.is_symlink()
    # a link the runner made, to an older run of the stage, is replaced
    shutil.rmtree(link) if link.is_dir() else link.unlink()
    link.symlink_to("elsewhere")
    reproduce.link_cell(cell, runner)
    assert os.readlink(link) == os.path.relpath(runner.folder(cell.runs[0]), link.parent)


def test_fail_fast_stops_at_the_first_failed_cell(tmp_path):
    """Without --fail_fast a failed cell ends only itself: the others run and the run counts
    the failures; with it the run stops at the first, before the next cell's stages."""
    grid = write_grid(tmp_path, str(tmp_path / "no_model"), retrievers=["bm25"], k=[0, 1],
                      subset=None)
    with pytest.raises(LampError, match=r"^2 of 2 cells failed \(first: LaMP_7\.user\.tiny\."
                                        r"zero_shot\.bm25\.k1: evaluate: "):
        run_grid(grid, tmp_path / "all")
    done = {name.split("-")[0] for name in complete_folders(tmp_path / "all")}
    assert done == {"rank", "merge"}
    assert len([name for name in complete_folders(tmp_path / "all")
                if name.startswith("merge-")]) == 2  # the ranked and the unranked one

    with pytest.raises(LampError, match=r"^cell LaMP_7\.user\.tiny\.zero_shot\.bm25\.k1: "
                                        r"evaluate: "):
        run_grid(grid, tmp_path / "fast", "--fail_fast")
    assert sorted(name.split("-")[0] for name in complete_folders(tmp_path / "fast")) == [
        "merge", "rank"]  # the second cell's merge never ran
