"""The output policy and the path checks (LaMP/utils/data/fileio.py) as every script meets them.

An output that is, contains or lies inside an input (or links to one) is refused before any
work, and so are two outputs of one run that are one file (or one inside the other); a device,
FIFO or descriptor is written in place and gets no arguments file beside it; a symlink keeps
pointing where it did; modes follow the umask or the replaced file; interrupted writes leave
nothing the next run keeps; JSON is strict; and a path the operating system will not look at
(a name over 255 bytes, a file where a folder must be, a symlink loop, no permission) is one
``error:`` line naming it, in every path flag of every script.
"""
from __future__ import annotations

import errno
import json
import os
import resource
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from pathlib import Path

import pytest

from conftest import (REPO, SAMPLE, lamp3_files, listing, load_script, problems, run_cli,
                      write_json)
from LaMP import (collect_feedback, evaluate_llm, rank_profiles, reproduce, train_llm,
                  train_retriever, train_selector, train_user_peft)
from LaMP.utils import make_subset, merge_with_rank
from LaMP.utils.cli.program import run
from LaMP.utils.data import fileio
from LaMP.utils.errors import LampError

eval_task = load_script("eval/eval_task.py")
eval_all = load_script("eval/eval_all.py")
compare = load_script("eval/compare.py")
avocado = load_script("data/avocado/create_avocado_dataset.py")
make_sample = load_script("data/make_sample.py")
demo = load_script("demo.py")

LAMP1_DEV = SAMPLE / "LaMP_1" / "dev_questions.json"
LAMP7_DEV = SAMPLE / "LaMP_7" / "dev_questions.json"
LAMP7_GOLDS = SAMPLE / "LaMP_7" / "dev_outputs.json"


def snapshot(*paths: Path) -> dict[Path, bytes]:
    files = []
    for path in paths:
        files += sorted(p for p in Path(path).rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {path: path.read_bytes() for path in files}


def hidden_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def zip_of(path: Path, member: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.write(member, "LaMP_3/" + member.name)
    return path


def char_device(path: Path) -> Path:
    """A /dev/null of our own (major 1, minor 3), so no test touches the machine's."""
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    return path


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


# -- output == input, for every script ----------------------------------------------------

def refused_cases(tmp_path: Path):
    """(name, main, argv, inputs that must stay byte-identical) for each way an output can
    name an input."""
    golds, preds = lamp3_files(tmp_path)
    golds_zip, preds_zip = zip_of(tmp_path / "g.zip", golds), zip_of(tmp_path / "p.zip", preds)
    questions = tmp_path / "q" / "dev_questions.json"
    questions.parent.mkdir()
    questions.write_bytes(LAMP7_DEV.read_bytes())
    named_like_args = tmp_path / "q" / "dev.args.json"
    named_like_args.write_bytes(LAMP7_DEV.read_bytes())
    ranking = tmp_path / "ranking.json"
    rank_profiles.main(["--input_data_addr", str(questions), "--output_ranking_addr",
                        str(ranking), "--task", "LaMP-7", "--ranker", "recency"])
    link = tmp_path / "link.json"
    link.symlink_to(golds)
    hard = tmp_path / "hard.json"
    os.link(golds, hard)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"weights")
    lamp6 = tmp_path / "lamp6"
    lamp6.mkdir()
    for name in ("train", "dev", "test"):
        write_json(lamp6 / f"{name}_questions.json", [{"id": "1", "input": "a-EM.txt",
                                                      "profile": []}])
    text_dir = tmp_path / "avocado"
    text_dir.mkdir()
    evaluation = ["--golds_json", golds, "--preds_json", preds, "--task_name", "LaMP_3"]
    avocado_files = [arg for name in ("train", "dev", "test")
                     for arg in (f"--input_question_file_{name}", lamp6 / f"{name}_questions.json")]
    training = ["--train_data", questions, "--validation_data", questions, "--task", "LaMP-7",
                "--model_name", model]
    return [
        ("eval_task output = golds", eval_task.main, [*evaluation, "--output_file", golds],
         [golds]),
        ("eval_task output = preds", eval_task.main, [*evaluation, "--output_file", preds],
         [preds]),
        ("eval_task output = a symlink to golds", eval_task.main,
         [*evaluation, "--output_file", link], [golds]),
        ("eval_task output = a hard link to golds", eval_task.main,
         [*evaluation, "--output_file", hard], [golds]),
        ("eval_all output = golds zip", eval_all.main,
         ["--golds_zip", golds_zip, "--preds_zip", preds_zip, "--output_file", golds_zip],
         [golds_zip]),
        ("compare output = preds_b", compare.main,
         ["--golds_json", golds, "--preds_a", preds, "--preds_b", preds, "--task_name", "LaMP_3",
          "--output_file", preds], [preds]),
        ("rank_profiles output = its input", rank_profiles.main,
         ["--input_data_addr", questions, "--output_ranking_addr", questions, "--task", "LaMP-7",
          "--ranker", "bm25"], [questions]),
        # The ranking's arguments go to dev.args.json beside dev.json: here, the input.
        ("rank_profiles arguments file = its input", rank_profiles.main,
         ["--input_data_addr", named_like_args, "--output_ranking_addr",
          named_like_args.with_name("dev.json"), "--task", "LaMP-7", "--ranker", "bm25"],
         [named_like_args]),
        ("merge output = the ranking", merge_with_rank.main,
         ["--lamp_questions_addr", questions, "--profile_ranking_addr", ranking,
          "--merged_output_addr", ranking], [ranking]),
        ("merge output = the questions", merge_with_rank.main,
         ["--lamp_questions_addr", questions, "--merged_output_addr", questions], [questions]),
        ("avocado output_dir = the folder of the question files", avocado.main,
         ["--avocado_files_dir", text_dir, "--output_dir", lamp6, *avocado_files], [lamp6]),
        ("train_llm --peft none into the base model", train_llm.main,
         [*training, "--peft", "none", "--output_dir", model], [model]),
        ("train_llm into a folder inside the base model", train_llm.main,
         [*training, "--output_dir", model / "lora"], [model]),
        ("train_llm output_dir holding the training data", train_llm.main,
         [*training, "--output_dir", questions.parent], [questions]),
        ("evaluate_llm into the model folder", evaluate_llm.main,
         ["--validation_data", questions, "--model_addr", model, "--task", "LaMP-7",
          "--output_dir", model], [model]),
        ("demo work_dir = data_dir", demo.main,
         ["--data_dir", lamp6, "--work_dir", lamp6], [lamp6]),
        ("collect_feedback output = its training data", collect_feedback.main,
         ["--train_data", questions, "--task", "LaMP-7", "--model_addr", model,
          "--output_file", questions], [questions]),
        ("collect_feedback arguments file = its training data", collect_feedback.main,
         ["--train_data", named_like_args, "--task", "LaMP-7", "--model_addr", model,
          "--output_file", named_like_args.with_name("dev.jsonl")], [named_like_args]),
        ("train_retriever output_dir holding the feedback", train_retriever.main,
         ["--feedback", ranking, "--train_data", questions, "--task", "LaMP-7",
          "--objective", "kd", "--output_dir", tmp_path], [ranking, questions]),
        ("train_retriever into the encoder it starts from", train_retriever.main,
         ["--feedback", ranking, "--train_data", questions, "--task", "LaMP-7",
          "--objective", "kd", "--contriever_checkpoint", model, "--output_dir",
          model / "ropg"], [model]),
        ("train_selector output_dir holding the rankings", train_selector.main,
         ["--train_data", questions, "--task", "LaMP-7", "--rankings", ranking, ranking,
          "--predictions", preds, preds, "--output_dir", tmp_path], [ranking]),
    ]


def test_an_output_that_names_an_input_is_refused_before_any_work(tmp_path, capsys):
    cases = refused_cases(tmp_path)
    for name, main, argv, inputs in cases:
        before = snapshot(*inputs)
        listing = sorted(p.name for p in tmp_path.rglob("*"))
        status, err = run_cli(main, argv, capsys)
        assert status == 2, name
        assert len(err) == 1 and err[0].startswith("error: --"), (name, err)
        assert "the input --" in err[0], (name, err)
        assert snapshot(*inputs) == before, name
        assert sorted(p.name for p in tmp_path.rglob("*")) == listing, name  # nothing written


def test_the_message_names_both_flags_and_the_paths(tmp_path, capsys):
    golds, preds = lamp3_files(tmp_path)
    status, err = run_cli(eval_task.main, ["--golds_json", golds, "--preds_json", preds,
                                           "--task_name", "LaMP_3", "--output_file", preds],
                          capsys)
    assert status == 2
    assert err == [f"error: --output_file {preds} is the input --preds_json {preds}; "
                   "choose another output path"]


def test_a_hub_name_is_not_a_path_to_protect(tmp_path):
    # "org/model" does not exist on disk: nothing to overwrite, no refusal.
    fileio.check_outputs(folders={"--output_dir": tmp_path / "org"},
                         inputs={"--model_name": "org/model"})


# -- a symlink inside an output folder leads to an input ----------------------------------

def test_a_link_in_the_output_folder_to_an_input_is_refused(tmp_path, capsys):
    from test_avocado import argv, build_avocado, question_files

    text_dir = build_avocado(tmp_path)
    files = question_files(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    # Written through, the link would replace the published dev questions with built ones.
    os.symlink(files["dev"], out / "train_outputs.json")
    before = listing(tmp_path)
    status, lines = run_cli(avocado.main, argv(text_dir, files, out), capsys)
    assert status == 2
    assert lines == [f"error: --output_dir {out} holds {out / 'train_outputs.json'}, a symlink "
                     f"that is the input --input_question_file_dev {files['dev']}; remove the "
                     "link or choose another folder"]
    assert listing(tmp_path) == before


def test_a_linked_subfolder_into_an_input_folder_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    out = tmp_path / "run"
    (out / "sub").mkdir(parents=True)
    os.symlink(model, out / "sub" / "checkpoints")
    with pytest.raises(fileio.LampError, match=r"a symlink that is the input --model_name"):
        fileio.check_outputs(folders={"--output_dir": out}, inputs={"--model_name": str(model)})
    os.unlink(out / "sub" / "checkpoints")
    os.symlink(tmp_path / "elsewhere", out / "dangling")  # leads to no input: accepted
    fileio.check_outputs(folders={"--output_dir": out}, inputs={"--model_name": str(model)})


@pytest.mark.parametrize("script", ["train", "evaluate"])
def test_the_retrieval_encoder_folder_is_an_input_too(tmp_path, capsys, script):
    encoder = tmp_path / "contriever"
    encoder.mkdir()
    (encoder / "model.safetensors").write_bytes(b"weights")
    data = write_json(tmp_path / "data.json", [])
    if script == "train":
        main, argv = train_llm.main, ["--train_data", data, "--validation_data", data,
                                      "--model_name", "m", "--task", "LaMP-7"]
    else:
        main, argv = evaluate_llm.main, ["--validation_data", data, "--model_addr", "m",
                                         "--task", "LaMP-7"]
    status, lines = run_cli(main, [*argv, "--output_dir", encoder, "--retriever", "contriever",
                                   "--contriever_checkpoint", encoder], capsys)
    assert status == 2
    assert lines == [f"error: --output_dir {encoder} is the input --contriever_checkpoint "
                     f"{encoder}; choose another output path"]
    assert sorted(os.listdir(encoder)) == ["model.safetensors"]


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
    assert (status, problems(lines)) == (0, [])
    assert json.loads((out / "ab" / "x.json").read_text())["task"] == "LaMP_7"
    status, lines = run_cli(make_subset.main,
                            subset_argv(inputs, out / "x.json", out / "x.json.bak"), capsys)
    assert (status, problems(lines)) == (0, [])


@pytest.mark.parametrize("script", ["make_subset", "rank_profiles", "merge_with_rank"])
@pytest.mark.parametrize("given", ["", ".", "/"])
def test_an_output_file_without_a_name_is_one_line(tmp_path, inputs, capsys, monkeypatch,
                                                  script, given):
    # A file output with no name has no arguments file beside it to derive: the output
    # itself is refused, naming its flag ("" read as a path is ".", the working folder).
    monkeypatch.chdir(tmp_path)
    main, flag, argv = {
        "make_subset": (make_subset.main, "--output_questions_addr",
                        subset_argv(inputs, given, "golds.json")),
        "rank_profiles": (rank_profiles.main, "--output_ranking_addr",
                          ["--input_data_addr", inputs["questions"], "--task", "LaMP-7",
                           "--ranker", "bm25", "--output_ranking_addr", given]),
        "merge_with_rank": (merge_with_rank.main, "--merged_output_addr",
                            ["--lamp_questions_addr", inputs["questions"],
                             "--merged_output_addr", given]),
    }[script]
    before = listing(tmp_path)
    status, lines = run_cli(main, argv, capsys)
    assert status == 2 and problems(lines) == lines[-1:], lines
    assert lines[-1] in (f"error: {flag} {given or '.'} is a folder; give a file name",
                         f"error: {flag} is an empty path; give a file name")
    assert listing(tmp_path) == before


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


# -- devices, FIFOs, descriptors, symlinks ----------------------------------------------------

def test_dev_null_stays_a_character_device(tmp_path, capsys):
    assert fileio._is_direct(Path("/dev/null"))  # else this test would replace /dev/null
    golds, preds = lamp3_files(tmp_path)
    status, _ = run_cli(eval_task.main, ["--golds_json", golds, "--preds_json", preds,
                                         "--task_name", "LaMP_3", "--output_file", "/dev/null"],
                        capsys)
    assert status == 0
    assert stat.S_ISCHR(os.lstat("/dev/null").st_mode)
    assert not [name for name in os.listdir("/dev") if name.startswith(".null")]


def test_a_fifo_gets_the_content_and_stays_a_fifo(tmp_path, capsys):
    golds, preds = lamp3_files(tmp_path)
    fifo = tmp_path / "results.fifo"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    status, _ = run_cli(eval_task.main, ["--golds_json", golds, "--preds_json", preds,
                                         "--task_name", "LaMP_3", "--output_file", fifo], capsys)
    reader.join(timeout=60)
    assert status == 0
    assert json.loads(received[0])["MAE"] == pytest.approx(0.5)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert hidden_files(tmp_path) == []


def test_dev_stdout_and_an_inherited_descriptor_are_written_in_place(tmp_path):
    golds, preds = lamp3_files(tmp_path)
    for target in ("/dev/stdout", "/proc/self/fd/1"):
        completed = subprocess.run(
            [sys.executable, str(REPO / "eval" / "eval_task.py"), "--golds_json", str(golds),
             "--preds_json", str(preds), "--task_name", "LaMP_3", "--output_file", target],
            capture_output=True, text=True, timeout=120)
        assert completed.returncode == 0, completed.stderr
        # The results JSON comes first on stdout, then the table.
        document, _ = json.JSONDecoder().raw_decode(completed.stdout)
        assert document["MAE"] == pytest.approx(0.5)


def test_a_symlink_stays_and_its_target_gets_the_content(tmp_path, capsys):
    golds, preds = lamp3_files(tmp_path)
    (tmp_path / "store").mkdir()
    target = tmp_path / "store" / "results.json"
    target.write_text("old")
    link = tmp_path / "results.json"
    link.symlink_to(target)
    dangling = tmp_path / "new.json"
    dangling.symlink_to(tmp_path / "store" / "made.json")
    for output in (link, dangling):
        status, _ = run_cli(eval_task.main, ["--golds_json", golds, "--preds_json", preds,
                                             "--task_name", "LaMP_3", "--output_file", output],
                            capsys)
        assert status == 0
        assert output.is_symlink()
        assert json.loads(output.resolve().read_text())["MAE"] == pytest.approx(0.5)
    assert os.readlink(link) == str(target)
    assert hidden_files(tmp_path) == hidden_files(tmp_path / "store") == []


@pytest.mark.parametrize("output, problem", [
    ("loop1", "loop1 is a symlink loop"),
    ("loop1/results.json", "loop1 is a symlink loop"),
    ("gone/results.json", "gone is a symlink to nowhere, which does not exist"),
])
def test_an_output_through_a_broken_symlink_is_one_line_and_the_link_stays(tmp_path, capsys,
                                                                           output, problem):
    golds, preds = lamp3_files(tmp_path)
    os.symlink("loop2", tmp_path / "loop1")
    os.symlink("loop1", tmp_path / "loop2")
    os.symlink("nowhere", tmp_path / "gone")
    before = listing(tmp_path)
    status, lines = run_cli(eval_task.main, ["--golds_json", golds, "--preds_json", preds,
                                             "--task_name", "LaMP_3", "--output_file",
                                             tmp_path / output], capsys)
    assert status == 2
    assert lines == [f"error: --output_file {tmp_path / output}: {tmp_path / problem}"]
    assert listing(tmp_path) == before  # the loop was not replaced by a regular file


def test_the_writer_itself_refuses_a_symlink_loop(tmp_path):
    os.symlink("b", tmp_path / "a")
    os.symlink("a", tmp_path / "b")
    with pytest.raises(fileio.LampError, match="is a symlink loop"):
        fileio.atomic_write_json(tmp_path / "a", {"x": 1})
    assert os.readlink(tmp_path / "a") == "b"
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


def test_an_input_through_a_broken_symlink_says_so(tmp_path):
    os.symlink("b", tmp_path / "a")
    os.symlink("a", tmp_path / "b")
    os.symlink("nowhere", tmp_path / "gone")
    with pytest.raises(fileio.LampError) as raised:
        fileio.check_readable(tmp_path / "a", "gold file")
    assert str(raised.value) == f"gold file {tmp_path / 'a'} is a symlink loop"
    with pytest.raises(fileio.LampError) as raised:
        fileio.check_readable(tmp_path / "gone", "gold file")
    assert str(raised.value) == (f"gold file {tmp_path / 'gone'} is a symlink to nowhere, "
                                 "which does not exist")
    with pytest.raises(fileio.LampError, match="does not exist$"):
        fileio.check_readable(tmp_path / "missing", "gold file")


# -- an output written in place has no arguments file beside it ---------------------------

def test_rank_profiles_to_a_device_leaves_no_args_file_beside_it(tmp_path, capsys):
    device = char_device(tmp_path / "null")
    status, _ = run_cli(rank_profiles.main, [
        "--input_data_addr", LAMP1_DEV, "--output_ranking_addr", device, "--task", "LaMP-1",
        "--ranker", "bm25"], capsys)
    assert status == 0
    assert os.listdir(tmp_path) == ["null"]  # no null.args.json
    assert stat.S_ISCHR(os.lstat(device).st_mode)


def test_merge_with_rank_to_a_symlinked_device_leaves_no_args_file(tmp_path, capsys):
    device = char_device(tmp_path / "null")
    os.symlink("null", tmp_path / "link")
    status, _ = run_cli(merge_with_rank.main, [
        "--lamp_questions_addr", LAMP1_DEV, "--merged_output_addr", tmp_path / "link"], capsys)
    assert status == 0
    assert sorted(os.listdir(tmp_path)) == ["link", "null"]
    assert fileio.args_path_for(device) is None
    assert fileio.args_path_for(tmp_path / "ranking.json") == tmp_path / "ranking.args.json"


# -- modes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o077, 0o600)])
def test_new_files_follow_the_umask(tmp_path, umask, expected):
    old = os.umask(umask)
    try:
        fileio.atomic_write_json(tmp_path / "a.json", {"x": 1})
        with fileio.JsonListWriter(tmp_path / "b.json") as out:
            out.write(1)
        with fileio.JsonObjectWriter(tmp_path / "c.json") as out:
            out.write("k", [1])
    finally:
        os.umask(old)
    for name in ("a.json", "b.json", "c.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o664])
def test_a_replaced_file_keeps_its_mode(tmp_path, mode):
    path = tmp_path / "results.json"
    path.write_text("old")
    path.chmod(mode)
    old = os.umask(0o077)
    try:
        fileio.atomic_write_json(path, {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert json.loads(path.read_text()) == {"x": 1}


def test_a_replaced_file_keeps_its_owner_where_allowed(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("only root can give a file to another user")
    path = tmp_path / "results.json"
    path.write_text("old")
    os.chown(path, 12345, 23456)
    fileio.atomic_write_json(path, {"x": 1})
    assert (path.stat().st_uid, path.stat().st_gid) == (12345, 23456)


# -- places that cannot be written ----------------------------------------------------------

def test_an_output_under_a_file_is_one_line(tmp_path, capsys):
    golds, preds = lamp3_files(tmp_path)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    status, err = run_cli(eval_task.main, ["--golds_json", golds, "--preds_json", preds,
                                           "--task_name", "LaMP_3", "--output_file",
                                           blocker / "sub" / "r.json"], capsys)
    assert status == 2
    assert err == [f"error: --output_file {blocker / 'sub' / 'r.json'}: {blocker} is a file, "
                   "not a folder"]
    assert blocker.read_text() == "a file"


def permissions_as_for_a_user(monkeypatch) -> None:
    """``os.access`` answering by the mode bits, as it does for a user other than root (who
    runs these tests and may write anywhere): the check must read what a user would meet."""
    real = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and not os.stat(path).st_mode & stat.S_IWUSR:
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def test_no_write_permission_and_a_read_only_file_are_one_line_before_any_work(
        tmp_path, capsys, monkeypatch):
    golds, preds = lamp3_files(tmp_path)
    evaluation = ["--golds_json", golds, "--preds_json", preds, "--task_name", "LaMP_3"]
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only = tmp_path / "results.json"
    read_only.write_text("earlier results")
    read_only.chmod(0o444)
    locked.chmod(0o555)
    permissions_as_for_a_user(monkeypatch)
    try:
        status, err = run_cli(eval_task.main, [*evaluation, "--output_file",
                                               locked / "sub" / "r.json"], capsys)
        assert status == 2 and err == [
            f"error: --output_file {locked / 'sub' / 'r.json'}: cannot write in {locked} "
            "(permission denied)"]
        status, err = run_cli(eval_task.main, [*evaluation, "--output_file", read_only],
                              capsys)
        assert status == 2 and err == [
            f"error: --output_file {read_only}: the file is read-only (permission denied)"]
        assert read_only.read_text() == "earlier results"
        assert listing(locked) == {}
    finally:
        locked.chmod(0o755)


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    questions = tmp_path / "q.json"
    questions.write_bytes(LAMP7_DEV.read_bytes())
    cases = {
        "evaluate_llm": (evaluate_llm.main, ["--validation_data", questions, "--model_addr",
                                             "org/model", "--task", "LaMP-7", "--output_dir"]),
        "train_llm": (train_llm.main, ["--train_data", questions, "--validation_data", questions,
                                       "--model_name", "org/model", "--task", "LaMP-7",
                                       "--output_dir"]),
    }
    for name, (main, argv) in cases.items():
        for output_dir in (blocker, blocker / "run"):
            status, err = run_cli(main, [*argv, output_dir], capsys)
            assert status == 2, name
            assert len(err) == 1 and err[0].startswith("error: --output_dir"), (name, err)
            assert str(blocker) in err[0]
    assert blocker.read_text() == "a file"


def test_an_out_dir_that_is_a_file_is_one_line_before_any_download_or_build(tmp_path, capsys):
    download = load_script("download_data.py")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    # Port 9 (discard) is never asked: the check comes first.
    status, err = run_cli(download.main, ["--out_dir", blocker, "--base_url",
                                          "http://127.0.0.1:9/LaMP/"], capsys)
    assert (status, err) == (2, [f"error: --out_dir {blocker} exists and is not a folder"])
    lamp6 = tmp_path / "lamp6"
    files = []
    for name in ("train", "dev", "test"):
        path = write_json(lamp6 / f"{name}_questions.json", [])
        files += [f"--input_question_file_{name}", path]
    status, err = run_cli(avocado.main, ["--avocado_files_dir", tmp_path, "--output_dir",
                                         blocker, *files], capsys)
    assert (status, err) == (2, [f"error: --output_dir {blocker} exists and is not a folder"])
    assert blocker.read_text() == "a file"


def test_a_full_device_is_one_error_naming_the_path(tmp_path):
    with pytest.raises(LampError, match=r"^/dev/full: cannot write \(No space left on device\)$"):
        fileio.atomic_write_json("/dev/full", {"x": 1})
    with pytest.raises(LampError, match="^/dev/full: cannot write"):
        with fileio.JsonListWriter("/dev/full") as out:
            for i in range(100_000):  # more than a buffer's worth
                out.write(i)


def test_library_writes_into_a_run_folder_fail_with_one_line(tmp_path):
    # What save_pretrained or a Trainer checkpoint raises on a full disk.
    with pytest.raises(LampError, match=r"^/run/model.safetensors: No space left on device$"):
        with fileio.writing_into(tmp_path):
            raise OSError(28, "No space left on device", "/run/model.safetensors")


def test_open_output_turns_a_failed_write_into_one_line(tmp_path):
    with pytest.raises(LampError, match=r"^/dev/full: cannot write \(No space left on device\)$"):
        with fileio.open_output("/dev/full", binary=True) as handle, \
                zipfile.ZipFile(handle, "w") as archive:
            archive.writestr("a.json", "x" * 100_000)
    missing = tmp_path / "missing.json"
    with pytest.raises(LampError, match=f"^{missing}: cannot read"):
        with fileio.open_output(tmp_path / "g.zip", binary=True) as handle, \
                zipfile.ZipFile(handle, "w") as archive:
            archive.write(missing, "m.json")
    assert list(tmp_path.iterdir()) == []


def _limit_file_size(limit: int):
    def apply():
        # Past the limit a write fails with EFBIG, like a full disk; without ignoring
        # SIGXFSZ the process would be killed instead.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_write_that_fails_midway_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    ranking = out / "ranking.json"
    completed = subprocess.run(
        [sys.executable, str(REPO / "LaMP" / "rank_profiles.py"), "--input_data_addr",
         str(LAMP7_DEV), "--output_ranking_addr", str(ranking), "--task", "LaMP-7", "--ranker",
         "recency"], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, preexec_fn=_limit_file_size(300))
    assert completed.returncode == 2
    errors = [line for line in completed.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {ranking}: cannot write (File too large)"], completed.stderr
    assert "Traceback" not in completed.stderr
    assert list(out.iterdir()) == []


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


def test_a_long_legal_output_name_is_written_and_its_stale_temporary_removed(tmp_path):
    target = tmp_path / ("r" * 250 + ".json")  # 255 bytes: legal, but not with a suffix
    dead_pid = 2**22 + 1  # above Linux's pid limit: no process has it
    stale = tmp_path / f"{fileio._tmp_prefix(target)}{dead_pid}-0123abcd.tmp"
    assert len(stale.name) <= 255
    stale.write_text("left by a killed run")
    fileio.atomic_write_json(target, {"x": 1})
    assert json.loads(target.read_text()) == {"x": 1}
    assert os.listdir(tmp_path) == [target.name]


def test_a_name_too_long_is_one_line(tmp_path, capsys):
    golds, preds = lamp3_files(tmp_path)
    output = tmp_path / ("r" * 300 + ".json")
    status, lines = run_cli(eval_task.main, ["--golds_json", golds, "--preds_json", preds,
                                             "--task_name", "LaMP_3", "--output_file", output],
                            capsys)
    assert status == 2
    assert lines == [f"error: --output_file {output}: File name too long"]
    status, lines = run_cli(eval_task.main, ["--golds_json", output, "--preds_json", preds,
                                             "--task_name", "LaMP_3", "--output_file",
                                             tmp_path / "r.json"], capsys)
    assert lines == [f"error: gold file {output}: cannot read (File name too long)"]
    assert sorted(os.listdir(tmp_path)) == ["golds.json", "preds.json"]


# -- run folders -----------------------------------------------------------------------------

def fake_training_run(folder: Path) -> dict[Path, bytes]:
    (folder / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    (folder / "checkpoints" / "checkpoint-5" / "adapter_model.safetensors").write_bytes(b"w")
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "args.json").write_text('{"train_data": "t.json", "task": "LaMP-7"}')
    (folder / "results_output.json").write_text('{"task": "LaMP-7"}')
    (folder / "predictions.json").write_text('{"task": "LaMP_7", "golds": []}')
    return snapshot(folder)


def merged(tmp_path: Path, name: str, count: int, with_output: bool = True) -> Path:
    questions = json.loads(LAMP7_DEV.read_text())[:count]
    golds = {g["id"]: g["output"] for g in json.loads(LAMP7_GOLDS.read_text())["golds"]}
    if with_output:
        for question in questions:
            question["output"] = golds[question["id"]]
    return write_json(tmp_path / name, questions)


def test_train_llm_refuses_a_folder_with_a_previous_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    before = fake_training_run(run_dir)
    data = merged(tmp_path, "train.json", 4)
    status, err = run_cli(train_llm.main, ["--train_data", data, "--validation_data", data,
                                           "--model_name", "org/model", "--task", "LaMP-7",
                                           "--output_dir", run_dir], capsys)
    assert status == 2
    assert len(err) == 1 and err[0].startswith(f"error: --output_dir {run_dir} holds a previous "
                                               "run (checkpoints, adapter_config.json")
    assert "--overwrite_output_dir" in err[0] and "--resume_from_checkpoint" in err[0]
    assert snapshot(run_dir) == before


@pytest.mark.usefixtures("torch_single_thread")
def test_train_llm_overwrites_a_previous_run_when_asked(tmp_path, tiny_llama):
    run_dir = tmp_path / "run"
    fake_training_run(run_dir)
    (run_dir / "test_predictions.json").write_text("stale")
    data = merged(tmp_path, "train.json", 4)
    train_llm.main(["--train_data", str(data), "--validation_data", str(data),
                    "--model_name", str(tiny_llama), "--task", "LaMP-7",
                    "--output_dir", str(run_dir), "--overwrite_output_dir", "--max_steps", "1",
                    "--per_device_batch_size", "4", "--generation_max_length", "4",
                    "--generation_num_beams", "1", "--device", "cpu", "--max_length", "64"])
    assert not (run_dir / "checkpoints" / "checkpoint-5").exists()
    assert not (run_dir / "test_predictions.json").exists()  # this run had no --test_data
    assert json.loads((run_dir / "args.json").read_text())["overwrite_output_dir"] is True
    assert json.loads((run_dir / "adapter_config.json").read_text())["r"] == 16


def test_evaluate_llm_does_not_write_over_a_training_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    before = fake_training_run(run_dir)
    data = merged(tmp_path, "dev.json", 4)
    status, err = run_cli(evaluate_llm.main, ["--validation_data", data, "--model_addr",
                                              "org/model", "--task", "LaMP-7",
                                              "--output_dir", run_dir], capsys)
    assert status == 2
    assert len(err) == 1 and err[0].startswith(f"error: --output_dir {run_dir} holds a training "
                                               "run (checkpoints, adapter_config.json")
    assert snapshot(run_dir) == before


@pytest.mark.usefixtures("torch_single_thread")
def test_an_evaluation_rerun_removes_results_it_no_longer_produces(tmp_path, tiny_llama):
    out = tmp_path / "eval"
    common = ["--model_addr", str(tiny_llama), "--task", "LaMP-7", "--output_dir", str(out),
              "--generation_max_length", "4", "--generation_num_beams", "1", "--device", "cpu",
              "--max_length", "64", "--per_device_batch_size", "4"]
    evaluate_llm.main(["--validation_data", str(merged(tmp_path, "dev.json", 3)), *common])
    assert (out / "results_output.json").exists()
    # The same folder again, on questions without golds (a test split): no stale metrics.
    evaluate_llm.main(["--validation_data", str(merged(tmp_path, "test.json", 2, False)),
                       *common])
    assert not (out / "results_output.json").exists()
    assert len(json.loads((out / "predictions.json").read_text())["golds"]) == 2
    assert json.loads((out / "args.json").read_text())["validation_data"].endswith("test.json")


# -- interrupted writes ------------------------------------------------------------------------

def big_questions(path: Path, count: int = 40_000) -> Path:
    """Questions enough that ranking them takes seconds, so a signal lands mid-write."""
    words = ["alpha", "beta", "gamma", "delta", "echo", "fox", "golf", "hotel"]
    with open(path, "w", encoding="utf-8") as out:
        out.write("[")
        for i in range(count):
            profile = [{"id": f"{i}-{j}", "text": " ".join(words[(i + j + k) % 8] for k in range(6))}
                       for j in range(6)]
            out.write(("," if i else "") + json.dumps({"id": str(i), "input": f"Paraphrase the "
                      f"following tweet without any explanation before or after it: {words[i % 8]}",
                      "profile": profile}))
        out.write("]")
    return path


def start_ranking(questions: Path, output: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "LaMP" / "rank_profiles.py"), "--input_data_addr",
         str(questions), "--output_ranking_addr", str(output), "--task", "LaMP-7",
         # One process: the write under way is this one's (workers finish the file too fast to
         # catch mid-write; tests/test_rank_workers.py interrupts runs with workers).
         "--ranker", "bm25", "--num_workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_temporary(folder: Path, process: subprocess.Popen) -> Path:
    """The writer's temporary, once it holds data (the write is under way)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        found = [p for p in folder.iterdir() if p.name.startswith(".ranking.json.")]
        if found and found[0].stat().st_size > 0:
            return found[0]
        time.sleep(0.01)
    raise AssertionError(f"no temporary appeared (status {process.poll()})")


@pytest.fixture(scope="module")
def big_input(tmp_path_factory) -> Path:
    return big_questions(tmp_path_factory.mktemp("big") / "questions.json")


def test_sigkill_mid_write_leaves_a_temporary_the_next_run_removes(tmp_path, big_input):
    output = tmp_path / "ranking.json"
    process = start_ranking(big_input, output)
    temporary = wait_for_temporary(tmp_path, process)
    process.kill()
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not output.exists() and temporary.exists()  # what SIGKILL cannot prevent
    # The next run for the same output recognises the dead writer's temporary.
    status = run(rank_profiles.main, ["--input_data_addr", str(LAMP7_DEV),
                                      "--output_ranking_addr", str(output), "--task", "LaMP-7",
                                      "--ranker", "recency"])
    assert status == 0
    assert hidden_files(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ranking.args.json", "ranking.json"]
    assert len(json.loads(output.read_text())) == 24


def test_sigterm_mid_write_exits_cleanly_without_a_temporary(tmp_path, big_input):
    output = tmp_path / "ranking.json"
    process = start_ranking(big_input, output)
    wait_for_temporary(tmp_path, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143
    assert stderr.splitlines()[-1] == "terminated (SIGTERM)"
    assert "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


def run_under_cli(body: str, **options) -> subprocess.CompletedProcess:
    """A fresh interpreter running ``main`` (whose body is ``body``) through cli.program.run."""
    script = ("import os, signal, sys, time\n"
              "from LaMP.utils.cli.program import run\n"
              "def main(argv):\n" + textwrap.indent(textwrap.dedent(body), "    ") +
              "sys.exit(run(main))\n")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, **options)


SIGHUP_SELF = """
    try:
        os.kill(os.getpid(), signal.SIGHUP)
    finally:
        print("cleaned up", file=sys.stderr)
"""


def test_sighup_is_a_clean_exit_too_and_an_ignored_signal_stays_ignored():
    hung = run_under_cli(SIGHUP_SELF)
    assert hung.returncode == 128 + signal.SIGHUP
    assert hung.stderr.splitlines() == ["cleaned up", "terminated (SIGHUP)"]
    # Under nohup SIGHUP is ignored, and run() must not undo that.
    ignored = run_under_cli(SIGHUP_SELF, preexec_fn=lambda: signal.signal(signal.SIGHUP,
                                                                          signal.SIG_IGN))
    assert ignored.returncode == 0 and ignored.stderr.splitlines() == ["cleaned up"]


@pytest.mark.parametrize("signame, exit_code", [("SIGTERM", -signal.SIGTERM), ("SIGINT", 7)])
def test_a_forked_worker_dies_quietly_on_sigterm_and_ignores_ctrl_c(signame, exit_code):
    # A pool worker inherits run()'s handlers but not its except clauses: no traceback there;
    # SIGTERM kills it, and Ctrl-C (the whole group's) is its parent's to handle.
    completed = run_under_cli(f"""
        ready, told = os.pipe()
        child = os.fork()
        if child == 0:
            os.write(told, b"x")  # in its sleep from here on
            time.sleep(0.5)
            os._exit(7)
        os.read(ready, 1)
        os.kill(child, signal.{signame})
        _, status = os.waitpid(child, 0)
        print("child", os.waitstatus_to_exitcode(status), file=sys.stderr)
    """, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert completed.returncode == 0
    assert completed.stderr.splitlines() == [f"child {exit_code}"]


# A stop signal that lands inside a __del__ (a zip file or a tokenizer being collected): its
# handler's exception is dropped there by Python, and the run would go on to write its output.
LOST_STOP = """
    from LaMP.utils.data.fileio import atomic_folder, atomic_write_json
    class Collected:
        def __del__(self):
            os.kill(os.getpid(), signal.{signal})
            time.sleep(0.01)  # the handler runs here, inside __del__
    Collected()
    print("went on", file=sys.stderr)
    {write}
"""
WRITES = {
    "a file": "atomic_write_json({out!r}, [1])",
    "a folder": "with atomic_folder({out!r}) as folder:\n        (folder / 'x').write_text('1')",
    "nothing more": "pass",
}


@pytest.mark.parametrize("signame, status, line", [("SIGINT", 130, "interrupted"),
                                                   ("SIGTERM", 143, "terminated (SIGTERM)"),
                                                   ("SIGHUP", 129, "terminated (SIGHUP)")])
@pytest.mark.parametrize("write", WRITES)
def test_a_stop_lost_inside_a_finaliser_still_ends_the_run_and_writes_nothing(
        tmp_path, signame, status, line, write):
    out = tmp_path / "out"
    body = LOST_STOP.format(signal=signame, write=WRITES[write].format(out=str(out)))
    completed = run_under_cli(body, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert completed.returncode == status, completed.stderr
    assert completed.stderr.splitlines() == ["went on", line]  # no "Exception ignored" trace
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary


def test_an_ordinary_exception_lost_in_a_finaliser_is_still_printed():
    completed = run_under_cli("""
        class Broken:
            def __del__(self):
                raise ValueError("a finaliser's own fault")
        Broken()
    """, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert completed.returncode == 0
    assert "ValueError: a finaliser's own fault" in completed.stderr


def test_only_a_dead_writers_temporary_of_the_same_output_is_removed(tmp_path):
    host = fileio._HOST
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                                  capture_output=True, text=True).stdout.strip()
        kept = {
            "a live writer's": f".out.json.lamp-tmp-{host}-{sleeper.pid}-0000abcd.tmp",
            "another output's": f".other.json.lamp-tmp-{host}-{dead_pid}-0000abcd.tmp",
            "another machine's": f".out.json.lamp-tmp-{host}x-{dead_pid}-0000abcd.tmp",
            "not ours": f".out.json.{dead_pid}.tmp",
        }
        dead = tmp_path / f".out.json.lamp-tmp-{host}-{dead_pid}-0000abcd.tmp"
        for name in [*kept.values(), dead.name]:
            (tmp_path / name).write_text("partial")
        fileio.atomic_write_json(tmp_path / "out.json", [1])
        assert not dead.exists()
        for why, name in kept.items():
            assert (tmp_path / name).exists(), why
    finally:
        sleeper.kill()
        sleeper.wait()


# -- strict JSON -------------------------------------------------------------------------------

def strict_loads(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def test_a_huge_rating_gives_valid_json(tmp_path, capsys):
    golds, preds = lamp3_files(tmp_path, prediction="1e200")
    output = tmp_path / "results.json"
    status, err = run_cli(eval_task.main, ["--golds_json", golds, "--preds_json", preds,
                                           "--task_name", "LaMP_3", "--output_file", output],
                          capsys)
    assert status == 0, err
    results = strict_loads(output.read_text())
    # (1e200 - 3)^2 overflows: RMSE is infinite and written as null; MAE is finite.
    assert results["RMSE"] is None
    assert results["MAE"] == pytest.approx(1e200 / 2)
    # The log (stderr, configured by the script) counts what was nulled.
    assert any(line.endswith(f"{output}: 1 non-finite numbers (NaN or infinity) written as null")
               for line in err), err


def test_every_writer_is_strict(tmp_path):
    value = {"a": float("nan"), "b": [float("inf"), 1.5], "c": "x"}
    fileio.atomic_write_json(tmp_path / "a.json", value)
    with fileio.JsonListWriter(tmp_path / "b.json") as out:
        out.write(value)
    with fileio.JsonObjectWriter(tmp_path / "c.json") as out:
        out.write("k", value)
    expected = {"a": None, "b": [None, 1.5], "c": "x"}
    assert strict_loads((tmp_path / "a.json").read_text()) == expected
    assert strict_loads((tmp_path / "b.json").read_text()) == [expected]
    assert strict_loads((tmp_path / "c.json").read_text()) == {"k": expected}
