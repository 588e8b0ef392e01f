"""LaMP-6 from Avocado-like zips that the tests build."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from LaMP.utils.data.avocado import parse_email
from LaMP.utils.data.outputs import load_outputs
from LaMP.utils.data.questions import input_problem, iter_questions
from LaMP.utils.errors import LampError
from LaMP.utils.tasks import get_task
from conftest import load_script, write_json

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
