"""The user behind a question, and the folder of their adapter."""
from __future__ import annotations

import json
import random
import re
from urllib.parse import unquote_to_bytes

import pytest

from LaMP.utils.data.users import (EMPTY_ID_NAME, MAX_NAME_BYTES, find_user_folder,
                                   user_adapter_dir, user_folder_name, user_of)
from LaMP.utils.errors import LampError


def test_time_split_questions_belong_to_their_user_id_and_user_split_ones_to_themselves():
    assert user_of({"id": "310", "user_id": "17"}) == "17"
    assert user_of({"id": "310", "user_id": 17}) == "17"
    assert user_of({"id": "310"}) == "310"
    assert user_of({"id": 310, "user_id": None}) == "310"


@pytest.mark.parametrize("user,name", [
    ("1234", "1234"), ("a-b_c.d", "a-b_c.d"), ("..", "%2E."), (".", "%2E"),
    (".hidden", "%2Ehidden"), ("../x", "%2E.%2Fx"), ("a/b", "a%2Fb"), ("", "%empty"),
    ("\x00", "%00"), ("a b", "a%20b"), ("é", "%C3%A9"), ("x\x00y", "x%00y"), ("~", "%7E"),
    ("Ab", "%41b"), ("%", "%25"), ("%41b", "%2541b"), ("\ud800", "%ED%A0%80"),
])
def test_every_user_id_gets_a_plain_name_inside_the_users_folder(tmp_path, user, name):
    assert user_folder_name(user) == name
    folder = user_adapter_dir(tmp_path, user)
    assert folder.parent == tmp_path / "users" and folder.name == name


def decode(name: str) -> str:
    """The id a folder name stands for: what shows that no two ids share a name."""
    if name == EMPTY_ID_NAME:
        return ""
    return unquote_to_bytes(name).decode("utf-8", "surrogatepass")


# Characters that have broken folder names somewhere: separators, escapes, case, dots,
# control characters, what Windows or macOS treat specially, combining marks, a lone
# surrogate (JSON allows "\ud800"), characters outside the BMP.
HOSTILE = ["", "\x00", "%", "~", ".", "/", "\\", "A", "a", "Z", "z", "E", "e", "0", "9", "-",
           "_", " ", ":", "*", "?", '"', "<", ">", "|", "\n", "\t", "\x7f", "é", "É",
           "e\u0301", "\u0130", "\u0131", "ß", "\ufb00", "\ud800", "\udfff", "\U0001f600",
           "%2E", "%00", "%25", "%41", "%e", "%empty", "empty", "..", "%2e"]
NAMED = ["", "\x00", "\x00\x00", "%", "%00", "%25", "~", "%7E", "%7e", "A", "a", "%41",
         "%61", ".", "..", "...", ".a", "%2Ea", "%empty", "%EMPTY", "a.", "aA", "Aa", "AA",
         "aa", "\u0130", "i\u0307", "ß", "SS", "ss", "é", "e\u0301"]


def hostile_ids(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    made = []
    for _ in range(count):
        text = "".join(rng.choice(HOSTILE) for _ in range(rng.randint(0, 6)))
        made += [text, text.upper(), text.lower(), text.swapcase()]  # case-only variants
    return NAMED + made


def test_the_folder_name_is_one_to_one_and_case_proof_for_hostile_ids():
    ids = hostile_ids(5000)
    names = {}
    for user in ids:
        name = user_folder_name(user)
        assert decode(name) == user  # a left inverse: no two ids can share a name
        # Lower-case letters are the only literal letters; escapes are upper-case hex.
        assert name == EMPTY_ID_NAME or re.fullmatch(r"(?:[a-z0-9_.-]|%[0-9A-F]{2})+", name)
        assert not name.startswith(".") and len(name.encode()) <= MAX_NAME_BYTES
        names.setdefault(name.casefold(), set()).add(user)
    # Distinct even where the file system ignores case (macOS, Windows).
    assert {frozenset(same) for same in names.values() if len(same) > 1} == set()
    assert len(names) == len(set(ids))


def test_an_id_too_long_for_a_folder_name_is_one_error():
    with pytest.raises(LampError, match=r"^user id '/{40}'… is too long"):
        user_folder_name("/" * 100)
    assert user_folder_name("9" * 255) == "9" * 255
    with pytest.raises(LampError, match=r"is too long for a folder name \(257 bytes"):
        user_folder_name("9" * 254 + "A")


def record(folder, user: str) -> None:
    folder.mkdir(parents=True)
    (folder / "user.json").write_text(json.dumps({"user": user}))


def test_folders_named_by_plain_quoting_are_found_by_the_user_their_record_names(tmp_path):
    # urllib's quote keeps upper case and "~", and gave the empty id "%00": NUL's name.
    record(tmp_path / "users" / "Ab~", "Ab~")
    record(tmp_path / "users" / "%00", "")
    assert find_user_folder(tmp_path, "Ab~") == tmp_path / "users" / "Ab~"
    assert find_user_folder(tmp_path, "") == tmp_path / "users" / "%00"
    # NUL's own folder name holds the empty id's adapter: found, for its caller to refuse.
    assert find_user_folder(tmp_path, "\x00") == tmp_path / "users" / "%00"
    assert find_user_folder(tmp_path, "ab~") is None
    record(tmp_path / "users" / "%41b%7E", "Ab~")  # both: the folder of this encoding first
    assert find_user_folder(tmp_path, "Ab~") == tmp_path / "users" / "%41b%7E"
