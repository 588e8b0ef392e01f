"""A grid file (YAML): what it may contain, validated on load with errors that name the key.

A grid is a set of axes whose product, minus ``exclude`` rules, is the set of cells:

    tasks × splits × models × methods × retrievers × k

plus the stage flags, an optional subset of the evaluated questions, the baseline column of
the significance test and reference numbers from a paper. docs/grids.md documents every
key; ``load_grid`` refuses anything else.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from LaMP.utils.cli.arguments import MAX_BOOTSTRAP
from LaMP.utils.errors import LampError
from LaMP.utils.grid.stages import NO_RETRIEVER, TRAINED_RANKERS, flag_groups, method_stages
from LaMP.utils.retrieval import RANKERS
from LaMP.utils.seeds import MAX_SEED
from LaMP.utils.tasks import Task, get_task

# Where a task's files sit under --data_root: download_data.py's raw_data layout.
DEFAULT_LAYOUT = {"questions": "{split}/{task}/{set}_questions.json",
                  "outputs": "{split}/{task}/{set}_outputs.json"}
# Matched whole (fullmatch: "$" would let a trailing newline through, and a name with a
# newline would break the comment lines of --dry_run): names become folder names and labels.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
FLAG = re.compile(r"[a-z][a-z0-9_]*")
# Every cell is planned (its stages hashed) before anything runs; past this a grid is a
# typo or a bomb (six axes of a few dozen values), not an experiment one runner plans.
MAX_CELLS = 100_000
DEFAULT_BOOTSTRAP = {"samples": 1000, "seed": 0, "alpha": 0.05}  # compare.py's defaults

# The rankers a grid retriever may name: rank_profiles.py's and those the grid trains.
GRID_RANKERS = (*RANKERS, *TRAINED_RANKERS)
SELECTOR_RANKERS = tuple(name for name, trained in TRAINED_RANKERS.items()
                         if trained.ranker == "rspg")

AXES = ("task", "split", "model", "method", "retriever", "k")


@dataclass(frozen=True)
class Method:
    name: str
    stage: str  # a stage a method may name (stages.method_stages: evaluate, train)
    flags: dict
    # Flags of this method's score stage (eval_task.py), over flags.score: a scoring variant
    # (the official ROUGE aggregation) is a column of its own that shares the predictions.
    score_flags: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Retriever:
    name: str
    ranker: str | None  # None for NO_RETRIEVER
    flags: dict
    # A selector's (rspg_pre/rspg_post) candidate retrievers, other retrievers of the grid.
    candidates: tuple[str, ...] = ()


@dataclass
class Grid:
    name: str
    source: str
    data_root: str | None
    layout: dict
    tasks: list[Task]
    splits: list[str]
    eval_set: str
    train_set: str
    subset: dict | None
    models: dict[str, str]
    methods: dict[str, Method]
    retrievers: dict[str, Retriever]
    k: list[int]
    flags: dict[str, dict]
    task_flags: dict[str, dict]
    exclude: list[dict]
    baseline: dict
    bootstrap: dict
    reference: dict | None
    description: str = ""
    varying: tuple[str, ...] = field(default=())  # axes of the table's columns


def _fail(source: str, key: str, message: str):
    raise LampError(f"{source}: {key}: {message}")


def _mapping(source, key, value, allowed=None) -> dict:
    if not isinstance(value, dict):
        _fail(source, key, f"expected a mapping, found {type(value).__name__}")
    if allowed is not None:
        unknown = sorted(str(name) for name in value if name not in allowed)
        if unknown:
            _fail(source, key, f"unknown key {unknown[0]!r} (valid: {', '.join(allowed)})")
    return value


def _names(source, key, value) -> list:
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value:
        _fail(source, key, "expected a non-empty list")
    return value


def _name(source, key, value) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        _fail(source, key, f"{value!r} is not a name (letters, digits, '_' and '-')")
    return value


def _flags(source, key, value) -> dict:
    """Stage flags as written in YAML: ``{flag_name: value}``, without the leading ``--``."""
    if value is None:
        return {}
    _mapping(source, key, value)
    for name, flag_value in value.items():
        if not isinstance(name, str) or not FLAG.fullmatch(name):
            _fail(source, key, f"{name!r} is not a flag name (write num_retrieved, not "
                               "--num_retrieved)")
        values = flag_value if isinstance(flag_value, list) else [flag_value]
        for item in values:
            if item is not None and not isinstance(item, (str, int, float, bool)):
                _fail(source, f"{key}.{name}", f"expected a number, a string, true/false or "
                                               f"a list of them, found {type(item).__name__}")
    return dict(value)


def _task(source, key, value) -> Task:
    try:
        return get_task(str(value))
    except LampError as error:
        _fail(source, key, str(error))


def _once(source, key, values: list, same=lambda value: value) -> list:
    """``values`` where no two are the same (``same`` says what a value stands for: both
    spellings of a task are one task); a repeat would run or print the same cells twice, or
    let one entry silently replace another."""
    seen = {}
    for value in values:
        meaning = same(value)
        if meaning in seen:
            also = "" if seen[meaning] == value else f" (as {seen[meaning]!r})"
            _fail(source, key, f"{value!r} is listed twice{also}")
        seen[meaning] = value
    return values


# -- one parser per top-level key ---------------------------------------------------------
# Each takes the key's value (MISSING where the grid leaves the key out) and the grid as
# parsed so far (``_Draft``: the keys before it in ``PARSERS``), and returns what ``Grid``
# holds for the key; a problem is a LampError naming the key.
MISSING = object()


class _Draft(SimpleNamespace):
    """The grid being parsed: ``source``, ``default_name`` and every key parsed so far."""


def _given(value, default):
    """``value``, or ``default`` where the key is left out or null (``key:`` alone)."""
    return default if value is MISSING or value is None else value


def _whole(source: str, key: str, value, lowest: int = 0, highest: int | None = None) -> int:
    """``value`` if it is a whole number in ``lowest`` … ``highest`` (true/false are not
    numbers, though YAML's booleans are Python ints)."""
    if (not isinstance(value, int) or isinstance(value, bool) or value < lowest
            or (highest is not None and value > highest)):
        within = f">= {lowest}" if highest is None else f"in {lowest} … {highest:,}"
        _fail(source, key, f"{value!r} is not a whole number {within}")
    return value


def _required(draft: _Draft, key: str, value):
    if value is MISSING:
        _fail(draft.source, key, "required key is missing")
    return value


def _parse_name(value, draft: _Draft) -> str:
    return _name(draft.source, "name", draft.default_name if value is MISSING else value)


def _parse_description(value, draft: _Draft) -> str:
    return "" if value is MISSING else str(value)


def _parse_data_root(value, draft: _Draft) -> str | None:
    if value is MISSING or value is None:
        return None
    if not isinstance(value, str):
        _fail(draft.source, "data_root", "expected a folder name")
    return value


def _parse_layout(value, draft: _Draft) -> dict:
    layout = dict(DEFAULT_LAYOUT)
    layout.update(_mapping(draft.source, "layout", {} if value is MISSING else value,
                           tuple(DEFAULT_LAYOUT)))
    for kind, pattern in layout.items():
        try:
            pattern.format(split="s", task="t", set="x")
        except (KeyError, IndexError, ValueError, AttributeError):
            _fail(draft.source, f"layout.{kind}", f"{pattern!r} may use only {{split}}, "
                                                  "{task} and {set}")
    return layout


def _parse_tasks(value, draft: _Draft) -> list[Task]:
    source = draft.source
    names = _once(source, "tasks", _names(source, "tasks", _required(draft, "tasks", value)),
                  lambda name: _task(source, "tasks", name).name)
    return [_task(source, "tasks", name) for name in names]


def _parse_splits(value, draft: _Draft) -> list[str]:
    source = draft.source
    return _once(source, "splits", [_name(source, "splits", split) for split in
                                    _names(source, "splits", ["user"] if value is MISSING
                                           else value)])


def _set_name(key: str, default: str):
    def parse(value, draft: _Draft) -> str:
        return default if value is MISSING else _name(draft.source, key, value)
    return parse


def _parse_subset(value, draft: _Draft) -> dict | None:
    if value is MISSING or value is None:
        return None
    subset = _mapping(draft.source, "subset", value, ("seed", "skip", "count"))
    if "count" not in subset:
        _fail(draft.source, "subset.count", "required key is missing")
    for key in ("seed", "skip", "count"):
        if key in subset:
            _whole(draft.source, f"subset.{key}", subset[key])
    return subset


def _parse_models(value, draft: _Draft) -> dict[str, str]:
    source, models = draft.source, {}
    for model, spec in _mapping(source, "models", _required(draft, "models", value)).items():
        key = f"models.{model}"
        _name(source, "models", model)
        if isinstance(spec, dict):
            spec = _mapping(source, key, spec, ("path",)).get("path")
        if not isinstance(spec, str) or not spec:
            _fail(source, key, "expected a model name or folder (or {path: ...})")
        models[model] = spec
    return models


def _parse_methods(value, draft: _Draft) -> dict[str, Method]:
    source, methods = draft.source, {}
    for method, spec in _mapping(source, "methods", _required(draft, "methods", value)).items():
        key = f"methods.{method}"
        _name(source, "methods", method)
        spec = {} if spec is None else _mapping(source, key, spec,
                                                ("stage", "flags", "score_flags"))
        stage = spec.get("stage", method_stages()[0])
        if stage not in method_stages():
            _fail(source, f"{key}.stage", f"{stage!r} is not one of {', '.join(method_stages())}")
        methods[method] = Method(method, stage, _flags(source, f"{key}.flags", spec.get("flags")),
                                 _flags(source, f"{key}.score_flags", spec.get("score_flags")))
    return methods


def _parse_retrievers(value, draft: _Draft) -> dict[str, Retriever]:
    source = draft.source
    if value is MISSING:
        value = [NO_RETRIEVER]
    if isinstance(value, (list, str)):  # names only: each with its ranker of that name
        names = [_name(source, "retrievers", name) for name in _names(source, "retrievers", value)]
        value = dict.fromkeys(_once(source, "retrievers", names))
    retrievers = {}
    for retriever, spec in _mapping(source, "retrievers", value).items():
        key = f"retrievers.{retriever}"
        _name(source, "retrievers", retriever)
        spec = {} if spec is None else _mapping(source, key, spec,
                                                ("ranker", "flags", "candidates"))
        ranker = spec.get("ranker", retriever)
        if retriever == NO_RETRIEVER:
            ranker = None
        elif ranker not in GRID_RANKERS:
            _fail(source, f"{key}.ranker", f"{ranker!r} is not one of {', '.join(GRID_RANKERS)} "
                                           f"(or the retriever {NO_RETRIEVER!r})")
        retrievers[retriever] = Retriever(retriever, ranker,
                                          _flags(source, f"{key}.flags", spec.get("flags")),
                                          spec.get("candidates", MISSING))
    return {name: _with_candidates(source, retriever, retrievers)
            for name, retriever in retrievers.items()}


def _selects(retriever: Retriever) -> bool:
    """Whether the retriever picks among others (a selector's ranking): never a candidate."""
    trained = TRAINED_RANKERS.get(retriever.ranker)
    return retriever.ranker == "rspg" or (trained is not None and trained.ranker == "rspg")


def _with_candidates(source: str, retriever: Retriever, retrievers: dict) -> Retriever:
    """A trained selector's candidates (default: every retriever of the grid that ranks and
    is no selector); anything else has none."""
    key, given = f"retrievers.{retriever.name}.candidates", retriever.candidates
    trained = TRAINED_RANKERS.get(retriever.ranker)
    if trained is None or trained.ranker != "rspg":
        if given is not MISSING:
            _fail(source, key, f"only a selector ({', '.join(SELECTOR_RANKERS)}) has candidates")
        return dataclasses.replace(retriever, candidates=())
    able = [name for name, other in retrievers.items()
            if other.ranker is not None and not _selects(other)]
    if given is MISSING:
        names = able
    else:
        names = _once(source, key, [_name(source, key, name) for name in
                                    _names(source, key, given)])
        for name in names:
            if name not in able:
                _fail(source, key, f"{name!r} is not a retriever of the grid that ranks and "
                                   f"selects none (valid: {', '.join(able) or 'none'})")
    if len(names) < 2:  # train_selector.py's rule, checked here to name the key
        _fail(source, key, f"a selector chooses among two or more retrievers of the grid "
                           f"that rank and select none (found: {', '.join(names) or 'none'})")
    return dataclasses.replace(retriever, candidates=tuple(names))


def _parse_k(value, draft: _Draft) -> list[int]:
    k_values = _names(draft.source, "k", [0] if value is MISSING else value)
    for k in k_values:
        _whole(draft.source, "k", k)
    return _once(draft.source, "k", k_values)


def _parse_flags(value, draft: _Draft) -> dict[str, dict]:
    source, groups = draft.source, flag_groups()
    flags = {group: {} for group in groups}
    for group, group_flags in _mapping(source, "flags", _given(value, {}), groups).items():
        flags[group] = _flags(source, f"flags.{group}", group_flags)
    return flags


def _parse_task_flags(value, draft: _Draft) -> dict[str, dict]:
    source = draft.source
    given = _mapping(source, "task_flags", _given(value, {}))
    _once(source, "task_flags", list(given), lambda name: _task(source, "task_flags", name).name)
    return {_task(source, "task_flags", name).name: _flags(source, f"task_flags.{name}", flags)
            for name, flags in given.items()}


def _axis_values(draft: _Draft) -> dict[str, list]:
    """Every value of each axis the grid has, for ``exclude`` and ``baseline``."""
    return {"task": [task.name for task in draft.tasks], "split": draft.splits,
            "model": list(draft.models), "method": list(draft.methods),
            "retriever": list(draft.retrievers) + [NO_RETRIEVER], "k": draft.k}


def _parse_exclude(value, draft: _Draft) -> list[dict]:
    source, axis_values, exclude = draft.source, _axis_values(draft), []
    rules = _given(value, [])
    if not isinstance(rules, list):
        _fail(source, "exclude", f"expected a list of rules ({{axis: values}}), found "
                                 f"{type(rules).__name__}")
    for index, rule in enumerate(rules):
        key = f"exclude[{index}]"
        rule = dict(_mapping(source, key, rule, AXES))
        for axis, values in rule.items():
            values = values if isinstance(values, list) else [values]
            if axis == "task":
                values = [_task(source, f"{key}.task", task).name for task in values]
            unknown = [item for item in values if item not in axis_values[axis]]
            if unknown:
                _fail(source, f"{key}.{axis}", f"{unknown[0]!r} is not in the grid's {axis} "
                                               "values")
            rule[axis] = values
        exclude.append(rule)
    return exclude


def _parse_baseline(value, draft: _Draft) -> dict:
    axis_values = _axis_values(draft)
    baseline = dict(_mapping(draft.source, "baseline", _given(value, {}),
                             ("model", "method", "retriever", "k")))
    for axis, axis_value in baseline.items():
        if axis_value not in axis_values[axis]:
            _fail(draft.source, f"baseline.{axis}", f"{axis_value!r} is not in the grid's "
                                                    f"{axis} values")
    return baseline


def _parse_bootstrap(value, draft: _Draft) -> dict:
    bootstrap = dict(DEFAULT_BOOTSTRAP)
    bootstrap.update(_mapping(draft.source, "bootstrap", _given(value, {}),
                              tuple(DEFAULT_BOOTSTRAP)))
    # Resampled for every column pair of every task: compare.py's bound (past it a typo
    # would make --collect run for ever).
    _whole(draft.source, "bootstrap.samples", bootstrap["samples"], 1, MAX_BOOTSTRAP)
    _whole(draft.source, "bootstrap.seed", bootstrap["seed"], 0, MAX_SEED)
    if not isinstance(bootstrap["alpha"], (int, float)) or not 0 < bootstrap["alpha"] < 1:
        _fail(draft.source, "bootstrap.alpha", "expected a number between 0 and 1")
    return bootstrap


def _parse_reference(value, draft: _Draft) -> dict | None:
    if value is MISSING or value is None:
        return None
    source = draft.source
    reference = _mapping(source, "reference", value, ("source", "values"))
    given = _mapping(source, "reference.values", reference.get("values", {}))
    _once(source, "reference.values", list(given),
          lambda name: _task(source, "reference.values", name).name)
    values = {}
    for task_name, metrics in given.items():
        task = _task(source, "reference.values", task_name)
        values[task.name] = _reference_numbers(source, f"reference.values.{task_name}", task,
                                               metrics)
    return {"source": str(reference.get("source", "reference")), "values": values}


def _reference_numbers(source: str, key: str, task: Task, metrics) -> dict:
    """``{metric: {column: number}}`` of one task's reference numbers."""
    numbers = {}
    for metric, columns in _mapping(source, key, metrics, task.metrics).items():
        columns = _mapping(source, f"{key}.{metric}", columns)
        for column, number in columns.items():
            if not isinstance(number, (int, float)) or isinstance(number, bool):
                _fail(source, f"{key}.{metric}.{column}", f"{number!r} is not a number")
        numbers[metric] = {str(column): float(number) for column, number in columns.items()}
    return numbers


# The parsers in the order they run: a parser may read the keys above it (exclude and
# baseline, the axes). The order is also the one a grid's keys are listed in.
PARSERS = {
    "name": _parse_name, "description": _parse_description, "data_root": _parse_data_root,
    "layout": _parse_layout, "tasks": _parse_tasks, "splits": _parse_splits,
    "eval_set": _set_name("eval_set", "dev"), "train_set": _set_name("train_set", "train"),
    "subset": _parse_subset, "models": _parse_models, "methods": _parse_methods,
    "retrievers": _parse_retrievers, "k": _parse_k, "flags": _parse_flags,
    "task_flags": _parse_task_flags, "exclude": _parse_exclude, "baseline": _parse_baseline,
    "bootstrap": _parse_bootstrap, "reference": _parse_reference,
}
TOP_KEYS = tuple(PARSERS)


def parse_grid(document: Any, source: str, default_name: str) -> Grid:
    """Validate a decoded grid document; every problem is a LampError naming its key."""
    top = _mapping(source, "grid", document, TOP_KEYS)
    draft = _Draft(source=source, default_name=default_name)
    for key, parse in PARSERS.items():
        setattr(draft, key, parse(top.get(key, MISSING), draft))
    cells = math.prod(len(getattr(draft, key)) for key in
                      ("tasks", "splits", "models", "methods", "retrievers", "k"))
    if cells > MAX_CELLS:
        _fail(source, "grid", f"{cells:,} cells (tasks × splits × models × methods × "
                              f"retrievers × k) is more than the {MAX_CELLS:,} one grid may "
                              "plan; split it into several grids")
    grid = Grid(source=source, **{key: getattr(draft, key) for key in TOP_KEYS})
    grid.varying = _varying(grid)
    return grid


def _varying(grid: Grid) -> tuple[str, ...]:
    """The axes the table's columns are named by: those the grid varies (a retriever with
    k = 0 is "none", so the retriever axis varies as soon as k does)."""
    declared = {"model": len(grid.models), "method": len(grid.methods),
                "retriever": len(grid.retrievers) + (0 in grid.k and len(grid.k) > 1
                                                     and NO_RETRIEVER not in grid.retrievers),
                "k": len(grid.k)}
    return tuple(axis for axis in ("model", "method", "retriever", "k")
                 if declared[axis] > 1) or ("method",)


def load_grid(path: str | Path) -> Grid:
    """Read and validate a grid file (YAML; see ``LaMP.utils.grid.loader`` for what the
    reading itself refuses)."""
    from LaMP.utils.data.fileio import check_readable
    from LaMP.utils.grid.loader import read_yaml

    path = check_readable(path, "--grid")
    return parse_grid(read_yaml(path), str(path), path.stem)
