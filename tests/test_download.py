"""LaMP/utils/data/download.py, through download_data.py, on bad input and bad luck: each
ends in a per-file error or one line up front, never a traceback, a lost download or a file
that holds the wrong data.

The server is the one test_download_data.py starts on 127.0.0.1.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from LaMP.utils.cli.program import run
from LaMP.utils.errors import LampError
from conftest import LAMP_REAL, REPO, SAMPLE, outputs_doc, requires_real_data, run_cli
from test_download_data import (args_for, download, download_data, lamp7_questions,
                                publish_lamp2_with_known_issue, publish_lamp7, server)

__all__ = ["server"]  # the fixture, imported for pytest

LAMP3_INSTRUCTION = "What is the score of the following review on a scale of 1 to 5? just answer " \
                    "with 1, 2, 3, 4, or 5 without further explanation. review: "
DEV7 = "/downloads/LaMP/LaMP_7/dev/"


def lamp7_dev(server, tmp_path: Path, *extra: str) -> list[str]:
    return args_for(server, tmp_path, "--tasks", "LaMP_7", "--splits", "user", "--sets", "dev",
                    *extra)


def script(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """download_data.py as a user runs it."""
    return subprocess.run([sys.executable, str(REPO / "download_data.py"), *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes()
            for path in sorted(folder.rglob("*")) if path.is_file()}


# -- what the server sends ----------------------------------------------------------------

@pytest.mark.parametrize("head_status", [None, 405])
def test_an_empty_body_fails_that_file_only(server, tmp_path, capsys, head_status):
    published = publish_lamp7(server)
    server.put("LaMP_7/dev/dev_questions.json", b"")
    server.head_status = head_status  # with 405 the size is learnt only from the GET
    args = args_for(server, tmp_path, "--tasks", "LaMP_7", "--splits", "user")
    with pytest.raises(LampError, match=r"^1 of 5 files failed .*dev_questions\.json"):
        download_data.main(args)
    err = capsys.readouterr().err
    assert f"user/LaMP_7/dev_questions.json: the server sent an empty file for " \
           f"{server.base_url}/LaMP_7/dev/dev_questions.json" in err
    folder = tmp_path / "user" / "LaMP_7"
    # The files after it were still fetched; nothing is left of the empty one.
    assert sorted(path.name for path in folder.iterdir()) == [
        "dev_outputs.json", "test_questions.json", "train_outputs.json", "train_questions.json"]
    assert (folder / "test_questions.json").read_bytes() == published["test_questions.json"]


def test_a_body_shorter_than_its_content_length_is_resumed(server, tmp_path):
    published = publish_lamp7(server)
    server.head_status = 405  # no size from HEAD: only the GET's Content-Length tells
    server.drop_once.add(DEV7 + "dev_questions.json")
    results = download_data.main(lamp7_dev(server, tmp_path))
    assert [r.status for r in results] == ["downloaded", "downloaded"]
    data = published["dev_questions.json"]
    assert (tmp_path / "user/LaMP_7/dev_questions.json").read_bytes() == data
    gets = [entry[2] for entry in server.gets() if entry[1] == DEV7 + "dev_questions.json"]
    assert gets == [None, f"bytes={len(data) // 2}-"]


def test_a_body_always_cut_short_fails_and_keeps_its_part(server, tmp_path, capsys):
    published = publish_lamp7(server)
    server.head_status = 405
    server.drop_always.add(DEV7 + "dev_outputs.json")
    with pytest.raises(LampError, match=r"^1 of 2 files failed"):
        download_data.main(lamp7_dev(server, tmp_path))
    assert "dev_outputs.json: connection ended at" in capsys.readouterr().err
    folder = tmp_path / "user" / "LaMP_7"
    assert not (folder / "dev_outputs.json").exists()
    part = (folder / "dev_outputs.json.part").read_bytes()
    assert 0 < len(part) < len(published["dev_outputs.json"])
    assert published["dev_outputs.json"].startswith(part)  # a prefix, for the next run


class FullDisk:
    """A file whose writes fail with ENOSPC once ``room`` bytes are on disk."""

    def __init__(self, handle, room: int):
        self.handle, self.room = handle, room

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            self.handle.write(data[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


def test_a_full_disk_fails_the_file_without_retrying_and_the_next_run_resumes(
        server, tmp_path, capsys, monkeypatch):
    published = publish_lamp7(server)
    full = DEV7 + "dev_questions.json"

    def open_on_a_full_disk(path, mode="r", *rest, **kwargs):
        handle = open(path, mode, *rest, **kwargs)
        return FullDisk(handle, 100) if str(path).endswith("dev_questions.json.part") else handle

    monkeypatch.setattr(download, "open", open_on_a_full_disk, raising=False)
    args = lamp7_dev(server, tmp_path)
    with pytest.raises(LampError, match=r"^1 of 2 files failed .*dev_questions\.json"):
        download_data.main(args)
    err = capsys.readouterr().err
    part = tmp_path / "user/LaMP_7/dev_questions.json.part"
    assert f"user/LaMP_7/dev_questions.json: cannot write {part} (No space left on device)" in err
    assert "Traceback" not in err and "retrying" not in err
    assert [entry[1] for entry in server.gets()].count(full) == 1  # a disk error is not retried
    assert part.read_bytes() == published["dev_questions.json"][:100]
    assert (tmp_path / "user/LaMP_7/dev_outputs.json").read_bytes() == published[
        "dev_outputs.json"]  # the next file still came

    monkeypatch.undo()  # space was freed
    server.log.clear()
    results = download_data.main(args)
    assert [r.status for r in results] == ["resumed", "up to date"]
    assert server.gets() == [("GET", full, "bytes=100-")]
    assert part.with_suffix("").read_bytes() == published["dev_questions.json"]


# -- files that parse but are not what they should be --------------------------------------

def lamp3_questions(count: int) -> list[dict]:
    return [{"id": f"21{row}", "input": f"{LAMP3_INSTRUCTION}a fine kettle {row}",
             "profile": [{"id": f"21{row}0", "text": "it boils", "score": "4"}]}
            for row in range(count)]


@pytest.mark.parametrize("fix", [[], ["--fix_known_issues"]])
def test_another_tasks_questions_are_not_kept(server, tmp_path, capsys, fix):
    published = publish_lamp7(server)
    lamp3 = server.put("LaMP_7/dev/dev_questions.json", lamp3_questions(4))
    with pytest.raises(LampError, match=r"^1 of 2 files failed .*dev_questions\.json"):
        download_data.main(lamp7_dev(server, tmp_path, *fix))
    folder = tmp_path / "user" / "LaMP_7"
    assert not (folder / "dev_questions.json").exists()
    # Kept under a name no stage reads, with the reason, never deleted.
    assert (folder / "dev_questions.rejected.json").read_bytes() == lamp3
    note = json.loads((folder / "dev_questions.rejected.reason.json").read_text())
    assert note["url"] == f"{server.base_url}/LaMP_7/dev/dev_questions.json"
    assert note["bytes"] == len(lamp3)
    assert note["reason"].startswith("user/LaMP_7/dev_questions.json: 4 of 4 inputs are not "
                                     "LaMP-7 inputs but LaMP-3 inputs (first: question 210:")
    assert "the downloaded file is not valid, kept as dev_questions.rejected.json" in \
        capsys.readouterr().err
    # The outputs are untouched: nothing was dropped from them.
    assert (folder / "dev_outputs.json").read_bytes() == published["dev_outputs.json"]
    manifest = json.loads((tmp_path / "download_manifest.json").read_text())["files"]
    assert "user/LaMP_7/dev_questions.json" not in manifest
    assert manifest["user/LaMP_7/dev_outputs.json"].get("removed_ids", []) == []


def test_another_tasks_outputs_under_our_task_name_are_not_kept(server, tmp_path, capsys):
    publish_lamp7(server)
    # LaMP-3 golds (ids 21…, ratings) with a "task" that claims LaMP-7.
    server.put("LaMP_7/dev/dev_outputs.json",
               outputs_doc("LaMP_7", [(f"21{row}", "4") for row in range(4)]))
    with pytest.raises(LampError, match=r"^1 of 2 files failed .*dev_outputs\.json"):
        download_data.main(lamp7_dev(server, tmp_path))
    assert "4 of 4 ids start with '2' as LaMP-3 ids do (LaMP-7 ids start with '6'): it holds " \
           "LaMP-3 data" in capsys.readouterr().err
    assert (tmp_path / "user/LaMP_7/dev_outputs.rejected.json").exists()
    assert not (tmp_path / "user/LaMP_7/dev_outputs.json").exists()


def test_questions_with_another_tasks_ids_are_not_kept(server, tmp_path, capsys):
    publish_lamp7(server)
    questions = lamp7_questions("3", 4)  # LaMP-7 inputs, LaMP-4 ids
    server.put("LaMP_7/dev/dev_questions.json", questions)
    with pytest.raises(LampError, match="1 of 2 files failed"):
        download_data.main(lamp7_dev(server, tmp_path))
    assert "ids start with '3' as LaMP-4 ids do" in capsys.readouterr().err


def test_outputs_of_another_set_are_not_kept(server, tmp_path, capsys):
    published = publish_lamp7(server)
    server.put("LaMP_7/dev/dev_outputs.json", published["train_outputs.json"])
    with pytest.raises(LampError, match=r"^1 of 2 files failed .*dev_outputs\.json"):
        download_data.main(lamp7_dev(server, tmp_path))
    assert "dev_outputs.json: 6 of 6 gold ids are not ids of dev_questions.json (first: 600, " \
           "601, 602): another set's or task's outputs" in capsys.readouterr().err
    folder = tmp_path / "user" / "LaMP_7"
    assert (folder / "dev_outputs.rejected.json").read_bytes() == published["train_outputs.json"]
    assert (folder / "dev_questions.json").read_bytes() == published["dev_questions.json"]


def test_every_task_of_the_sample_passes_the_checks(server, tmp_path):
    # The bundled sample has every task's input format and id scheme: no check may refuse it.
    for source in download.SOURCES:
        if source.task is None:
            continue
        for path in sorted((SAMPLE / source.name).glob("*_*.json")):
            set_name = path.name.split("_")[0]
            server.put(f"{source.remote}/{set_name}/{path.name}", path.read_bytes())
    results = download_data.main(args_for(server, tmp_path, "--splits", "user"))
    assert [r.status for r in results] == ["downloaded"] * 30
    assert all(not r.problems for r in results)


@requires_real_data
def test_the_real_lamp7_dev_pair_passes_the_checks(server, tmp_path):
    for name in ("dev_questions.json", "dev_outputs.json"):
        server.put(f"LaMP_7/dev/{name}", (LAMP_REAL / "LaMP_7/dev" / name).read_bytes())
    results = download_data.main(lamp7_dev(server, tmp_path))
    assert [(r.status, r.records) for r in results] == [("downloaded", 1500)] * 2


def test_a_few_malformed_questions_do_not_reject_a_file(server, tmp_path):
    questions = lamp7_questions("61", 5)
    questions[1]["input"] = "x lost its instruction"
    questions[2]["id"] = "999"  # an id of no known scheme is not a reason either
    server.put("LaMP_7/test/test_questions.json", questions)
    results = download_data.main(args_for(server, tmp_path, "--tasks", "LaMP_7", "--splits", "user",
                                     "--sets", "test"))
    assert results[0].status == "downloaded"
    assert [qid for qid, _ in results[0].problems] == ["611"]


def test_a_wrong_file_put_in_place_by_hand_is_refused_and_left_alone(server, tmp_path, capsys):
    published = publish_lamp7(server)
    target = tmp_path / "user/LaMP_7/dev_questions.json"
    target.parent.mkdir(parents=True)
    target.write_text(json.dumps(lamp3_questions(3)))
    before = target.read_bytes()
    server.head_status = 405  # the size cannot tell it apart: the check has to
    with pytest.raises(LampError, match="1 of 2 files failed"):
        download_data.main(lamp7_dev(server, tmp_path, "--fix_known_issues"))
    assert "3 of 3 inputs are not LaMP-7 inputs" in capsys.readouterr().err
    assert target.read_bytes() == before
    assert not (target.parent / "dev_questions.rejected.json").exists()  # not our download
    assert (target.parent / "dev_outputs.json").read_bytes() == published["dev_outputs.json"]


def test_an_empty_file_recorded_as_complete_is_looked_at_again(server, tmp_path, capsys):
    # A wrong file with every question dropped: "[]" under the final name and a manifest
    # entry that calls it complete.
    published = publish_lamp7(server)
    target = tmp_path / "user/LaMP_7/test_questions.json"
    target.parent.mkdir(parents=True)
    target.write_text("[]\n")
    remote = len(server.files["/downloads/LaMP/LaMP_7/test/test_questions.json"])
    (tmp_path / "download_manifest.json").write_text(json.dumps({"files": {
        "user/LaMP_7/test_questions.json": {"bytes": 3, "records": 0, "profile_items": 0,
                                            "problems": [], "removed_ids": ["610", "611", "612"],
                                            "remote_bytes": remote, "url": ""}}}))
    results = download_data.main(args_for(server, tmp_path, "--tasks", "LaMP_7", "--splits", "user",
                                     "--sets", "test"))
    assert results[0].status == "downloaded"
    err = capsys.readouterr().err
    assert "the entry for user/LaMP_7/test_questions.json is malformed" in err
    assert target.read_bytes() == published["test_questions.json"]


def test_a_good_download_replaces_an_earlier_rejection(server, tmp_path):
    published = publish_lamp7(server)
    server.put("LaMP_7/dev/dev_questions.json", lamp3_questions(2))
    args = lamp7_dev(server, tmp_path)
    assert run(download_data.main, args) == 2
    folder = tmp_path / "user" / "LaMP_7"
    assert (folder / "dev_questions.rejected.json").exists()
    server.put("LaMP_7/dev/dev_questions.json", published["dev_questions.json"])  # fixed
    assert [r.status for r in download_data.main(args)] == ["downloaded", "up to date"]
    assert sorted(path.name for path in folder.iterdir()) == [
        "dev_outputs.json", "dev_questions.json"]


# -- --fix_known_issues keeps each pair consistent ----------------------------------------

def test_a_failed_outputs_download_postpones_the_fix_of_its_pair(server, tmp_path, capsys):
    publish_lamp2_with_known_issue(server)
    golds = server.files.pop("/downloads/LaMP/LaMP_2/new/dev/dev_outputs.json")
    args = args_for(server, tmp_path, "--tasks", "LaMP_2", "--splits", "user", "--sets", "dev",
                    "--fix_known_issues")
    with pytest.raises(LampError, match="1 of 2 files failed"):
        download_data.main(args)
    assert "user/LaMP_2/dev_questions.json: not fixed while user/LaMP_2/dev_outputs.json is " \
           "missing; run again to fix the pair" in capsys.readouterr().err
    folder = tmp_path / "user" / "LaMP_2"
    published = server.files["/downloads/LaMP/LaMP_2/new/dev/dev_questions.json"]
    assert (folder / "dev_questions.json").read_bytes() == published  # not fixed by half

    server.files["/downloads/LaMP/LaMP_2/new/dev/dev_outputs.json"] = golds
    results = download_data.main(args)
    assert [(r.status, r.records, r.removed_ids) for r in results] == [
        ("up to date", 3, ["110"]), ("downloaded", 3, ["110"])]
    assert [q["id"] for q in json.loads((folder / "dev_questions.json").read_text())] == [
        "111", "112", "113"]
    assert [g["id"] for g in json.loads((folder / "dev_outputs.json").read_text())["golds"]] == [
        "111", "112", "113"]


def test_a_pair_fixed_by_half_is_completed_by_the_next_fix(server, tmp_path, capsys):
    publish_lamp2_with_known_issue(server)
    args = args_for(server, tmp_path, "--tasks", "LaMP_2", "--splits", "user", "--sets", "dev")
    download_data.main([*args, "--fix_known_issues"])
    # The outputs file is lost and fetched again without the flag: the pair now disagrees.
    folder = tmp_path / "user" / "LaMP_2"
    (folder / "dev_outputs.json").unlink()
    download_data.main(args)
    assert "user/LaMP_2/dev_outputs.json: the other file of its pair had 1 (first: 110) " \
           "dropped by --fix_known_issues, this one not yet" in capsys.readouterr().err
    assert len(json.loads((folder / "dev_outputs.json").read_text())["golds"]) == 4

    results = download_data.main([*args, "--fix_known_issues"])
    assert [(r.records, r.removed_ids) for r in results] == [(3, ["110"]), (3, ["110"])]
    assert [g["id"] for g in json.loads((folder / "dev_outputs.json").read_text())["golds"]] == [
        "111", "112", "113"]
    manifest = json.loads((tmp_path / "download_manifest.json").read_text())["files"]
    assert manifest["user/LaMP_2/dev_outputs.json"]["removed_ids"] == ["110"]


class FullDiskListWriter(download.JsonListWriter):
    """The questions rewrite of --fix_known_issues on a disk that fills after one question."""

    def write(self, element) -> None:
        if self.count:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        super().write(element)


@pytest.mark.parametrize("failing", ["questions", "outputs"])
def test_a_fix_that_cannot_be_written_changes_neither_file(server, tmp_path, capsys, monkeypatch,
                                                           failing):
    publish_lamp2_with_known_issue(server)
    args = args_for(server, tmp_path, "--tasks", "LaMP_2", "--splits", "user", "--sets", "dev")
    download_data.main(args)
    folder = tmp_path / "user" / "LaMP_2"
    before = snapshot(tmp_path)

    def full_disk(path, *rest):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    if failing == "outputs":  # the questions are staged first, then the outputs fail
        monkeypatch.setattr(download, "write_outputs", full_disk)
    else:
        monkeypatch.setattr(download, "JsonListWriter", FullDiskListWriter)
    assert run(download_data.main, [*args, "--fix_known_issues"]) == 2
    err = capsys.readouterr().err
    assert "user/LaMP_2/dev_questions.json: --fix_known_issues did not complete (" in err
    assert "No space left on device); run again with it to fix the pair" in err
    assert err.strip().splitlines()[-1].startswith("error: 2 of 2 files failed")
    assert snapshot(tmp_path) == before  # the questions were rewritten only to a staging file

    monkeypatch.undo()
    download_data.main([*args, "--fix_known_issues"])
    assert len(json.loads((folder / "dev_questions.json").read_text())) == 3
    assert len(json.loads((folder / "dev_outputs.json").read_text())["golds"]) == 3
    assert sorted(path.name for path in folder.iterdir()) == [
        "dev_outputs.json", "dev_questions.json"]


# -- the output folder, the manifest and the lock ------------------------------------------

def test_out_dir_that_is_a_file_is_one_line(server, tmp_path):
    target = tmp_path / "raw_data"
    target.write_text("mine")
    failed = script("--base_url", server.base_url, "--out_dir", str(target), "--tasks", "LaMP_7",
                    cwd=tmp_path)
    assert failed.returncode == 2
    assert failed.stderr == f"error: --out_dir {target} exists and is not a folder\n"
    assert target.read_text() == "mine"
    assert server.log == []  # refused before any request


def test_a_bad_url_from_the_shell_is_an_error_not_a_traceback(tmp_path):
    failed = script("--base_url", "http://[::1", "--out_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert failed.returncode == 2
    assert failed.stderr.splitlines()[-1] == (
        "error: --base_url 'http://[::1': not a valid URL (Invalid IPv6 URL)")
    assert "Traceback" not in failed.stderr
    assert not (tmp_path / "out").exists()


def test_out_dir_below_a_file_is_one_line(server, tmp_path, capsys):
    (tmp_path / "a_file").write_text("mine")
    out_dir = tmp_path / "a_file" / "raw_data"
    status, lines = run_cli(download_data.main, ["--base_url", server.base_url, "--out_dir",
                                                 out_dir], capsys)
    assert status == 2
    # The shared output-folder check names the file in the way.
    assert lines[-1] == (
        f"error: --out_dir {out_dir}: {tmp_path / 'a_file'} is a file, not a folder")


@pytest.mark.parametrize("manifest", [
    {"files": []},
    {"files": "user/LaMP_7/dev_questions.json"},
    [],
    {"files": {"user/LaMP_7/dev_questions.json": {"bytes": "12"}}},
    {"files": {"user/LaMP_7/dev_questions.json": {"bytes": True, "records": 4}}},
    {"files": {"user/LaMP_7/dev_questions.json": None}},
    "MANIFEST BYTES",
])
def test_a_malformed_manifest_costs_a_check_not_a_traceback(server, tmp_path, manifest):
    publish_lamp7(server)
    args = lamp7_dev(server, tmp_path)
    download_data.main(args)
    path = tmp_path / "download_manifest.json"
    sizes = json.loads(path.read_text())["files"]["user/LaMP_7/dev_questions.json"]["bytes"]
    if manifest == "MANIFEST BYTES":
        path.write_bytes(b"\xff\xfe not utf-8")
    elif isinstance(manifest, dict) and isinstance(manifest["files"], dict):
        entry = manifest["files"]["user/LaMP_7/dev_questions.json"]
        if isinstance(entry, dict) and entry.get("records") == 4:
            entry.update(profile_items=12, remote_bytes=sizes, problems=[], removed_ids=[])
        path.write_text(json.dumps(manifest))
    else:
        path.write_text(json.dumps(manifest))
    server.log.clear()
    results = download_data.main(args)
    assert [r.status for r in results][0] == "verified"
    assert server.gets() == []
    rebuilt = json.loads(path.read_text())["files"]
    assert rebuilt["user/LaMP_7/dev_questions.json"]["bytes"] == sizes


def test_a_manifest_that_is_a_folder_is_one_line(server, tmp_path, capsys):
    publish_lamp7(server)
    (tmp_path / "download_manifest.json").mkdir()
    status, lines = run_cli(download_data.main, lamp7_dev(server, tmp_path), capsys)
    assert status == 2
    assert lines == [f"error: {tmp_path / 'download_manifest.json'} is not a file; move it away "
                     "(it is the download manifest's name)"]
    assert server.gets() == []


def test_a_second_run_into_the_same_folder_is_refused(server, tmp_path, capsys):
    published = publish_lamp7(server)
    gate = server.gates[DEV7 + "dev_questions.json"] = threading.Event()
    args = lamp7_dev(server, tmp_path)
    first: dict = {}
    runner = threading.Thread(target=lambda: first.update(results=download_data.main(args)))
    runner.start()
    try:
        assert server.waiting.wait(30)  # the first run is in the middle of a download
        with pytest.raises(LampError) as refused:
            download_data.main(args)
        assert str(refused.value) == (f"another download_data.py is running into {tmp_path} "
                                      f"(pid {os.getpid()}); wait for it to finish")
    finally:
        gate.set()
        runner.join(60)
    assert [r.status for r in first["results"]] == ["downloaded", "downloaded"]
    assert (tmp_path / "user/LaMP_7/dev_questions.json").read_bytes() == published[
        "dev_questions.json"]
    assert not list(tmp_path.rglob("*.part"))
    capsys.readouterr()
    # Once the first run is over the folder is free again; the lock file keeps its pid.
    assert [r.status for r in download_data.main(args)] == ["up to date", "up to date"]
    assert (tmp_path / ".download_data.lock").read_text() == f"{os.getpid()}\n"


def test_the_refusal_names_the_other_process(server, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time\n"
        "from LaMP.utils.data.download import out_dir_lock\n"
        "from pathlib import Path\n"
        "with out_dir_lock(Path(sys.argv[1])):\n"
        "    print('held', flush=True)\n"
        "    sys.stdin.read()\n"), str(tmp_path)], cwd=REPO, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        failed = script("--base_url", server.base_url, "--out_dir", str(tmp_path), cwd=tmp_path)
    finally:
        holder.communicate("", timeout=60)
    assert failed.returncode == 2
    assert failed.stderr == (f"error: another download_data.py is running into {tmp_path} "
                             f"(pid {holder.pid}); wait for it to finish\n")
    assert server.log == []


def test_a_folder_that_cannot_be_locked_still_downloads(server, tmp_path, capsys, monkeypatch):
    publish_lamp7(server)

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    results = download_data.main(lamp7_dev(server, tmp_path))
    assert [r.status for r in results] == ["downloaded", "downloaded"]
    assert f"{tmp_path / '.download_data.lock'}: cannot lock (No locks available)" in \
        capsys.readouterr().err


def test_a_lock_file_name_taken_by_a_folder_is_one_line(server, tmp_path, capsys):
    (tmp_path / ".download_data.lock").mkdir()
    status, lines = run_cli(download_data.main, lamp7_dev(server, tmp_path), capsys)
    assert status == 2
    assert lines == [
        f"error: --out_dir {tmp_path}: cannot write its lock file .download_data.lock "
        "(Is a directory)"]
    assert server.log == []


@pytest.mark.parametrize("taken_by", ["a link to the user's file", "a FIFO"])
def test_a_lock_file_name_taken_by_a_link_or_a_fifo_is_one_line(server, tmp_path, capsys,
                                                                 taken_by):
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    out_dir = tmp_path / "raw_data"
    out_dir.mkdir()
    lock = out_dir / ".download_data.lock"
    if taken_by == "a FIFO":
        os.mkfifo(lock)
    else:
        lock.symlink_to(mine)
    status, lines = run_cli(download_data.main, lamp7_dev(server, out_dir), capsys)
    assert status == 2
    [line] = lines
    assert line.startswith(f"error: --out_dir {out_dir}: cannot write its lock file "
                           ".download_data.lock (")
    assert mine.read_text() == "mine"  # no pid written through the link
    assert server.log == []


def test_a_manifest_that_cannot_be_written_fails_the_file_not_the_run(server, tmp_path, capsys,
                                                                       monkeypatch):
    published = publish_lamp7(server)

    def full_disk(self, result):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    monkeypatch.setattr(download.Manifest, "record", full_disk)
    args = lamp7_dev(server, tmp_path)
    assert run(download_data.main, args) == 2
    err = capsys.readouterr().err
    assert f"user/LaMP_7/dev_questions.json: {tmp_path / 'download_manifest.json'}: No space " \
           f"left on device" in err
    assert err.strip().splitlines()[-1].startswith("error: 2 of 2 files failed")
    monkeypatch.undo()
    server.log.clear()
    # The files themselves were complete: the next run checks them, it does not fetch them.
    assert [r.status for r in download_data.main(args)] == ["verified", "verified"]
    assert server.gets() == []
    assert (tmp_path / "user/LaMP_7/dev_questions.json").read_bytes() == published[
        "dev_questions.json"]


# -- the HTTP client ----------------------------------------------------------------------

def test_a_url_the_flags_did_not_catch_is_a_per_file_error():
    fetcher = download.Fetcher(retries=3, backoff=0, timeout=1)
    with pytest.raises(download.DownloadError, match=r"cannot request http://\[::1/x "
                                                     r"\(Invalid IPv6 URL\)"):
        fetcher.remote_size("http://[::1/x")


def test_the_wait_between_tries_stays_finite():
    waits = []
    fetcher = download.Fetcher(retries=3, backoff=download.MAX_WAIT_S, timeout=1,
                               sleep=waits.append)

    def never():
        raise download._Retry("down")

    with pytest.raises(download.DownloadError, match="gave up after 4 attempts"):
        fetcher._with_retries("x", never)
    assert waits == [download.MAX_WAIT_S] * 3
