"""How every script runs (LaMP/utils/cli/program.py): a usage mistake ends like every other
user mistake, with one `error:` line on stderr and status 2; an OSError about a path is one
line too; every --seed takes the range every generator accepts."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from conftest import REPO, load_script
from test_train_llm import common_args, merged_sample
from LaMP import evaluate_llm, rank_profiles, train_llm
from LaMP.utils.cli.program import Terminated, run, seed_arg
from LaMP.utils.seeds import MAX_SEED

SCRIPTS = ["LaMP/train_llm.py", "LaMP/rank_profiles.py", "LaMP/evaluate_llm.py",
           "LaMP/utils/merge_with_rank.py", "download_data.py", "demo.py",
           "data/avocado/create_avocado_dataset.py", "data/make_sample.py", "eval/compare.py",
           "eval/eval_all.py", "eval/eval_task.py", "LaMP/collect_feedback.py",
           "LaMP/train_retriever.py", "LaMP/train_selector.py"]


def run_script(script: str, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / script), *argv], capture_output=True,
                          text=True, env=env, timeout=120)


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_unknown_flag_is_one_error_line(script):
    result = run_script(script, "--no_such_flag", "1")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")


@pytest.mark.parametrize("script", ["LaMP/rank_profiles.py", "eval/eval_task.py",
                                    "LaMP/train_llm.py", "LaMP/collect_feedback.py",
                                    "LaMP/train_retriever.py", "LaMP/train_selector.py"])
def test_a_missing_required_flag_and_a_bad_value_are_one_line_each(script):
    missing = run_script(script)
    assert missing.returncode == 2
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the following arguments are required")
    bad_seed = run_script(script, "--seed", "-1")
    assert bad_seed.returncode == 2
    lines = bad_seed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: argument --seed: ")


def test_help_still_prints_the_usage():
    result = run_script("eval/eval_task.py", "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: ")


def test_an_oserror_about_a_path_is_one_error_line_and_any_other_stays_whole(capsys):
    from LaMP.utils.cli.program import run

    def refused(argv):
        raise OSError(36, "File name too long", "/data/" + "n" * 300)

    assert run(refused, []) == 2
    assert capsys.readouterr().err == f"error: /data/{'n' * 300}: File name too long\n"

    def fault(argv):
        raise OSError("a fault with no path")

    with pytest.raises(OSError, match="a fault with no path"):
        run(fault, [])


# -- --seed: one shared type --------------------------------------------------------------

def test_seed_type_takes_the_range_every_generator_accepts():
    assert seed_arg("0") == 0 and seed_arg(str(MAX_SEED)) == MAX_SEED == 2**32 - 1
    import argparse

    for bad in ("-1", str(2**32), "1.5", "seven", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            seed_arg(bad)


SEED_SCRIPTS = {
    "train_llm": lambda: train_llm.main,
    "evaluate_llm": lambda: evaluate_llm.main,
    "rank_profiles": lambda: rank_profiles.main,
    "eval_task": lambda: load_script("eval/eval_task.py").main,
    "eval_all": lambda: load_script("eval/eval_all.py").main,
    "compare": lambda: load_script("eval/compare.py").main,
    "demo": lambda: load_script("demo.py").main,
    "make_sample": lambda: load_script("data/make_sample.py").main,
    "collect_feedback": lambda: load_script("LaMP/collect_feedback.py").main,
    "train_retriever": lambda: load_script("LaMP/train_retriever.py").main,
    "train_selector": lambda: load_script("LaMP/train_selector.py").main,
}


@pytest.mark.parametrize("script", sorted(SEED_SCRIPTS))
@pytest.mark.parametrize("seed", ["-1", "-7", str(2**32), "4294967296000"])
def test_a_seed_out_of_range_is_a_usage_error_in_every_script(script, seed, capsys,
                                                                no_model_loads):
    with pytest.raises(SystemExit) as exited:
        SEED_SCRIPTS[script]()(["--seed", seed])
    assert exited.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith(f"error: argument --seed: {int(seed)} is outside 0 … {MAX_SEED}")


def test_a_negative_seed_from_the_command_line_has_no_traceback(tmp_path):
    valid = merged_sample(tmp_path, 7, "dev", 2)
    done = subprocess.run([sys.executable, str(REPO / "LaMP" / "train_llm.py"),
                           *common_args(tmp_path, "no/model", valid, valid, "LaMP-7",
                                        "--seed", "-1")],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "argument --seed: -1 is outside" in done.stderr
    assert not (tmp_path / "out").exists()


def _wrapped_by_a_c_extension(interruption: BaseException):
    """What a C extension makes of a signal handler's exception raised in its callback."""
    def main(argv):
        try:
            raise interruption
        except BaseException as error:
            raise SystemError("<class 'ParsedObject'> returned a result with an exception "
                              "set") from error
    return main


@pytest.mark.parametrize("interruption, status, line", [
    (KeyboardInterrupt(), 130, "interrupted"),
    (Terminated(signal.SIGTERM), 143, "terminated (SIGTERM)"),
    (Terminated(signal.SIGHUP), 129, "terminated (SIGHUP)"),
])
def test_an_interruption_wrapped_by_a_c_extension_ends_as_the_interruption(
        interruption, status, line, capsys):
    assert run(_wrapped_by_a_c_extension(interruption), []) == status
    assert capsys.readouterr().err.splitlines() == [line]


def test_a_system_error_of_its_own_stays_whole():
    def main(argv):
        raise SystemError("a fault to see whole")

    with pytest.raises(SystemError, match="a fault to see whole"):
        run(main, [])
