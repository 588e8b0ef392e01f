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
import html.parser
import importlib.util
import logging
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable

from tqdm import tqdm

from LaMP.utils.errors import LampError, preview
from LaMP.utils.tasks import get_task

logger = logging.getLogger(__name__)

INSTRUCTION = get_task("LaMP-6").input_prefix  # "Generate a subject for the following email:"
# An email reference is a bare file name; anything with spaces is text, not a reference
# (for example a file that was already built).
_FILE_NAME = re.compile(r"^[^\s/\\]+$")
_FOLDED = re.compile(r"\s*\r?\n\s*")
# Avocado keeps attachments in separate -AT files, so an email file is headers and text; a
# member this large is not an email, and is not inflated into memory.
MAX_EMAIL_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Email:
    subject: str
    body: str


def is_email_reference(value: object) -> bool:
    return isinstance(value, str) and bool(_FILE_NAME.match(value))


def _decode_text(data: bytes, charsets: Iterable[str | None]) -> str:
    """``data`` in the first of ``charsets`` that decodes it strictly, else latin-1.

    Latin-1 maps every byte to a character, so text in an unknown 8-bit charset keeps its
    ASCII letters instead of turning into replacement characters.
    """
    for charset in charsets:
        if not charset:
            continue
        try:
            return data.decode(charset)
        except (LookupError, ValueError):  # unknown charset (or not a text codec), or
            continue                       # bytes it cannot decode (UnicodeError)
    return data.decode("latin-1")


class _RawHeaders(email.policy.Compat32):
    """compat32, except that a header comes back exactly as the parser stored it.

    The parser keeps raw 8-bit header bytes as surrogate escapes, and compat32 would wrap
    such a header in a Header object whose text keeps those escapes (``d\\udcc3\\udca9j``);
    ``_decode_header`` gets the bytes back from the raw value instead.
    """

    def header_fetch_parse(self, name, value):
        return value


_POLICY = _RawHeaders()


def _decode_header(raw: str | None, declared: str | None = None) -> str:
    """A header as text: encoded words (``=?utf-8?…?=``) decoded, folded lines joined.

    Raw 8-bit bytes (common in real mail, though RFC 5322 has no room for them) are read as
    UTF-8, then as the charset the email declares, then as latin-1.
    """
    if raw is None:
        return ""
    # Unfolded first, into one space per fold (a tab after the line break included), since
    # decode_header would drop the space that separates a folded word from the next.
    data = re.sub(rb"[ \t]*\r?\n[ \t]+", b" ", str(raw).encode("ascii", "surrogateescape"))
    fallback = _decode_text(data, ("utf-8", declared))
    try:
        # Handed over as latin-1 so that decode_header gives each unencoded run back as its
        # original bytes, which then get the same charset guess as a header without words.
        chunks = email.header.decode_header(data.decode("latin-1"))
    except email.errors.HeaderParseError:  # a broken base64 word: keep the header as written
        return _FOLDED.sub(" ", fallback).strip()
    pieces = []
    for chunk, charset in chunks:
        if isinstance(chunk, str):  # decode_header found no encoded word at all
            chunk = chunk.encode("latin-1")
        if charset is None:
            pieces.append(_decode_text(chunk, ("utf-8", declared)))
            continue
        charset = charset.partition("*")[0]  # RFC 2231 language suffix: utf-8*en
        try:
            pieces.append(chunk.decode(charset))
        except LookupError:  # a charset Python does not know: keep the header as written
            return _FOLDED.sub(" ", fallback).strip()
        except ValueError:  # bytes the word's own charset cannot decode (mislabelled)
            pieces.append(_decode_text(chunk, ("utf-8",)))
    return _FOLDED.sub(" ", "".join(pieces)).strip()


class _HtmlText(html.parser.HTMLParser):
    """The text of an HTML body, as a mail reader would show it, without the markup."""

    # Their content is code or metadata, never part of the message.
    SKIPPED = frozenset({"script", "style", "title", "template"})
    LINE_BREAKS = frozenset({"li", "tr", "dt", "dd"})  # and <br>, which adds up
    PARAGRAPH_BREAKS = frozenset({"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote",
                                  "pre", "table", "ul", "ol", "dl", "hr", "address", "center"})

    def __init__(self):
        super().__init__(convert_charrefs=True)  # entities such as &amp; arrive unescaped
        self.pieces: list[str] = []
        self.skipping = 0
        self.preformatted = 0
        # Newlines owed before the next text: tags only ask for a break, so that "</li><li>"
        # is one line break and "</p>\n<p>" one blank line, not an accumulation.
        self.breaks = 0

    def _break(self, tag: str) -> None:
        if tag == "br":
            self.breaks = min(self.breaks + 1, 2)  # <br><br> is a blank line
        elif tag in self.LINE_BREAKS:
            self.breaks = max(self.breaks, 1)
        elif tag in self.PARAGRAPH_BREAKS:
            self.breaks = 2

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIPPED:
            self.skipping += 1
        self.preformatted += tag == "pre"
        self._break(tag)

    def handle_endtag(self, tag):
        if tag in self.SKIPPED:
            self.skipping = max(0, self.skipping - 1)
        if tag == "pre":
            self.preformatted = max(0, self.preformatted - 1)
        if tag != "br":  # <br/> arrives as a start and an end tag: one line break
            self._break(tag)

    def handle_data(self, data):
        if self.skipping:
            return
        # Outside <pre>, line breaks in the source are layout, not text.
        text = data if self.preformatted else re.sub(r"\s+", " ", data)
        if self.breaks:
            if not text.strip():
                return  # the indentation between two blocks
            self.pieces.append("\n" * self.breaks)
            self.breaks = 0
        self.pieces.append(text)

    def parse_marked_section(self, i, report=1):
        # "<![CDATA[…]]>" and Word's "<![if …]>"/"<![endif]>" are markup; the standard
        # parser raises AssertionError on any other keyword, so skip every section here.
        end_mark = "]]>" if self.rawdata.startswith("<![CDATA[", i) else "]>"
        end = self.rawdata.find(end_mark, i + 3)
        return -1 if end < 0 else end + len(end_mark)

    def text(self) -> str:
        lines = [re.sub(r"[^\S\n]+", " ", line).strip()
                 for line in "".join(self.pieces).split("\n")]
        return "\n".join(lines).strip()


def html_to_text(markup: str) -> str:
    """Plain text of an HTML email body: no script or style, paragraphs on their own lines."""
    parser = _HtmlText()
    parser.feed(markup)
    parser.close()
    return parser.text()


def _part_text(part: email.message.Message) -> str:
    payload = part.get_payload(decode=True)
    if payload is None:
        return ""
    text = _decode_text(payload, (part.get_content_charset(), "utf-8"))
    if part.get_content_type() == "text/html":
        return html_to_text(text)
    return re.sub(r"\r\n?", "\n", text).strip()  # CRLF files (and CRLF in base64) as \n


def _declared_charset(message: email.message.Message) -> str | None:
    """The first charset the email declares (the headers' best guess after UTF-8)."""
    for part in message.walk():
        charset = part.get_content_charset()
        if charset:
            return charset
    return None


def parse_email(data: bytes) -> Email:
    """Subject and body of one email file.

    The body is the text/plain parts that are not attachments; an email without one, or
    whose text/plain is empty (HTML only, such as a multipart/alternative with just
    text/html), uses its text/html parts, converted to text. A single-part email that is not
    text has no body.
    """
    message = email.message_from_bytes(data, policy=_POLICY)
    if message.is_multipart():
        parts = [part for part in message.walk()
                 if not part.is_multipart() and part.get_content_disposition() != "attachment"]
        body = "\n".join(_part_text(part) for part in parts
                         if part.get_content_type() == "text/plain").strip()
        if not body:  # some mailers send an empty text/plain next to the real HTML
            body = "\n".join(_part_text(part) for part in parts
                             if part.get_content_type() == "text/html")
    else:  # one part: text/html is converted, other text is used as it is
        body = _part_text(message) if message.get_content_maintype() == "text" else ""
    return Email(subject=_decode_header(message["Subject"], _declared_charset(message)),
                 body=body.strip())


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


# The compression methods this Python can inflate: zipfile needs an optional module for all
# but "stored", and says so with a RuntimeError only once it tries.
_METHOD_MODULES = {zipfile.ZIP_STORED: None, zipfile.ZIP_DEFLATED: "zlib",
                   zipfile.ZIP_BZIP2: "bz2", zipfile.ZIP_LZMA: "lzma"}
_READABLE_METHODS = frozenset(method for method, module in _METHOD_MODULES.items()
                              if module is None or importlib.util.find_spec(module))
# What a member's damaged bytes raise while they are inflated and checked: BadZipFile (bad
# CRC, bad local header), EOFError (truncated), zlib.error (deflate), OSError (bzip2, and
# disk errors), LZMAError (an Exception subclass, and lzma may be absent), NotImplementedError
# for flag bits zipfile does not handle (patched data, strong encryption), and
# UnicodeDecodeError for a local header whose name is flagged UTF-8 but is not.
_MEMBER_ERRORS = (zipfile.BadZipFile, EOFError, zlib.error, OSError, NotImplementedError,
                  UnicodeDecodeError)
if importlib.util.find_spec("lzma"):
    import lzma
    _MEMBER_ERRORS += (lzma.LZMAError,)


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes | str:
    """A member's bytes, or why they cannot be read (a string)."""
    if info.flag_bits & 0x1:  # zipfile would ask for a password with a RuntimeError
        return "encrypted"
    if info.compress_type not in _READABLE_METHODS:
        module = _METHOD_MODULES.get(info.compress_type)
        return (f"compressed with method {info.compress_type}, which needs the missing "
                f"{module} module" if module else
                f"compressed with method {info.compress_type}, which Python cannot read")
    if info.file_size > MAX_EMAIL_BYTES:
        return f"{info.file_size:,} bytes is too large for an email"
    try:
        # zipfile inflates no more than the header's size, and a header that understates it
        # fails the CRC check, so the limit above bounds what is read.
        return archive.read(info)
    except _MEMBER_ERRORS as error:
        # A bare EOFError: the member's data runs past the end of the zip file.
        return f"damaged ({str(error) or 'truncated'})"


def read_emails(zips: list[Path], wanted: set[str]) -> tuple[dict[str, Email], dict[str, str]]:
    """Parse the ``wanted`` members (by file name) of the zips, reading nothing else.

    Returns the emails and, for members that cannot be read (damaged, encrypted, compressed
    in a way Python cannot inflate), ``{file name: "zip:member: why"}``. A zip whose
    directory cannot be read at all is a LampError. The first zip that holds a name decides.
    """
    emails: dict[str, Email] = {}
    unreadable: dict[str, str] = {}
    for path in tqdm(zips, desc="Avocado zips", unit=" zip", disable=None):
        # Besides BadZipFile and OSError: NotImplementedError for a zip version zipfile does
        # not read, UnicodeDecodeError for a member name flagged UTF-8 that is not.
        try:
            archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError,
                UnicodeDecodeError) as error:
            raise LampError(f"{path}: cannot read the zip ({error})") from None
        with archive:
            for info in archive.infolist():
                name = PurePosixPath(info.filename).name
                if info.is_dir() or name not in wanted:
                    continue
                if name in emails or name in unreadable:
                    logger.warning("%s: %s also appears in an earlier zip; keeping the first",
                                   path, info.filename)
                    continue
                data = _read_member(archive, info)
                if isinstance(data, str):
                    unreadable[name] = f"{path}:{info.filename}: {data}"
                else:
                    emails[name] = parse_email(data)
    return emails, unreadable


def sort_out(wanted: set[str], emails: dict[str, Email], unreadable: dict[str, str]
             ) -> tuple[dict[str, Email], dict[str, list[str]]]:
    """The emails LaMP-6 can use, and the referenced ones it cannot, by problem.

    An email without a subject would give an empty gold output or profile title, one without
    a body an empty input or profile text; both are unusable, like a missing email.
    """
    problems = {
        "not in the zips": sorted(wanted - emails.keys() - unreadable.keys()),
        "unreadable": [unreadable[name] for name in sorted(unreadable)],
        "without a subject": sorted(name for name, found in emails.items() if not found.subject),
        "without a body": sorted(name for name, found in emails.items() if not found.body),
    }
    usable = {name: found for name, found in emails.items() if found.subject and found.body}
    return usable, problems


def describe_problems(problems: dict[str, list[str]]) -> str:
    """``not in the zips: 2 (first: a, b); without a body: 1 (first: c)``, empty ones left out."""
    return "; ".join(f"{problem}: {preview(names)}" for problem, names in problems.items()
                     if names)


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
