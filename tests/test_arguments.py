"""The shared flag groups and checks (LaMP/utils/cli/arguments.py) as the scripts meet them:
each script keeps the seed README's spelling of the model and ranker flags and takes the other
script's spelling as an alias; a count, rate or length out of range, above its upper bound
included, stops while parsing with one ``error:`` line, before any model loads; the bounds
themselves parse."""
from __future__ import annotations

import pytest

from conftest import lamp3_files, load_script, run_cli, write_json
from test_train_llm import common_args, merged_sample
from LaMP import evaluate_llm, rank_profiles, train_llm, train_user_peft
from LaMP.utils.cli.arguments import MAX_BOOTSTRAP, UPPER_BOUNDS
from LaMP.utils.seeds import MAX_SEED

eval_task = load_script("eval/eval_task.py")
eval_all = load_script("eval/eval_all.py")
compare = load_script("eval/compare.py")

HUGE = str(10**20)
DATA = "data/sample/LaMP_7/dev_questions.json"


# -- the model and ranker flags take both spellings ------------------------------------------

@pytest.mark.parametrize("module, base, flag, alias, dest", [
    (evaluate_llm, ["--validation_data", DATA, "--task", "LaMP-7", "--output_dir", "o"],
     "--model_addr", "--model_name", "model_addr"),
    (train_llm, ["--train_data", DATA, "--validation_data", DATA, "--task", "LaMP-7",
                 "--output_dir", "o"], "--model_name", "--model_addr", "model_name"),
    (train_user_peft, ["--train_data", DATA, "--task", "LaMP-7", "--output_dir", "o"],
     "--model_name", "--model_addr", "model_name"),
])
def test_the_model_flag_takes_both_spellings(module, base, flag, alias, dest):
    own = module.parse_args([*base, flag, "org/model"])
    other = module.parse_args([*base, alias, "org/model"])
    assert getattr(own, dest) == getattr(other, dest) == "org/model"
    assert vars(own) == vars(other)


@pytest.mark.parametrize("module, base, flag, alias, dest", [
    (rank_profiles, ["--input_data_addr", DATA, "--output_ranking_addr", "r.json",
                     "--task", "LaMP-7"], "--ranker", "--retriever", "ranker"),
    (evaluate_llm, ["--validation_data", DATA, "--task", "LaMP-7", "--output_dir", "o",
                    "--model_addr", "m"], "--retriever", "--ranker", "retriever"),
    (train_llm, ["--train_data", DATA, "--validation_data", DATA, "--task", "LaMP-7",
                 "--output_dir", "o", "--model_name", "m"], "--retriever", "--ranker",
     "retriever"),
])
def test_the_ranker_flag_takes_both_spellings(module, base, flag, alias, dest):
    own = module.parse_args([*base, flag, "recency"])
    other = module.parse_args([*base, alias, "recency"])
    assert getattr(own, dest) == getattr(other, dest) == "recency"
    assert vars(own) == vars(other)


def test_a_required_model_flag_left_out_is_one_error_line_naming_it(capsys):
    with pytest.raises(SystemExit) as stop:
        evaluate_llm.parse_args(["--validation_data", DATA, "--task", "LaMP-7",
                                 "--output_dir", "o"])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--model_addr" in lines[0]


def test_an_unknown_ranker_under_the_alias_names_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        rank_profiles.parse_args(["--input_data_addr", DATA, "--output_ranking_addr", "r.json",
                                  "--task", "LaMP-7", "--retriever", "nope"])
    err = capsys.readouterr().err
    assert err.startswith("error:") and "bm25" in err and "nope" in err


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
