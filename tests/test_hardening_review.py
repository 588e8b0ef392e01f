"""Cases an adversarial review of the hardening found still open, one test per class.

Each runs a script as its ``__main__`` would (``cli.program.run``) and checks the exit status, the
exact error line, that inputs are byte-identical afterwards and that nothing stray is left.
Devices are made in ``tmp_path`` with ``os.mknod``: nothing here points at the real /dev.
"""
from __future__ import annotations

import json
import os
import stat
import warnings
from pathlib import Path

import pytest

from conftest import SAMPLE, load_script, outputs_doc, write_json
from LaMP import evaluate_llm, rank_profiles, train_llm
from LaMP.utils import merge_with_rank
from LaMP.utils.cli.arguments import MAX_BOOTSTRAP, UPPER_BOUNDS
from LaMP.utils.cli.program import run
from LaMP.utils.data import fileio
from LaMP.utils.evaluation.metrics import RatingMetric

eval_task = load_script("eval/eval_task.py")
eval_all = load_script("eval/eval_all.py")
compare = load_script("eval/compare.py")
avocado = load_script("data/avocado/create_avocado_dataset.py")
download = load_script("download_data.py")

LAMP1_DEV = SAMPLE / "LaMP_1" / "dev_questions.json"


def run_cli(main, argv, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    try:
        status = run(main, [str(arg) for arg in argv])
    except SystemExit as exited:  # a usage error: argparse exits from inside main
        status = exited.code
    return status, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def tree(folder: Path) -> dict[str, object]:
    """Every entry under ``folder``: a file's bytes, a link's target, a device's kind."""
    found = {}
    for path in sorted(folder.rglob("*")):
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            found[str(path)] = ("link", os.readlink(path))
        elif stat.S_ISREG(mode):
            found[str(path)] = path.read_bytes()
        else:
            found[str(path)] = stat.S_IFMT(mode)
    return found


def lamp3(tmp_path: Path) -> tuple[Path, Path]:
    golds = write_json(tmp_path / "golds.json", outputs_doc("LaMP_3", [("1", "3"), ("2", "5")]))
    preds = write_json(tmp_path / "preds.json", outputs_doc("LaMP_3", [("1", "1e200"),
                                                                         ("2", "5")]))
    return golds, preds


def char_device(path: Path) -> Path:
    """A /dev/null of our own (major 1, minor 3), so no test touches the machine's."""
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    return path


# -- a symlink loop (or a dangling link where a folder must be) as an output --------------

@pytest.mark.parametrize("output, problem", [
    ("loop1", "loop1 is a symlink loop"),
    ("loop1/results.json", "loop1 is a symlink loop"),
    ("gone/results.json", "gone is a symlink to nowhere, which does not exist"),
])
def test_an_output_through_a_broken_symlink_is_one_line_and_the_link_stays(tmp_path, capsys,
                                                                           output, problem):
    golds, preds = lamp3(tmp_path)
    os.symlink("loop2", tmp_path / "loop1")
    os.symlink("loop1", tmp_path / "loop2")
    os.symlink("nowhere", tmp_path / "gone")
    before = tree(tmp_path)
    status, lines = run_cli(eval_task.main, ["--golds_json", golds, "--preds_json", preds,
                                             "--task_name", "LaMP_3", "--output_file",
                                             tmp_path / output], capsys)
    assert status == 2
    assert lines == [f"error: --output_file {tmp_path / output}: {tmp_path / problem}"]
    assert tree(tmp_path) == before  # the loop was not replaced by a regular file


def test_the_writer_itself_refuses_a_symlink_loop(tmp_path):
    os.symlink("b", tmp_path / "a")
    os.symlink("a", tmp_path / "b")
    with pytest.raises(fileio.LampError, match="is a symlink loop"):
        fileio.atomic_write_json(tmp_path / "a", {"x": 1})
    assert os.readlink(tmp_path / "a") == "b"
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


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


# -- a symlink inside an output folder leads to an input ----------------------------------

def test_a_link_in_the_output_folder_to_an_input_is_refused(tmp_path, capsys):
    from test_avocado import argv, build_avocado, question_files

    text_dir = build_avocado(tmp_path)
    files = question_files(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    # Written through, the link would replace the published dev questions with built ones.
    os.symlink(files["dev"], out / "train_outputs.json")
    before = tree(tmp_path)
    status, lines = run_cli(avocado.main, argv(text_dir, files, out), capsys)
    assert status == 2
    assert lines == [f"error: --output_dir {out} holds {out / 'train_outputs.json'}, a symlink "
                     f"that is the input --input_question_file_dev {files['dev']}; remove the "
                     "link or choose another folder"]
    assert tree(tmp_path) == before


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


# -- counts without an upper bound ran for ever -------------------------------------------

@pytest.mark.parametrize("script, minimum", [("compare", 1), ("eval_task", 0), ("eval_all", 0)])
@pytest.mark.parametrize("value", [str(10**20), str(MAX_BOOTSTRAP + 1), "-1"])
def test_bootstrap_counts_are_bounded(tmp_path, capsys, script, minimum, value):
    golds, preds = lamp3(tmp_path)
    main, argv = {
        "compare": (compare.main, ["--golds_json", golds, "--preds_a", preds, "--preds_b", preds,
                                   "--task_name", "LaMP_3"]),
        "eval_task": (eval_task.main, ["--golds_json", golds, "--preds_json", preds,
                                       "--task_name", "LaMP_3", "--output_file",
                                       tmp_path / "r.json"]),
        "eval_all": (eval_all.main, ["--golds_zip", golds, "--preds_zip", preds,
                                     "--output_file", tmp_path / "r.json"]),
    }[script]
    status, lines = run_cli(main, [*argv, "--bootstrap", value], capsys)
    assert status == 2
    assert lines == [f"error: --bootstrap must be in {minimum} … {MAX_BOOTSTRAP:,}"]
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("value", ["-1", "101", str(10**20)])
def test_download_retries_are_bounded(capsys, value):
    with pytest.raises(SystemExit) as exited:
        download.parse_args(["--retries", value])
    assert exited.value.code == 2
    assert capsys.readouterr().err == "error: --retries must be in 0 … 100\n"


# -- an overflowing rating is a result, not numpy noise on stderr -------------------------

def test_an_overflowing_rating_gives_null_rmse_without_a_runtime_warning(tmp_path, capsys):
    golds, preds = lamp3(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's overflow RuntimeWarning would raise here
        status, lines = run_cli(eval_task.main, [
            "--golds_json", golds, "--preds_json", preds, "--task_name", "LaMP_3",
            "--output_file", tmp_path / "r.json"], capsys)
    assert status == 0
    assert not [line for line in lines if "RuntimeWarning" in line or "np.sqrt" in line]
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["RMSE"] is None and results["MAE"] > 1e199
    metric = RatingMetric()
    assert metric.aggregate(metric.prepare(["1"], ["1e300"]))["RMSE"] == float("inf")


# -- integer flags with no upper bound failed after the model loaded ----------------------

HUGE = str(10**20)


@pytest.mark.parametrize("script", ["train", "evaluate"])
@pytest.mark.parametrize("flag", ["--max_length", "--generation_max_length",
                                  "--generation_num_beams", "--per_device_batch_size",
                                  "--lora_r", "--max_steps", "--num_train_epochs"])
def test_huge_counts_stop_while_parsing(tmp_path, capsys, script, flag):
    data = write_json(tmp_path / "data.json", [])
    if script == "train":
        parse, argv = train_llm.parse_args, ["--train_data", data, "--validation_data", data,
                                             "--model_name", "m", "--task", "LaMP-7"]
    else:
        if flag in ("--lora_r", "--max_steps", "--num_train_epochs"):
            pytest.skip("a training flag")
        parse, argv = evaluate_llm.parse_args, ["--validation_data", data, "--model_addr", "m",
                                                "--task", "LaMP-7"]
    with pytest.raises(SystemExit) as exited:
        parse([str(arg) for arg in argv] + ["--output_dir", str(tmp_path / "out"), flag, HUGE])
    assert exited.value.code == 2
    highest = UPPER_BOUNDS[flag[2:]]
    shown = str(float(HUGE)) if flag == "--num_train_epochs" else HUGE  # a float flag
    assert capsys.readouterr().err == f"error: {flag} must be at most {highest:,}, not {shown}\n"
    # The bound itself is accepted.
    args = parse([str(arg) for arg in argv] + ["--output_dir", str(tmp_path / "out"), flag,
                                               str(highest)])
    assert getattr(args, flag[2:]) == highest


# -- a hostile adapter_config.json ended in peft's TypeError/KeyError traceback -----------

@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory) -> tuple[Path, Path]:
    from conftest import build_tiny_llama
    from LaMP.utils.modeling.model import load_pretrained
    from LaMP.utils.modeling.training import add_lora

    base = build_tiny_llama(tmp_path_factory.mktemp("base"))
    model, _ = load_pretrained(str(base))
    folder = tmp_path_factory.mktemp("adapter")
    add_lora(model, seq2seq=False, r=4, alpha=8, dropout=0.0,
             target_modules=None).save_pretrained(folder)
    return base, folder


def edited_adapter(lora_adapter, tmp_path: Path, config) -> Path:
    import shutil

    folder = tmp_path / "adapter"
    shutil.copytree(lora_adapter[1], folder)
    saved = json.loads((folder / "adapter_config.json").read_text())
    text = json.dumps(config if not isinstance(config, dict) else {**saved, **config})
    (folder / "adapter_config.json").write_text(text)
    return folder


@pytest.mark.parametrize("config, problem", [
    ([], "adapter_config.json is not a JSON object"),
    ({"peft_type": None}, "adapter_config.json: peft_type must be a string, not None"),
    ({"r": "x"}, "adapter_config.json: r must be a positive integer, not 'x'"),
    ({"r": True}, "adapter_config.json: r must be a positive integer, not True"),
    ({"lora_alpha": "big"}, "adapter_config.json: lora_alpha must be a number, not 'big'"),
    ({"lora_dropout": 2}, "adapter_config.json: lora_dropout must be a number in [0, 1), not 2"),
    ({"target_modules": 5},
     "adapter_config.json: target_modules must be a module name or a list of them, not 5"),
    ({"target_modules": ["q_proj", 3]},
     "adapter_config.json: target_modules must be a module name or a list of them, "
     "not ['q_proj', 3]"),
    ({"base_model_name_or_path": 7},
     "adapter_config.json: base_model_name_or_path must be a string, not 7"),
])
def test_a_wrongly_typed_adapter_config_is_one_line_before_any_load(lora_adapter, tmp_path,
                                                                     capsys, monkeypatch,
                                                                     config, problem):
    import LaMP.utils.modeling.model as modeling

    monkeypatch.setattr(modeling, "load_model_and_tokenizer", lambda *a, **k: pytest.fail(
        "the base model loaded before the adapter's config was checked"))
    folder = edited_adapter(lora_adapter, tmp_path, config)
    data = write_json(tmp_path / "data.json", [])
    before = tree(folder)
    status, lines = run_cli(evaluate_llm.main, [
        "--validation_data", data, "--model_addr", lora_adapter[0], "--task", "LaMP-7",
        "--output_dir", tmp_path / "out", "--adapter", folder], capsys)
    assert status == 2
    assert lines == [f"error: --adapter {folder}: {problem}"]
    assert tree(folder) == before and not (tmp_path / "out").exists()


def test_a_checkpoint_with_a_hostile_adapter_config_is_incomplete(lora_adapter, tmp_path):
    from LaMP.utils.modeling.checkpoints import checkpoint_problem

    folder = edited_adapter(lora_adapter, tmp_path, {"r": "x"})
    (folder / "trainer_state.json").write_text("{}")
    assert checkpoint_problem(folder) == ("adapter_config.json: r must be a positive integer, "
                                          "not 'x'")


def test_an_unknown_peft_type_is_one_line(lora_adapter, tmp_path):
    from LaMP.utils.errors import LampError
    from LaMP.utils.modeling.model import load_model

    folder = edited_adapter(lora_adapter, tmp_path, {"peft_type": "NOPE"})
    with pytest.raises(LampError) as raised:
        load_model(str(lora_adapter[0]), device="cpu", adapter=str(folder))
    assert str(raised.value) == (f"cannot load adapter {folder} onto {lora_adapter[0]}: its "
                                 "adapter_config.json does not suit peft (KeyError: 'NOPE')")


# -- long names, and path probes that raise ------------------------------------------------

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
    golds, preds = lamp3(tmp_path)
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


# -- the demo's flags reached the stages only after minutes of work -----------------------

@pytest.mark.parametrize("flag, value, message", [
    ("--learning_rate", "-1", "error: --learning_rate must be > 0"),
    ("--epochs", "nan", "error: --num_train_epochs must be a finite number, not nan"),
    ("--epochs", "1e300", "error: --num_train_epochs must be at most 10,000, not 1e+300"),
    ("--num_retrieved", "-3", "error: --num_retrieved must be >= 0"),
])
def test_demo_checks_every_stage_flag_before_any_work(tmp_path, capsys, monkeypatch, flag,
                                                      value, message):
    demo = load_script("demo.py")
    monkeypatch.setattr(demo, "rank_and_merge", lambda *a: pytest.fail("work started"))
    work = tmp_path / "work"
    status, lines = run_cli(demo.main, ["--work_dir", work, "--model", tmp_path / "model",
                                        flag, value], capsys)
    assert status == 2
    assert lines == [message]
    assert not work.exists()
