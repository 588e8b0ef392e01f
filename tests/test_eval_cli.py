"""The evaluator CLIs (eval_task, eval_all, compare) through ``main(argv)`` on tiny files, every
kind of bad input (unreadable, malformed or mismatched files, unknown tasks), and a few runs as a user would start them (a fresh interpreter)."""
from __future__ import annotations

import builtins
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import LaMP.utils.data.outputs
from LaMP.utils.errors import LampError
from conftest import REPO, load_script, outputs_doc, write_json

eval_task = load_script("eval/eval_task.py")
eval_all = load_script("eval/eval_all.py")
compare = load_script("eval/compare.py")

# Tiny sets whose metrics are worked out by hand in the comments of the tests using them.
LAMP2_GOLDS = [("200", "comedy"), ("201", "action"), ("202", "classic"), ("203", "comedy")]
LAMP2_PREDS = [("200", " comedy "), ("201", "comedy"), ("202", "classic"), ("203", "horror")]
LAMP3_GOLDS = [("300", "1"), ("301", "3"), ("302", "5")]
LAMP3_PREDS = [("300", "2"), ("301", "five"), ("302", "4.5")]
LAMP7_GOLDS = [("700", "the cat sat on the mat"), ("701", "a b c d"), ("702", "hello world")]
LAMP7_PREDS = [("700", "the cat on mat"), ("701", "d c b a"), ("702", "")]


def write_outputs(path: Path, task: str, pairs) -> Path:
    return write_json(path, outputs_doc(task, pairs))


def make_zip(path: Path, members: dict[str, object], compression=zipfile.ZIP_DEFLATED) -> Path:
    """A zip of JSON documents (dict/list) or raw bytes; names ending in '/' are folders."""
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, content in members.items():
            if name.endswith("/"):
                archive.writestr(zipfile.ZipInfo(name), b"")
            elif isinstance(content, bytes):
                archive.writestr(name, content)
            else:
                archive.writestr(name, json.dumps(content))
    return path


def tree(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` with its bytes, to show that nothing else was written."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(folder.rglob("*"))}


def assert_lamp_error(main, argv, output: Path, *fragments: str) -> str:
    """``main(argv)`` fails with a one-line LampError holding ``fragments``; no output appears."""
    before = tree(output.parent)
    with pytest.raises(LampError) as caught:
        main(argv)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message
    assert "\n" not in message
    assert not output.exists()
    assert tree(output.parent) == before  # no temporary file left behind either
    return message


# --- eval_task ------------------------------------------------------------------------------


def run_eval_task(tmp_path, task, golds, preds, *extra):
    golds_path = write_outputs(tmp_path / "golds.json", task, golds)
    preds_path = write_outputs(tmp_path / "preds.json", task, preds)
    output = tmp_path / "results" / "out.json"
    result = eval_task.main(["--golds_json", str(golds_path), "--preds_json", str(preds_path),
                             "--task_name", task, "--output_file", str(output), *extra])
    assert json.loads(output.read_text(encoding="utf-8")) == result
    return result


def test_eval_task_classification(tmp_path, capsys):
    result = run_eval_task(tmp_path, "LaMP_2", LAMP2_GOLDS, LAMP2_PREDS)
    # correct: rows 200 and 202 -> accuracy 1/2.
    # comedy: TP 1, predicted 2, actual 2 -> 1/2; action: TP 0, actual 1 -> 0;
    # classic: TP 1, predicted 1, actual 1 -> 1; 12 other tags 0 -> macro (1/2 + 1) / 15 = 0.1
    assert result == {"accuracy": pytest.approx(0.5), "f1": pytest.approx(0.1),
                      "count": 4, "invalid": 1}
    table = capsys.readouterr().out
    assert "LaMP_2" in table and "accuracy" in table and "0.5000" in table


def test_eval_task_rating(tmp_path):
    result = run_eval_task(tmp_path, "LaMP-3", LAMP3_GOLDS, LAMP3_PREDS)
    # predictions used: 2, 5 ("five", gold 3 is a tie -> 5), 4.5; errors 1, 2, -0.5
    # MAE = 3.5 / 3; RMSE = sqrt((1 + 4 + 0.25) / 3) = sqrt(1.75)
    assert result == {"MAE": pytest.approx(3.5 / 3), "RMSE": pytest.approx(1.75 ** 0.5),
                      "count": 3, "invalid": 1}


def test_eval_task_generation(tmp_path):
    result = run_eval_task(tmp_path, "lamp_7", LAMP7_GOLDS, LAMP7_PREDS)
    # per pair (see test_metrics): R1 0.8, 1, 0 -> 0.6; RL 0.8, 0.25, 0 -> 0.35
    assert result == {"rouge-1": pytest.approx(0.6), "rouge-L": pytest.approx(0.35), "count": 3}


def test_eval_task_pairs_by_id_not_by_position_and_accepts_integer_ids(tmp_path):
    golds = write_outputs(tmp_path / "golds.json", "LaMP_3", LAMP3_GOLDS)
    # shuffled, with integer ids: the same predictions as LAMP3_PREDS
    preds = write_json(tmp_path / "preds.json", {"task": "LaMP_3", "golds": [
        {"id": 302, "output": "4.5"}, {"id": "300", "output": "2"}, {"id": 301, "output": "five"}]})
    output = tmp_path / "out.json"
    result = eval_task.main(["--golds_json", str(golds), "--preds_json", str(preds),
                             "--task_name", "LaMP_3", "--output_file", str(output)])
    assert result["MAE"] == pytest.approx(3.5 / 3)


def test_eval_task_reads_a_byte_order_mark(tmp_path):
    golds = tmp_path / "golds.json"
    golds.write_bytes(b"\xef\xbb\xbf" + json.dumps(outputs_doc("LaMP_3", LAMP3_GOLDS)).encode())
    preds = write_outputs(tmp_path / "preds.json", "LaMP_3", LAMP3_GOLDS)
    result = eval_task.main(["--golds_json", str(golds), "--preds_json", str(preds),
                             "--task_name", "LaMP_3", "--output_file", str(tmp_path / "o.json")])
    assert result["MAE"] == 0.0


def test_eval_task_bootstrap_adds_repeatable_intervals(tmp_path):
    golds = [(str(i), str(1 + i % 5)) for i in range(40)]
    preds = [(str(i), str(1 + (i * 7) % 5)) for i in range(40)]
    first = run_eval_task(tmp_path, "LaMP_3", golds, preds, "--bootstrap", "200", "--seed", "3")
    again = run_eval_task(tmp_path, "LaMP_3", golds, preds, "--bootstrap", "200", "--seed", "3")
    plain = run_eval_task(tmp_path, "LaMP_3", golds, preds)
    assert first == again
    assert set(first) == set(plain) | {"ci95", "bootstrap"}
    assert first["bootstrap"] == {"samples": 200, "seed": 3}
    for name in ("MAE", "RMSE"):
        assert first[name] == plain[name]
        low, high = first["ci95"][name]
        assert low <= plain[name] <= high and low < high
    assert "ci95" not in plain


def test_eval_task_rejects_negative_bootstrap(tmp_path):
    with pytest.raises(SystemExit) as exited:
        eval_task.parse_args(["--golds_json", "g", "--preds_json", "p", "--task_name", "LaMP_1",
                              "--output_file", "o", "--bootstrap", "-1"])
    assert exited.value.code == 2


def test_eval_task_rejects_an_unknown_task_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        eval_task.parse_args(["--golds_json", "g", "--preds_json", "p", "--task_name", "LaMP-8",
                              "--output_file", "o"])
    assert exited.value.code == 2
    assert "LaMP-1, LaMP-2, LaMP-3, LaMP-4, LaMP-5, LaMP-6, LaMP-7" in capsys.readouterr().err


# Each bad input: (golds file content, preds file content, --task_name, the file the message
# must name, fragments of the message). Content is a JSON document, raw bytes, None for a
# missing file or DIRECTORY for a folder in its place.
DIRECTORY = object()
G7 = outputs_doc("LaMP_7", LAMP7_GOLDS)
P7 = outputs_doc("LaMP_7", LAMP7_PREDS)


def entries(*items):
    return {"task": "LaMP_7", "golds": list(items)}


BAD_INPUTS = {
    "golds missing": (None, P7, "LaMP_7", "golds", ["gold file", "does not exist"]),
    "preds missing": (G7, None, "LaMP_7", "preds", ["predictions file", "does not exist"]),
    "golds is a folder": (DIRECTORY, P7, "LaMP_7", "golds", ["is a directory"]),
    "malformed JSON": (G7, b'{"task": "LaMP_7", "golds": [', "LaMP_7", "preds",
                       ["malformed JSON", "line 1"]),
    "empty file": (b"", P7, "LaMP_7", "golds", ["malformed JSON"]),
    "not UTF-8": (G7, b'{"task": "LaMP_7", "golds": [{"id": "700", "output": "\xff"}]}',
                  "LaMP_7", "preds", ["not UTF-8"]),
    "a list, not an object": (G7, P7["golds"], "LaMP_7", "preds",
                              ["expected an object", "found list"]),
    "no task field": (G7, {"golds": P7["golds"]}, "LaMP_7", "preds", ['missing the "task" field']),
    "no golds field": (G7, {"task": "LaMP_7", "predictions": P7["golds"]}, "LaMP_7", "preds",
                       ['missing the "golds" field']),
    "task not a string": ({"task": 7, "golds": G7["golds"]}, P7, "LaMP_7", "golds",
                          ['"task" must be a string']),
    "unknown task in file": ({"task": "LaMP_9", "golds": G7["golds"]}, P7, "LaMP_7", "golds",
                             ["unknown task 'LaMP_9'", "LaMP-7"]),
    "golds not a list": (G7, {"task": "LaMP_7", "golds": {"700": "x"}}, "LaMP_7", "preds",
                         ['"golds" must be a list']),
    "entry not an object": (G7, entries("the cat"), "LaMP_7", "preds",
                            ["golds[0] must be an object"]),
    "entry without output": (G7, entries({"id": "700", "output": "x"}, {"id": "701"}), "LaMP_7",
                             "preds", ['golds[1] must be an object with "id" and "output"']),
    "entry without id": (entries({"output": "x"}), P7, "LaMP_7", "golds", ["golds[0]"]),
    "float id": (G7, entries({"id": 700.0, "output": "x"}), "LaMP_7", "preds",
                 ["golds[0] has id 700.0", "ids are strings"]),
    "boolean id": (G7, entries({"id": True, "output": "x"}), "LaMP_7", "preds",
                   ["golds[0] has id True"]),
    "null output": (G7, entries({"id": "700", "output": None}), "LaMP_7", "preds",
                    ["id 700 has a non-string output (NoneType)"]),
    "numeric rating output": (outputs_doc("LaMP_3", LAMP3_GOLDS),
                              {"task": "LaMP_3", "golds": [{"id": "300", "output": 4}]},
                              "LaMP_3", "preds", ["id 300 has a non-string output (int)"]),
    "list output": (entries({"id": "700", "output": ["a"]}), P7, "LaMP_7", "golds",
                    ["non-string output (list)"]),
    "flag differs from both files": (G7, P7, "LaMP_4", "golds",
                                     ["task is LaMP_7, expected LaMP_4"]),
    "preds of another task": (G7, outputs_doc("LaMP_6", LAMP7_PREDS), "LaMP_7", "preds",
                              ["task is LaMP_6, expected LaMP_7"]),
    "golds of another task": (outputs_doc("LaMP_5", LAMP7_GOLDS), P7, "LaMP-7", "golds",
                              ["task is LaMP_5, expected LaMP_7"]),
    "duplicate gold ids": (outputs_doc("LaMP_7", LAMP7_GOLDS + [("701", "again")]), P7,
                           "LaMP_7", "golds", ["duplicate ids: 1 (first: 701)"]),
    "duplicate ids as int and string": (G7, entries({"id": "700", "output": "x"},
                                                    {"id": 700, "output": "y"}),
                                        "LaMP_7", "preds", ["duplicate ids: 1 (first: 700)"]),
    "predictions missing": (G7, outputs_doc("LaMP_7", LAMP7_PREDS[:1]), "LaMP_7", "preds",
                            ["no prediction for 2 (first: 701, 702) gold ids"]),
    "predictions without gold": (G7, outputs_doc("LaMP_7", LAMP7_PREDS + [("9", "x"), ("8", "y")]),
                                 "LaMP_7", "preds",
                                 ["predictions for 2 (first: 9, 8) ids that have no gold"]),
    "many missing, first five shown": (
        outputs_doc("LaMP_7", [(str(i), "x") for i in range(10)]),
        outputs_doc("LaMP_7", [("0", "x")]), "LaMP_7", "preds",
        ["no prediction for 9 (first: 1, 2, 3, 4, 5, …) gold ids"]),
    "empty gold set": (outputs_doc("LaMP_7", []), outputs_doc("LaMP_7", []), "LaMP_7", "golds",
                       ["the gold set is empty"]),
    "gold not a label": (outputs_doc("LaMP_2", [("200", "comedy"), ("201", "horror")]),
                         outputs_doc("LaMP_2", [("200", "comedy"), ("201", "comedy")]),
                         "LaMP_2", "golds", ["not labels", "1 (first: 201) ids"]),
    "gold rating not a number": (outputs_doc("LaMP_3", [("300", "five")]),
                                 outputs_doc("LaMP_3", [("300", "5")]), "LaMP_3", "golds",
                                 ["not numbers", "1 (first: 300) ids"]),
}


def place(path: Path, content) -> None:
    if content is None:
        return
    if content is DIRECTORY:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        write_json(path, content)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_eval_task_bad_input_names_the_file_and_writes_nothing(tmp_path, case):
    golds, preds, task, culprit, fragments = BAD_INPUTS[case]
    paths = {"golds": tmp_path / "golds.json", "preds": tmp_path / "preds.json"}
    place(paths["golds"], golds)
    place(paths["preds"], preds)
    output = tmp_path / "out.json"
    assert_lamp_error(eval_task.main, ["--golds_json", str(paths["golds"]), "--preds_json",
                                       str(paths["preds"]), "--task_name", task,
                                       "--output_file", str(output)],
                      output, str(paths[culprit]), *fragments)


def test_eval_task_unreadable_file(tmp_path, monkeypatch):
    golds = write_outputs(tmp_path / "golds.json", "LaMP_7", LAMP7_GOLDS)
    preds = write_outputs(tmp_path / "preds.json", "LaMP_7", LAMP7_PREDS)

    # chmod does not stop root, so the refusal is simulated where the file is read
    real_read_bytes = Path.read_bytes

    def read_bytes(self):
        if self == preds:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    (tmp_path / "out").mkdir()
    output = tmp_path / "out" / "results.json"
    assert_lamp_error(eval_task.main, ["--golds_json", str(golds), "--preds_json", str(preds),
                                       "--task_name", "LaMP_7", "--output_file", str(output)],
                      output, str(preds), "cannot read", "Permission denied")


def test_eval_task_file_too_large(tmp_path, monkeypatch):
    golds = write_outputs(tmp_path / "golds.json", "LaMP_7", LAMP7_GOLDS)
    preds = write_outputs(tmp_path / "preds.json", "LaMP_7", LAMP7_PREDS)
    monkeypatch.setattr(LaMP.utils.data.outputs, "MAX_OUTPUTS_BYTES", 50)
    output = tmp_path / "out.json"
    assert_lamp_error(eval_task.main, ["--golds_json", str(golds), "--preds_json", str(preds),
                                       "--task_name", "LaMP_7", "--output_file", str(output)],
                      output, str(golds), "too large", "limit 50")


# --- eval_all -------------------------------------------------------------------------------


def golds_zip(path: Path) -> Path:
    """LaMP-2, 3 and 7 golds in nested folders, with the junk archives collect on the way."""
    return make_zip(path, {
        "LaMP/": None,
        "LaMP/LaMP_2/dev/": None,
        "LaMP/LaMP_2/dev/dev_outputs.json": outputs_doc("LaMP_2", LAMP2_GOLDS),
        # named after another task on purpose: the task comes from the "task" field
        "LaMP/LaMP_7/dev/dev_outputs.json": outputs_doc("LaMP_3", LAMP3_GOLDS),
        "LaMP/deep/er/still/golds_seven.JSON": outputs_doc("LaMP_7", LAMP7_GOLDS),
        "__MACOSX/LaMP/LaMP_2/dev/._dev_outputs.json": b"\x00\x05\x16\x07 not json",
        # a second LaMP_2 file, which would be an error were __MACOSX/ read
        "__MACOSX/LaMP/LaMP_2/dev/dev_outputs.json": outputs_doc("LaMP_2", LAMP2_PREDS),
        "LaMP/LaMP_2/dev/._dev_outputs.json": b"\x00\x05\x16\x07 not json",
        "LaMP/README.txt": b"not a LaMP file",
        "LaMP/notes.md": b"# notes",
        ".DS_Store": b"\x00\x00\x00\x01Bud1",
    })


def preds_zip(path: Path, *, with_lamp4: bool = True) -> Path:
    members = {
        "LaMP_2.json": outputs_doc("LaMP_2", LAMP2_PREDS),
        "preds/LaMP_3.json": outputs_doc("LaMP_3", LAMP3_PREDS),
        "__MACOSX/._LaMP_2.json": b"junk",
    }
    if with_lamp4:  # a task without golds: listed, not scored
        members["preds/LaMP_4.json"] = outputs_doc("LaMP_4", [("400", "a headline")])
    return make_zip(path, members)


def eval_all_argv(golds: Path, preds: Path, output: Path, *extra) -> list[str]:
    return ["--golds_zip", str(golds), "--preds_zip", str(preds), "--output_file", str(output),
            *extra]


def test_eval_all_scores_the_tasks_with_both_sides(tmp_path, capsys):
    golds, preds = golds_zip(tmp_path / "golds.zip"), preds_zip(tmp_path / "preds.zip")
    output = tmp_path / "out" / "results.json"
    results = eval_all.main(eval_all_argv(golds, preds, output))
    assert json.loads(output.read_text(encoding="utf-8")) == results
    assert list(results) == ["LaMP_2", "LaMP_3"]
    # same sets and hand-computed values as the eval_task tests above
    assert results["LaMP_2"] == {"accuracy": pytest.approx(0.5), "f1": pytest.approx(0.1),
                                 "count": 4, "invalid": 1}
    assert results["LaMP_3"] == {"MAE": pytest.approx(3.5 / 3), "RMSE": pytest.approx(1.75 ** 0.5),
                                 "count": 3, "invalid": 1}
    out = capsys.readouterr().out
    assert "not scored: LaMP_1 (no golds and no predictions)" in out
    assert "not scored: LaMP_4 (no golds)" in out
    assert "not scored: LaMP_7 (no predictions)" in out
    assert "not scored: LaMP_5" in out and "not scored: LaMP_6" in out
    assert "not scored: LaMP_2" not in out and "not scored: LaMP_3" not in out


def test_eval_all_generation_and_bootstrap(tmp_path):
    golds = make_zip(tmp_path / "golds.zip", {"a/b.json": outputs_doc("LaMP_7", LAMP7_GOLDS)})
    preds = make_zip(tmp_path / "preds.zip", {"p.json": outputs_doc("LaMP_7", LAMP7_PREDS)},
                     compression=zipfile.ZIP_STORED)
    results = eval_all.main(eval_all_argv(golds, preds, tmp_path / "r.json", "--bootstrap", "50"))
    result = results["LaMP_7"]
    assert result["rouge-1"] == pytest.approx(0.6) and result["rouge-L"] == pytest.approx(0.35)
    assert set(result["ci95"]) == {"rouge-1", "rouge-L"}
    assert result["bootstrap"] == {"samples": 50, "seed": 0}


def test_eval_all_never_touches_temp_dir_or_anything_else(tmp_path):
    golds, preds = golds_zip(tmp_path / "golds.zip"), preds_zip(tmp_path / "preds.zip")
    temp_dir = tmp_path / "temp"
    write_json(temp_dir / "keep.json", {"precious": True})
    (temp_dir / "sub").mkdir()
    (temp_dir / "sub" / "notes.txt").write_text("do not delete", encoding="utf-8")
    before = tree(tmp_path)
    output = tmp_path / "results.json"
    eval_all.main(eval_all_argv(golds, preds, output, "--temp_dir", str(temp_dir)))
    after = tree(tmp_path)
    assert set(after) - set(before) == {"results.json"}
    assert {k: v for k, v in after.items() if k != "results.json"} == before


def test_eval_all_require_all(tmp_path):
    golds, preds = golds_zip(tmp_path / "golds.zip"), preds_zip(tmp_path / "preds.zip")
    output = tmp_path / "results.json"
    message = assert_lamp_error(eval_all.main, eval_all_argv(golds, preds, output, "--require_all"),
                                output, "--require_all", "LaMP_1 (no golds and no predictions)",
                                "LaMP_4 (no golds)", "LaMP_7 (no predictions)")
    assert "LaMP_2" not in message and "LaMP_3" not in message


def test_eval_all_require_all_passes_with_all_seven(tmp_path):
    pairs = {"LaMP_1": ("[1]", "[2]"), "LaMP_2": ("comedy", "comedy"), "LaMP_3": ("3", "4"),
             "LaMP_4": ("a b", "a"), "LaMP_5": ("x y", "x y"), "LaMP_6": ("s", "t"),
             "LaMP_7": ("one two", "two one")}
    golds = make_zip(tmp_path / "golds.zip", {f"{task}/g.json": outputs_doc(task, [("1", gold)])
                                              for task, (gold, _) in pairs.items()})
    preds = make_zip(tmp_path / "preds.zip", {f"{task}.json": outputs_doc(task, [("1", pred)])
                                              for task, (_, pred) in pairs.items()})
    results = eval_all.main(eval_all_argv(golds, preds, tmp_path / "r.json", "--require_all"))
    assert list(results) == list(pairs)
    assert results["LaMP_1"]["accuracy"] == 0.0
    assert results["LaMP_2"]["accuracy"] == 1.0
    assert results["LaMP_3"]["MAE"] == 1.0
    # "a" against "a b": P 1, R 1/2 -> 2/3
    assert results["LaMP_4"]["rouge-1"] == pytest.approx(2 / 3)
    assert results["LaMP_5"]["rouge-L"] == 1.0
    assert results["LaMP_6"]["rouge-1"] == 0.0
    assert results["LaMP_7"] == {"rouge-1": 1.0, "rouge-L": 0.5, "count": 1}


def corrupted_deflate_zip(path: Path) -> Path:
    """A zip whose directory is intact but whose compressed data is garbage."""
    make_zip(path, {"g.json": outputs_doc("LaMP_2", [(str(i), "comedy") for i in range(300)])})
    data = bytearray(path.read_bytes())
    start = 30 + len("g.json")  # the local header is 30 bytes plus the name
    for position in range(start + 10, start + 30):
        data[position] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def crc_mismatch_zip(path: Path) -> Path:
    """A stored (uncompressed) member whose bytes no longer match its CRC."""
    document = json.dumps(outputs_doc("LaMP_2", LAMP2_GOLDS)).encode()
    make_zip(path, {"g.json": document}, compression=zipfile.ZIP_STORED)
    data = path.read_bytes()
    path.write_bytes(data.replace(b"comedy", b"cOmedy", 1))
    return path


def patched_header_zip(path: Path, flag_bits: int = 0, method: int = 0) -> Path:
    """A stored member whose headers claim encryption (flag bit 0) or another compression method."""
    make_zip(path, {"g.json": outputs_doc("LaMP_2", LAMP2_GOLDS)}, compression=zipfile.ZIP_STORED)
    data = bytearray(path.read_bytes())
    central = data.find(b"PK\x01\x02")
    # local header: flags at 6, method at 8; central directory entry: flags at 8, method at 10
    for offset in (6, central + 8):
        data[offset:offset + 4] = struct.pack("<HH", flag_bits, method)
    path.write_bytes(bytes(data))
    return path


def two_files_for_one_task(path: Path) -> Path:
    return make_zip(path, {"a/LaMP_2.json": outputs_doc("LaMP_2", LAMP2_GOLDS),
                           "b/copy.json": outputs_doc("LaMP_2", LAMP2_GOLDS)})


# (which zip is bad, how to build it, fragments of the message besides the zip's path)
BAD_ZIPS = {
    "missing": ("golds", None, ["golds zip", "does not exist"]),
    "a folder": ("preds", lambda p: p.mkdir(), ["is a directory"]),
    "not a zip": ("preds", lambda p: p.write_text("just text", encoding="utf-8"),
                  ["not a zip archive"]),
    "a JSON file, not a zip": ("golds", lambda p: write_json(p, outputs_doc("LaMP_2", LAMP2_GOLDS)),
                               ["not a zip archive"]),
    "truncated": ("preds", lambda p: p.write_bytes(
        preds_zip(p.with_name("whole.zip")).read_bytes()[:200]), ["not a zip archive"]),
    "corrupted compressed data": ("golds", corrupted_deflate_zip, ["damaged zip archive"]),
    "CRC mismatch": ("golds", crc_mismatch_zip, ["damaged zip archive"]),
    "encrypted member": ("golds", lambda p: patched_header_zip(p, flag_bits=1),
                         [":g.json", "encrypted"]),
    "unsupported compression": ("golds", lambda p: patched_header_zip(p, method=99),
                                ["cannot read this zip archive", "compression method"]),
    "malformed JSON member": ("preds", lambda p: make_zip(p, {"x/LaMP_2.json": b'{"task": '}),
                              [":x/LaMP_2.json", "malformed JSON"]),
    "wrong schema member": ("preds", lambda p: make_zip(p, {"x/p.json": {"task": "LaMP_2"}}),
                            [":x/p.json", 'missing the "golds" field']),
    "unknown task member": ("golds", lambda p: make_zip(p, {"g.json": outputs_doc("LaMP_8", [])}),
                            [":g.json", "unknown task 'LaMP_8'"]),
    "ids missing in a member": ("preds", lambda p: make_zip(p, {"in/p.json": outputs_doc(
        "LaMP_2", LAMP2_PREDS[:1])}), [":in/p.json", "no prediction for 3 (first: 201, 202, 203)"]),
    "duplicate ids in a member": ("golds", lambda p: make_zip(p, {"g.json": outputs_doc(
        "LaMP_2", LAMP2_GOLDS + LAMP2_GOLDS[:1])}), [":g.json", "duplicate ids: 1 (first: 200)"]),
    "non-string output in a member": ("preds", lambda p: make_zip(p, {"p.json": {
        "task": "LaMP_2", "golds": [{"id": "200", "output": 3}]}}),
        [":p.json", "non-string output"]),
    "empty gold set": ("golds", lambda p: make_zip(p, {"g.json": outputs_doc("LaMP_2", [])}),
                       [":g.json", "the gold set is empty"]),
    "two files for one task": ("golds", two_files_for_one_task,
                               ["two files for LaMP_2", ":a/LaMP_2.json", ":b/copy.json"]),
    "no JSON at all": ("golds", lambda p: make_zip(p, {"readme.txt": b"hi"}),
                       ["no task has both golds and predictions", "holds no LaMP outputs file",
                        "preds.zip holds LaMP_2, LaMP_3, LaMP_4"]),
    "no common task": ("preds", lambda p: make_zip(p, {"p.json": outputs_doc("LaMP_5", [])}),
                       ["no task has both golds and predictions",
                        "golds.zip holds LaMP_2, LaMP_3, LaMP_7", "preds.zip holds LaMP_5"]),
}


@pytest.mark.parametrize("case", list(BAD_ZIPS))
def test_eval_all_bad_input_names_the_file_and_writes_nothing(tmp_path, case):
    culprit, build, fragments = BAD_ZIPS[case]
    paths = {"golds": tmp_path / "golds.zip", "preds": tmp_path / "preds.zip"}
    # the other side is the usual good archive
    if culprit == "preds":
        golds_zip(paths["golds"])
    else:
        preds_zip(paths["preds"])
    if build is not None:
        build(paths[culprit])
    (tmp_path / "out").mkdir()
    output = tmp_path / "out" / "results.json"
    assert_lamp_error(eval_all.main, eval_all_argv(paths["golds"], paths["preds"], output),
                      output, str(paths[culprit]), *fragments)


def test_eval_all_unreadable_zip(tmp_path, monkeypatch):
    golds, preds = golds_zip(tmp_path / "golds.zip"), preds_zip(tmp_path / "preds.zip")

    # chmod does not stop root, so every open() of the archive is refused instead
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file) == preds:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    (tmp_path / "out").mkdir()
    output = tmp_path / "out" / "results.json"
    assert_lamp_error(eval_all.main, eval_all_argv(golds, preds, output), output,
                      str(preds), "cannot read", "Permission denied")


def test_eval_all_member_too_large(tmp_path, monkeypatch):
    golds, preds = golds_zip(tmp_path / "golds.zip"), preds_zip(tmp_path / "preds.zip")
    # the smallest gold member is about 150 bytes; 100 refuses every one of them
    monkeypatch.setattr(LaMP.utils.data.outputs, "MAX_OUTPUTS_BYTES", 100)
    (tmp_path / "out").mkdir()
    output = tmp_path / "out" / "results.json"
    assert_lamp_error(eval_all.main, eval_all_argv(golds, preds, output), output,
                      f"{golds}:LaMP/", "too large to be a LaMP outputs file", "limit 100")


# --- compare --------------------------------------------------------------------------------


def test_compare_two_systems(tmp_path, capsys):
    golds = write_outputs(tmp_path / "golds.json", "LaMP_1",
                          [(str(i), "[1]" if i % 2 else "[2]") for i in range(30)])
    # A always answers [1] (right on the 15 odd ids); B is always right
    preds_a = write_outputs(tmp_path / "a.json", "LaMP_1", [(str(i), "[1]") for i in range(30)])
    preds_b = write_outputs(tmp_path / "b.json", "LaMP_1",
                            [(str(i), "[1]" if i % 2 else "[2]") for i in range(30)])
    output = tmp_path / "cmp" / "comparison.json"
    argv = ["--golds_json", str(golds), "--preds_a", str(preds_a), "--preds_b", str(preds_b),
            "--task_name", "LaMP-1", "--output_file", str(output), "--bootstrap", "300"]
    comparison = compare.main(argv)
    saved = json.loads(output.read_text(encoding="utf-8"))
    assert saved == {"task": "LaMP_1", "count": 30, "bootstrap": 300, "seed": 0,
                     "metrics": comparison}
    accuracy = comparison["accuracy"]
    assert (accuracy["first"], accuracy["second"], accuracy["difference"]) == (0.5, 1.0, 0.5)
    assert accuracy["ci95"][0] > 0
    assert accuracy["p_value"] == pytest.approx(1 / 301)
    # A's macro-F1: [1] TP 15, predicted 30, actual 15 -> 2/3; [2] -> 0; mean 1/3
    assert comparison["f1"]["first"] == pytest.approx(1 / 3)
    table = capsys.readouterr().out
    assert "accuracy" in table and "+0.5000" in table and " B" in table
    assert compare.main(argv) == comparison  # seeded


def test_compare_identical_systems_and_no_output_file(tmp_path):
    golds = write_outputs(tmp_path / "golds.json", "LaMP_7", LAMP7_GOLDS)
    preds = write_outputs(tmp_path / "p.json", "LaMP_7", LAMP7_PREDS)
    before = tree(tmp_path)
    comparison = compare.main(["--golds_json", str(golds), "--preds_a", str(preds),
                               "--preds_b", str(preds), "--task_name", "LaMP_7",
                               "--bootstrap", "20"])
    assert tree(tmp_path) == before  # --output_file is optional
    for values in comparison.values():
        assert values["difference"] == 0.0 and values["p_value"] == 1.0


def test_compare_rejects_mismatched_ids_in_either_system(tmp_path):
    golds = write_outputs(tmp_path / "golds.json", "LaMP_7", LAMP7_GOLDS)
    preds_a = write_outputs(tmp_path / "a.json", "LaMP_7", LAMP7_PREDS)
    preds_b = write_outputs(tmp_path / "b.json", "LaMP_7", LAMP7_PREDS[:2])
    output = tmp_path / "comparison.json"
    for first, second in ((preds_a, preds_b), (preds_b, preds_a)):
        assert_lamp_error(compare.main, ["--golds_json", str(golds), "--preds_a", str(first),
                                         "--preds_b", str(second), "--task_name", "LaMP_7",
                                         "--output_file", str(output)],
                          output, str(preds_b), "no prediction for 1 (first: 702)")


def test_compare_needs_at_least_one_resample():
    with pytest.raises(SystemExit):
        compare.parse_args(["--golds_json", "g", "--preds_a", "a", "--preds_b", "b",
                            "--task_name", "LaMP_1", "--bootstrap", "0"])


# --- as a user runs them --------------------------------------------------------------------


def run_python(*args: str) -> subprocess.CompletedProcess:
    """A fresh interpreter in the repository, importing this checkout's ``LaMP``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def assert_one_line_error(process: subprocess.CompletedProcess, *fragments: str) -> None:
    assert process.returncode == 2
    assert "Traceback" not in process.stderr
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1, process.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_script_eval_task_missing_predictions(tmp_path):
    golds = write_outputs(tmp_path / "golds.json", "LaMP_2", LAMP2_GOLDS)
    output = tmp_path / "out.json"
    process = run_python("eval/eval_task.py", "--golds_json", str(golds), "--preds_json",
                         str(tmp_path / "nope.json"), "--task_name", "LaMP_2",
                         "--output_file", str(output))
    assert_one_line_error(process, str(tmp_path / "nope.json"), "does not exist")
    assert not output.exists()


def test_script_eval_task_id_mismatch(tmp_path):
    golds = write_outputs(tmp_path / "golds.json", "LaMP_2", LAMP2_GOLDS)
    preds = write_outputs(tmp_path / "preds.json", "LaMP_2", LAMP2_PREDS[1:])
    output = tmp_path / "out.json"
    process = run_python("eval/eval_task.py", "--golds_json", str(golds), "--preds_json",
                         str(preds), "--task_name", "LaMP_2", "--output_file", str(output))
    assert_one_line_error(process, str(preds), "no prediction for 1 (first: 200)")
    assert not output.exists()


def test_script_eval_all_damaged_zip(tmp_path):
    golds = corrupted_deflate_zip(tmp_path / "golds.zip")
    preds = preds_zip(tmp_path / "preds.zip")
    output = tmp_path / "out.json"
    process = run_python("eval/eval_all.py", *eval_all_argv(golds, preds, output))
    assert_one_line_error(process, str(golds), "damaged zip archive")
    assert not output.exists()


def test_script_eval_all_not_a_zip(tmp_path):
    golds = golds_zip(tmp_path / "golds.zip")
    preds = write_outputs(tmp_path / "preds.zip", "LaMP_2", LAMP2_PREDS)
    output = tmp_path / "out.json"
    process = run_python("eval/eval_all.py", *eval_all_argv(golds, preds, output))
    assert_one_line_error(process, str(preds), "not a zip archive")
    assert not output.exists()


def test_script_usage_error_has_no_traceback(tmp_path):
    process = run_python("eval/eval_task.py", "--golds_json", "g.json", "--preds_json", "p.json",
                         "--task_name", "LaMP3", "--output_file", str(tmp_path / "o.json"))
    assert process.returncode == 2
    assert "Traceback" not in process.stderr
    assert "valid tasks: LaMP-1" in process.stderr


def test_script_eval_all_succeeds_without_importing_torch(tmp_path):
    # all three metric families, so that the ROUGE path is imported too
    golds = make_zip(tmp_path / "golds.zip", {"g7.json": outputs_doc("LaMP_7", LAMP7_GOLDS),
                                              "g2.json": outputs_doc("LaMP_2", LAMP2_GOLDS),
                                              "g3.json": outputs_doc("LaMP_3", LAMP3_GOLDS)})
    preds = make_zip(tmp_path / "preds.zip", {"p7.json": outputs_doc("LaMP_7", LAMP7_PREDS),
                                              "p2.json": outputs_doc("LaMP_2", LAMP2_PREDS),
                                              "p3.json": outputs_doc("LaMP_3", LAMP3_PREDS)})
    output = tmp_path / "results.json"
    code = (
        "import json, runpy, sys\n"
        "main = runpy.run_path('eval/eval_all.py')['main']\n"
        f"results = main({eval_all_argv(golds, preds, output)!r})\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "print(json.dumps({'tasks': list(results), 'heavy': heavy}))\n"
    )
    process = run_python("-c", code)
    assert process.returncode == 0, process.stderr
    report = json.loads(process.stdout.strip().splitlines()[-1])
    assert report == {"tasks": ["LaMP_2", "LaMP_3", "LaMP_7"], "heavy": []}
    assert set(json.loads(output.read_text(encoding="utf-8"))) == {"LaMP_2", "LaMP_3", "LaMP_7"}


def test_script_eval_all_prints_a_table(tmp_path):
    golds, preds = golds_zip(tmp_path / "golds.zip"), preds_zip(tmp_path / "preds.zip")
    output = tmp_path / "results.json"
    process = run_python("eval/eval_all.py", *eval_all_argv(golds, preds, output,
                                                            "--temp_dir", str(tmp_path / "t")))
    assert process.returncode == 0, process.stderr
    assert "Traceback" not in process.stderr
    lines = process.stdout.splitlines()
    assert lines[0].split() == ["task", "metric", "value", "95%", "CI", "n", "invalid"]
    assert any(line.split()[:3] == ["LaMP_2", "accuracy", "0.5000"] for line in lines)
    assert "not scored: LaMP_7 (no predictions)" in lines
    assert json.loads(output.read_text(encoding="utf-8"))["LaMP_3"]["invalid"] == 1
    assert not (tmp_path / "t").exists()  # --temp_dir is accepted, never created


# --- LaMP-2N: the original LaMP-2, whose published files say "LaMP_2" -----------------------

NEWS_GOLDS = [("100", "sports"), ("101", "women"), ("102", "crime"), ("103", "sports")]
NEWS_PREDS = [("100", "sports"), ("101", "sports"), ("102", " crime "), ("103", "football")]


@pytest.mark.parametrize("declared", ["LaMP_2", "LaMP_2N"])
def test_eval_task_scores_lamp_2n_files_whichever_name_they_carry(tmp_path, declared):
    golds = write_outputs(tmp_path / "golds.json", declared, NEWS_GOLDS)
    preds = write_outputs(tmp_path / "preds.json", declared, NEWS_PREDS)
    for flag in ("LaMP-2N", "lamp_2_old"):
        result = eval_task.main(["--golds_json", str(golds), "--preds_json", str(preds),
                                 "--task_name", flag, "--output_file", str(tmp_path / "r.json")])
        # 2 of 4 right ("crime" after stripping); "football" is no category. Macro F1 over
        # the 15 categories: sports P 1/2 R 1/2, crime 1, women 0, the rest 0 -> 1.5 / 15.
        assert result["accuracy"] == pytest.approx(0.5)
        assert result["f1"] == pytest.approx(1.5 / 15)
        assert result["invalid"] == 1 and result["count"] == 4
    # Read without a flag the file's own outputs say which LaMP-2 it is.
    assert LaMP.utils.data.outputs.load_outputs(golds).task.name == "LaMP-2N"
    # Movie tagging is still movie tagging: its golds are not news categories.
    message = assert_lamp_error(eval_task.main, [
        "--golds_json", str(golds), "--preds_json", str(preds), "--task_name", "LaMP-2",
        "--output_file", str(tmp_path / "out" / "r.json")], tmp_path / "out" / "r.json",
        "expected LaMP_2")
    assert str(golds) in message


@pytest.mark.parametrize("prediction", ["no idea", "comedy", "Sports"])
def test_lamp_2n_predictions_under_the_old_name_are_scored_against_lamp_2n_golds(tmp_path,
                                                                                prediction):
    # Whatever the predictions hold (no label, movie tags, a category in another case), a
    # file saying "LaMP_2" is scored as the golds' task: the golds decide.
    golds = write_outputs(tmp_path / "golds.json", "LaMP_2", NEWS_GOLDS)
    preds = write_outputs(tmp_path / "preds.json", "LaMP_2",
                          [(i, prediction) for i, _ in NEWS_GOLDS])
    result = eval_task.main(["--golds_json", str(golds), "--preds_json", str(preds),
                             "--task_name", "LaMP-2N", "--output_file", str(tmp_path / "r.json")])
    assert result["accuracy"] == 0.0 and result["invalid"] == 4
    # Movie golds are still movie golds, whatever their predictions look like ("crime" for
    # every movie); and predictions that say LaMP_2N never pass for movie tagging's.
    movie_golds = write_outputs(tmp_path / "movie_golds.json", "LaMP_2", LAMP2_GOLDS)
    crime = write_outputs(tmp_path / "crime.json", "LaMP_2", [(i, "crime") for i, _ in LAMP2_GOLDS])
    result = eval_task.main(["--golds_json", str(movie_golds), "--preds_json", str(crime),
                             "--task_name", "LaMP-2", "--output_file", str(tmp_path / "m.json")])
    assert result["accuracy"] == 0.0 and result["invalid"] == 4
    news_named = write_outputs(tmp_path / "news.json", "LaMP_2N", LAMP2_PREDS)
    assert_lamp_error(eval_task.main, [
        "--golds_json", str(movie_golds), "--preds_json", str(news_named), "--task_name",
        "LaMP-2", "--output_file", str(tmp_path / "o" / "r.json")], tmp_path / "o" / "r.json",
        str(news_named), "task is LaMP_2N, expected LaMP_2")


def test_eval_all_scores_lamp_2n_beside_lamp_2_and_never_requires_it(tmp_path, capsys):
    golds = make_zip(tmp_path / "golds.zip", {
        "LaMP_2/dev_outputs.json": outputs_doc("LaMP_2", LAMP2_GOLDS),
        "LaMP_2_old/dev_outputs.json": outputs_doc("LaMP_2", NEWS_GOLDS)})
    preds = make_zip(tmp_path / "preds.zip", {
        "LaMP_2.json": outputs_doc("LaMP_2", LAMP2_PREDS),
        "LaMP_2N.json": outputs_doc("LaMP_2N", NEWS_PREDS)})
    results = eval_all.main(eval_all_argv(golds, preds, tmp_path / "r.json"))
    assert list(results) == ["LaMP_2", "LaMP_2N"]
    assert results["LaMP_2"]["accuracy"] == pytest.approx(0.5)  # the movie sets above
    assert results["LaMP_2N"]["accuracy"] == pytest.approx(0.5)
    out = capsys.readouterr().out
    assert "not scored: LaMP_1" in out and "LaMP_2N (" not in out
    # --require_all names the seven benchmark tasks it lacks, never LaMP-2N.
    message = assert_lamp_error(eval_all.main, eval_all_argv(
        golds_zip(tmp_path / "g.zip"), preds_zip(tmp_path / "p.zip"), tmp_path / "o" / "r.json",
        "--require_all"), tmp_path / "o" / "r.json", "LaMP_1 (no golds and no predictions)")
    assert "LaMP_2N" not in message


def test_eval_all_require_all_passes_with_lamp_2n_golds_but_no_lamp_2n_predictions(tmp_path,
                                                                                   capsys):
    sample = REPO / "data" / "sample" / "user"
    golds = make_zip(tmp_path / "golds.zip", {
        f"{folder.name}/dev_outputs.json": json.loads((folder / "dev_outputs.json").read_text())
        for folder in sorted(sample.iterdir())})
    preds = make_zip(tmp_path / "preds.zip", {
        f"{folder.name}.json": json.loads((folder / "dev_outputs.json").read_text())
        for folder in sorted(sample.iterdir()) if folder.name != "LaMP_2_old"})
    results = eval_all.main(eval_all_argv(golds, preds, tmp_path / "r.json", "--require_all"))
    assert len(results) == 7 and "LaMP_2N" not in results
    assert "not scored: LaMP_2N (no predictions)" in capsys.readouterr().out


def test_eval_all_pairs_lamp_2n_predictions_of_no_label_with_lamp_2n_golds(tmp_path):
    # Read alone such predictions look like movie tagging's (no news category among them);
    # with LaMP-2N golds in the other zip and no movie golds, they are LaMP-2N's.
    golds = make_zip(tmp_path / "golds.zip", {"old/dev.json": outputs_doc("LaMP_2", NEWS_GOLDS)})
    preds = make_zip(tmp_path / "preds.zip", {
        "p.json": outputs_doc("LaMP_2", [(i, "?") for i, _ in NEWS_GOLDS])})
    results = eval_all.main(eval_all_argv(golds, preds, tmp_path / "r.json"))
    assert list(results) == ["LaMP_2N"] and results["LaMP_2N"]["invalid"] == 4
