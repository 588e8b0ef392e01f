"""The shared flag checks (LaMP/utils/cli/arguments.py) as the scripts meet them: a count,
rate or length out of range, above its upper bound included, stops while parsing with one
``error:`` line, before any model loads; the bounds themselves parse."""
from __future__ import annotations

import pytest

from conftest import lamp3_files, load_script, run_cli, write_json
from test_train_llm import common_args, merged_sample
from LaMP import evaluate_llm, train_llm
from LaMP.utils.cli.arguments import MAX_BOOTSTRAP, UPPER_BOUNDS
from LaMP.utils.seeds import MAX_SEED

eval_task = load_script("eval/eval_task.py")
eval_all = load_script("eval/eval_all.py")
compare = load_script("eval/compare.py")

HUGE = str(10**20)


# -- --bootstrap ------------------------------------------------------------------------------

@pytest.mark.parametrize("script, minimum", [("compare", 1), ("eval_task", 0), ("eval_all", 0)])
@pytest.mark.parametrize("value", [str(10**20), str(MAX_BOOTSTRAP + 1), "-1"])
def test_bootstrap_counts_are_bounded(tmp_path, capsys, script, minimum, value):
    golds, preds = lamp3_files(tmp_path)
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


# -- training and evaluation numbers ----------------------------------------------------------

BAD_TRAINING_NUMBERS = [
    ("--learning_rate", "-1"), ("--learning_rate", "0"), ("--learning_rate", "nan"),
    ("--learning_rate", "inf"), ("--weight_decay", "-0.1"), ("--weight_decay", "nan"),
    ("--num_train_epochs", "nan"), ("--num_train_epochs", "inf"), ("--num_train_epochs", "0"),
    ("--warmup_ratio", "-0.1"), ("--warmup_ratio", "1"), ("--warmup_ratio", "nan"),
    ("--lora_dropout", "1"), ("--lora_dropout", "-0.5"), ("--lora_dropout", "nan"),
    ("--lora_r", "0"), ("--lora_alpha", "-4"), ("--per_device_batch_size", "0"),
    ("--gradient_accumulation_steps", "0"), ("--eval_steps", "0"), ("--logging_steps", "0"),
    ("--save_total_limit", "0"), ("--max_steps", "0"), ("--max_steps", "-2"),
    ("--generation_max_length", "0"), ("--generation_num_beams", "0"),
    ("--max_length", "8"), ("--num_retrieved", "-1"),
]


@pytest.mark.parametrize("flag, value", BAD_TRAINING_NUMBERS)
def test_bad_training_numbers_stop_while_parsing(tmp_path, capsys, no_model_loads, flag,
                                                 value):
    valid = merged_sample(tmp_path, 7, "dev", 2)
    argv = common_args(tmp_path, "no/model", valid, valid, "LaMP-7", flag, value)
    with pytest.raises(SystemExit) as exited:
        train_llm.main(argv)
    assert exited.value.code == 2
    assert f"error: {flag}" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value", [
    ("--generation_max_length", "0"), ("--generation_num_beams", "0"),
    ("--per_device_batch_size", "0"), ("--max_length", "8"), ("--limit", "0"),
])
def test_bad_evaluation_numbers_stop_while_parsing(tmp_path, capsys, no_model_loads, flag,
                                                   value):
    valid = merged_sample(tmp_path, 7, "dev", 2)
    with pytest.raises(SystemExit) as exited:
        evaluate_llm.main(["--validation_data", valid, "--model_addr", "no/model", "--task",
                           "LaMP-7", "--output_dir", str(tmp_path / "out"), flag, value])
    assert exited.value.code == 2
    assert f"error: {flag}" in capsys.readouterr().err.strip().splitlines()[-1]


def test_good_numbers_still_parse(tmp_path):
    valid = merged_sample(tmp_path, 7, "dev", 2)
    args = train_llm.parse_args(common_args(
        tmp_path, "m", valid, valid, "LaMP-7", "--lora_dropout", "0", "--warmup_ratio", "0",
        "--weight_decay", "0", "--max_steps", "-1", "--seed", str(MAX_SEED)))
    assert args.lora_dropout == 0 and args.seed == MAX_SEED


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
