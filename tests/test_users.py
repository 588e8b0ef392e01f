"""The user behind a question, and the folder of their adapter."""
from __future__ import annotations

import pytest

from LaMP.utils.data.users import user_adapter_dir, user_folder_name, user_of
from LaMP.utils.errors import LampError


def test_time_split_questions_belong_to_their_user_id_and_user_split_ones_to_themselves():
    assert user_of({"id": "310", "user_id": "17"}) == "17"
    assert user_of({"id": "310", "user_id": 17}) == "17"
    assert user_of({"id": "310"}) == "310"
    assert user_of({"id": 310, "user_id": None}) == "310"


@pytest.mark.parametrize("user,name", [
    ("1234", "1234"), ("a-b_c.d", "a-b_c.d"), ("..", "%2E."), (".", "%2E"),
    (".hidden", "%2Ehidden"), ("../x", "%2E.%2Fx"), ("a/b", "a%2Fb"), ("", "%00"),
    ("a b", "a%20b"), ("é", "%C3%A9"), ("x\x00y", "x%00y"),
])
def test_every_user_id_gets_a_plain_name_inside_the_users_folder(tmp_path, user, name):
    assert user_folder_name(user) == name
    folder = user_adapter_dir(tmp_path, user)
    assert folder.parent == tmp_path / "users" and folder.name == name


def test_distinct_ids_get_distinct_folders():
    ids = ["a/b", "a%2Fb", "..", "%2E.", "", "%00", "A", "a"]
    assert len({user_folder_name(user) for user in ids}) == len(ids)


def test_an_id_too_long_for_a_folder_name_is_one_error():
    with pytest.raises(LampError, match=r"^user id '/{40}'… is too long"):
        user_folder_name("/" * 100)
    assert user_folder_name("9" * 255) == "9" * 255
