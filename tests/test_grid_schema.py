"""What a grid may contain (LaMP/utils/grid/schema.py): entries that would stand twice, names
that would break a folder name or a printed line, grids too large to plan."""
from __future__ import annotations

import pytest

from LaMP.utils.errors import LampError
from LaMP.utils.grid.schema import parse_grid

MAX_CELLS = 100_000  # the most cells a grid may plan
GOOD = {"tasks": ["LaMP-7"], "models": {"m": "some/model"}, "methods": {"zero_shot": {}}}


def refusal(**changes) -> str:
    with pytest.raises(LampError) as raised:
        parse_grid({**GOOD, **changes}, "g.yaml", "g")
    return str(raised.value)


@pytest.mark.parametrize("changes, message", [
    # both spellings of a task are one task: its rows would be printed twice
    ({"tasks": ["LaMP-3", "LaMP_3"]}, "g.yaml: tasks: 'LaMP_3' is listed twice (as 'LaMP-3')"),
    ({"tasks": ["LaMP-7", "LaMP-7"]}, "g.yaml: tasks: 'LaMP-7' is listed twice"),
    ({"splits": ["user", "time", "user"]}, "g.yaml: splits: 'user' is listed twice"),
    ({"k": [0, 1, 1]}, "g.yaml: k: 1 is listed twice"),
    ({"retrievers": ["bm25", "bm25"]}, "g.yaml: retrievers: 'bm25' is listed twice"),
    # two spellings of one task as keys: one task's flags would replace the other's
    ({"task_flags": {"LaMP-7": {"max_length": 64}, "LaMP_7": {"max_length": 128}}},
     "g.yaml: task_flags: 'LaMP_7' is listed twice (as 'LaMP-7')"),
    ({"reference": {"values": {"LaMP-7": {"rouge-1": {"none": 0.5}},
                               "LaMP_7": {"rouge-1": {"none": 0.4}}}}},
     "g.yaml: reference.values: 'LaMP_7' is listed twice (as 'LaMP-7')"),
])
def test_an_entry_listed_twice_is_refused(changes, message):
    assert refusal(**changes) == message


@pytest.mark.parametrize("changes, message", [
    # a trailing newline passed a `$`-anchored pattern; in --dry_run's "# cell ..." comment
    # it ends the comment and makes the rest of the name a command
    ({"name": "tiny\n"}, "g.yaml: name: 'tiny\\n' is not a name"),
    ({"methods": {"zs\n": {}}}, "g.yaml: methods: 'zs\\n' is not a name"),
    ({"models": {"m\n": "some/model"}}, "g.yaml: models: 'm\\n' is not a name"),
    ({"splits": ["user\n"]}, "g.yaml: splits: 'user\\n' is not a name"),
    ({"retrievers": {"bm25\n": {"ranker": "bm25"}}}, "g.yaml: retrievers: 'bm25\\n' is not"),
    ({"flags": {"model": {"max_length\n": 64}}}, "g.yaml: flags.model: 'max_length\\n' is not "
                                                 "a flag name"),
])
def test_a_name_with_a_trailing_newline_is_refused(changes, message):
    assert refusal(**changes).startswith(message)


def test_a_grid_file_named_with_a_newline_needs_a_name_key():
    with pytest.raises(LampError, match=r"^g\.yaml: name: 'g\\n' is not a name"):
        parse_grid(GOOD, "g.yaml", "g\n")
    assert parse_grid({**GOOD, "name": "g"}, "g.yaml", "g\n").name == "g"


def test_a_grid_of_more_cells_than_one_runner_plans_is_refused():
    side = 10  # 10 models x 10 methods x 10 retrievers x 101 k = 101,000 cells
    grid = {**GOOD, "models": {f"m{i}": "some/model" for i in range(side)},
            "methods": {f"x{i}": {} for i in range(side)},
            "retrievers": {f"r{i}": {"ranker": "bm25"} for i in range(side)},
            "k": list(range(MAX_CELLS // side ** 3 + 1))}
    with pytest.raises(LampError, match=r"^g\.yaml: grid: 101,000 cells \(tasks × splits × "
                                        r"models × methods × retrievers × k\) is more than the "
                                        r"100,000 one grid may plan"):
        parse_grid(grid, "g.yaml", "g")
    grid["k"] = grid["k"][:-1]  # 100,000: planned
    assert len(parse_grid(grid, "g.yaml", "g").k) == MAX_CELLS // side ** 3


@pytest.mark.parametrize("changes, message", [
    # not a list: a traceback, or each key (each letter) read as a rule
    ({"exclude": True}, "g.yaml: exclude: expected a list of rules ({axis: values}), found bool"),
    ({"exclude": 3}, "g.yaml: exclude: expected a list of rules ({axis: values}), found int"),
    ({"exclude": {"k": 1}},
     "g.yaml: exclude: expected a list of rules ({axis: values}), found dict"),
    ({"exclude": "k"}, "g.yaml: exclude: expected a list of rules ({axis: values}), found str"),
    # a list of retriever names holding a mapping: a traceback
    ({"retrievers": ["bm25", {"ranker": "bm25"}]},
     "g.yaml: retrievers: {'ranker': 'bm25'} is not a name (letters, digits, '_' and '-')"),
    # YAML's true is a Python int: a subset of one question, one resample
    ({"subset": {"count": True}}, "g.yaml: subset.count: True is not a whole number >= 0"),
    ({"subset": {"count": 5, "seed": False}},
     "g.yaml: subset.seed: False is not a whole number >= 0"),
    ({"bootstrap": {"samples": True}},
     "g.yaml: bootstrap.samples: True is not a whole number in 1 … 100,000"),
    # accepted on load, these failed (or ran for ever) only when --collect resampled, after
    # the whole grid had run
    ({"bootstrap": {"seed": "x"}},
     "g.yaml: bootstrap.seed: 'x' is not a whole number in 0 … 4,294,967,295"),
    ({"bootstrap": {"seed": -1}},
     "g.yaml: bootstrap.seed: -1 is not a whole number in 0 … 4,294,967,295"),
    ({"bootstrap": {"samples": 10**9}},
     "g.yaml: bootstrap.samples: 1000000000 is not a whole number in 1 … 100,000"),
    # a mapping given as a list or a number was silently an empty one
    ({"flags": []}, "g.yaml: flags: expected a mapping, found list"),
    ({"task_flags": 0}, "g.yaml: task_flags: expected a mapping, found int"),
    ({"baseline": []}, "g.yaml: baseline: expected a mapping, found list"),
    ({"bootstrap": False}, "g.yaml: bootstrap: expected a mapping, found bool"),
])
def test_a_key_of_the_wrong_kind_is_one_error_naming_it(changes, message):
    assert refusal(**changes) == message


def test_a_key_written_alone_is_its_default():
    keys = ("subset", "flags", "task_flags", "exclude", "baseline", "bootstrap", "reference")
    grid = parse_grid({**GOOD, **dict.fromkeys(keys)}, "g.yaml", "g")  # `key:` is null
    assert grid.subset is None and grid.reference is None
    assert grid.task_flags == {} and grid.exclude == [] and grid.baseline == {}
    assert set(grid.flags) >= {"rank", "model", "score"} and not any(grid.flags.values())
    assert grid.bootstrap == {"samples": 1000, "seed": 0, "alpha": 0.05}
