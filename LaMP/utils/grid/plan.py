"""Cells and stages of a grid: what runs, where its outputs go, and whether it is done.

A stage is one row of ``stages.STAGES``: a script whose ``main(argv)`` the runner calls. A
stage run is that stage with an argv made of plain strings and path tokens (``Raw``, ``Ref``,
``Out``; see ``stages``). Its key is a hash of the stage name and that argv, with each ``Ref``
replaced by the key of the run it names and each ``Raw`` by the identity of the file, so two
cells that need the same ranking share one run, and a changed input or flag is a new run.
Outputs live in ``<runs>/<grid>/stages/<stage>-<key>/``; ``complete.json``, written last and
atomically, marks a run as done, and a done run is never run again.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import io
import itertools
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from filelock import FileLock

from LaMP.utils.data.fileio import atomic_write_json
from LaMP.utils.errors import LampError
from LaMP.utils.grid.schema import NO_RETRIEVER, Grid
from LaMP.utils.grid.stages import CELL_STAGE, STAGES, Out, Raw, Ref, Request, Stage, StageRun

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[3]
COMPLETE = "complete.json"


# Models packaged on PyPI that a grid names as "local:<name>" (converted once into .cache/).
LOCAL_MODELS = {"smollm2": "smollm2_path", "minilm": "minilm_path"}


@dataclass
class Cell:
    axes: dict  # task, split, model, method, retriever, k
    runs: list[StageRun] = field(default_factory=list)  # in execution order, score last

    @property
    def name(self) -> str:
        axes = self.axes
        return (f"{axes['task'].file_name}.{axes['split']}.{axes['model']}.{axes['method']}."
                f"{axes['retriever']}.k{axes['k']}")

    @property
    def score(self) -> StageRun:
        return self.runs[-1]


def resolve_model(spec: str) -> str:
    """A model as a grid names it: ``local:<name>`` for a packaged model, else a hub name or
    a folder."""
    if isinstance(spec, str) and spec.startswith("local:"):
        name = spec.removeprefix("local:")
        if name not in LOCAL_MODELS:
            raise LampError(f"unknown packaged model {spec!r} (valid: "
                            f"{', '.join('local:' + n for n in LOCAL_MODELS)})")
        from LaMP.utils.modeling import local_models

        return str(getattr(local_models, LOCAL_MODELS[name])())
    return spec


def expand_cells(grid: Grid) -> list[Cell]:
    """The product of the axes minus ``exclude``; k = 0 and the retriever "none" are one cell."""
    cells, seen = [], set()
    for task, split, model, method, retriever, k in itertools.product(
            grid.tasks, grid.splits, grid.models, grid.methods, grid.retrievers, grid.k):
        if k == 0 or retriever == NO_RETRIEVER:
            retriever, k = NO_RETRIEVER, 0
        axes = {"task": task, "split": split, "model": model, "method": method,
                "retriever": retriever, "k": k}
        if any(all((task.name if axis == "task" else axes[axis]) in values
                   for axis, values in rule.items()) for rule in grid.exclude):
            continue
        cell = Cell(axes)
        if cell.name not in seen:
            seen.add(cell.name)
            cells.append(cell)
    return cells


class Planner:
    """Builds every cell's stage runs; equal runs (same key) are one object."""

    def __init__(self, grid: Grid, data_root: Path, limit: int | None = None):
        self.grid, self.data_root, self.limit = grid, data_root, limit
        self.runs: dict[str, StageRun] = {}
        self.data_files: dict[str, None] = {}  # every data file the cells read, in order
        self._identities: dict[str, str] = {}

    def data_file(self, kind: str, split: str, task, set_name: str) -> Raw:
        relative = self.grid.layout[kind].format(split=split, task=task.folder, set=set_name)
        path = str(self.data_root / relative)
        self.data_files[path] = None
        return Raw(path)

    def add(self, stage: str, argv: list) -> StageRun:
        run = StageRun(STAGES[stage], tuple(argv))
        run.key = self.key(run)
        return self.runs.setdefault(run.key, run)

    def key(self, run: StageRun) -> str:
        def identity(token):
            if isinstance(token, Ref):
                return f"{token.prefix}<{token.run.key}/{token.name}>"
            if isinstance(token, Out):
                return f"<out/{token.name}>"
            if isinstance(token, Raw):
                return f"{token.prefix}<raw {self.identity(token.path)}>"
            return token

        text = json.dumps([run.stage.name, [identity(token) for token in run.argv]])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def identity(self, path: str) -> str:
        """What a raw input is: its content (small files), size and mtime (large ones), the
        files of a folder, or the name itself (a hub model)."""
        if path not in self._identities:
            try:
                self._identities[path] = _identity(Path(resolve_model(path)), path)
            except OSError as error:
                raise LampError(f"{error.filename or path}: cannot read "
                                f"({error.strerror or error})") from None
        return self._identities[path]

    def planned(self, stage: str, request: Request) -> StageRun | None:
        """The run of ``stage`` that ``request`` reads, or None where its cell has none."""
        argv = STAGES[stage].argv(request)
        return None if argv is None else self.add(stage, argv)

    def plan(self, cell: Cell) -> Cell:
        request = Request(self, cell.axes, self.grid.eval_set, self.grid.subset)
        cell.runs = _dependencies(request.run(CELL_STAGE))
        return cell


def _dependencies(run: StageRun) -> list[StageRun]:
    """``run`` and every run it reads from, each once, producers first."""
    order: list[StageRun] = []

    def visit(current: StageRun) -> None:
        for token in current.argv:
            if isinstance(token, Ref) and token.run not in order:
                visit(token.run)
        if current not in order:
            order.append(current)

    visit(run)
    return order


SMALL_FILE = 64 * 2**20  # hashed whole below this size; above, size and mtime stand for it


def _file_identity(path: Path, small: int) -> str:
    stat = path.stat()
    if stat.st_size <= small:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return f"size {stat.st_size} mtime {stat.st_mtime_ns}"


def _identity(path: Path, spec: str) -> str:
    if path.is_file():
        return _file_identity(path, SMALL_FILE)
    if path.is_dir():
        # A model folder: weights are large, so configs and tokenizers (small) are hashed and
        # the rest counts by size; the folder's place on disk does not matter.
        files = sorted(item for item in path.rglob("*") if item.is_file())
        return hashlib.sha256(json.dumps(
            [[str(item.relative_to(path)), _file_identity(item, 2**20)] for item in files]
        ).encode()).hexdigest()
    return f"name {spec}"  # a hub model name (or a missing file, which its stage reports)


class Runner:
    """Executes stage runs under ``<runs>/<grid>/stages``; optionally under a launcher."""

    def __init__(self, root: Path, launcher: str | None = None):
        self.root, self.launcher = root, launcher
        self.stages = root / "stages"
        self.executed: list[str] = []  # folder names of the runs this process ran
        self.failed: dict[str, str] = {}  # key -> one-line reason

    def folder(self, run: StageRun) -> Path:
        return self.stages / run.folder_name

    def is_complete(self, run: StageRun) -> bool:
        return (self.folder(run) / COMPLETE).is_file()

    def path(self, token, run: StageRun) -> str:
        if isinstance(token, Ref):
            return token.prefix + str(self.folder(token.run) / token.name)
        if isinstance(token, Out):
            return str(self.folder(run) / token.name) if token.name != "." \
                else str(self.folder(run))
        if isinstance(token, Raw):
            return token.prefix + resolve_model(token.path)
        return token

    def argv(self, run: StageRun) -> list[str]:
        return [self.path(token, run) for token in run.argv]

    def command(self, run: StageRun) -> str:
        """The shell command of one stage run, as the docs write it (from the repo root)."""
        prefix = shlex.split(self.launcher) if self.launcher and run.stage.launched \
            else ["python"]
        return shlex.join([*prefix, run.stage.script, *self.argv(run)])

    def execute(self, run: StageRun) -> bool:
        """Run one stage unless it is complete; False (with ``failed[key]``) if it failed."""
        if run.key in self.failed:
            return False
        if self.is_complete(run):
            return True
        folder = self.folder(run)
        make_folder(self.stages)
        with _locked(self.stages / f".{run.folder_name}.lock"):
            if self.is_complete(run):  # another shard finished it while we waited
                return True
            argv = self.argv(run)
            # Resumed only in a folder of its own: a link would write into its target.
            resume = (run.stage.resumes and not folder.is_symlink()
                      and _has_checkpoint(folder))
            if resume:
                argv += ["--resume_from_checkpoint", "last"]
            else:
                _clear(folder)
            make_folder(folder)
            atomic_write_json(folder / "stage.json", {
                "stage": run.stage.name, "key": run.key, "argv": argv,
                "command": self.command(run)}, indent=2)
            started = time.perf_counter()
            error = self._call(run, argv)
            if error is None:
                missing = [name for name in run.stage.outputs if not (folder / name).exists()]
                if missing:
                    error = f"finished without writing {', '.join(missing)}"
            if error is not None:
                self.failed[run.key] = f"{run.stage.name}: {error}"
                return False
            atomic_write_json(folder / COMPLETE, {
                "seconds": round(time.perf_counter() - started, 3),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            self.executed.append(run.folder_name)
            return True

    def _call(self, run: StageRun, argv: list[str]) -> str | None:
        """None on success, else the stage's one-line error."""
        if self.launcher and run.stage.launched:
            command = [*shlex.split(self.launcher), str(REPO / run.stage.script), *argv]
            try:
                done = subprocess.run(command, stderr=subprocess.PIPE, text=True,
                                      errors="replace", env={**os.environ, "PYTHONPATH": (
                                          os.pathsep.join(filter(None, [
                                              str(REPO), os.environ.get("PYTHONPATH")])))})
            except OSError as error:  # checked up front, but gone or not a program now
                return f"--launcher {command[0]}: cannot run ({error.strerror or error})"
            sys.stderr.write(done.stderr)
            if done.returncode:
                lines = [line for line in done.stderr.splitlines() if line.strip()]
                return lines[-1] if lines else f"exit status {done.returncode}"
            return None
        main = load_stage(run.stage).main
        captured = io.StringIO()
        try:
            with contextlib.redirect_stderr(_Tee(sys.stderr, captured)):
                main(argv)
        except LampError as error:
            return str(error)
        except SystemExit as done:  # a usage mistake: the stage's parser printed one line
            if done.code:
                lines = [line for line in captured.getvalue().splitlines() if line.strip()]
                return lines[-1].removeprefix("error: ") if lines else f"exit status {done.code}"
        return None


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self):
        for stream in self.streams:
            stream.flush()


def load_stage(stage: Stage):
    """A stage's script as a module (for its ``main`` and ``parse_args``), imported only when
    the stage runs."""
    if stage.module is not None:
        return importlib.import_module(stage.module)
    name = "lamp_stage_" + Path(stage.script).stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / stage.script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def _has_checkpoint(folder: Path) -> bool:
    from LaMP.utils.modeling.checkpoints import checkpoint_folders, checkpoint_problem

    checkpoints = folder / "checkpoints"
    return checkpoints.is_dir() and any(checkpoint_problem(item) is None
                                        for item in checkpoint_folders(checkpoints))


def _locked(path: Path):
    """The held lock of one stage run (released when its ``with`` block ends): one process
    at a time per stage run, since shards of a cluster job share rankings."""
    try:
        return FileLock(path).acquire()
    except OSError as error:  # a folder in its place, no permission
        raise LampError(f"cannot lock {path} ({error.strerror or error})") from None


def make_folder(path: Path) -> Path:
    """``mkdir -p`` whose failure (a file in the way, no permission) is one error line."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        in_the_way = isinstance(error, (FileExistsError, NotADirectoryError))
        why = "it or a folder above it is a file" if in_the_way else error.strerror or error
        raise LampError(f"cannot make the folder {path} ({why})") from None
    return path


def _clear(folder: Path) -> None:
    """Remove what a killed run left in a stage's folder (ours: its name is the run's key,
    under stages/). Something else in its place goes too, a link as a link: its target is
    never touched."""
    try:
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            folder.unlink()
        elif folder.exists():
            shutil.rmtree(folder)
    except OSError as error:
        raise LampError(f"cannot clear the stage folder {folder} "
                        f"({error.strerror or error})") from None
