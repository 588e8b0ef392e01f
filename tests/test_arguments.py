"""Shared flag groups (LaMP/utils/cli/arguments.py): each script keeps the seed README's
spelling of the model and ranker flags and takes the other script's spelling as an alias."""
from __future__ import annotations

import pytest

from LaMP import evaluate_llm, rank_profiles, train_llm, train_user_peft

DATA = "data/sample/LaMP_7/dev_questions.json"


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
