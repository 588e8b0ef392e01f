"""LaMP-6 from Avocado-like zips that the tests build (data/avocado/create_avocado_dataset.py
and LaMP/utils/data/avocado.py): real-world headers and HTML bodies, unusable emails, and
damaged, encrypted and unsupported zip members."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from LaMP.utils.data import avocado
from LaMP.utils.data.avocado import html_to_text, parse_email
from LaMP.utils.data.outputs import load_outputs
from LaMP.utils.data.questions import input_problem, iter_questions
from LaMP.utils.errors import LampError
from LaMP.utils.tasks import get_task
from conftest import REPO, load_script, problems, run_cli, write_json

builder = load_script("data/avocado/create_avocado_dataset.py")
evaluator = load_script("eval/eval_task.py")
LAMP6 = get_task("LaMP-6")


def plain_email(subject: str, body: str) -> bytes:
    return (f"Date: Mon, 3 Jul 2000 09:15:00 -0700\nFrom: a@example.com\nTo: b@example.com\n"
            f"Subject: {subject}\n\n{body}\n").encode()


MULTIPART = (b"From: c@example.com\nSubject: =?utf-8?q?Caf=C3=A9_budget?=\nMIME-Version: 1.0\n"
             b'Content-Type: multipart/mixed; boundary="xx"\n\n--xx\n'
             b"Content-Type: text/plain; charset=utf-8\n\nThe caf\xc3\xa9 budget is attached.\n"
             b"--xx\nContent-Type: text/plain\nContent-Disposition: attachment; filename=a.txt"
             b"\n\nnot the body\n--xx--\n")

EMAILS = {  # zip custodian -> {file name: bytes}
    "001": {
        "001-000001-EM.txt": plain_email("Quarterly numbers", "Please send the Q3 numbers."),
        "001-000002-EM.txt": plain_email("Re: Quarterly numbers", "Attached, see row 4."),
        "001-000003-EM.txt": plain_email("Lunch", "Lunch at noon?"),
    },
    "002": {
        "002-000001-EM.txt": MULTIPART,
        "002-000002-EM.txt": plain_email("Offsite agenda\n for Friday", "Agenda below."),
        "002-000003-EM.txt": plain_email("Server outage", "The build server is down."),
    },
}


def build_avocado(root: Path) -> Path:
    text_dir = root / "avocado-1.0.2" / "data" / "text"
    text_dir.mkdir(parents=True)
    for custodian, files in EMAILS.items():
        with zipfile.ZipFile(text_dir / f"{custodian}.zip", "w") as archive:
            archive.writestr(f"{custodian}/", "")
            for name, data in files.items():
                archive.writestr(f"{custodian}/{name}", data)
            archive.writestr(f"{custodian}/{custodian}-000009-AT.txt", b"an attachment file")
    (text_dir / "README.txt").write_text("not a zip")
    return text_dir


def question(qid: str, own: str, profile: list[str], **extra) -> dict:
    return {"id": qid, "input": own, **extra,
            "profile": [{"text": name, "id": f"{qid}{i}", "date": f"2000-07-0{i}"}
                        for i, name in enumerate(profile)]}


def question_files(root: Path, **overrides) -> dict[str, Path]:
    sets = {
        "train": [question("500", "001-000001-EM.txt", ["001-000003-EM.txt", "002-000003-EM.txt"],
                           user_id="u1"),
                  question("501", "002-000002-EM.txt", ["002-000001-EM.txt"], user_id="u2")],
        "dev": [question("510", "001-000002-EM.txt", ["001-000001-EM.txt"], user_id="u1")],
        "test": [question("520", "002-000001-EM.txt", ["002-000002-EM.txt", "001-000003-EM.txt"],
                          user_id="u2")],
    }
    sets.update(overrides)
    return {name: write_json(root / "lamp6" / f"{name}_questions.json", items)
            for name, items in sets.items()}


def argv(text_dir: Path, files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--avocado_files_dir", str(text_dir), "--extract_addr", str(out.parent / "extract"),
            "--output_dir", str(out),
            *[arg for name, path in files.items()
              for arg in (f"--input_question_file_{name}", str(path))], *extra]


def test_builds_lamp6_that_the_loader_and_evaluator_accept(tmp_path):
    text_dir = build_avocado(tmp_path)
    out = tmp_path / "raw_data" / "user" / "LaMP_6"
    summary = builder.main(argv(text_dir, question_files(tmp_path), out))
    assert summary["train"] == {"questions": 2, "dropped_questions": 0, "dropped_profile_items": 0}

    train = list(iter_questions(out / "train_questions.json", LAMP6))
    assert train[0]["input"] == ("Generate a subject for the following email: "
                                 "Please send the Q3 numbers.")
    assert all(input_problem(q["input"], LAMP6) is None for q in train)
    assert train[0]["profile"] == [
        {"text": "Lunch at noon?", "id": "5000", "date": "2000-07-00", "title": "Lunch"},
        {"text": "The build server is down.", "id": "5001", "date": "2000-07-01",
         "title": "Server outage"},
    ]
    # Encoded-word subject decoded, attachment part left out of the body.
    assert train[1]["profile"][0]["title"] == "Café budget"
    assert train[1]["profile"][0]["text"] == "The café budget is attached."
    assert "user_id" not in train[0]

    golds = load_outputs(out / "train_outputs.json")
    assert golds.task is LAMP6
    assert golds.outputs == {"500": "Quarterly numbers", "501": "Offsite agenda for Friday"}
    assert load_outputs(out / "dev_outputs.json").outputs == {"510": "Re: Quarterly numbers"}
    # Test questions are a plain list of questions, not wrapped in a golds object.
    test = json.loads((out / "test_questions.json").read_text())
    assert isinstance(test, list) and [q["id"] for q in test] == ["520"]
    assert not (out / "test_outputs.json").exists()

    result = evaluator.main(["--golds_json", str(out / "dev_outputs.json"),
                             "--preds_json", str(out / "dev_outputs.json"),
                             "--task_name", "LaMP_6", "--output_file", str(tmp_path / "r.json")])
    assert result["rouge-1"] == pytest.approx(1.0)


def test_time_based_separation_keeps_user_ids(tmp_path):
    text_dir = build_avocado(tmp_path)
    out = tmp_path / "out"
    builder.main(argv(text_dir, question_files(tmp_path), out, "--time_based_separation"))
    assert [q["user_id"] for q in iter_questions(out / "train_questions.json", LAMP6)] == [
        "u1", "u2"]


def test_missing_emails_fail_with_a_list(tmp_path):
    text_dir = build_avocado(tmp_path)
    files = question_files(tmp_path, dev=[
        question("510", "009-000001-EM.txt", ["001-000001-EM.txt", "009-000002-EM.txt"])])
    out = tmp_path / "out"
    with pytest.raises(LampError, match=r"^2 of 7 referenced emails in .*text cannot be used: "
                                        r"not in the zips: 2 \(first: 009-000001-EM.txt, "
                                        r"009-000002-EM.txt\); pass --allow_missing to build "
                                        r"without them$"):
        builder.main(argv(text_dir, files, out))
    assert not out.exists()  # nothing half built


def test_allow_missing_drops_what_cannot_be_built(tmp_path):
    text_dir = build_avocado(tmp_path)
    files = question_files(tmp_path, dev=[
        question("510", "009-000001-EM.txt", ["001-000001-EM.txt"]),
        question("511", "001-000003-EM.txt", ["009-000002-EM.txt", "001-000001-EM.txt"])])
    out = tmp_path / "out"
    summary = builder.main(argv(text_dir, files, out, "--allow_missing"))
    assert summary["dev"] == {"questions": 1, "dropped_questions": 1, "dropped_profile_items": 1}
    dev = list(iter_questions(out / "dev_questions.json", LAMP6))
    assert [q["id"] for q in dev] == ["511"]
    assert [item["id"] for item in dev[0]["profile"]] == ["5111"]
    assert load_outputs(out / "dev_outputs.json").outputs == {"511": "Lunch"}


def test_extract_folder_is_left_alone(tmp_path):
    text_dir = build_avocado(tmp_path)
    out = tmp_path / "out"
    extract = tmp_path / "extract"
    (extract / "keep").mkdir(parents=True)
    (extract / "notes.txt").write_text("mine")
    (extract / "keep" / "data.bin").write_bytes(b"\x00\x01")
    builder.main(argv(text_dir, question_files(tmp_path), out))
    assert sorted(str(p.relative_to(extract)) for p in extract.rglob("*")) == [
        "keep", "keep/data.bin", "notes.txt"]
    assert (extract / "notes.txt").read_text() == "mine"


def test_already_built_questions_are_refused(tmp_path):
    text_dir = build_avocado(tmp_path)
    files = question_files(tmp_path, test=[
        {"id": "520", "input": "Generate a subject for the following email: hi", "profile": []}])
    with pytest.raises(LampError, match=r"test_questions\.json: question 520: the input is "
                                        r"'Generate a subject.*not an Avocado email file name"):
        builder.main(argv(text_dir, files, tmp_path / "out"))


def test_a_folder_without_zips_and_a_damaged_zip(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    files = question_files(tmp_path)
    with pytest.raises(LampError, match="no .zip files"):
        builder.main(argv(empty, files, tmp_path / "out"))
    (empty / "001.zip").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(LampError, match=r"001\.zip: cannot read the zip"):
        builder.main(argv(empty, files, tmp_path / "out"))


def test_flag_errors(tmp_path, capsys):
    files = question_files(tmp_path)
    with pytest.raises(SystemExit):
        builder.parse_args(argv(tmp_path / "nope", files, tmp_path / "out"))
    assert "is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        builder.parse_args(["--avocado_files_dir", str(tmp_path)])
    assert "required" in capsys.readouterr().err


@pytest.mark.parametrize("data, subject, body", [
    (b"Subject: Hi\n\nline one\nline two\n\n", "Hi", "line one\nline two"),
    (b"From: x\n\nno subject here", "", "no subject here"),
    (b"Subject: =?iso-8859-1?q?R=E9sum=E9?=\nContent-Type: text/plain; charset=latin-1\n\n"
     b"r\xe9sum\xe9 attached", "Résumé", "résumé attached"),
    (b"Subject: odd\nContent-Type: text/plain; charset=x-unknown\n\nplain \xc3\xa9", "odd",
     "plain é"),
    (b"Subject: =?bogus?q?x?=\n\nbody", "=?bogus?q?x?=", "body"),
])
def test_parse_email(data, subject, body):
    parsed = parse_email(data)
    assert (parsed.subject, parsed.body) == (subject, body)


# --- headers -------------------------------------------------------------------------------

@pytest.mark.parametrize("data, subject", [
    # Raw UTF-8 in a header, as real mail has it (decoded, not d\udcc3\udca9j\udcc3\udca0 vu).
    ("Subject: déjà vu\n\nbody".encode(), "déjà vu"),
    (b"Subject: d\xc3\xa9j\xc3\xa0\r\n vu\r\n\r\nbody\r\n", "déjà vu"),
    # Raw bytes and an encoded word in one header.
    (b"Subject: d\xc3\xa9j\xc3\xa0 =?utf-8?q?vu_=C3=A0_Paris?=\n\nbody", "déjà vu à Paris"),
    # Not UTF-8 and no charset declared: latin-1.
    (b"Subject: d\xe9j\xe0 vu\n\nbody", "déjà vu"),
    # Not UTF-8: the charset the email declares, before latin-1.
    (b"Subject: \xcf\xf0\xe8\xe2\xe5\xf2\nContent-Type: text/plain; charset=windows-1251\n\nx",
     "Привет"),
    (b"Subject: \xcf\xf0\xe8\xe2\xe5\xf2\nContent-Type: multipart/mixed; boundary=b\n\n--b\n"
     b"Content-Type: text/plain; charset=windows-1251\n\nx\n--b--\n", "Привет"),
    # Encoded words: base64, a mislabelled charset, an RFC 2231 language, folded words.
    (b"Subject: =?utf-8?b?Y2Fmw6k=?=\n\nx", "café"),
    (b"Subject: =?us-ascii?q?caf=C3=A9?=\n\nx", "café"),
    (b"Subject: =?utf-8*en?q?caf=C3=A9?=\n\nx", "café"),
    (b"Subject: Re: =?utf-8?q?caf=C3=A9?= menu\n =?utf-8?q?for?=\n =?utf-8?q?_Friday?=\n\nx",
     "Re: café menu for Friday"),
    (b"Subject: Offsite agenda\n\tfor  Friday \n\nx", "Offsite agenda for  Friday"),
    (b"Subject: =?utf-8?b?a?=\n\nx", "=?utf-8?b?a?="),  # broken base64: kept as written
    (b"", ""),
])
def test_header_decoding(data, subject):
    assert parse_email(data).subject == subject


@pytest.mark.parametrize("data, body", [
    (b"Subject: x\n\nr\xe9sum\xe9 attached", "résumé attached"),  # no charset, not UTF-8
    (b"Subject: x\r\n\r\nline one\r\nline two\r\n", "line one\nline two"),
    (b"Subject: x\nContent-Transfer-Encoding: base64\n\nbGluZSBvbmUNCmxpbmUgdHdvDQo=\n",
     "line one\nline two"),
    (b"Subject: x\nContent-Type: text/plain; charset=us-ascii\n\ncaf\xc3\xa9", "café"),
    (b"Subject: x\nContent-Type: text/plain; charset=a\x00b\n\ncaf\xc3\xa9", "café"),
    (b"Subject: x\nContent-Type: application/pdf\nContent-Transfer-Encoding: base64\n\n"
     b"JVBERi0xLjQ=\n", ""),  # a single part that is not text has no body
])
def test_body_decoding(data, body):
    assert parse_email(data).body == body


# --- HTML bodies ---------------------------------------------------------------------------

HTML = (b"<html><head><title>Newsletter</title><style>p { color: red }</style></head>\n"
        b"<body>\n  <p>Hello&nbsp;team,</p>\n  <p>Q3 &amp; Q4 are\n  attached &mdash; see"
        b"<br>row 4.<br/><br>Thanks</p><script>alert('x')</script>\n<ul>\n <li>one</li>\n"
        b" <li>two &lt;b&gt;</li>\n</ul></body></html>")
HTML_TEXT = "Hello team,\n\nQ3 & Q4 are attached — see\nrow 4.\n\nThanks\n\none\ntwo <b>"


def alternative(*parts: tuple[str, bytes], outer: str = "alternative") -> bytes:
    body = b"".join(b"--b\nContent-Type: " + kind.encode() + b"\n\n" + payload + b"\n"
                    for kind, payload in parts)
    return (b"Subject: x\nMIME-Version: 1.0\nContent-Type: multipart/" + outer.encode()
            + b'; boundary="b"\n\n' + body + b"--b--\n")


@pytest.mark.parametrize("data, body", [
    (b"Subject: x\nContent-Type: text/html; charset=utf-8\n\n" + HTML, HTML_TEXT),
    (alternative(("text/html; charset=utf-8", HTML)), HTML_TEXT),
    (alternative(("text/html; charset=iso-8859-1\nContent-Transfer-Encoding: "
                  "quoted-printable", b"<p>r=E9sum=E9</p><p>&eacute;t&eacute;</p>")),
     "résumé\n\nété"),
    # text/plain wins when both are there, whatever their order, unless it is empty.
    (alternative(("text/html", b"<p>the html</p>"), ("text/plain", b"the plain text")),
     "the plain text"),
    (alternative(("text/plain", b" \n"), ("text/html", b"<p>the html</p>")), "the html"),
    # An HTML attachment is not the body.
    (alternative(("text/html\nContent-Disposition: attachment; filename=a.html",
                  b"<p>attached</p>"), outer="mixed"), ""),
])
def test_html_bodies_become_text(data, body):
    assert parse_email(data).body == body


@pytest.mark.parametrize("markup, text", [
    # Word's conditional sections, CDATA, and sections the standard parser raises
    # AssertionError on (an unknown keyword, no keyword) are markup, not text.
    ("<p>a</p><![if !supportLists]>-<![endif]>b", "a\n\n-b"),
    ("x<![CDATA[hidden]]>y<![foo bar]>z<![ ]>w", "xyzw"),
    ("<pre>col1  col2\nrow</pre>after", "col1 col2\nrow\n\nafter"),
    ("<div>one<div>two</div></div>three", "one\n\ntwo\n\nthree"),
    ("<script>never closed", ""),
    ("&#233;&eacute;&bogus; &#x41;", "éé&bogus; A"),
])
def test_html_to_text(markup, text):
    assert html_to_text(markup) == text


# --- unusable emails in a build ------------------------------------------------------------

NO_SUBJECT = b"From: a@example.com\n\nA body but no subject line.\n"
NO_BODY = plain_email("Empty", "")
HTML_ONLY_EMPTY = (b"Subject: Scripts only\nContent-Type: text/html\n\n"
                   b"<script>track()</script><style>p{}</style>")


def digests(text_dir: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(text_dir.iterdir())}


def add_members(zip_path: Path, members: dict[str, bytes], **options) -> None:
    with zipfile.ZipFile(zip_path, "a", **options) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def unusable_setup(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    text_dir = build_avocado(tmp_path)
    add_members(text_dir / "001.zip", {"001/001-000004-EM.txt": NO_SUBJECT,
                                       "001/001-000005-EM.txt": NO_BODY})
    add_members(text_dir / "002.zip", {"002/002-000004-EM.txt": HTML_ONLY_EMPTY})
    files = question_files(
        tmp_path,
        train=[{"id": "500", "input": "001-000001-EM.txt", "profile": [
            {"id": "5000", "text": "001-000004-EM.txt"},
            {"id": "5001", "text": "001-000003-EM.txt"}]}],
        dev=[{"id": "510", "input": "001-000005-EM.txt", "profile": []},
             {"id": "511", "input": "002-000004-EM.txt", "profile": []},
             {"id": "512", "input": "001-000002-EM.txt", "profile": []}])
    return text_dir, files


def test_emails_without_subject_or_body_fail_the_build(tmp_path, capsys):
    text_dir, files = unusable_setup(tmp_path)
    before = digests(text_dir)
    out = tmp_path / "out"
    status, lines = run_cli(builder.main, argv(text_dir, files, out), capsys)
    assert status == 2
    assert problems(lines) == [
        f"error: 3 of 8 referenced emails in {text_dir} cannot be used: without a subject: 1 "
        f"(first: 001-000004-EM.txt); without a body: 2 (first: 001-000005-EM.txt, "
        f"002-000004-EM.txt); pass --allow_missing to build without them"]
    assert not out.exists()
    assert digests(text_dir) == before


def test_allow_missing_skips_and_counts_emails_without_subject_or_body(tmp_path, capsys):
    text_dir, files = unusable_setup(tmp_path)
    out = tmp_path / "out"
    summary = builder.main(argv(text_dir, files, out, "--allow_missing"))
    assert summary["unusable_emails"] == {"not in the zips": 0, "unreadable": 0,
                                          "without a subject": 1, "without a body": 2}
    assert summary["train"] == {"questions": 1, "dropped_questions": 0,
                                "dropped_profile_items": 1}
    assert summary["dev"] == {"questions": 1, "dropped_questions": 2,
                              "dropped_profile_items": 0}
    log = capsys.readouterr().err
    assert ("INFO create_avocado_dataset: 5 of 8 referenced emails usable (not in the zips: 0, "
            "unreadable: 0, without a subject: 1, without a body: 2)\n") in log
    assert "WARNING create_avocado_dataset: 3 of 8 referenced emails" in log
    train = list(iter_questions(out / "train_questions.json", LAMP6))
    assert [item["id"] for item in train[0]["profile"]] == ["5001"]
    assert load_outputs(out / "dev_outputs.json").outputs == {"512": "Re: Quarterly numbers"}


def test_the_script_exits_2_with_one_error_line(tmp_path):
    text_dir, files = unusable_setup(tmp_path)
    out = tmp_path / "out"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    process = subprocess.run([sys.executable, "data/avocado/create_avocado_dataset.py",
                              *argv(text_dir, files, out)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert process.returncode == 2
    assert "Traceback" not in process.stderr
    errors = [line for line in process.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: 3 of 8 referenced emails")
    assert process.stderr.rstrip().endswith(errors[0])
    assert not out.exists()


# --- damaged, encrypted and unsupported zip members ----------------------------------------

MEMBER = "001/001-000001-EM.txt"  # the train question 500's own email, in dev 510's profile


def patch_member(zip_path: Path, member: str, *, flags: int | None = None,
                 method: int | None = None, compressed_size: int | None = None,
                 file_size: int | None = None, flip_data_byte: int | None = None) -> None:
    """Change one member's local and central headers (or a byte of its data) in place."""
    raw = bytearray(zip_path.read_bytes())
    with zipfile.ZipFile(zip_path) as archive:
        local = archive.getinfo(member).header_offset
    central = raw.find(b"PK\x01\x02")
    while raw[central + 46:central + 46 + len(member)] != member.encode():
        central = raw.find(b"PK\x01\x02", central + 4)
    for value, local_at, central_at, size in ((flags, 6, 8, 2), (method, 8, 10, 2),
                                              (compressed_size, 18, 20, 4),
                                              (file_size, 22, 24, 4)):
        if value is not None:
            raw[local + local_at:local + local_at + size] = value.to_bytes(size, "little")
            raw[central + central_at:central + central_at + size] = value.to_bytes(size,
                                                                                   "little")
    if flip_data_byte is not None:
        name_length, extra_length = (int.from_bytes(raw[local + at:local + at + 2], "little")
                                     for at in (26, 28))
        raw[local + 30 + name_length + extra_length + flip_data_byte] ^= 0xFF
    zip_path.write_bytes(bytes(raw))


def rewrite_zip(zip_path: Path, compression: int, only: str | None = None,
                data: bytes | None = None) -> None:
    """The zip again, its members (or just ``only``, with new ``data``) compressed so."""
    with zipfile.ZipFile(zip_path) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    if data is not None:
        members[only] = data
    zip_path.unlink()
    with zipfile.ZipFile(zip_path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content, compress_type=(
                compression if only in (None, name) else zipfile.ZIP_STORED))


# Each takes (zip path, monkeypatch) and leaves MEMBER unreadable in its own way.
def bad_crc(zip_path, monkeypatch):
    patch_member(zip_path, MEMBER, flip_data_byte=3)


def truncated(zip_path, monkeypatch):
    # The headers promise more data than the file holds.
    size = 2 * zip_path.stat().st_size
    patch_member(zip_path, MEMBER, compressed_size=size, file_size=size)


def corrupt_deflate(zip_path, monkeypatch):
    rewrite_zip(zip_path, zipfile.ZIP_DEFLATED)
    patch_member(zip_path, MEMBER, flip_data_byte=0)


def encrypted(zip_path, monkeypatch):
    patch_member(zip_path, MEMBER, flags=0x1)


def unknown_method(zip_path, monkeypatch):
    patch_member(zip_path, MEMBER, method=99)


def lzma_without_the_module(zip_path, monkeypatch):
    rewrite_zip(zip_path, zipfile.ZIP_LZMA, only=MEMBER)
    monkeypatch.setattr(avocado, "_READABLE_METHODS",
                        avocado._READABLE_METHODS - {zipfile.ZIP_LZMA})


def too_large(zip_path, monkeypatch):
    monkeypatch.setattr(avocado, "MAX_EMAIL_BYTES", 1000)
    rewrite_zip(zip_path, zipfile.ZIP_STORED, only=MEMBER,
                data=plain_email("Quarterly numbers", "Q3 " * 1000))


def lying_size(zip_path, monkeypatch):
    # Headers that understate a member's size do not get it past the limit.
    too_large(zip_path, monkeypatch)
    patch_member(zip_path, MEMBER, file_size=40)


MEMBER_DEFECTS = [
    (bad_crc, r"damaged \(Bad CRC-32 for file '001/001-000001-EM.txt'\)"),
    (truncated, r"damaged \(truncated\)"),
    (corrupt_deflate, r"damaged \(Error -3 while decompressing data: .+\)"),
    (encrypted, r"encrypted"),
    (unknown_method, r"compressed with method 99, which Python cannot read"),
    (lzma_without_the_module, r"compressed with method 14, which needs the missing lzma module"),
    (too_large, r"3,104 bytes is too large for an email"),
    (lying_size, r"damaged \(Bad CRC-32 for file '001/001-000001-EM.txt'\)"),
]


@pytest.mark.parametrize("defect, reason", MEMBER_DEFECTS,
                         ids=[defect.__name__ for defect, _ in MEMBER_DEFECTS])
def test_an_unreadable_member_is_one_error_line(tmp_path, monkeypatch, capsys, defect, reason):
    text_dir = build_avocado(tmp_path)
    zip_path = text_dir / "001.zip"
    defect(zip_path, monkeypatch)
    before = digests(text_dir)
    out = tmp_path / "out"
    status, lines = run_cli(builder.main, argv(text_dir, question_files(tmp_path), out), capsys)
    assert status == 2
    [line] = problems(lines)
    prefix = (f"error: 1 of 6 referenced emails in {text_dir} cannot be used: unreadable: 1 "
              f"(first: {zip_path}:{MEMBER}: ")
    assert line.startswith(prefix)
    assert re.fullmatch(re.escape(prefix) + reason
                        + re.escape("); pass --allow_missing to build without them"), line)
    assert not out.exists()
    assert digests(text_dir) == before


@pytest.mark.parametrize("defect", [bad_crc, encrypted, unknown_method])
def test_allow_missing_skips_and_counts_unreadable_members(tmp_path, monkeypatch, defect):
    text_dir = build_avocado(tmp_path)
    defect(text_dir / "001.zip", monkeypatch)
    out = tmp_path / "out"
    summary = builder.main(argv(text_dir, question_files(tmp_path), out, "--allow_missing"))
    assert summary["unusable_emails"]["unreadable"] == 1
    assert summary["train"]["dropped_questions"] == 1
    assert summary["dev"]["dropped_profile_items"] == 1
    assert load_outputs(out / "train_outputs.json").outputs == {
        "501": "Offsite agenda for Friday"}


@pytest.mark.parametrize("compression", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA,
                                         zipfile.ZIP_DEFLATED])
def test_bzip2_and_lzma_members_are_read(tmp_path, compression):
    text_dir = build_avocado(tmp_path)
    rewrite_zip(text_dir / "001.zip", compression)
    summary = builder.main(argv(text_dir, question_files(tmp_path), tmp_path / "out"))
    assert summary["emails"] == 6
    assert load_outputs(tmp_path / "out" / "dev_outputs.json").outputs == {
        "510": "Re: Quarterly numbers"}


def test_a_damaged_member_nobody_references_is_never_read(tmp_path):
    text_dir = build_avocado(tmp_path)
    patch_member(text_dir / "001.zip", "001/001-000009-AT.txt", flip_data_byte=0)
    summary = builder.main(argv(text_dir, question_files(tmp_path), tmp_path / "out"))
    assert summary["emails"] == 6


def test_a_zip_whose_directory_cannot_be_read(tmp_path, capsys):
    text_dir = build_avocado(tmp_path)
    zip_path = text_dir / "002.zip"
    with zipfile.ZipFile(zip_path, "a") as archive:
        archive.writestr("002/é.txt", b"x")  # a name flagged UTF-8 ...
    raw = zip_path.read_bytes()
    central = raw.rfind("002/é.txt".encode())
    zip_path.write_bytes(raw[:central] + b"002/\xff\xff.txt" + raw[central + 10:])  # ... is not
    files = question_files(tmp_path)
    status, lines = run_cli(builder.main, argv(text_dir, files, tmp_path / "out"), capsys)
    assert status == 2
    assert problems(lines) == [f"error: {zip_path}: cannot read the zip ('utf-8' codec can't "
                                   f"decode byte 0xff in position 4: invalid start byte)"]
    zip_path.write_bytes(raw[:len(raw) // 2])  # cut short: no central directory
    status, lines = run_cli(builder.main, argv(text_dir, files, tmp_path / "out"), capsys)
    assert status == 2
    assert problems(lines) == [f"error: {zip_path}: cannot read the zip (File is not a zip "
                                   f"file)"]
    assert not (tmp_path / "out").exists()
