"""Bounded JSON input: the limits every JSON reader enforces, checked before a parser runs.

Parsers handed hostile bytes fail in ways a user cannot act on. ijson's C backend keeps the
key path of every enclosing level, so its memory grows with the square of the nesting depth
(a 200 KB file nested 100,000 deep needs over 20 GB); it crashes the interpreter on a
5000-digit integer and silently turns the escape ``\\ud800`` into ``?``. ``json.loads``
recurses until ``RecursionError``, refuses integers over 4300 digits with a ``ValueError``,
reads ``1e400`` as infinity and keeps lone surrogates that fail later, when the text is
written. So every reader passes its bytes through ``GuardedReader``, which checks each
block before handing it on and refuses, with one line naming the file and the byte offset:

* bytes that are not UTF-8 (raw UTF-16 surrogates included);
* nesting deeper than ``MAX_DEPTH``;
* a number with more than ``MAX_NUMBER_DIGITS`` digits, an integer beyond 64 bits, a number
  that overflows a float, and ``NaN`` / ``Infinity`` (not JSON, though ``json.loads`` takes
  them);
* a ``\\uXXXX`` escape that is half of a UTF-16 surrogate pair.

Both parsers also keep only the last value of a key repeated in one object, so
``{"output": "a", "output": "b"}`` would read as if ``"a"`` were not there: ``RepeatedKeys``
watches the objects a parser builds and every reader refuses a repeated key, naming it and
where its object sits.

The checks are C-level passes over each block (``bytes.split`` at quotes to set strings
aside, ``bytes.translate``, regular expressions, one ``numpy.cumsum``); only a block they
flag is walked token by token, to find the offset. A block ends outside any string or number
(the rest is held back for the next read), so no check has to span two blocks.
Memory stays bounded by a block plus the longest string or number being read.
"""
from __future__ import annotations

import codecs
import json
import re
from typing import Any, BinaryIO, Iterator

from LaMP.utils.errors import LampError

# LaMP files nest 4 deep (list > question > profile > item); 64 leaves room for any
# reasonable extra field while keeping both parsers far from their pathological cases.
MAX_DEPTH = 64
# LaMP ids have at most a dozen digits; 100 keeps ints cheap to convert and far below the
# size that crashes ijson's C backend (a few thousand digits).
MAX_NUMBER_DIGITS = 100
# Integers must fit 64 bits: ijson's C backend refuses larger ones ("integer overflow", and
# -2**63 too), so every reader refuses them alike, with the same message.
INTEGER_RANGE = range(-2 ** 63 + 1, 2 ** 63)
READ_SIZE = 1 << 16  # bytes read from the file per block (ijson's own default buffer)
# A trailing number or literal is held back to the next block so that it is checked whole;
# anything longer is already a problem (or malformed) and is checked as it stands.
_MAX_HELD_TOKEN = 2 * MAX_NUMBER_DIGITS + 56

_BOM = codecs.BOM_UTF8
_TOKEN_BYTES = b"-+.0123456789" + bytes(range(ord("A"), ord("Z") + 1)) + bytes(
    range(ord("a"), ord("z") + 1))
_NON_BRACKETS = bytes(byte for byte in range(256) if byte not in b"[]{}")
_SIGNS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 / -1 as int8
_STRUCTURE = b"_:, \t\r\n[]{}"  # a skeleton of only these holds no number or literal
# Cheap tests that flag a block for the exact walk: a run of digits as long as 2**63, a positive
# exponent of three or more digits (the only way a short number can overflow), NaN/Infinity.
_SUSPECT_NUMBER = re.compile(rb"[0-9]{%d}|[eE]\+?[0-9]{3}|NaN|Infinity"
                             % len(str(INTEGER_RANGE.stop)))
_SURROGATE_PAIR = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
# The exact walk: strings, brackets, numbers and the non-JSON literals, in file order.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]|-?[0-9][-+.0-9eE]*|NaN|-?Infinity',
                    re.S)
_ESCAPE = re.compile(rb"\\u([dD][89a-fA-F][0-9a-fA-F]{2})|\\.", re.S)
_DIGIT_RUN = re.compile(rb"[0-9]+")
_ESCAPED_PAIR = re.compile(rb'\\[\\"]')  # an escaped backslash or quote


def _neutralize_escapes(text: bytes) -> bytes:
    """``text`` with each escaped backslash and escaped quote replaced by two dots (same
    length, same offsets): every '"' left delimits a string and every backslash left starts
    an escape. ``text`` must start outside a string; outside strings JSON has no backslash."""
    # Left to right, so a run of backslashes pairs up as the JSON reader pairs it. One
    # regular expression: it finds backslashes at memchr speed, where bytes.replace
    # searches for two-byte patterns several times slower.
    return _ESCAPED_PAIR.sub(b"..", text) if b"\\" in text else text


class GuardedReader:
    """A binary reader over ``raw`` that hands on only bytes that passed the checks above.

    ``opener`` (``b"["`` or ``b"{"``) is the byte the document must start with; ``expected``
    says what the file should be, for the error when it does not. A UTF-8 byte order mark
    is dropped. Reads ``raw`` once, front to back, so a pipe works.
    """

    def __init__(self, raw: BinaryIO, source: str, opener: bytes = b"", expected: str = ""):
        self._raw = raw
        self.source = source
        self._opener, self._expected = opener, expected
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._read = 0  # bytes read from raw so far
        self._offset = 0  # file offset of the first byte of self._held
        self._head: bytes | None = b""  # the first bytes until a byte order mark is ruled out
        self._held = b""  # read, not yet checked: an unfinished string or trailing token
        self._ready = b""  # checked, not yet handed on
        self._depth = 0
        self._started = False
        self._eof = False

    def read(self, size: int = -1) -> bytes:
        if size == 0:
            return b""  # ijson asks read(0) to learn whether the file is binary
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(READ_SIZE), b""))
        while not self._ready and not self._eof:
            self._fill()
        block, self._ready = self._ready[:size], self._ready[size:]
        return block

    def _fail(self, problem: str, offset: int):
        raise LampError(f"{self.source}: {problem} at byte {offset}")

    def _fill(self) -> None:
        try:
            # A held-back string grows the next read as much, so a long string costs
            # linear time, not one rescan per block.
            data = self._raw.read(max(READ_SIZE, len(self._held)))
        except OSError as error:
            raise LampError(f"{self.source}: cannot read ({error.strerror})") from None
        final = not data
        if self._head is not None:  # the first bytes: is there a byte order mark?
            data, self._head = self._head + data, None
            if not final and len(data) < len(_BOM) and _BOM.startswith(data):
                self._head = data  # a pipe may deliver the mark a byte at a time
                return
            if data.startswith(_BOM):
                self._read = self._offset = len(_BOM)
                data = data[len(_BOM):]
        self._check_utf8(data, final)
        window = self._held + data
        text = _neutralize_escapes(window)
        parts = text.split(b'"')  # even positions are outside strings
        outside = parts[0::2]
        ends_in_string = len(parts) % 2 == 0
        if final:
            held = 0
        elif ends_in_string:  # hold the unfinished string back whole
            held = len(window) - text.rfind(b'"')
        else:  # hold back a trailing number or literal, which the next read may continue
            held = len(window) - len(window.rstrip(_TOKEN_BYTES))
            held = held if held <= _MAX_HELD_TOKEN else 0
            outside[-1] = outside[-1][:len(outside[-1]) - held]
        cut = len(window) - held
        block, self._held = window[:cut], window[cut:]
        self._check(block, text[:cut], b"_".join(outside))  # "_" stands for each string
        self._offset += len(block)
        self._ready = block
        if final:
            self._eof = True
            if self._opener and not self._started:
                raise LampError(f"{self.source}: the file is empty")

    def _check_utf8(self, data: bytes, final: bool) -> None:
        pending = len(self._decoder.getstate()[0])
        if self._read <= len(_BOM) and b"\x00" in data[:4]:
            # JSON text never holds a NUL byte; at the start it means UTF-16 or UTF-32.
            self._fail("not UTF-8 text (a NUL byte: UTF-16 or UTF-32?)",
                       self._read + data.index(b"\x00"))
        try:
            self._decoder.decode(data, final)
        except UnicodeDecodeError as error:
            self._fail(f"not UTF-8 text ({error.reason})", self._read - pending + error.start)
        self._read += len(data)

    def _check(self, block: bytes, text: bytes, skeleton: bytes) -> None:
        """``block`` as read, ``text`` with its escapes neutralized, ``skeleton`` its bytes
        outside strings."""
        if not self._started:
            first = block.lstrip()[:1]
            if first:
                self._started = True
                if self._opener and first != self._opener:
                    raise LampError(f"{self.source}: expected {self._expected}")
        # A one-byte search first: it runs at memchr speed, the two-byte one does not.
        flagged = (b"\\" in text and b"\\u" in text
                   and _SURROGATE.search(_SURROGATE_PAIR.sub(b"", text)) is not None)
        flagged = flagged or (skeleton.translate(None, _STRUCTURE) != b""
                              and _SUSPECT_NUMBER.search(skeleton) is not None)
        start_depth = self._depth
        brackets = skeleton.translate(_SIGNS, _NON_BRACKETS)
        if start_depth + len(brackets) > MAX_DEPTH:  # else the limit cannot be reached
            import numpy as np

            depths = np.cumsum(np.frombuffer(brackets, np.int8), dtype=np.int64)
            flagged = flagged or start_depth + int(depths.max()) > MAX_DEPTH
            self._depth = start_depth + int(depths[-1])
        else:
            opened = brackets.count(1)
            self._depth = start_depth + opened - (len(brackets) - opened)
        if flagged:
            problem = first_problem(block, start_depth)
            if problem is not None:
                self._fail(problem[1], self._offset + problem[0])


def first_problem(block: bytes, depth: int = 0) -> tuple[int, str] | None:
    """``(offset in block, what)`` of the first limit ``block`` breaks, walking it token by
    token from nesting ``depth``; ``None`` when it breaks none (the cheap tests overshoot)."""
    for match in _TOKEN.finditer(block):
        token = match.group()
        head = token[:1]
        if head == b'"':
            problem = _surrogate_problem(token) if b"\\u" in token else None
        elif head in b"[{":
            depth += 1
            problem = (0, f"nesting deeper than {MAX_DEPTH} levels (LaMP files need 4)"
                       ) if depth > MAX_DEPTH else None
        elif head in b"]}":
            depth -= 1
            problem = None
        else:
            problem = _number_problem(token)
        if problem is not None:
            return match.start() + problem[0], problem[1]
    return None


def _number_problem(token: bytes) -> tuple[int, str] | None:
    text = token.decode("ascii")
    if text.lstrip("-") in ("NaN", "Infinity"):
        return 0, f"{text} is not a JSON number"
    if max(map(len, _DIGIT_RUN.findall(token)), default=0) > MAX_NUMBER_DIGITS:
        return 0, (f"a number of {len(text):,} characters (the limit is "
                   f"{MAX_NUMBER_DIGITS} digits; an id belongs in a string)")
    if not any(mark in text for mark in ".eE"):
        try:
            integer = int(text)
        except ValueError:
            return None  # malformed: the parser names it
        if integer not in INTEGER_RANGE:
            return 0, (f"the integer {text} does not fit 64 bits (an id belongs in a string)")
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    if value in (float("inf"), float("-inf")):
        return 0, f"the number {text} is too large (it overflows to infinity)"
    return None


def _surrogate_problem(string: bytes) -> tuple[int, str] | None:
    """A ``\\uXXXX`` escape in one JSON string that is half of a surrogate pair, if any."""
    high = None  # (start, end) of a high-surrogate escape waiting for its low half
    problem = None
    for match in _ESCAPE.finditer(string):
        code = match.group(1)
        is_low = code is not None and code[1:2] in b"cdefCDEF"
        if high is not None:
            if is_low and match.start() == high[1]:
                high = None
                continue
            problem = high[0]
            break
        if is_low:
            problem = match.start()
            break
        if code is not None:
            high = match.span()
    else:
        problem = high[0] if high is not None else None
    if problem is None:
        return None
    escape = string[problem:problem + 6].decode("ascii")
    return problem, (f"the escape {escape} is half of a UTF-16 surrogate pair "
                     "(not valid text)")


class RepeatedKeys:
    """Finds keys that occur twice in one JSON object, while a parser builds the objects.

    ``object_pairs_hook`` is for ``json.loads``; ``map_type`` for ijson, whose objects are
    then of that type (a dict that pickles and copies as a plain one), with the ijson
    iterator wrapped in ``watched``: an object records a repeat only while the parser runs,
    not when a caller writes to it (an id made a string). ``check`` raises for the first
    repeat inside a parsed value. Only a dict subclass sees ijson's keys one by one; it
    costs about 0.2 µs a key (iter_questions over LaMP-7's dev questions: 31 → 43 ms), and
    no cheaper check found every repeat.
    """

    def __init__(self) -> None:
        self.found: list[tuple[dict, str]] = []  # (object, the key it repeats), parse order
        self._parsing = False
        keys = self

        class ParsedObject(dict):
            __slots__ = ()

            def __setitem__(self, key, value, _set=dict.__setitem__):
                if keys._parsing and key in self:
                    keys.found.append((self, key))
                _set(self, key, value)

            def __reduce__(self):
                return dict, (dict(self),)

        self.map_type = ParsedObject

    def object_pairs_hook(self, pairs: list[tuple[str, Any]]) -> dict:
        built = dict(pairs)
        if len(built) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    self.found.append((built, key))
                    break
                seen.add(key)
        return built

    def watched(self, items: Iterator) -> Iterator:
        """The items of an ijson iterator built with ``map_type``, parsed while watched."""
        while True:
            self._parsing = True
            try:
                item = next(items, _END)
            finally:
                self._parsing = False
            if item is _END:
                return
            yield item

    def check(self, value: Any, source: str, at: tuple = ()) -> None:
        """Raise for the first repeat found in an object inside ``value``, whose place in
        its file is the keys and indices ``at``; repeats elsewhere (in values a streaming
        parser built ahead) stay for their own check."""
        for position, (built, key) in enumerate(self.found):
            steps = _steps_to(value, built)
            if steps is not None:
                del self.found[position]
                path = "".join(map(_step, (*at, *steps))).lstrip(".")
                where = f"the object at {path}" if path else "the top-level object"
                shown = json.dumps(key, ensure_ascii=False)
                if len(shown) > 80:
                    shown = shown[:76] + '…"'
                raise LampError(f"{source}: the key {shown} occurs twice in {where} (only "
                                "one of its values could be read)")


_END = object()  # what an iterator gives past its last item (an item may be null)


def _step(key: str | int) -> str:
    """One step of a JSON path as messages write it: ``[3]``, ``.profile``, ``["a b"]``."""
    if isinstance(key, int):
        return f"[{key}]"
    return f".{key}" if key.isidentifier() else f"[{json.dumps(key, ensure_ascii=False)}]"


def _steps_to(value: Any, target: dict) -> list[str | int] | None:
    """The keys and indices from ``value`` to the object ``target`` (by identity), or None
    when ``target`` is not inside ``value``."""
    if value is target:
        return []
    if isinstance(value, dict):
        children = value.items()
    elif isinstance(value, list):
        children = enumerate(value)
    else:
        return None
    for step, child in children:
        if isinstance(child, (dict, list)):
            below = _steps_to(child, target)
            if below is not None:
                return [step, *below]
    return None
