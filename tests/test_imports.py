"""The code's layers: every module imports, and no two modules import each other, even
through a chain or an import deferred into a function."""
from __future__ import annotations

import ast
import subprocess
import sys

from conftest import REPO

PACKAGE_ROOTS = ("LaMP",)


def module_files() -> dict[str, object]:
    modules = {}
    for root in PACKAGE_ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


MODULES = module_files()


def imported_modules(name: str, path) -> set[str]:
    """The project modules ``name`` imports anywhere in its code (top level or deferred)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # "from package import module" names a module; "from module import name" not.
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in MODULES and target != name)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as the list of its modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_project_has_no_import_cycle():
    graph = {name: imported_modules(name, path) for name, path in MODULES.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_deferred_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_deferred_and_relative_imports_are_seen():
    # Within the project: the dense ranker's module imports the base module.
    assert "LaMP.utils.retrieval.base" in imported_modules(
        "LaMP.utils.retrieval.dense", MODULES["LaMP.utils.retrieval.dense"])
    # evaluate_llm imports the model wrapper inside main(), not at the top.
    assert "LaMP.utils.modeling.model" in imported_modules("LaMP.evaluate_llm",
                                                     MODULES["LaMP.evaluate_llm"])


def test_every_module_imports():
    # In a fresh interpreter, each module first in turn would take one interpreter per module
    # (torch makes that a minute); one interpreter importing them all in order still fails on
    # a runtime cycle (a name imported from a module that is only half initialised).
    names = sorted(name for name in MODULES if "configs" not in name)
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    result = subprocess.run([sys.executable, "-c", script, *names], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr.splitlines()[-3:]


# The layers of LaMP/utils, lowest first: a module imports modules of its own layer or below
# only (docs/layout.md). Scripts sit on top and may import anything.
LAYERS = (
    ("base", ("LaMP", "LaMP.utils", "LaMP.utils.errors", "LaMP.utils.tasks", "LaMP.utils.seeds",
              "LaMP.utils.devices")),
    ("data", ("LaMP.utils.data",)),
    ("evaluation", ("LaMP.utils.evaluation",)),
    ("retrieval", ("LaMP.utils.retrieval",)),
    ("modeling", ("LaMP.utils.modeling",)),
    ("cli", ("LaMP.utils.cli",)),
    ("grid", ("LaMP.utils.grid",)),
)
SCRIPTS = ("LaMP.rank_profiles", "LaMP.evaluate_llm", "LaMP.train_llm", "LaMP.train_user_peft",
           "LaMP.reproduce", "LaMP.utils.merge_with_rank", "LaMP.utils.make_subset",
           "LaMP.collect_feedback", "LaMP.train_retriever", "LaMP.train_selector",
           "LaMP.build_zoo", "LaMP.personalize_from_zoo", "LaMP.train_zoo_gates")


def layer_of(name: str) -> int | None:
    """The index of ``name``'s layer (a package's modules share it); None for a script."""
    if name in SCRIPTS or name.startswith("LaMP.configs"):
        return None
    for index, (_, members) in enumerate(LAYERS):
        if name in members[:1] and index == 0:
            return 0
        if any(name == member or (index and name.startswith(member + ".")) for member in members):
            return index
    raise AssertionError(f"{name} is in no layer: add it to LAYERS or SCRIPTS")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for name, targets in sorted(graph.items()):
        own = layer_of(name)
        for target in sorted(targets):
            theirs = layer_of(target)
            if theirs is None:
                found.append(f"{name} imports the script {target}")
            elif own is not None and theirs > own:
                found.append(f"{name} ({LAYERS[own][0]}) imports {target} ({LAYERS[theirs][0]})")
    return found


def test_every_module_is_in_a_layer_and_imports_only_downward():
    graph = {name: imported_modules(name, path) for name, path in MODULES.items()}
    assert upward_imports(graph) == []


def test_the_layer_check_finds_an_upward_and_a_script_import():
    graph = {"LaMP.utils.data.outputs": {"LaMP.utils.evaluation.metrics", "LaMP.utils.tasks"},
             "LaMP.utils.modeling.examples": {"LaMP.utils.cli.program"},
             "LaMP.utils.cli.arguments": {"LaMP.utils.modeling.examples", "LaMP.rank_profiles"},
             "LaMP.train_llm": {"LaMP.utils.cli.program", "LaMP.utils.grid.plan"}}
    assert upward_imports(graph) == [
        "LaMP.utils.cli.arguments imports the script LaMP.rank_profiles",
        "LaMP.utils.data.outputs (data) imports LaMP.utils.evaluation.metrics (evaluation)",
        "LaMP.utils.modeling.examples (modeling) imports LaMP.utils.cli.program (cli)"]


def test_the_default_model_cache_is_the_repository_roots(monkeypatch):
    # A module moved one package deeper once put it under LaMP/.cache, outside .gitignore.
    from LaMP.utils.modeling.local_models import cache_root

    monkeypatch.delenv("LAMP_CACHE_DIR", raising=False)
    assert cache_root() == REPO / ".cache"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(REPO / ".cache" / "x")], cwd=REPO)
    assert ignored.returncode == 0


# Every script a user runs by its path; each must import LaMP from its own checkout.
SCRIPT_PATHS = sorted(
    str(path.relative_to(REPO)) for path in [*REPO.glob("*.py"), *(REPO / "LaMP").glob("*.py"),
                                             *(REPO / "LaMP" / "utils").glob("*.py"),
                                             *(REPO / "eval").glob("*.py"),
                                             *(REPO / "data").rglob("*.py")]
    if path.name != "__init__.py" and 'if __name__ == "__main__"' in path.read_text())


def plain_checkout_env() -> dict[str, str]:
    """What a fresh clone sees: the third-party packages, but no installed LaMP. ``-S`` skips
    the .pth files (this environment's editable install of LaMP is one); the packages come
    back through PYTHONPATH, which -S keeps."""
    import os
    import sysconfig

    paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def test_the_plain_checkout_environment_has_no_installed_lamp(tmp_path):
    # The premise of the test below: under these conditions LaMP is not importable as such.
    found = subprocess.run([sys.executable, "-S", "-c", "import LaMP"], cwd=tmp_path,
                           env=plain_checkout_env(), capture_output=True, text=True)
    assert found.returncode == 1 and "No module named 'LaMP'" in found.stderr


def test_every_script_runs_from_a_plain_checkout(tmp_path):
    """Without ``pip install -e .`` each script puts its repository root on sys.path."""
    assert len(SCRIPT_PATHS) >= 15 and "LaMP/rank_profiles.py" in SCRIPT_PATHS
    env = plain_checkout_env()
    for script in SCRIPT_PATHS:
        shown = subprocess.run([sys.executable, "-S", str(REPO / script), "--help"],
                               cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=300)
        assert shown.returncode == 0, (script, shown.stderr[-2000:])
        assert shown.stdout.startswith("usage:"), script
    # One real stage, to show that the LaMP it imported is this checkout's and works.
    from conftest import SAMPLE

    ranking = tmp_path / "ranking.json"
    ranked = subprocess.run(
        [sys.executable, "-S", str(REPO / "LaMP" / "rank_profiles.py"), "--input_data_addr",
         str(SAMPLE / "LaMP_7" / "dev_questions.json"), "--output_ranking_addr", str(ranking),
         "--task", "LaMP-7", "--ranker", "bm25", "--num_workers", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert ranked.returncode == 0, ranked.stderr[-2000:]
    import json

    assert len(json.loads(ranking.read_text())) == 24
