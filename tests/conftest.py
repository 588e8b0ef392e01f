"""Shared test helpers: repository paths, the real-data location, and script loading."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The bundled synthetic sample (data/make_sample.py): the fixture for stage tests, laid out
# like raw_data/user (SAMPLE / "LaMP_3" / "dev_questions.json").
SAMPLE = REPO / "data" / "sample" / "user"
# Real LaMP files for tests, present in CI and on the development machine but never in a
# user's clone; tests that need them skip with a reason when they are absent.
LAMP_REAL = Path(os.environ.get("LAMP_REAL_DIR", REPO.parent / "shared" / "lamp-real"))

requires_real_data = pytest.mark.skipif(
    not (LAMP_REAL / "LaMP_7" / "dev" / "dev_questions.json").exists(),
    reason=f"real LaMP data not found at {LAMP_REAL} (set LAMP_REAL_DIR)",
)


def load_script(relative_path: str):
    """Import a script such as ``eval/eval_task.py`` as a module, to call its ``main``."""
    path = REPO / relative_path
    name = "script_" + relative_path.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def outputs_doc(task_file_name: str, pairs) -> dict:
    return {"task": task_file_name, "golds": [{"id": i, "output": o} for i, o in pairs]}
