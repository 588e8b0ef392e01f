"""A grid file (YAML): what it may contain, validated on load with errors that name the key.

A grid is a set of axes whose product, minus ``exclude`` rules, is the set of cells:

    tasks × splits × models × methods × retrievers × k

plus the stage flags, an optional subset of the evaluated questions, the baseline column of
the significance test and reference numbers from a paper. docs/grids.md documents every
key; ``load_grid`` refuses anything else.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from LaMP.utils.errors import LampError
from LaMP.utils.retrieval import RANKERS
from LaMP.utils.tasks import Task, get_task

# The method stages: zero-shot runs evaluate_llm.py, a fine-tuning method train_llm.py.
METHOD_STAGES = ("evaluate", "train")
# Stage flag groups: "model" goes to both evaluate and train (prompt budget, generation).
FLAG_GROUPS = ("subset", "rank", "merge", "model", "evaluate", "train", "score")
NO_RETRIEVER = "none"  # k = 0: the bare input; no ranking, one cell shared by all retrievers
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

TOP_KEYS = ("name", "description", "data_root", "layout", "tasks", "splits", "eval_set",
            "train_set", "subset", "models", "methods", "retrievers", "k", "flags",
            "task_flags", "exclude", "baseline", "bootstrap", "reference")
AXES = ("task", "split", "model", "method", "retriever", "k")


@dataclass(frozen=True)
class Method:
    name: str
    stage: str  # "evaluate" or "train"
    flags: dict
    # Flags of this method's score stage (eval_task.py), over flags.score: a scoring variant
    # (the official ROUGE aggregation) is a column of its own that shares the predictions.
    score_flags: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Retriever:
    name: str
    ranker: str | None  # None for NO_RETRIEVER
    flags: dict


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


def parse_grid(document: Any, source: str, default_name: str) -> Grid:
    """Validate a decoded grid document; every problem is a LampError naming its key."""
    top = _mapping(source, "grid", document, TOP_KEYS)
    for required in ("tasks", "models", "methods"):
        if required not in top:
            _fail(source, required, "required key is missing")
    name = _name(source, "name", top.get("name", default_name))
    task_names = _once(source, "tasks", _names(source, "tasks", top["tasks"]),
                       lambda value: _task(source, "tasks", value).name)
    tasks = [_task(source, "tasks", value) for value in task_names]
    splits = _once(source, "splits", [_name(source, "splits", value) for value in
                                      _names(source, "splits", top.get("splits", ["user"]))])
    layout = dict(DEFAULT_LAYOUT)
    layout.update(_mapping(source, "layout", top.get("layout", {}), tuple(DEFAULT_LAYOUT)))
    for kind, pattern in layout.items():
        try:
            pattern.format(split="s", task="t", set="x")
        except (KeyError, IndexError, ValueError, AttributeError):
            _fail(source, f"layout.{kind}", f"{pattern!r} may use only {{split}}, {{task}} "
                                            "and {set}")

    models = {}
    for model, spec in _mapping(source, "models", top["models"]).items():
        key = f"models.{model}"
        _name(source, "models", model)
        if isinstance(spec, dict):
            spec = _mapping(source, key, spec, ("path",)).get("path")
        if not isinstance(spec, str) or not spec:
            _fail(source, key, "expected a model name or folder (or {path: ...})")
        models[model] = spec

    methods = {}
    for method, spec in _mapping(source, "methods", top["methods"]).items():
        key = f"methods.{method}"
        _name(source, "methods", method)
        spec = {} if spec is None else _mapping(source, key, spec,
                                                ("stage", "flags", "score_flags"))
        stage = spec.get("stage", "evaluate")
        if stage not in METHOD_STAGES:
            _fail(source, f"{key}.stage", f"{stage!r} is not one of {', '.join(METHOD_STAGES)}")
        methods[method] = Method(method, stage, _flags(source, f"{key}.flags", spec.get("flags")),
                                 _flags(source, f"{key}.score_flags", spec.get("score_flags")))

    raw_retrievers = top.get("retrievers", [NO_RETRIEVER])
    if isinstance(raw_retrievers, (list, str)):
        raw_retrievers = {name: None for name in _once(source, "retrievers", _names(
            source, "retrievers", raw_retrievers), str)}
    retrievers = {}
    for retriever, spec in _mapping(source, "retrievers", raw_retrievers).items():
        key = f"retrievers.{retriever}"
        _name(source, "retrievers", retriever)
        spec = {} if spec is None else _mapping(source, key, spec, ("ranker", "flags"))
        ranker = spec.get("ranker", retriever)
        if retriever == NO_RETRIEVER:
            ranker = None
        elif ranker not in RANKERS:
            _fail(source, f"{key}.ranker", f"{ranker!r} is not one of {', '.join(RANKERS)} "
                                           f"(or the retriever {NO_RETRIEVER!r})")
        retrievers[retriever] = Retriever(retriever, ranker,
                                          _flags(source, f"{key}.flags", spec.get("flags")))

    k_values = _names(source, "k", top.get("k", [0]))
    for value in k_values:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            _fail(source, "k", f"{value!r} is not a whole number >= 0")
    _once(source, "k", k_values)
    cells = math.prod(map(len, (tasks, splits, models, methods, retrievers, k_values)))
    if cells > MAX_CELLS:
        _fail(source, "grid", f"{cells:,} cells (tasks × splits × models × methods × "
                              f"retrievers × k) is more than the {MAX_CELLS:,} one grid may "
                              "plan; split it into several grids")

    flags = {group: {} for group in FLAG_GROUPS}
    for group, value in _mapping(source, "flags", top.get("flags", {}) or {}, FLAG_GROUPS).items():
        flags[group] = _flags(source, f"flags.{group}", value)
    task_flags = {}
    raw_task_flags = _mapping(source, "task_flags", top.get("task_flags", {}) or {})
    _once(source, "task_flags", list(raw_task_flags),
          lambda value: _task(source, "task_flags", value).name)
    for task_name, value in raw_task_flags.items():
        task_flags[_task(source, "task_flags", task_name).name] = \
            _flags(source, f"task_flags.{task_name}", value)

    subset = top.get("subset")
    if subset is not None:
        subset = _mapping(source, "subset", subset, ("seed", "skip", "count"))
        if "count" not in subset:
            _fail(source, "subset.count", "required key is missing")
        for key in ("seed", "skip", "count"):
            if key in subset and (not isinstance(subset[key], int) or subset[key] < 0):
                _fail(source, f"subset.{key}", f"{subset[key]!r} is not a whole number >= 0")

    axis_values = {"task": [task.name for task in tasks], "split": splits,
                   "model": list(models), "method": list(methods),
                   "retriever": list(retrievers) + [NO_RETRIEVER], "k": k_values}
    exclude = []
    for index, rule in enumerate(top.get("exclude", []) or []):
        key = f"exclude[{index}]"
        rule = dict(_mapping(source, key, rule, AXES))
        for axis, values in rule.items():
            values = values if isinstance(values, list) else [values]
            if axis == "task":
                values = [_task(source, f"{key}.task", value).name for value in values]
            unknown = [value for value in values if value not in axis_values[axis]]
            if unknown:
                _fail(source, f"{key}.{axis}", f"{unknown[0]!r} is not in the grid's {axis} "
                                               "values")
            rule[axis] = values
        exclude.append(rule)

    baseline = dict(_mapping(source, "baseline", top.get("baseline", {}) or {},
                             ("model", "method", "retriever", "k")))
    for axis, value in baseline.items():
        if value not in axis_values[axis]:
            _fail(source, f"baseline.{axis}", f"{value!r} is not in the grid's {axis} values")

    bootstrap = dict(DEFAULT_BOOTSTRAP)
    bootstrap.update(_mapping(source, "bootstrap", top.get("bootstrap", {}) or {},
                              tuple(DEFAULT_BOOTSTRAP)))
    if not isinstance(bootstrap["samples"], int) or bootstrap["samples"] < 1:
        _fail(source, "bootstrap.samples", "expected a whole number >= 1")
    if not isinstance(bootstrap["alpha"], (int, float)) or not 0 < bootstrap["alpha"] < 1:
        _fail(source, "bootstrap.alpha", "expected a number between 0 and 1")

    reference = top.get("reference")
    if reference is not None:
        reference = _mapping(source, "reference", reference, ("source", "values"))
        values = {}
        raw_values = _mapping(source, "reference.values", reference.get("values", {}))
        _once(source, "reference.values", list(raw_values),
              lambda value: _task(source, "reference.values", value).name)
        for task_name, metrics in raw_values.items():
            task = _task(source, "reference.values", task_name)
            key = f"reference.values.{task_name}"
            values[task.name] = {}
            for metric, columns in _mapping(source, key, metrics, task.metrics).items():
                columns = _mapping(source, f"{key}.{metric}", columns)
                for column, number in columns.items():
                    if not isinstance(number, (int, float)) or isinstance(number, bool):
                        _fail(source, f"{key}.{metric}.{column}", f"{number!r} is not a number")
                values[task.name][metric] = {str(column): float(number)
                                             for column, number in columns.items()}
        reference = {"source": str(reference.get("source", "reference")), "values": values}

    for key in ("eval_set", "train_set"):
        if key in top:
            _name(source, key, top[key])
    data_root = top.get("data_root")
    if data_root is not None and not isinstance(data_root, str):
        _fail(source, "data_root", "expected a folder name")
    grid = Grid(name=name, source=source, data_root=data_root, layout=layout, tasks=tasks,
                splits=splits, eval_set=top.get("eval_set", "dev"),
                train_set=top.get("train_set", "train"), subset=subset, models=models,
                methods=methods, retrievers=retrievers, k=k_values, flags=flags,
                task_flags=task_flags, exclude=exclude, baseline=baseline, bootstrap=bootstrap,
                reference=reference, description=str(top.get("description", "")))
    # The table's columns are named by the axes the grid varies (a retriever with k = 0 is
    # "none", so the retriever axis varies as soon as k does).
    declared = {"model": len(models), "method": len(methods),
                "retriever": len(retrievers) + (0 in k_values and NO_RETRIEVER not in retrievers
                                               and len(k_values) > 1),
                "k": len(k_values)}
    grid.varying = tuple(axis for axis in ("model", "method", "retriever", "k")
                         if declared[axis] > 1) or ("method",)
    return grid


def load_grid(path: str | Path) -> Grid:
    """Read and validate a grid file (YAML; see ``LaMP.utils.grid.loader`` for what the
    reading itself refuses)."""
    from LaMP.utils.data.fileio import check_readable
    from LaMP.utils.grid.loader import read_yaml

    path = check_readable(path, "--grid")
    return parse_grid(read_yaml(path), str(path), path.stem)
