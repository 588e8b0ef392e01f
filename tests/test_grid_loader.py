"""Reading a grid file's YAML (LaMP/utils/grid/loader.py): duplicate keys refused at every
level, alias bombs and nesting bombs refused before anything is built, bad tagged values one
error line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from LaMP.utils.errors import LampError
from LaMP.utils.grid.schema import load_grid

MAX_BYTES = 2**20  # the loader's bound on a grid file
GOOD = "tasks: [LaMP-7]\nmodels: {m: some/model}\nmethods: {zero_shot: {}}\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def refused(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(LampError) as raised:
        load_grid(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    return message.removeprefix(f"{path}: ")


@pytest.mark.parametrize("text, message", [
    # block style, the issue's own example: the second zs would drop the first one's cells
    (GOOD.replace("{zero_shot: {}}", "\n  zs: {}\n  zs: {stage: train}"),
     "methods: duplicate key 'zs' at line 5 (first at line 4)"),
    # flow style, on one line
    (GOOD.replace("{zero_shot: {}}", "{zs: {}, zs: {}}"),
     "methods: duplicate key 'zs' at line 3 (first at line 3)"),
    # the top level
    (GOOD + "name: a\nname: b\n", "grid: duplicate key 'name' at line 5 (first at line 4)"),
    # deep inside a list of mappings
    (GOOD + "exclude:\n  - {method: zero_shot}\n  - {k: 0, method: zero_shot, k: 1}\n",
     "exclude[1]: duplicate key 'k' at line 6 (first at line 6)"),
    (GOOD + "flags:\n  model:\n    max_length: 64\n    max_length: 128\n",
     "flags.model: duplicate key 'max_length' at line 7 (first at line 6)"),
    # spelled differently, one key once decoded
    (GOOD.replace("{zero_shot: {}}", "{zs: {}, 'zs': {}}"), "methods: duplicate key 'zs'"),
    (GOOD + "task_flags: {LaMP-7: {1: a, 0x1: b}}\n", "task_flags.LaMP-7: duplicate key '0x1'"),
    (GOOD + "bootstrap: {samples: 10, seed: 1, samples: 20}\n", "bootstrap: duplicate key"),
    # two merge keys: the second would replace the first merge
    ("base: &b {x: 1}\n" + GOOD + "task_flags:\n  LaMP-7:\n    <<: *b\n    <<: *b\n",
     "task_flags.LaMP-7: duplicate key '<<' at line 8 (first at line 7)"),
])
def test_a_duplicate_key_is_refused_wherever_it_stands(tmp_path, text, message):
    error = refused(tmp_path, text)
    assert error.startswith(message), error
    assert "silently replace" in error


def test_a_key_beside_a_merge_overrides_the_merged_one(tmp_path):
    """YAML's merge: an explicit key wins over a merged one; that is not a duplicate."""
    text = ("description: &shared {max_length: 64, device: cpu}\n" + GOOD.replace(
        "{zero_shot: {}}", "{zero_shot: {flags: {<<: *shared, max_length: 128}}}"))
    grid = load_grid(write(tmp_path, text))
    assert grid.methods["zero_shot"].flags == {"max_length": 128, "device": "cpu"}


def laughs(levels: int = 9) -> str:
    """The billion laughs: each level a list of ten aliases of the one before (10**9
    values at level 8, built as nine short lines)."""
    lines = ["l0: &l0 [" + ", ".join(["lol"] * 10) + "]"]
    lines += [f"l{n}: &l{n} [" + ", ".join([f"*l{n - 1}"] * 10) + "]" for n in range(1, levels)]
    return "\n".join(lines) + "\n"


def merge_laughs(levels: int = 9) -> str:
    """The same through merge keys: each level merges the one before ten times, which
    PyYAML does by copying the merged entries (10**9 of them at level 8)."""
    lines = ["l0: &l0 {" + ", ".join(f"k{i}: lol" for i in range(10)) + "}"]
    lines += [f"l{n}: &l{n} {{<<: [" + ", ".join([f"*l{n - 1}"] * 10) + "]}"
              for n in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text", [
    laughs() + GOOD + "description: [*l8]\n",  # formatting it would build gigabytes
    merge_laughs() + GOOD + "task_flags: {LaMP-7: *l8}\n",  # decoding it would
])
def test_an_alias_bomb_is_refused_before_it_is_built(tmp_path, text):
    # Caught at level 4 (10**5 values), the first one past the bound.
    assert refused(tmp_path, text).endswith(
        ": more than 100,000 values once its aliases are expanded at line 5 (an alias "
        "repeats all its anchor holds)")


def test_a_merge_bomb_is_one_error_line_in_a_process_with_little_memory(tmp_path):
    path = write(tmp_path, merge_laughs() + GOOD + "task_flags: {LaMP-7: *l8}\n")
    script = ("import resource, sys\nresource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))\n"
              "from LaMP.utils.cli.program import run\nfrom LaMP.utils.grid.schema import "
              "load_grid\nsys.exit(run(lambda argv: load_grid(sys.argv[1])))\n")
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True,
                          text=True, cwd=REPO, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert "more than 100,000 values once its aliases are expanded" in done.stderr


@pytest.mark.parametrize("text, message", [
    ("a: &a [x, *a]\n" + GOOD, "a[1]: an alias inside its own anchor at line 1"),
    ("a: &a {b: *a}\n" + GOOD, "a.b: an alias inside its own anchor at line 1"),
    # nesting: written out, and (flow style) far past Python's recursion limit
    (GOOD + "description: " + "[" * 40 + "]" * 40 + "\n",
     "description[0][0][0][0][0][0][0]…: nested deeper than 32 levels at line 4"),
    (GOOD + "description: " + "[" * 200_000 + "]" * 200_000 + "\n",
     "nested deeper than 32 levels"),
    (GOOD + "description: " + "{a: " * 50_000 + "1" + "}" * 50_000 + "\n",
     "description.a.a.a.a.a.a.a…: nested deeper than 32 levels"),
    # shallow pieces stacked through aliases are as deep as they expand
    ("a: &a [[[[[[[[[[x]]]]]]]]]]\nb: &b [[[[[[[[[[*a]]]]]]]]]]\nc: &c [[[[[[[[[[*b]]]]]]]]]]\n"
     + GOOD + "description: [[[[[[[[[[*c]]]]]]]]]]\n",
     "nested deeper than 32 levels once its aliases are expanded"),
    ("a: &a x\n" + GOOD + "description: [" + ", ".join(["*a"] * 1001) + "]\n",
     "description[1000]: more than 1,000 aliases at line 5"),
])
def test_recursive_deep_and_alias_heavy_documents_are_refused(tmp_path, text, message):
    assert message in refused(tmp_path, text)


@pytest.mark.parametrize("text, message", [
    (GOOD + "k: !!int abc\n", "the value 'abc' at line 4 is not a valid tag:yaml.org,2002:int"),
    (GOOD + "k: [1" + "0" * 5000 + "]\n", "at line 4 is not a valid tag:yaml.org,2002:int"),
    (GOOD + "description: !!timestamp 2020-13-45\n",
     "the value '2020-13-45' at line 4 is not a valid tag:yaml.org,2002:timestamp"),
    (GOOD + "description: !!float x\n", "is not a valid tag:yaml.org,2002:float"),
    (GOOD + "description: !!python/object:os.system ls\n", "not valid YAML at line 4"),
    (GOOD + "k: [1]\n---\nk: [2]\n", "not valid YAML at line 5"),
    (GOOD + "description: \x00\n", "not valid YAML"),
])
def test_a_value_its_tag_cannot_hold_is_one_error_line(tmp_path, text, message):
    assert message in refused(tmp_path, text)


@pytest.mark.parametrize("text, where", [
    (GOOD.replace("some/model", '"some\\0model"'), "models.m"),
    (GOOD.replace("some/model", '"some\\x00model"'), "models.m"),
    (GOOD.replace("some/model", '"some\\u0000model"'), "models.m"),
    (GOOD + 'flags:\n  model: {prompt_tuning_init_text: "a\\0"}\n', "flags.model.prompt_tuning_init_text"),
    (GOOD + 'data_root: ["d\\0"]\n', "data_root[0]"),
    (GOOD + 'task_flags: {"LaMP-7\\0": {}}\n', "task_flags"),
])
def test_a_nul_character_written_as_an_escape_is_refused(tmp_path, text, where):
    # A NUL cannot stand in a path or a command line: the stage's argv and the --dry_run
    # line would both be cut at it.
    message = refused(tmp_path, text)
    assert message.startswith(f"{where}: a NUL character (\\0) in a value at line "), message


def test_a_grid_file_too_large_or_not_utf8_is_refused(tmp_path):
    assert refused(tmp_path, GOOD + "# " + "x" * MAX_BYTES + "\n").startswith(
        f"more than {MAX_BYTES:,} bytes is too large for a grid file")
    path = tmp_path / "grid.yaml"
    path.write_bytes(GOOD.encode() + b"description: caf\xe9\n")
    with pytest.raises(LampError, match=rf"grid\.yaml: not UTF-8 text \(byte {len(GOOD) + 16}\)$"):
        load_grid(path)


def test_the_shipped_grids_read_within_the_bounds():
    for path in sorted((REPO / "LaMP" / "configs").glob("*.yaml")):
        assert load_grid(path).name == path.stem
