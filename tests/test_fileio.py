"""The shared path checks (LaMP/utils/data/fileio.py) as every script meets them.

Two outputs of one run that are one file (or one inside the other) are refused before any
work, as an output that is an input is; and a path the operating system will not look at
(a name over 255 bytes, a file where a folder must be, a symlink loop, no permission) is one
``error:`` line naming it, in every path flag of every script.
"""
from __future__ import annotations

import errno
import json
import os
import zipfile
from pathlib import Path

import pytest

from conftest import SAMPLE, load_script, write_json
from LaMP import evaluate_llm, rank_profiles, reproduce, train_llm, train_user_peft
from LaMP.utils import make_subset, merge_with_rank
from LaMP.utils.cli.program import run
from LaMP.utils.data import fileio
from LaMP.utils.errors import LampError

eval_task = load_script("eval/eval_task.py")
eval_all = load_script("eval/eval_all.py")
compare = load_script("eval/compare.py")
avocado = load_script("data/avocado/create_avocado_dataset.py")
make_sample = load_script("data/make_sample.py")

LAMP7_DEV = SAMPLE / "LaMP_7" / "dev_questions.json"
LAMP7_GOLDS = SAMPLE / "LaMP_7" / "dev_outputs.json"


def run_cli(main, argv, capsys) -> tuple[int, list[str]]:
    """Exit status and the ``error:`` / traceback lines of a run as its ``__main__`` runs it."""
    capsys.readouterr()
    try:
        status = run(main, [str(arg) for arg in argv])
    except SystemExit as stop:  # a flag parse_args refuses: argparse exits
        status = stop.code
    lines = capsys.readouterr().err.splitlines()
    return status, [line for line in lines if line.startswith(("error:", "Traceback"))]


def listing(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder``: a file's bytes, a link's target, a folder's name."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_symlink():
            entries[name] = "-> " + os.readlink(path)
        elif path.is_file():
            entries[name] = path.read_bytes()
        else:
            entries[name] = "/"
    return entries


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    folder = tmp_path / "in"
    folder.mkdir()
    questions = folder / "questions.json"
    questions.write_bytes(LAMP7_DEV.read_bytes())
    golds = folder / "golds.json"
    golds.write_bytes(LAMP7_GOLDS.read_bytes())
    ranking = folder / "ranking.json"
    rank_profiles.main(["--input_data_addr", str(questions), "--output_ranking_addr",
                        str(ranking), "--task", "LaMP-7", "--ranker", "recency"])
    golds_zip = folder / "golds.zip"
    with zipfile.ZipFile(golds_zip, "w") as archive:
        archive.write(golds, "LaMP_7/dev_outputs.json")
    lamp6 = folder / "lamp6"
    for name in ("train", "dev", "test"):
        write_json(lamp6 / f"{name}_questions.json",
                   [{"id": "1", "input": "a-EM.txt", "profile": []}])
    (folder / "avocado").mkdir()
    grid = folder / "grid.yaml"
    grid.write_text("name: tiny\ntasks: [LaMP-7]\nmodels: {m: org/model}\n"
                    "methods: {zero_shot: {}}\nretrievers: [bm25]\nk: [1]\n")
    return {"questions": questions, "golds": golds, "ranking": ranking, "golds_zip": golds_zip,
            "lamp6": lamp6, "avocado": folder / "avocado", "grid": grid}


# -- two outputs, one file -------------------------------------------------------------------

def subset_argv(inputs, first: Path | str, second: Path | str) -> list:
    return ["--questions_addr", inputs["questions"], "--outputs_addr", inputs["golds"],
            "--count", "2", "--output_questions_addr", first, "--output_outputs_addr", second]


def same_file_ways(out: Path) -> dict[str, tuple[str, str]]:
    """(first output, second output) that name one file, each in its own way; ``out`` holds
    what the ways need (a folder, a link, a hard link)."""
    (out / "sub").mkdir(parents=True)
    os.symlink("sub", out / "sub_link")
    os.symlink("x.json", out / "link.json")
    os.symlink("gone/x.json", out / "dangling.json")
    (out / "hard_a.json").write_text("[]")
    os.link(out / "hard_a.json", out / "hard_b.json")
    return {
        "the same name": ("x.json", "x.json"),
        "./ in front": ("x.json", "./x.json"),
        "a .. step": ("x.json", "sub/../x.json"),
        "an absolute and a relative path": (str(out / "x.json"), "x.json"),
        "a symlink to the other": ("x.json", "link.json"),
        "a dangling symlink to the other": ("gone/x.json", "dangling.json"),
        "a hard link": ("hard_a.json", "hard_b.json"),
        "a symlinked folder": ("sub/x.json", "sub_link/x.json"),
        "the first one's arguments file": ("q.json", "q.args.json"),
    }


@pytest.mark.parametrize("way", ["the same name", "./ in front", "a .. step",
                                 "an absolute and a relative path", "a symlink to the other",
                                 "a dangling symlink to the other", "a hard link",
                                 "a symlinked folder", "the first one's arguments file"])
def test_make_subset_refuses_two_outputs_that_are_one_file(tmp_path, inputs, capsys,
                                                          monkeypatch, way):
    out = tmp_path / "out"
    first, second = same_file_ways(out)[way]
    monkeypatch.chdir(out)
    before = listing(tmp_path)
    status, lines = run_cli(make_subset.main, subset_argv(inputs, first, second), capsys)
    assert status == 2
    assert len(lines) == 1 and " is the same file as " in lines[0], lines
    assert lines[0].endswith("; give each output its own path")
    # Both flags are named, each path as it was given.
    assert f" {second} " in lines[0] or f" {first} " in lines[0]
    assert listing(tmp_path) == before


def test_an_output_inside_another_output_is_refused(tmp_path, inputs, capsys):
    out = tmp_path / "out"
    out.mkdir()
    status, lines = run_cli(make_subset.main,
                            subset_argv(inputs, out / "x.json", out / "x.json" / "golds.json"),
                            capsys)
    assert status == 2
    assert lines == [f"error: --output_outputs_addr {out / 'x.json' / 'golds.json'} lies inside "
                     f"--output_questions_addr {out / 'x.json'}, which is written as a file; "
                     "give each output its own path"]
    assert listing(out) == {}


def test_distinct_outputs_that_look_alike_are_accepted(tmp_path, inputs, capsys):
    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    (out / "ab").mkdir()
    status, lines = run_cli(make_subset.main,
                            subset_argv(inputs, out / "a" / "x.json", out / "ab" / "x.json"),
                            capsys)
    assert (status, lines) == (0, [])
    assert json.loads((out / "ab" / "x.json").read_text())["task"] == "LaMP_7"
    status, lines = run_cli(make_subset.main,
                            subset_argv(inputs, out / "x.json", out / "x.json.bak"), capsys)
    assert (status, lines) == (0, [])


def test_check_outputs_on_folders_and_their_contents(tmp_path):
    out = tmp_path / "out"
    # A folder output holding another output, and one folder output inside another.
    with pytest.raises(LampError, match=r"^--log .*/out/log.json lies inside --output_dir .*/out, "
                                        r"which is written as a folder; give each output"):
        fileio.check_outputs(inputs={}, folders={"--output_dir": out},
                             files={"--log": out / "log.json"})
    with pytest.raises(LampError, match=r"^--cache .*/out/cache lies inside --output_dir"):
        fileio.check_outputs(inputs={}, folders={"--output_dir": out, "--cache": out / "cache"})
    # What the folder's own run writes in it is not "inside another output".
    fileio.check_outputs(inputs={}, folders={"--output_dir": out},
                         contents={"--output_dir": ("a.json", "b.json", "users/")})
    # Devices are written in place: nothing is replaced, so both may be /dev/null.
    fileio.check_outputs(inputs={}, files={"--a": "/dev/null", "--b": "/dev/null"})
    out.mkdir()
    (out / "users").write_text("a file where a folder goes")
    with pytest.raises(LampError, match=f"^--output_dir {out / 'users'} exists and is not a "
                                        "folder$"):
        fileio.check_outputs(inputs={}, folders={"--output_dir": out},
                             contents={"--output_dir": ("users/",)})
    (out / "a.json").mkdir()
    with pytest.raises(LampError, match=f"^--output_dir {out}: a.json is a folder; remove it or "
                                        "choose another folder$"):
        fileio.check_outputs(inputs={}, folders={"--output_dir": out},
                             contents={"--output_dir": ("a.json",)})


def fixed_names_linked(tmp_path, inputs) -> dict[str, tuple]:
    """Per script: (main, argv, folder, link, target): ``link`` in the run's output folder
    points at ``target``, another file the same run writes, so one write would replace
    the other."""
    out = tmp_path / "out"
    data = inputs["questions"]
    lamp6 = inputs["lamp6"]
    avocado_files = [arg for name in ("train", "dev", "test")
                     for arg in (f"--input_question_file_{name}", lamp6 / f"{name}_questions.json")]
    return {
        "rank_profiles (ranking and its arguments file)": (
            rank_profiles.main, ["--input_data_addr", data, "--output_ranking_addr",
                                 out / "r.json", "--task", "LaMP-7", "--ranker", "bm25"],
            out, "r.args.json", "r.json"),
        "merge_with_rank (merged file and its arguments file)": (
            merge_with_rank.main, ["--lamp_questions_addr", data, "--merged_output_addr",
                                   out / "m.json"], out, "m.args.json", "m.json"),
        "make_subset (questions' arguments file and the golds)": (
            make_subset.main, subset_argv(inputs, out / "q.json", out / "golds.json"), out,
            "q.args.json", "golds.json"),
        "evaluate_llm": (
            evaluate_llm.main, ["--validation_data", data, "--model_addr", "org/model",
                                "--task", "LaMP-7", "--output_dir", out], out, "args.json",
            "predictions.json"),
        "train_llm": (
            train_llm.main, ["--train_data", data, "--validation_data", data, "--model_name",
                             "org/model", "--task", "LaMP-7", "--output_dir", out], out,
            "results_output.json", "test_predictions.json"),
        "train_user_peft": (
            train_user_peft.main, ["--train_data", data, "--model_name", "org/model",
                                   "--task", "LaMP-7", "--output_dir", out], out, "users.json",
            "args.json"),
        "create_avocado_dataset": (
            avocado.main, ["--avocado_files_dir", inputs["avocado"], "--output_dir", out,
                           *avocado_files], out, "dev_outputs.json", "train_outputs.json"),
        "make_sample": (
            make_sample.main, ["--out_dir", out, "--tasks", "LaMP-7"], out / "user" / "LaMP_7",
            "dev_questions.json", "train_questions.json"),
    }


@pytest.mark.parametrize("script", ["rank_profiles (ranking and its arguments file)",
                                    "merge_with_rank (merged file and its arguments file)",
                                    "make_subset (questions' arguments file and the golds)",
                                    "evaluate_llm", "train_llm", "train_user_peft",
                                    "create_avocado_dataset", "make_sample"])
def test_every_script_refuses_two_of_its_files_that_are_one(tmp_path, inputs, capsys, script):
    main, argv, folder, link, target = fixed_names_linked(tmp_path, inputs)[script]
    folder.mkdir(parents=True)
    (folder / target).write_text("kept")
    os.symlink(target, folder / link)
    before = listing(tmp_path)
    status, lines = run_cli(main, argv, capsys)
    assert status == 2
    assert len(lines) == 1 and " is the same file as " in lines[0], lines
    assert str(folder / link) in lines[0] and str(folder / target) in lines[0]
    assert listing(tmp_path) == before


# -- paths the operating system will not look at ---------------------------------------------

def hostile_paths(tmp_path: Path) -> dict[str, Path]:
    """Paths whose every probe fails with an OSError other than "no such file"."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    os.symlink("loop_b", tmp_path / "loop_a")
    os.symlink("loop_a", tmp_path / "loop_b")
    return {"a 300-byte name": tmp_path / ("n" * 296 + ".json"),
            "a 300-byte folder on the way": tmp_path / ("d" * 300) / "x.json",
            "a file used as a folder": blocker / "x.json",
            "a symlink loop": tmp_path / "loop_a",
            "a symlink loop on the way": tmp_path / "loop_a" / "x.json"}


LONG_ONLY = ("a 300-byte name", "a 300-byte folder on the way")


def path_flags(inputs, out: Path) -> dict[str, tuple]:
    """Per script: (main, {flag: a good value}, other arguments, flags that name a model or
    an adapter, where a path that cannot exist is taken for a hub name)."""
    data, golds, lamp6 = inputs["questions"], inputs["golds"], inputs["lamp6"]
    return {
        "rank_profiles": (rank_profiles.main, {"--input_data_addr": data,
                                               "--output_ranking_addr": out / "r.json"},
                          ["--task", "LaMP-7", "--ranker", "bm25"], ()),
        "merge_with_rank": (merge_with_rank.main,
                            {"--lamp_questions_addr": data, "--lamp_output_addr": golds,
                             "--profile_ranking_addr": inputs["ranking"],
                             "--merged_output_addr": out / "m.json"}, [], ()),
        "make_subset": (make_subset.main,
                        {"--questions_addr": data, "--outputs_addr": golds,
                         "--output_questions_addr": out / "q.json",
                         "--output_outputs_addr": out / "g.json"}, ["--count", "2"], ()),
        "eval_task": (eval_task.main, {"--golds_json": golds, "--preds_json": golds,
                                       "--output_file": out / "e.json"},
                      ["--task_name", "LaMP_7"], ()),
        "compare": (compare.main, {"--golds_json": golds, "--preds_a": golds, "--preds_b": golds,
                                   "--output_file": out / "c.json"},
                    ["--task_name", "LaMP_7", "--bootstrap", "10"], ()),
        "eval_all": (eval_all.main, {"--golds_zip": inputs["golds_zip"],
                                     "--preds_zip": inputs["golds_zip"],
                                     "--output_file": out / "a.json"}, [], ()),
        "evaluate_llm": (evaluate_llm.main, {"--validation_data": data,
                                             "--model_addr": "org/model",
                                             "--output_dir": out / "eval", "--adapter": None,
                                             "--user_adapters": None},
                         ["--task", "LaMP-7"], ("--model_addr", "--adapter")),
        "train_llm": (train_llm.main, {"--train_data": data, "--validation_data": data,
                                       "--test_data": data, "--model_name": "org/model",
                                       "--output_dir": out / "train",
                                       "--resume_from_checkpoint": None},
                      ["--task", "LaMP-7"], ("--model_name",)),
        "train_user_peft": (train_user_peft.main,
                            {"--train_data": data, "--model_name": "org/model",
                             "--output_dir": out / "users", "--base_adapter": None},
                            ["--task", "LaMP-7"], ("--model_name", "--base_adapter")),
        "make_sample": (make_sample.main, {"--out_dir": out / "sample"},
                        ["--tasks", "LaMP-7"], ()),
        "create_avocado_dataset": (
            avocado.main, {"--avocado_files_dir": inputs["avocado"], "--output_dir": out / "l6",
                           **{f"--input_question_file_{name}": lamp6 / f"{name}_questions.json"
                              for name in ("train", "dev", "test")}}, [], ()),
        "reproduce": (reproduce.main, {"--grid": inputs["grid"], "--data_root": SAMPLE.parent,
                                       "--runs_dir": out / "runs"}, ["--dry_run"], ()),
    }


@pytest.fixture
def no_model_loads(monkeypatch):
    import LaMP.utils.modeling.model as modeling

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded: the path was not checked")

    for name in ("load_model", "load_config", "load_config_and_tokenizer"):
        monkeypatch.setattr(modeling, name, refuse)


@pytest.mark.parametrize("script", ["rank_profiles", "merge_with_rank", "make_subset",
                                    "eval_task", "compare", "eval_all", "evaluate_llm",
                                    "train_llm", "train_user_peft", "make_sample",
                                    "create_avocado_dataset", "reproduce"])
def test_a_path_the_system_refuses_is_one_line_naming_it_in_every_flag(tmp_path, inputs,
                                                                       capsys, no_model_loads,
                                                                       script):
    out = tmp_path / "out"
    main, good, extra, model_flags = path_flags(inputs, out)[script]
    bad_paths = hostile_paths(tmp_path)
    before = listing(inputs["questions"].parent)
    for flag in good:
        for way, bad in bad_paths.items():
            if flag in model_flags and way not in LONG_ONLY:
                continue  # not a folder there: a hub name, which the hub answers for
            argv = [*extra]
            for other, value in {**good, flag: bad}.items():
                if value is not None:
                    argv += [other, value]
            status, lines = run_cli(main, argv, capsys)
            assert status == 2, (flag, way)
            assert len(lines) == 1 and lines[0].startswith("error: "), (flag, way, lines)
            assert str(bad) in lines[0], (flag, way, lines)
    assert listing(inputs["questions"].parent) == before
    assert not out.exists()


def raise_for(path: Path, error_number: int, real=os.stat):
    """An ``os.stat`` that fails for ``path`` and anything below it with ``error_number``
    (root, which runs these tests, is never refused a permission)."""
    def stat(target, *args, **kwargs):
        if str(target) == str(path) or str(target).startswith(f"{path}/"):
            raise OSError(error_number, os.strerror(error_number), str(target))
        return real(target, *args, **kwargs)
    return stat


@pytest.mark.parametrize("error_number", [errno.EACCES, errno.EIO])
def test_every_shared_probe_turns_an_oserror_into_one_line(tmp_path, monkeypatch, error_number):
    from LaMP.utils.modeling.checkpoints import check_adapter_folder, check_model_folder

    locked = tmp_path / "locked"
    locked.mkdir()
    message = os.strerror(error_number)
    monkeypatch.setattr(os, "stat", raise_for(locked, error_number))
    with pytest.raises(LampError, match=f"^gold file {locked}/g.json: cannot read "
                                        rf"\({message}\)$"):
        fileio.check_readable(locked / "g.json", "gold file")
    with pytest.raises(LampError, match=f"^--output_file {locked}/r.json: {message}$"):
        fileio.check_outputs(inputs={}, files={"--output_file": locked / "r.json"})
    with pytest.raises(LampError, match=f"^--output_dir {locked}/run: {message}$"):
        fileio.check_outputs(inputs={}, folders={"--output_dir": locked / "run"})
    with pytest.raises(LampError, match=f"^--out_dir {locked}/run: {message}$"):
        fileio.check_output_dir(locked / "run", "--out_dir")
    with pytest.raises(LampError, match=f"^--model_name {locked}/model: {message}$"):
        check_model_folder(str(locked / "model"), "--model_name")
    with pytest.raises(LampError, match=f"^--adapter {locked}/adapter: {message}$"):
        check_adapter_folder(str(locked / "adapter"))
