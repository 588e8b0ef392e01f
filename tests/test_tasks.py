"""The task registry: name lookup in both spellings, and each task's facts (labels, fields, metrics, templates)."""
from __future__ import annotations

import argparse

import pytest

from LaMP.utils.errors import LampError
from LaMP.utils.tasks import (BENCHMARK_TASK_NAMES, CLASSIFICATION, GENERATION, MOVIE_TAGS,
                              NEWS_CATEGORIES, RATING, TASK_NAMES, TASKS, get_task, task_arg,
                              task_of_file)

BENCHMARK_NAMES = [f"LaMP-{n}" for n in range(1, 8)]
ALL_NAMES = BENCHMARK_NAMES + ["LaMP-2N"]  # the original LaMP-2 (news) comes last


def test_registry_holds_the_seven_benchmark_tasks_then_lamp_2n():
    assert list(TASK_NAMES) == ALL_NAMES
    assert list(TASKS) == ALL_NAMES
    assert list(BENCHMARK_TASK_NAMES) == BENCHMARK_NAMES
    for name, task in TASKS.items():
        assert task.name == name
        assert task.file_name == name.replace("-", "_")
        assert str(task) == name
        assert task.benchmark is (name != "LaMP-2N")
    # Published ids start with N - 1: LaMP-2N shares LaMP-2's digit.
    assert [task.id_digit for task in TASKS.values()] == list("01234561")


def test_no_two_tasks_share_a_spelling():
    spellings = [written.lower() for task in TASKS.values() for written in task.spellings]
    assert len(spellings) == len(set(spellings)) == 2 * len(TASKS) + 1  # + LaMP-2N's alias


@pytest.mark.parametrize("spelling", ["LaMP-2N", "LaMP_2N", "lamp-2n", "LAMP_2N", "LaMP_2_old",
                                      "lamp_2_old", " LaMP-2N\t"])
def test_lamp_2n_has_its_own_spellings_and_lamp_2_keeps_its_own(spelling):
    assert get_task(spelling) is TASKS["LaMP-2N"]
    assert get_task("LaMP_2") is TASKS["LaMP-2"] and get_task("lamp-2") is TASKS["LaMP-2"]
    for wrong in ("LaMP-2-old", "LaMP_2n_old", "LaMP-N", "LaMP_2_new"):
        with pytest.raises(LampError):
            get_task(wrong)


def test_news_categories_are_the_fifteen_of_the_original_lamp_2():
    assert NEWS_CATEGORIES == (
        "food & drink", "sports", "education", "parents", "religion", "travel", "business",
        "crime", "science & technology", "culture & arts", "entertainment", "politics", "women",
        "style & beauty", "healthy living",
    )
    assert not set(NEWS_CATEGORIES) & set(MOVIE_TAGS)  # what tells their files apart
    # The published instruction lists the same fifteen (in its own order).
    task = TASKS["LaMP-2N"]
    listed = task.user_template.input.split("categories: [")[1].split("]")[0].split(", ")
    assert sorted(listed) == sorted(NEWS_CATEGORIES)


@pytest.mark.parametrize("declared, outputs, expected", [
    ("LaMP_2", ["sports", "women"], "LaMP-2N"),  # the original LaMP-2's published files
    ("lamp_2", ["crime", "not a label"], "LaMP-2N"),
    ("LaMP_2", ["comedy", "sci-fi"], "LaMP-2"),
    ("LaMP_2", ["comedy", "sports"], "LaMP-2"),  # a movie tag: the name wins
    ("LaMP_2", [], "LaMP-2"),
    ("LaMP_2", ["neither"], "LaMP-2"),
    ("LaMP_2N", ["comedy"], "LaMP-2N"),  # our own spelling is never second-guessed
    ("LaMP_2_old", ["sports"], "LaMP-2N"),
    ("LaMP_4", ["sports"], "LaMP-4"),  # no other task is published as LaMP_4
])
def test_the_outputs_decide_only_a_name_two_tasks_were_published_under(declared, outputs,
                                                                        expected):
    assert task_of_file(declared, outputs) is TASKS[expected]


@pytest.mark.parametrize("spelling", [
    "LaMP-3", "LaMP_3", "lamp-3", "lamp_3", "LAMP-3", "LAMP_3", "lAmP_3", " LaMP_3 ", "\tlamp-3\n",
])
def test_both_spellings_in_any_case_find_the_same_task(spelling):
    assert get_task(spelling) is TASKS["LaMP-3"]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_task_is_found_by_its_file_name_and_its_name(name):
    task = TASKS[name]
    assert get_task(task.file_name) is task
    assert get_task(task.name.lower()) is task


@pytest.mark.parametrize("bad", [
    "LaMP-8", "LaMP_0", "LaMP3", "LaMP 3", "LaMP-03", "LaMP--3", "LaMP-3x", "xLaMP-3",
    "LaMP-", "LaMP", "3", "", "   ", "LaMP-３",  # the last one is a full-width digit
])
def test_unknown_names_are_rejected_with_every_valid_name(bad):
    with pytest.raises(LampError) as caught:
        get_task(bad)
    message = str(caught.value)
    assert repr(bad) in message
    for name in ALL_NAMES:
        assert name in message
    assert "\n" not in message


def test_task_arg_turns_an_unknown_name_into_an_argparse_error():
    assert task_arg("lamp_7") is TASKS["LaMP-7"]
    with pytest.raises(argparse.ArgumentTypeError, match="LaMP-1, LaMP-2"):
        task_arg("LaMP-8")

    parser = argparse.ArgumentParser()
    parser.add_argument("--task_name", type=task_arg)
    assert parser.parse_args(["--task_name", "LaMP_2"]).task_name is TASKS["LaMP-2"]
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["--task_name", "LaMP3"])
    assert exited.value.code == 2


def test_movie_tags_are_the_fifteen_of_issue_2_in_order():
    assert MOVIE_TAGS == (
        "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia",
        "dark comedy", "classic", "psychology", "fantasy", "romance", "thought-provoking",
        "social commentary", "violence", "true story",
    )
    assert len(set(MOVIE_TAGS)) == 15


# name: (kind, labels, metrics, selection metric, greater is better, profile fields)
EXPECTED = {
    "LaMP-1": (CLASSIFICATION, ("[1]", "[2]"), ("accuracy", "f1"), "accuracy", True,
               {"title", "abstract"}),
    "LaMP-2": (CLASSIFICATION, MOVIE_TAGS, ("accuracy", "f1"), "accuracy", True,
               {"description", "tag"}),
    "LaMP-3": (RATING, ("1", "2", "3", "4", "5"), ("MAE", "RMSE"), "MAE", False,
               {"text", "score"}),
    "LaMP-4": (GENERATION, None, ("rouge-1", "rouge-L"), "rouge-1", True, {"text", "title"}),
    "LaMP-5": (GENERATION, None, ("rouge-1", "rouge-L"), "rouge-1", True, {"title", "abstract"}),
    "LaMP-6": (GENERATION, None, ("rouge-1", "rouge-L"), "rouge-1", True, {"text", "title"}),
    "LaMP-7": (GENERATION, None, ("rouge-1", "rouge-L"), "rouge-1", True, {"text"}),
    "LaMP-2N": (CLASSIFICATION, NEWS_CATEGORIES, ("accuracy", "f1"), "accuracy", True,
                {"text", "title", "category"}),
}


@pytest.mark.parametrize("name", ALL_NAMES)
def test_each_task_matches_issue_2(name):
    kind, labels, metrics, selection, greater, fields = EXPECTED[name]
    task = TASKS[name]
    assert task.kind == kind
    assert task.labels == labels
    assert task.metrics == metrics
    assert task.selection_metric == selection
    assert task.selection_metric in task.metrics
    assert task.greater_is_better is greater
    assert set(task.profile_fields) == fields
    # id and date are common to all profiles and are not listed as task fields
    assert "id" not in task.profile_fields and "date" not in task.profile_fields
    # the retrieval corpus is built only from fields the profile has
    assert set(task.corpus_fields) <= fields


def test_tasks_are_immutable():
    with pytest.raises(AttributeError):
        TASKS["LaMP-1"].labels = ("x",)


# -- the registry is the one source of names and directions -------------------------------

def test_every_spelling_of_every_registered_task_resolves_and_nothing_else_does():
    from LaMP.utils.tasks import get_task

    for task in TASKS.values():
        for spelling in (task.name, task.file_name, task.name.upper(), task.file_name.lower(),
                         f"  {task.name} "):
            assert get_task(spelling) is task
    for wrong in ("LaMP-8", "LaMP 3", "lamp3", "LaMP-3x", "", "LaMP-", "3"):
        with pytest.raises(LampError) as error:
            get_task(wrong)
        # The message lists what the registry holds, whatever it holds.
        assert all(name in str(error.value) for name in TASK_NAMES)


@pytest.mark.parametrize("script", ["LaMP/rank_profiles.py", "LaMP/evaluate_llm.py",
                                    "LaMP/train_llm.py", "LaMP/train_user_peft.py",
                                    "eval/eval_task.py", "eval/compare.py",
                                    "LaMP/collect_feedback.py", "LaMP/train_retriever.py",
                                    "LaMP/train_selector.py"])
def test_every_scripts_task_help_names_every_registered_task(script):
    import subprocess
    import sys

    from conftest import REPO

    text = subprocess.run([sys.executable, script, "-h"], cwd=REPO, capture_output=True,
                          text=True, check=True, env={"PYTHONPATH": str(REPO),
                                                      "COLUMNS": "1000"}).stdout
    options = text.split("\n  -")  # one entry per option, its help included
    task_help = next(entry for entry in options if entry.startswith("-task"))
    assert all(name in task_help for name in TASK_NAMES), task_help


def test_metric_direction_has_one_source():
    from LaMP.utils.evaluation.metrics import Metric, metric_for
    from LaMP.utils.tasks import LOWER_IS_BETTER

    for task in TASKS.values():
        family = metric_for(task)
        assert isinstance(family, Metric)
        assert task.greater_is_better is (task.selection_metric not in family.lower_is_better)
        assert set(family.lower_is_better) == set(family.names) & set(LOWER_IS_BETTER)
    assert not TASKS["LaMP-3"].greater_is_better and TASKS["LaMP-7"].greater_is_better
