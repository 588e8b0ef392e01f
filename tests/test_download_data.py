"""download_data.py (and LaMP/utils/data/download.py behind it) against a LaMP-like server
on 127.0.0.1 that each test starts: downloads, resumes, skips, the layout and the flags.

The server honours Range requests and can drop a connection half way through a file, answer
404, refuse HEAD, hold a response until a test lets it go, or serve a corrupt file, so every
path of the downloader runs without the network.
"""
from __future__ import annotations

import http.server
import json
import socket
import threading
from pathlib import Path

import pytest

from LaMP.utils.cli.program import run
from LaMP.utils.data import download
from LaMP.utils.errors import LampError
from conftest import load_script, outputs_doc

download_data = load_script("download_data.py")

LAMP2_INSTRUCTION = ("Which tag does this movie relate to among the following tags? Just answer "
                     "with the tag name without further explanation. tags: [sci-fi, comedy] "
                     "description: ")
LAMP7_INSTRUCTION = "Paraphrase the following tweet without any explanation before or after it: "


class LampHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_HEAD(self):
        self._serve(send_body=False)

    def do_GET(self):
        self._serve(send_body=True)

    def _serve(self, send_body: bool) -> None:
        server = self.server
        range_header = self.headers.get("Range")
        server.log.append((self.command, self.path, range_header))
        data = server.files.get(self.path)
        if data is None:
            self.send_error(404, "Not Found")
            return
        if not send_body and server.head_status:
            self.send_error(server.head_status)
            return
        start = 0
        if range_header and server.ranges:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_error(416, "Range Not Satisfiable")
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not send_body:
            return
        if self.path in server.gates:
            server.waiting.set()  # a download is under way; the test may act now
            server.gates[self.path].wait(30)
        if self.path in server.drop_once or self.path in server.drop_always:
            # Promise the whole file, send half of it, and hang up.
            server.drop_once.discard(self.path)
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # keep test output quiet
        pass


class LampServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), LampHandler)
        self.files: dict[str, bytes] = {}
        self.log: list[tuple] = []
        self.drop_once: set[str] = set()
        self.drop_always: set[str] = set()
        self.ranges = True  # honour Range requests
        self.head_status: int | None = None  # e.g. 405: HEAD not supported, sizes unknown
        self.gates: dict[str, threading.Event] = {}  # GETs of these paths wait for the event
        self.waiting = threading.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/downloads/LaMP"

    def put(self, remote_path: str, document) -> bytes:
        data = document if isinstance(document, bytes) else json.dumps(document).encode()
        self.files[f"/downloads/LaMP/{remote_path}"] = data
        return data

    def gets(self) -> list[tuple]:
        return [entry for entry in self.log if entry[0] == "GET"]


@pytest.fixture
def server():
    lamp_server = LampServer()
    thread = threading.Thread(target=lamp_server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield lamp_server
    lamp_server.shutdown()
    lamp_server.server_close()


def lamp7_questions(prefix: str, count: int, words: int = 40) -> list[dict]:
    text = " ".join(["word"] * words)
    return [{"id": f"{prefix}{row}", "input": f"{LAMP7_INSTRUCTION}tweet {row} {text}",
             "profile": [{"id": f"{prefix}{row}{i}", "text": f"old tweet {i}"} for i in range(3)]}
            for row in range(count)]


def publish_lamp7(server: LampServer, split_dir: str = "") -> dict[str, bytes]:
    """LaMP-7 train/dev/test as the real server lays them out; returns bytes by local name."""
    published = {}
    for set_name, digit, count in (("train", "0", 6), ("dev", "1", 4), ("test", "2", 3)):
        questions = lamp7_questions(f"6{digit}", count)
        published[f"{set_name}_questions.json"] = server.put(
            f"{split_dir}LaMP_7/{set_name}/{set_name}_questions.json", questions)
        if set_name != "test":
            golds = outputs_doc("LaMP_7", [(q["id"], f"gold {q['id']}") for q in questions])
            published[f"{set_name}_outputs.json"] = server.put(
                f"{split_dir}LaMP_7/{set_name}/{set_name}_outputs.json", golds)
    return published


def args_for(server: LampServer, out_dir: Path, *extra: str) -> list[str]:
    return ["--base_url", server.base_url, "--out_dir", str(out_dir), "--retries", "2",
            "--backoff", "0", "--timeout", "10", *extra]


def test_full_download_in_the_real_layout(server, tmp_path, capsys):
    user = publish_lamp7(server)
    time_split = publish_lamp7(server, "time/")
    results = download_data.main(args_for(server, tmp_path, "--tasks", "LaMP-7"))
    assert [r.status for r in results] == ["downloaded"] * 10
    for split, published in (("user", user), ("time", time_split)):
        for name, data in published.items():
            assert (tmp_path / split / "LaMP_7" / name).read_bytes() == data
    assert not list(tmp_path.rglob("*.part"))
    summary = {r.rel: r for r in results}
    assert summary["user/LaMP_7/train_questions.json"].records == 6
    assert summary["user/LaMP_7/train_questions.json"].profile_items == 18
    assert summary["time/LaMP_7/dev_outputs.json"].records == 4
    table = capsys.readouterr().out
    assert "user/LaMP_7/test_questions.json" in table and "10 files" in table
    manifest = json.loads((tmp_path / "download_manifest.json").read_text())
    assert manifest["files"]["user/LaMP_7/dev_questions.json"]["bytes"] == len(user[
        "dev_questions.json"])


def test_complete_files_are_skipped(server, tmp_path):
    publish_lamp7(server)
    args = args_for(server, tmp_path, "--tasks", "LaMP_7", "--splits", "user")
    download_data.main(args)
    before = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*_*.json")}
    server.log.clear()
    results = download_data.main(args)
    assert [r.status for r in results] == ["up to date"] * 5
    assert server.gets() == []  # sizes were asked for, nothing was fetched
    assert {path: path.stat().st_mtime_ns for path in before} == before
    assert results[0].records == 6  # counts come from the manifest


def test_a_file_from_elsewhere_is_verified_not_fetched(server, tmp_path):
    published = publish_lamp7(server)
    target = tmp_path / "user" / "LaMP_7" / "dev_questions.json"
    target.parent.mkdir(parents=True)
    target.write_bytes(published["dev_questions.json"])
    results = download_data.main(args_for(server, tmp_path, "--tasks", "LaMP_7", "--splits", "user",
                                      "--sets", "dev"))
    assert [r.status for r in results] == ["verified", "downloaded"]
    assert [entry[1] for entry in server.gets()] == [
        "/downloads/LaMP/LaMP_7/dev/dev_outputs.json"]


def test_a_damaged_manifest_costs_a_check_not_a_download(server, tmp_path, capsys):
    publish_lamp7(server)
    args = args_for(server, tmp_path, "--tasks", "LaMP_7", "--splits", "user", "--sets", "dev")
    download_data.main(args)
    (tmp_path / "download_manifest.json").write_text("{not json")
    server.log.clear()
    assert [r.status for r in download_data.main(args)] == ["verified", "verified"]
    assert server.gets() == []
    assert "starting a new manifest" in capsys.readouterr().err
    assert json.loads((tmp_path / "download_manifest.json").read_text())["files"]


def test_a_changed_server_file_is_downloaded_again(server, tmp_path):
    publish_lamp7(server)
    args = args_for(server, tmp_path, "--tasks", "LaMP_7", "--splits", "user", "--sets", "test")
    download_data.main(args)
    newer = server.put("LaMP_7/test/test_questions.json", lamp7_questions("62", 5))
    assert download_data.main(args)[0].status == "downloaded"
    assert (tmp_path / "user" / "LaMP_7" / "test_questions.json").read_bytes() == newer


def test_resume_after_the_server_drops_the_connection(server, tmp_path):
    published = publish_lamp7(server)
    remote = "/downloads/LaMP/LaMP_7/train/train_questions.json"
    server.drop_once.add(remote)
    results = download_data.main(args_for(server, tmp_path, "--tasks", "LaMP_7", "--splits", "user",
                                     "--sets", "train"))
    assert results[0].status == "downloaded"
    data = published["train_questions.json"]
    assert (tmp_path / "user" / "LaMP_7" / "train_questions.json").read_bytes() == data
    fetches = [entry for entry in server.gets() if entry[1] == remote]
    # The second request asked only for what the first one did not deliver.
    assert fetches == [("GET", remote, None), ("GET", remote, f"bytes={len(data) // 2}-")]


def test_resume_of_a_part_file_left_by_an_earlier_run(server, tmp_path):
    published = publish_lamp7(server)
    data = published["test_questions.json"]
    part = tmp_path / "user" / "LaMP_7" / "test_questions.json.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:100])
    results = download_data.main(args_for(server, tmp_path, "--tasks", "LaMP_7", "--splits", "user",
                                     "--sets", "test"))
    assert results[0].status == "resumed"
    assert part.with_suffix("").read_bytes() == data
    assert server.gets()[0][2] == "bytes=100-"


def test_a_server_without_range_support_restarts_the_file(server, tmp_path):
    published = publish_lamp7(server)
    server.ranges = False
    part = tmp_path / "user" / "LaMP_7" / "test_questions.json.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"[garbage that is not the file's start")
    download_data.main(args_for(server, tmp_path, "--tasks", "LaMP_7", "--splits", "user",
                           "--sets", "test"))
    assert part.with_suffix("").read_bytes() == published["test_questions.json"]


def test_404_fails_that_file_only(server, tmp_path, capsys):
    published = publish_lamp7(server)
    del server.files["/downloads/LaMP/LaMP_7/dev/dev_outputs.json"]
    args = args_for(server, tmp_path, "--tasks", "LaMP_7", "--splits", "user")
    with pytest.raises(LampError, match=r"1 of 5 files failed .*user/LaMP_7/dev_outputs\.json"):
        download_data.main(args)
    assert "user/LaMP_7/dev_outputs.json: HTTP 404" in capsys.readouterr().err
    assert not (tmp_path / "user" / "LaMP_7" / "dev_outputs.json").exists()
    assert (tmp_path / "user" / "LaMP_7" / "dev_questions.json").read_bytes() == published[
        "dev_questions.json"]
    assert (tmp_path / "user" / "LaMP_7" / "test_questions.json").exists()
    # No retries for a 404: one HEAD, no GET.
    assert [e[0] for e in server.log if e[1].endswith("dev_outputs.json")] == ["HEAD"]
    assert run(download_data.main, args) == 2  # the script's exit status


def test_corrupt_json_is_not_renamed_into_place(server, tmp_path, capsys):
    published = publish_lamp7(server)
    server.put("LaMP_7/dev/dev_questions.json", published["dev_questions.json"][:-40])
    server.put("LaMP_7/dev/dev_outputs.json", {"task": "LaMP_4", "golds": []})
    with pytest.raises(LampError, match="2 of 2 files failed"):
        download_data.main(args_for(server, tmp_path, "--tasks", "LaMP_7", "--splits", "user",
                               "--sets", "dev"))
    folder = tmp_path / "user" / "LaMP_7"
    # Neither a final name nor a .part: the bytes are kept aside, with the reason beside them.
    assert sorted(path.name for path in folder.iterdir()) == [
        "dev_outputs.rejected.json", "dev_outputs.rejected.reason.json",
        "dev_questions.rejected.json", "dev_questions.rejected.reason.json"]
    assert (folder / "dev_questions.rejected.json").read_bytes() == \
        published["dev_questions.json"][:-40]
    note = json.loads((folder / "dev_outputs.rejected.reason.json").read_text())
    assert note["reason"] == "user/LaMP_7/dev_outputs.json: holds LaMP_4 outputs, expected LaMP_7"
    err = capsys.readouterr().err
    assert "dev_questions.json: the downloaded file is not valid, kept as " \
           "dev_questions.rejected.json" in err
    assert "malformed JSON after question 2" in err
    assert "holds LaMP_4 outputs, expected LaMP_7" in err


def test_an_unknown_task_name_in_outputs_is_reported_not_refused(server, tmp_path, capsys):
    published = publish_lamp7(server)
    golds = json.loads(published["dev_outputs.json"])
    server.put("LaMP_7/dev/dev_outputs.json", {**golds, "task": "LaMP_7_time"})
    results = download_data.main(args_for(server, tmp_path, "--tasks", "LaMP_7", "--splits", "user",
                                     "--sets", "dev"))
    assert [r.status for r in results] == ["downloaded", "downloaded"]
    assert results[1].records == 4
    assert "its \"task\" is 'LaMP_7_time', not LaMP_7" in capsys.readouterr().err


def test_network_failure_is_reported_per_file(tmp_path, capsys):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = ["--base_url", f"http://127.0.0.1:{port}/LaMP", "--out_dir", str(tmp_path),
            "--retries", "1", "--backoff", "0", "--tasks", "LaMP_3", "--splits", "time",
            "--sets", "test"]
    with pytest.raises(LampError, match="1 of 1 files failed"):
        download_data.main(args)
    err = capsys.readouterr().err
    assert "time/LaMP_3/test_questions.json:" in err
    assert "gave up after 2 attempts" in err


def publish_lamp2_with_known_issue(server: LampServer) -> None:
    questions = [{"id": f"11{row}", "input": f"{LAMP2_INSTRUCTION}movie {row}",
                  "profile": [{"id": f"11{row}0", "description": "a film", "tag": "comedy"}]}
                 for row in range(4)]
    questions[0]["input"] = "x movie 0 without its instruction"
    server.put("LaMP_2/new/dev/dev_questions.json", questions)
    server.put("LaMP_2/new/dev/dev_outputs.json",
               outputs_doc("LaMP_2", [(q["id"], "sci-fi") for q in questions]))


def test_malformed_question_is_reported_then_fixed(server, tmp_path, capsys):
    publish_lamp2_with_known_issue(server)
    args = args_for(server, tmp_path, "--tasks", "LaMP_2", "--splits", "user", "--sets", "dev")
    download_data.main(args)
    err = capsys.readouterr().err
    assert "user/LaMP_2/dev_questions.json: question 110 is malformed: input does not start " \
           "with the LaMP-2 instruction" in err
    assert "(known issue:" in err
    assert "run again with --fix_known_issues" in err
    folder = tmp_path / "user" / "LaMP_2"
    assert len(json.loads((folder / "dev_questions.json").read_text())) == 4  # kept as published

    server.log.clear()
    results = download_data.main([*args, "--fix_known_issues"])
    assert server.gets() == []  # fixed in place, not downloaded again
    questions = json.loads((folder / "dev_questions.json").read_text())
    golds = json.loads((folder / "dev_outputs.json").read_text())["golds"]
    assert [q["id"] for q in questions] == ["111", "112", "113"]
    assert [g["id"] for g in golds] == ["111", "112", "113"]
    assert [(r.records, r.removed_ids) for r in results] == [(3, ["110"]), (3, ["110"])]
    manifest = json.loads((tmp_path / "download_manifest.json").read_text())["files"]
    assert manifest["user/LaMP_2/dev_questions.json"]["removed_ids"] == ["110"]
    assert manifest["user/LaMP_2/dev_outputs.json"]["removed_ids"] == ["110"]
    assert manifest["user/LaMP_2/dev_questions.json"]["records"] == 3

    # A fixed file is complete: the next run neither fetches nor rewrites it.
    capsys.readouterr()
    mtime = (folder / "dev_questions.json").stat().st_mtime_ns
    results = download_data.main([*args, "--fix_known_issues"])
    assert [r.status for r in results] == ["up to date", "up to date"]
    assert (folder / "dev_questions.json").stat().st_mtime_ns == mtime
    assert "malformed" not in capsys.readouterr().err


def test_gold_outside_the_label_set_is_a_problem_too(server, tmp_path, capsys):
    publish_lamp2_with_known_issue(server)
    server.put("LaMP_2/new/dev/dev_outputs.json", outputs_doc(
        "LaMP_2", [("110", "sci-fi"), ("111", "not a tag"), ("112", "comedy"), ("113", "action")]))
    download_data.main(args_for(server, tmp_path, "--tasks", "LaMP_2", "--splits", "user",
                           "--sets", "dev", "--fix_known_issues"))
    golds = json.loads((tmp_path / "user/LaMP_2/dev_outputs.json").read_text())["golds"]
    assert [g["id"] for g in golds] == ["112", "113"]
    err = capsys.readouterr().err
    assert "question 111 is malformed: output 'not a tag' is not a LaMP-2 label" in err


def plan_of(argv: list[str]) -> list:
    args = download_data.parse_args(argv)
    return download.plan(Path(args.out_dir), args.base_url, args.splits, args.tasks, args.sets)


def test_url_table_and_layout(tmp_path):
    jobs = plan_of(["--out_dir", str(tmp_path), "--base_url", "http://m/LaMP/", "--tasks",
                    "LaMP_2", "lamp-2_old", "LaMP-1", "--splits", "time", "user", "--sets",
                    "test"])
    assert [(job.url, job.rel) for job in jobs] == [
        ("http://m/LaMP/LaMP_1/test/test_questions.json", "user/LaMP_1/test_questions.json"),
        ("http://m/LaMP/LaMP_2/new/test/test_questions.json", "user/LaMP_2/test_questions.json"),
        ("http://m/LaMP/LaMP_2/test/test_questions.json", "user/LaMP_2_old/test_questions.json"),
        ("http://m/LaMP/time/LaMP_1/test/test_questions.json", "time/LaMP_1/test_questions.json"),
        ("http://m/LaMP/time/LaMP_2/new/test/test_questions.json",
         "time/LaMP_2/test_questions.json"),
        ("http://m/LaMP/time/LaMP_2/test/test_questions.json",
         "time/LaMP_2_old/test_questions.json"),
    ]
    default = plan_of([])
    assert len(default) == 6 * 2 * 5  # six tasks, two splits, five files each
    assert not any("LaMP_2_old" in job.rel for job in default)


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "LaMP_6"], "build it from the Avocado corpus"),
    (["--tasks", "LaMP_9"], "unknown task 'LaMP_9'; valid: LaMP_1"),
    (["--retries", "-1"], "--retries must be in 0 … 100"),
    (["--retries", str(10**20)], "--retries must be in 0 … 100"),
    (["--splits", "random"], "invalid choice"),
    (["--base_url", "ftp://x"], "must be an http"),
    (["--base_url", "http://[::1"], "--base_url 'http://[::1': not a valid URL (Invalid IPv6 URL)"),
    (["--base_url", "http://"], "names no host"),
    (["--base_url", "https://host:port/LaMP"], "not a valid URL (Port could not be cast"),
    (["--base_url", "http://host:99999/LaMP"], "not a valid URL (Port out of range"),
    (["--base_url", "http://my host/LaMP"], "contains a space or a control character"),
    (["--base_url", "http://host/LaMP\n"], "contains a space or a control character"),
    (["--base_url", "http://host/LaMP?mirror=1"], "must not have a ?query or #fragment"),
    (["--base_url", "file:///srv/LaMP"], "must be an http:// or https:// URL"),
    (["--base_url", "http://mirror/LäMP"], "has a non-ASCII path (percent-encode it)"),
    (["--timeout", "nan"], "--timeout must be a number of seconds above 0"),
    (["--timeout", "inf"], "--timeout must be a number of seconds above 0"),
    (["--timeout", "-1"], "--timeout must be a number of seconds above 0"),
    (["--timeout", "0"], "--timeout must be a number of seconds above 0"),
    (["--timeout", "1e12"], "--timeout must be a number of seconds above 0"),
    (["--backoff", "nan"], "--backoff must be a number of seconds from 0 to 86400"),
    (["--backoff=-inf"], "--backoff must be a number of seconds from 0 to 86400"),
    (["--backoff", "1e9"], "--backoff must be a number of seconds from 0 to 86400"),
])
def test_flag_errors_are_refused_up_front(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        download_data.parse_args(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1", "101", str(10**20)])
def test_download_retries_are_bounded(capsys, value):
    with pytest.raises(SystemExit) as exited:
        download_data.parse_args(["--retries", value])
    assert exited.value.code == 2
    assert capsys.readouterr().err == "error: --retries must be in 0 … 100\n"


def test_dry_run_reports_sizes_and_downloads_nothing(server, tmp_path, capsys):
    published = publish_lamp7(server)
    results = download_data.main(args_for(server, tmp_path / "out", "--tasks", "LaMP_7", "--splits",
                                     "user", "--dry_run"))
    assert sum(r.bytes for r in results) == sum(len(data) for data in published.values())
    assert server.gets() == []
    assert not (tmp_path / "out").exists()
    assert f"{sum(len(d) for d in published.values()):,}" in capsys.readouterr().out


NEWS_INSTRUCTION = ("Which category does this article relate to among the following categories? "
                    "Just answer with the category name without further explanation. categories: "
                    "[women, religion, politics, sports] article: ")


def publish_lamp2_old(server: LampServer, golds: list[str], inputs: list[str] | None = None
                      ) -> None:
    """The original LaMP-2 (news) dev set where the server keeps it: LaMP_2/, not LaMP_2/new/;
    its outputs file says "LaMP_2", as the published one does."""
    inputs = inputs or [f"{NEWS_INSTRUCTION}article {row} about a match" for row in range(4)]
    questions = [{"id": f"11{row}", "input": text,
                  "profile": [{"id": f"11{row}{i}", "text": "t", "title": "h",
                               "category": "sports", "date": "2014-01-01"} for i in range(2)]}
                 for row, text in enumerate(inputs)]
    server.put("LaMP_2/dev/dev_questions.json", questions)
    server.put("LaMP_2/dev/dev_outputs.json",
               outputs_doc("LaMP_2", [(q["id"], gold) for q, gold in zip(questions, golds)]))


@pytest.mark.parametrize("spelling", ["LaMP_2_old", "LaMP-2N", "lamp_2n"])
def test_the_original_lamp_2_is_checked_as_lamp_2n(server, tmp_path, spelling):
    publish_lamp2_old(server, ["sports", "women", "politics", "sports"])
    results = download_data.main(args_for(server, tmp_path, "--tasks", spelling, "--splits", "user",
                                     "--sets", "dev"))
    assert [r.status for r in results] == ["downloaded", "downloaded"]
    assert [r.problems for r in results] == [[], []]
    folder = tmp_path / "user" / "LaMP_2_old"  # the layout keeps its published folder name
    # The file keeps the published bytes ("task": "LaMP_2") and reads as LaMP-2N.
    assert json.loads((folder / "dev_outputs.json").read_text())["task"] == "LaMP_2"
    from LaMP.utils.data.outputs import load_outputs

    assert load_outputs(folder / "dev_outputs.json").task.name == "LaMP-2N"


def test_movie_tagging_files_in_the_lamp_2_old_place_are_refused(server, tmp_path, capsys):
    # Movie tags as golds: LaMP-2's outputs, not the original LaMP-2's.
    publish_lamp2_old(server, ["comedy", "sci-fi", "comedy", "comedy"])
    with pytest.raises(LampError, match="1 of 2 files failed"):
        download_data.main(args_for(server, tmp_path, "--tasks", "LaMP_2_old", "--splits", "user",
                               "--sets", "dev"))
    assert "holds LaMP_2 outputs, expected LaMP_2N" in capsys.readouterr().err
    assert not (tmp_path / "user" / "LaMP_2_old" / "dev_outputs.json").exists()
    # Movie inputs: not LaMP-2N inputs, and the message says what they look like.
    server.files.clear()
    publish_lamp2_old(server, ["sports"] * 4,
                      inputs=[f"{LAMP2_INSTRUCTION}a film {row}" for row in range(4)])
    with pytest.raises(LampError, match="files failed"):
        download_data.main(args_for(server, tmp_path / "b", "--tasks", "LaMP_2_old", "--splits",
                               "user", "--sets", "dev"))
    err = capsys.readouterr().err
    assert "are not LaMP-2N inputs but LaMP-2 inputs" in err
    assert not (tmp_path / "b" / "user" / "LaMP_2_old" / "dev_questions.json").exists()


@pytest.mark.parametrize("declared", [None, 7, "LaMP_7_time"])
def test_outputs_without_a_known_task_name_are_read_as_the_jobs_task(server, tmp_path, capsys,
                                                                     declared):
    published = publish_lamp7(server)
    golds = json.loads(published["dev_outputs.json"])
    document = {key: value for key, value in golds.items() if key != "task"}
    if declared is not None:
        document["task"] = declared
    server.put("LaMP_7/dev/dev_outputs.json", document)
    results = download_data.main(args_for(server, tmp_path, "--tasks", "LaMP_7", "--splits", "user",
                                     "--sets", "dev"))
    assert [r.status for r in results] == ["downloaded", "downloaded"] and results[1].records == 4
    assert f"its \"task\" is {declared!r}, not LaMP_7; read as LaMP_7" in capsys.readouterr().err
