"""The stages a grid cell runs, one row each in ``STAGES``, and how each builds its argv.

A row says which script the stage runs, what a complete run has written, whether it runs
under ``--launcher``, whether a grid method may name it (``methods.<name>.stage``), which
groups of the grid's ``flags`` it takes, whether a killed run resumes from its checkpoint,
and how its argv is built. The argv is plain strings and three kinds of path token: ``Raw``
(a file the user gave: data or a model), ``Ref`` (a file another stage run writes) and
``Out`` (a file this run writes); the planner hashes it into the run's key.

A builder takes a ``Request`` (one cell, one question set) and returns the stage's argv, or
None where the cell has no such stage (no ``subset`` without a subset, no ``rank`` for k = 0).
It asks for the runs it reads with ``request.run(stage)``, which plans them in turn, so a
cell is planned by asking for its score and the stages follow their inputs. Adding a stage:
its builder and one row; the stage that reads its output asks for it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

NO_RETRIEVER = "none"  # k = 0: the bare input; no ranking, one cell shared by all retrievers


@dataclass(frozen=True)
class Raw:
    path: str
    prefix: str = ""  # text before the path in the token (``contriever=<folder>``)


@dataclass(frozen=True)
class Out:
    name: str  # a file in the run's folder; "." is the folder itself


@dataclass(frozen=True, eq=False)
class Ref:
    run: "StageRun"
    name: str
    prefix: str = ""  # text before the path in the token (``contriever=<folder>``)


@dataclass(eq=False)
class StageRun:
    stage: "Stage"
    argv: tuple
    key: str = ""

    @property
    def folder_name(self) -> str:
        return f"{self.stage.name}-{self.key}"

    def output(self, name: str, prefix: str = "") -> Ref:
        return Ref(self, name, prefix)


def flag_argv(flags: dict) -> list:
    """``{name: value}`` as command-line tokens: true is a bare flag, false/null leave it out,
    a list gives several values; a ``local:`` model is a raw input (it counts in the key)."""
    argv: list = []
    for name, value in flags.items():
        if value is False or value is None:
            continue
        argv.append(f"--{name}")
        if value is True:
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, (Raw, Ref)):  # a path a builder put among the flags
                argv.append(item)
            elif isinstance(item, str) and item.startswith("local:"):
                argv.append(Raw(item))
            else:
                argv.append(str(item))
    return argv


def merged_flags(*groups: dict) -> dict:
    """Later groups override earlier ones, flag by flag."""
    result: dict = {}
    for group in groups:
        result.update(group)
    return result


@dataclass
class Request:
    """What a stage run is planned for: one cell (its axes) on one question set.

    ``planner`` plans the runs (``plan.Planner``): ``grid``, ``limit`` (the runner's
    ``--limit``), ``data_file(kind, split, task, set_name)`` and ``planned(stage, request)``.
    """

    planner: object
    axes: dict  # task, split, model, method, retriever, k
    set_name: str  # the grid's eval_set or train_set
    subset: dict | None  # the grid's subset of this set's questions, if any
    _runs: dict = field(default_factory=dict, repr=False)  # stage name -> planned run

    @property
    def grid(self):
        return self.planner.grid

    @property
    def method(self):
        return self.grid.methods[self.axes["method"]]

    def run(self, stage: str) -> StageRun | None:
        """The run of ``stage`` this request reads (planned once), or None if it has none."""
        if stage not in self._runs:
            self._runs[stage] = self.planner.planned(stage, self)
        return self._runs[stage]

    @property
    def retriever(self):
        return self.grid.retrievers.get(self.axes["retriever"])

    def on(self, set_name: str, subset: dict | None, **axes) -> "Request":
        """The same cell (but for ``axes``) on another question set."""
        return Request(self.planner, {**self.axes, **axes}, set_name, subset)

    def training(self, **axes) -> "Request":
        """The cell on the grid's training set, under the grid's subset: the questions the
        feedback stages learn from (a retriever and a selector are trained per cell)."""
        return self.on(self.grid.train_set, self.grid.subset, **axes)

    def data_file(self, kind: str) -> Raw:
        """This set's ``questions`` or ``outputs`` file under the grid's layout."""
        return self.planner.data_file(kind, self.axes["split"], self.axes["task"], self.set_name)

    def flags(self, stage: str, *extra: dict) -> list:
        """The grid's flags for ``stage``: its flag groups, then ``extra``, later over earlier."""
        groups = [self.grid.flags[group] for group in STAGES[stage].flag_groups]
        return flag_argv(merged_flags(*groups, *extra))


def questions_and_golds(request: Request) -> tuple:
    """The set's questions and gold outputs: the subset's when the cell takes one."""
    subset = request.run("subset")
    if subset is None:
        return request.data_file("questions"), request.data_file("outputs")
    return subset.output("questions.json"), subset.output("outputs.json")


def _subset_argv(request: Request) -> list | None:
    limit = request.planner.limit
    if request.subset is None and limit is None:
        return None
    subset = dict(request.subset or {})
    if limit is not None:
        subset["count"] = min(subset.get("count", limit), limit)
    return ["--questions_addr", request.data_file("questions"),
            "--outputs_addr", request.data_file("outputs"),
            *flag_argv({"seed": subset.get("seed"), "skip": subset.get("skip", 0),
                        "count": subset["count"]}),
            *request.flags("subset"),
            "--output_questions_addr", Out("questions.json"),
            "--output_outputs_addr", Out("outputs.json")]


@dataclass(frozen=True)
class Trained:
    """A grid ranker whose model a stage of the grid trains for the cell."""

    ranker: str  # what rank_profiles.py runs
    stage: str  # the stage that trains the model rank_profiles.py reads
    option: dict  # that stage's flag that makes this ranker


# A grid retriever whose ranker is one of these is trained from the cell's LLM on the
# training set (docs/feedback-retrieval.md): ROPG's encoders and RSPG's selectors.
TRAINED_RANKERS = {
    "ropg_kd": Trained("contriever", "train_retriever", {"objective": "kd"}),
    "ropg_rl": Trained("contriever", "train_retriever", {"objective": "rl"}),
    "rspg_pre": Trained("rspg", "train_selector", {"mode": "pre"}),
    "rspg_post": Trained("rspg", "train_selector", {"mode": "post"}),
}


def _rank_argv(request: Request) -> list | None:
    retriever = request.retriever
    if retriever is None or retriever.ranker is None:  # k = 0: the bare input
        return None
    questions, _ = questions_and_golds(request)
    trained = TRAINED_RANKERS.get(retriever.ranker)
    ranker, model_flags = retriever.ranker, {}
    if trained is not None and trained.ranker == "contriever":
        ranker = trained.ranker
        model_flags = {"contriever_checkpoint": request.run(trained.stage).output("encoder")}
    elif trained is not None:
        ranker = trained.ranker
        model_flags = {"selector": request.run(trained.stage).output("selector"),
                       "retrievers": [_candidate_token(request.on(
                           request.set_name, request.subset, retriever=name))
                           for name in retriever.candidates]}
        if trained.option["mode"] == "post":  # the selector reads each candidate's answers
            model_flags["retriever_outputs"] = _candidate_outputs(request, request)
    return ["--input_data_addr", questions, "--output_ranking_addr", Out("ranking.json"),
            "--task", request.axes["task"].name, "--ranker", ranker,
            *request.flags("rank", retriever.flags, model_flags)]


def _candidate_token(request: Request):
    """How rank_profiles.py --retrievers names the request's retriever: its ranker, or
    ``contriever=<encoder>`` for a dense one with an encoder of its own."""
    retriever = request.retriever
    trained = TRAINED_RANKERS.get(retriever.ranker)
    if trained is not None:  # a ROPG encoder (the schema refuses a selector as a candidate)
        return request.run(trained.stage).output("encoder", prefix="contriever=")
    checkpoint = merged_flags(request.grid.flags["rank"], retriever.flags).get(
        "contriever_checkpoint")
    if retriever.ranker != "contriever" or checkpoint in (None, False):
        return retriever.ranker
    if isinstance(checkpoint, str) and checkpoint.startswith("local:"):
        return Raw(checkpoint, prefix="contriever=")
    return f"contriever={checkpoint}"


def _candidate_outputs(request: Request, on: Request) -> list:
    """Each candidate's answers (the cell's method) on ``on``'s questions."""
    return [on.on(on.set_name, on.subset, retriever=name).run(request.method.stage)
            .output("predictions.json") for name in request.retriever.candidates]


def _training_data(request: Request):
    """The training questions with their gold outputs, unranked: what feedback is collected
    on and what the retriever and the selector read."""
    return request.training(retriever=NO_RETRIEVER, k=0).run("merge").output("merged.json")


def _feedback_argv(request: Request) -> list:
    task_flags = request.grid.task_flags.get(request.axes["task"].name, {})
    return ["--train_data", _training_data(request), "--task", request.axes["task"].name,
            "--model_addr", Raw(_model(request)), "--output_file", Out("feedback.jsonl"),
            *request.flags("feedback", task_flags)]


def _train_retriever_argv(request: Request) -> list:
    trained = TRAINED_RANKERS[request.retriever.ranker]
    return ["--feedback", request.run("feedback").output("feedback.jsonl"),
            "--train_data", _training_data(request), "--task", request.axes["task"].name,
            *flag_argv(trained.option), "--output_dir", Out("encoder"),
            *request.flags("train_retriever")]


def _train_selector_argv(request: Request) -> list:
    trained = TRAINED_RANKERS[request.retriever.ranker]
    training = request.training()
    rankings = [training.on(training.set_name, training.subset, retriever=name).run("rank")
                .output("ranking.json") for name in request.retriever.candidates]
    return ["--train_data", _training_data(request), "--task", request.axes["task"].name,
            "--rankings", *rankings, "--predictions", *_candidate_outputs(request, training),
            *flag_argv(trained.option), "--num_retrieved", str(request.axes["k"]),
            "--output_dir", Out("selector"), *request.flags("train_selector")]


def _merge_argv(request: Request) -> list:
    questions, golds = questions_and_golds(request)
    rank = request.run("rank")
    ranking = ["--profile_ranking_addr", rank.output("ranking.json")] if rank else []
    return ["--lamp_questions_addr", questions, "--lamp_output_addr", golds, *ranking,
            "--merged_output_addr", Out("merged.json"), *request.flags("merge")]


def _model_flags(request: Request, stage: str) -> list:
    """What the evaluate and train stages share after their data: the profile items of the
    merged file, then the grid's flags (task flags, then the method's own, over the groups)."""
    k = request.axes["k"]
    profile = ["--use_profile", "--is_ranked", "--num_retrieved", str(k)] if k else []
    task_flags = request.grid.task_flags.get(request.axes["task"].name, {})
    return [*profile, *request.flags(stage, task_flags, request.method.flags)]


def _evaluate_argv(request: Request) -> list:
    merged = request.run("merge").output("merged.json")
    return ["--validation_data", merged, "--model_addr", Raw(_model(request)),
            "--task", request.axes["task"].name, "--output_dir", Out("."),
            *_model_flags(request, "evaluate")]


def _train_argv(request: Request) -> list:
    validation = request.run("merge").output("merged.json")
    # The training set is never subset (the grid's subset is of the evaluated questions).
    train = request.on(request.grid.train_set, None).run("merge").output("merged.json")
    return ["--train_data", train, "--validation_data", validation,
            "--model_name", Raw(_model(request)), "--task", request.axes["task"].name,
            "--output_dir", Out("."), *_model_flags(request, "train")]


def _score_argv(request: Request) -> list:
    _, golds = questions_and_golds(request)
    method = request.method
    predictions = request.run(method.stage).output("predictions.json")
    return ["--golds_json", golds, "--preds_json", predictions,
            "--task_name", request.axes["task"].file_name, "--output_file", Out("results.json"),
            *request.flags("score", method.score_flags)]


def _model(request: Request) -> str:
    return request.grid.models[request.axes["model"]]


@dataclass(frozen=True)
class Stage:
    name: str
    script: str  # relative to the repository: what --dry_run prints and a launcher runs
    module: str | None  # imported to call main(); None: the script is loaded from its path
    outputs: tuple[str, ...]  # files a complete run has written
    argv: Callable[[Request], list | None]  # the run's argv for a request; None: no run
    flag_groups: tuple[str, ...]  # groups of the grid's `flags` it takes, later over earlier
    launched: bool = False  # run under --launcher (the stages that use accelerators)
    method: bool = False  # a grid method may name it: it writes predictions.json
    resumes: bool = False  # a killed run goes on from its last complete checkpoint


STAGES = {stage.name: stage for stage in (
    Stage("subset", "LaMP/utils/make_subset.py", "LaMP.utils.make_subset",
          ("questions.json", "outputs.json"), _subset_argv, ("subset",)),
    Stage("rank", "LaMP/rank_profiles.py", "LaMP.rank_profiles", ("ranking.json",),
          _rank_argv, ("rank",)),
    # The feedback stages (docs/feedback-retrieval.md): what the trained rankers read.
    Stage("feedback", "LaMP/collect_feedback.py", "LaMP.collect_feedback",
          ("feedback.jsonl",), _feedback_argv, ("model", "feedback")),
    Stage("train_retriever", "LaMP/train_retriever.py", "LaMP.train_retriever", ("encoder",),
          _train_retriever_argv, ("train_retriever",)),
    Stage("train_selector", "LaMP/train_selector.py", "LaMP.train_selector", ("selector",),
          _train_selector_argv, ("train_selector",)),
    Stage("merge", "LaMP/utils/merge_with_rank.py", "LaMP.utils.merge_with_rank",
          ("merged.json",), _merge_argv, ("merge",)),
    # "model": the flags both model stages take (prompt budget, generation).
    Stage("evaluate", "LaMP/evaluate_llm.py", "LaMP.evaluate_llm", ("predictions.json",),
          _evaluate_argv, ("model", "evaluate"), launched=True, method=True),
    Stage("train", "LaMP/train_llm.py", "LaMP.train_llm", ("predictions.json",),
          _train_argv, ("model", "train"), launched=True, method=True, resumes=True),
    Stage("score", "eval/eval_task.py", None, ("results.json",), _score_argv,
          ("score",)),
)}
# The run that stands for a cell: its results are the cell's numbers.
CELL_STAGE = "score"


def method_stages() -> tuple[str, ...]:
    """The stages a grid method may name, the first the default (read from the table when
    asked, so a row added to it is a stage a grid may name)."""
    return tuple(name for name, stage in STAGES.items() if stage.method)


def flag_groups() -> tuple[str, ...]:
    """The groups of the grid's ``flags``, in table order."""
    return tuple(dict.fromkeys(group for stage in STAGES.values()
                               for group in stage.flag_groups))
