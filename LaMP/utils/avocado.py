"""Building LaMP-6 (email subject generation) from the licensed Avocado corpus.

LaMP publishes LaMP-6 questions that name emails instead of holding them: a question's
``input`` and each profile item's ``text`` are Avocado email file names such as
``147-000874-EM.txt``. The emails live inside the zips of ``avocado-1.0.2/data/text``
(one folder per custodian in each zip). This module reads just the named members straight
from the zips, parses them with the standard library's ``email`` package, and fills the
questions in: the input becomes the instruction plus the email body, the gold output is the
email's subject, and each profile item gets ``text`` = body and ``title`` = subject.
"""
from __future__ import annotations

import email
import email.errors
import email.header
import email.message
import email.policy
import logging
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable

from tqdm import tqdm

from LaMP.utils.errors import LampError
from LaMP.utils.tasks import get_task

logger = logging.getLogger(__name__)

INSTRUCTION = get_task("LaMP-6").input_prefix  # "Generate a subject for the following email:"
# An email reference is a bare file name; anything with spaces is text, not a reference
# (for example a file that was already built).
_FILE_NAME = re.compile(r"^[^\s/\\]+$")
_FOLDED = re.compile(r"\s*\r?\n\s*")


@dataclass(frozen=True)
class Email:
    subject: str
    body: str


def is_email_reference(value: object) -> bool:
    return isinstance(value, str) and bool(_FILE_NAME.match(value))


def _decode_header(raw: str | None) -> str:
    """A header as text: encoded words (``=?utf-8?…?=``) decoded, folded lines joined."""
    if raw is None:
        return ""
    text = str(raw)
    try:
        text = str(email.header.make_header(email.header.decode_header(text)))
    except (LookupError, UnicodeError, email.errors.HeaderParseError):
        pass  # an unknown charset or a broken encoded word: keep the header as written
    return _FOLDED.sub(" ", text).strip()


def _part_text(part: email.message.Message) -> str:
    payload = part.get_payload(decode=True)
    if payload is None:
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:  # a charset Python does not know
        return payload.decode("utf-8", errors="replace")


def parse_email(data: bytes) -> Email:
    """Subject and body of one email file; the body is the text/plain parts, stripped."""
    # compat32 never raises on odd headers; headers are decoded by hand above.
    message = email.message_from_bytes(data, policy=email.policy.compat32)
    if message.is_multipart():
        parts = [part for part in message.walk()
                 if not part.is_multipart() and part.get_content_type() == "text/plain"
                 and part.get_content_disposition() != "attachment"]
        body = "\n".join(_part_text(part).strip() for part in parts)
    else:
        body = _part_text(message)
    return Email(subject=_decode_header(message["Subject"]), body=body.strip())


def referenced_emails(questions: Iterable[dict], source: str) -> set[str]:
    """The email file names that questions (inputs and profile items) refer to."""
    names: set[str] = set()
    for question in questions:
        references = [("input", question["input"])]
        references += [(f"profile item {item['id']}", item.get("text")) for item in
                       question["profile"]]
        for where, value in references:
            if not is_email_reference(value):
                shown = repr(value)[:60]
                raise LampError(f"{source}: question {question['id']}: the {where} is "
                                f"{shown}, not an Avocado email file name such as "
                                f"147-000874-EM.txt (are these LaMP's LaMP-6 question files?)")
            names.add(value)
    return names


def zip_files(directory: Path) -> list[Path]:
    zips = sorted(path for path in directory.iterdir() if path.suffix.lower() == ".zip")
    if not zips:
        raise LampError(f"{directory}: no .zip files (expected avocado-1.0.2/data/text)")
    return zips


def read_emails(zips: list[Path], wanted: set[str]) -> dict[str, Email]:
    """Parse the ``wanted`` members (by file name) of the zips, reading nothing else."""
    emails: dict[str, Email] = {}
    for path in tqdm(zips, desc="Avocado zips", unit=" zip", disable=None):
        try:
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    name = PurePosixPath(info.filename).name
                    if info.is_dir() or name not in wanted:
                        continue
                    if name in emails:
                        logger.warning("%s: %s also appears in an earlier zip; keeping the first",
                                       path, info.filename)
                        continue
                    emails[name] = parse_email(archive.read(info))
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as error:
            raise LampError(f"{path}: cannot read the zip ({error})") from None
    return emails


def build_question(question: dict, emails: dict[str, Email], keep_user_id: bool
                   ) -> tuple[dict, str] | None:
    """A LaMP-6 question with its texts filled in, and its gold subject.

    Returns None when the question's own email is missing; missing profile emails are left
    out of the profile.
    """
    own = emails.get(question["input"])
    if own is None:
        return None
    profile = []
    for item in question["profile"]:
        found = emails.get(item["text"])
        if found is not None:
            profile.append({**item, "text": found.body, "title": found.subject})
    built = {"id": question["id"], "input": f"{INSTRUCTION} {own.body}", "profile": profile}
    if keep_user_id and "user_id" in question:
        built["user_id"] = question["user_id"]
    return built, own.subject
