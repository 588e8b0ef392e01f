"""Executing stage runs (LaMP/utils/grid/plan.py): the lock shards share, what a stage's
folder may hold when it runs again, and a launcher that cannot start."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, SAMPLE
from LaMP.utils import merge_with_rank
from LaMP.utils.errors import LampError
from LaMP.utils.grid.plan import COMPLETE, Planner, Runner, expand_cells
from LaMP.utils.grid.schema import parse_grid

GRID = {"name": "g", "tasks": ["LaMP-7"], "models": {"m": "some/model"},
        "methods": {"zero_shot": {}}}
# Holds the stage's lock until a line comes on stdin, then marks the stage done and lets go:
# another shard that finishes the stage while this process waits for it.
OTHER_SHARD = """
import sys
from pathlib import Path
from filelock import FileLock
lock = FileLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
sys.stdin.readline()
Path(sys.argv[2]).mkdir(parents=True, exist_ok=True)
(Path(sys.argv[2]) / "complete.json").write_text("{}")
lock.release()
"""
TRY_LOCK = """
import sys
from filelock import FileLock, Timeout
try:
    FileLock(sys.argv[1]).acquire(timeout=0)
except Timeout:
    print("busy")
else:
    print("free")
"""


@pytest.fixture
def merge_run(tmp_path):
    grid = parse_grid(GRID, "g.yaml", "g")
    (cell,) = [Planner(grid, SAMPLE.parent).plan(cell) for cell in expand_cells(grid)]
    merge = cell.runs[0]
    assert merge.stage.name == "merge"
    return Runner(tmp_path / "runs" / "g"), merge


def lock_of(runner: Runner, run) -> str:
    return str(runner.stages / f".{run.folder_name}.lock")


def try_lock(path: str) -> str:
    return subprocess.run([sys.executable, "-c", TRY_LOCK, path], capture_output=True,
                          text=True, check=True, cwd=REPO).stdout.strip()


def test_a_stage_runs_holding_its_lock_and_lets_it_go(merge_run, monkeypatch):
    runner, merge = merge_run
    real_main, seen = merge_with_rank.main, []

    def main(argv):
        seen.append(try_lock(lock_of(runner, merge)))  # another process, while it runs
        return real_main(argv)

    monkeypatch.setattr(merge_with_rank, "main", main)
    assert runner.execute(merge)
    assert seen == ["busy"]
    assert try_lock(lock_of(runner, merge)) == "free"
    assert runner.executed == [merge.folder_name] and runner.is_complete(merge)


def test_a_stage_another_shard_finishes_while_this_one_waits_is_not_run_again(
        merge_run, monkeypatch):
    runner, merge = merge_run
    runner.stages.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", OTHER_SHARD, lock_of(runner, merge),
                              str(runner.folder(merge))], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert other.stdout.readline().strip() == "held"
    real_is_complete, looks = runner.is_complete, []

    def is_complete(run):
        done = real_is_complete(run)
        if not looks:  # not done at the first look: the other shard finishes it now
            other.stdin.write("go\n")
            other.stdin.flush()
        looks.append(done)
        return done

    monkeypatch.setattr(runner, "is_complete", is_complete)
    monkeypatch.setattr(merge_with_rank, "main", lambda argv: pytest.fail("ran again"))
    assert runner.execute(merge)
    assert other.wait(timeout=60) == 0
    assert looks == [False, True] and runner.executed == []


@pytest.mark.parametrize("in_the_way", ["file", "link to a folder", "dangling link"])
def test_whatever_stands_in_a_stage_folder_is_cleared_and_a_link_target_kept(
        merge_run, tmp_path, in_the_way):
    runner, merge = merge_run
    folder = runner.folder(merge)
    folder.parent.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    if in_the_way == "file":
        folder.write_text("what a killed run left")
    else:
        folder.symlink_to(elsewhere if in_the_way == "link to a folder" else tmp_path / "gone")
    assert runner.execute(merge), runner.failed
    assert folder.is_dir() and not folder.is_symlink()
    assert isinstance(json.loads((folder / "merged.json").read_text()), list)
    assert sorted(os.listdir(elsewhere)) == ["keep.txt"]
    assert (elsewhere / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("where", ["stages", "runs"])
def test_a_file_where_the_stages_go_is_one_error_line(merge_run, where):
    runner, merge = merge_run
    blocker = runner.stages if where == "stages" else runner.root.parent
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a folder")
    with pytest.raises(LampError, match=rf"^cannot make the folder {runner.stages} \(it or a "
                                        r"folder above it is a file\)$"):
        runner.execute(merge)
    assert blocker.read_text() == "not a folder"


def test_a_folder_in_the_place_of_a_stage_lock_is_one_error_line(merge_run):
    runner, merge = merge_run
    os.makedirs(lock_of(runner, merge))
    with pytest.raises(LampError, match=r"^cannot lock .*\.lock \(Is a directory\)$"):
        runner.execute(merge)
    assert not (runner.folder(merge) / COMPLETE).exists()


def test_a_data_file_that_cannot_be_read_while_planning_is_one_error_line(monkeypatch):
    """Planning hashes every data file (the stage keys); an unreadable one (no permission,
    an I/O error) names the file instead of a traceback."""
    from LaMP.utils.grid import plan

    questions = SAMPLE / "LaMP_7" / "dev_questions.json"

    def unreadable(path, small):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(plan, "_file_identity", unreadable)
    grid = parse_grid(GRID, "g.yaml", "g")
    with pytest.raises(LampError, match=rf"^{questions}: cannot read \(Permission denied\)$"):
        [Planner(grid, SAMPLE.parent).plan(cell) for cell in expand_cells(grid)]


def test_a_stage_added_as_one_row_is_planned_named_by_a_method_and_launched(
        tmp_path, monkeypatch, capsys):
    """A new stage is one row of STAGES: a grid method may name it and the grid's flags may
    set its group; the planner builds its argv from the row, the score reads its
    predictions, its flags are checked by its script's parser and --dry_run prints it under
    the launcher."""
    import yaml

    from LaMP import reproduce
    from LaMP.utils.grid import stages

    def greedy_argv(request):
        return ["--validation_data", request.run("merge").output("merged.json"),
                "--model_addr", stages.Raw("some/model"), "--task", request.axes["task"].name,
                "--output_dir", stages.Out("."), *request.flags("greedy", request.method.flags),
                "--generation_num_beams", "1"]

    monkeypatch.setitem(stages.STAGES, "greedy", stages.Stage(
        "greedy", "LaMP/evaluate_llm.py", "LaMP.evaluate_llm", ("predictions.json",),
        greedy_argv, ("greedy",), launched=True, method=True))
    document = {**GRID, "methods": {"beam": {}, "fast": {"stage": "greedy",
                                                         "flags": {"limit": 2}}},
                "flags": {"greedy": {"max_length": 64}}}
    grid = parse_grid(document, "g.yaml", "g")
    planner = Planner(grid, SAMPLE.parent)
    planned = {cell.axes["method"]: planner.plan(cell) for cell in expand_cells(grid)}
    assert [run.stage.name for run in planned["fast"].runs] == ["merge", "greedy", "score"]
    score = planned["fast"].score
    assert score.argv[score.argv.index("--preds_json") + 1].run is planned["fast"].runs[1]
    assert planned["beam"].runs[0] is planned["fast"].runs[0]  # one merge for both
    assert planned["beam"].runs[1].stage.name == "evaluate"

    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    reproduce.main(["--grid", str(path), "--data_root", str(SAMPLE.parent), "--runs_dir",
                    str(tmp_path / "runs"), "--dry_run", "--launcher", "env"])
    commands = [line.split() for line in capsys.readouterr().out.splitlines()
                if "evaluate_llm.py" in line]
    assert [command[:2] for command in commands] == [["env", "LaMP/evaluate_llm.py"]] * 2
    fast = next(command for command in commands if "/greedy-" in " ".join(command))
    assert fast[-6:] == ["--max_length", "64", "--limit", "2", "--generation_num_beams", "1"]


def keys_of(grid: dict, data_root) -> dict[str, str]:
    """Each stage of the grid's one cell, by name, with its key."""
    parsed = parse_grid(grid, "g.yaml", "g")
    (cell,) = expand_cells(parsed)
    return {run.stage.name: run.key for run in Planner(parsed, data_root).plan(cell).runs}


def test_a_stage_key_follows_its_flags_and_the_content_of_its_inputs(tmp_path, monkeypatch):
    """A changed flag or data file makes new stage folders, an unchanged one reuses them: a
    small file counts by its content, a large one by size and mtime, a model folder's small
    files by content and its weights by size and mtime, wherever the folder lies."""
    import shutil

    from LaMP.utils.grid import plan

    data = tmp_path / "data"
    shutil.copytree(SAMPLE / "LaMP_7", data / "user" / "LaMP_7")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "t5"}')
    (model / "model.safetensors").write_bytes(b"\0" * (2**20 + 1))  # past the 1 MiB limit
    grid = {**GRID, "models": {"m": str(model)}, "retrievers": ["bm25"], "k": [1]}
    first = keys_of(grid, data)
    assert list(first) == ["rank", "merge", "evaluate", "score"]
    assert keys_of(grid, data) == first  # planned again: the same folders

    # A flag: its stage and everything downstream of it.
    verbose = keys_of({**grid, "flags": {"merge": {"verbose": True}}}, data)
    assert verbose["rank"] == first["rank"]
    assert all(verbose[stage] != first[stage] for stage in ("merge", "evaluate", "score"))

    # A data file's content, at the same size and path.
    questions = data / "user" / "LaMP_7" / "dev_questions.json"
    original = questions.read_bytes()
    questions.write_bytes(original.replace(b"a", b"b", 1))
    changed = keys_of(grid, data)
    assert all(changed[stage] != first[stage] for stage in first)
    questions.write_bytes(original)
    assert keys_of(grid, data) == first

    # The model folder: where it lies does not matter; a config counts by its content,
    # weights by size and mtime, not content.
    copy = tmp_path / "elsewhere" / "model"
    shutil.copytree(model, copy, copy_function=shutil.copy2)
    elsewhere = {**grid, "models": {"m": str(copy)}}
    assert keys_of(elsewhere, data) == first
    weights = copy / "model.safetensors"
    stat = weights.stat()
    weights.write_bytes(b"\1" * (2**20 + 1))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert keys_of(elsewhere, data) == first
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    moved = keys_of(elsewhere, data)
    assert moved["rank"] == first["rank"] and moved["evaluate"] != first["evaluate"]
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    (copy / "config.json").write_text('{"model_type": "t5" }')
    assert keys_of(elsewhere, data)["evaluate"] != first["evaluate"]

    # A data file past the size limit counts by size and mtime.
    monkeypatch.setattr(plan, "SMALL_FILE", 1000)
    big = keys_of(grid, data)
    stat = questions.stat()
    questions.write_bytes(original.replace(b"a", b"b", 1))
    os.utime(questions, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert keys_of(grid, data) == big
    os.utime(questions, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert keys_of(grid, data)["rank"] != big["rank"]
