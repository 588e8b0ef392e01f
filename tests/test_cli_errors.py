"""Usage mistakes end like every other user mistake: one `error:` line on stderr, status 2."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO

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
