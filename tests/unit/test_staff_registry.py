"""Staff named per channel (取扱者をあらかじめ指定) in the staff registry: stored, read
back, and every mistake named with the command that fixes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.identity.passwords import hash_password
from gateway.identity.registry import (
    RegistryError,
    User,
    UserRegistry,
    load_users,
    save_users,
    staff_problems,
)

FAST = 2**10


def users_json(path: Path) -> list[dict[str, object]]:
    doc = json.loads(path.read_text("utf-8"))
    users: list[dict[str, object]] = doc["users"]
    return users


# ------------------------------------------------------------------------ registry


def test_a_users_channels_round_trip(tmp_path: Path) -> None:
    """channels (names and group:NAME) are stored and read back in order, deduplicated."""
    path = tmp_path / "users.json"
    user = User("staff-1", hash_password("x" * 12, n=FAST), channels=("group:desk", "a", "a"))
    save_users(path, UserRegistry((user,)))
    loaded = load_users(path).get("staff-1")
    assert loaded is not None and loaded.channels == ("group:desk", "a")
    assert users_json(path)[0]["channels"] == ["group:desk", "a"]


def test_an_entry_without_channels_is_read_as_never_named(tmp_path: Path) -> None:
    """A registry from before staff were named loads (so it can be fixed) as None."""
    path = tmp_path / "users.json"
    hashed = hash_password("x" * 12, n=FAST)
    path.write_text(json.dumps({"version": 1, "users": [{"id": "old", "password_hash": hashed}]}))
    user = load_users(path).get("old")
    assert user is not None and user.channels is None
    save_users(path, load_users(path))  # saved as it was: still not named
    assert "channels" not in users_json(path)[0]


@pytest.mark.parametrize(
    ("channels", "where"),
    [
        ("window-reception", "users[0].channels: must be a list"),
        (["Window Reception"], "users[0].channels[0]: must be a channel name or group:NAME"),
        ([7], "users[0].channels: must be a list"),
    ],
)
def test_malformed_channels_name_the_entry(tmp_path: Path, channels: object, where: str) -> None:
    path = tmp_path / "users.json"
    hashed = hash_password("x" * 12, n=FAST)
    entry = {"id": "s", "password_hash": hashed, "channels": channels}
    path.write_text(json.dumps({"version": 1, "users": [entry]}))
    with pytest.raises(RegistryError, match=where.replace("[", r"\[").replace("]", r"\]")):
        load_users(path)


def test_staff_problems_name_the_users_and_the_command_that_fixes_them() -> None:
    """Users never named, and a user allowed an unknown channel, are both refused."""
    hashed = "scrypt$1024$8$1$AAAA$BBBB"
    registry = UserRegistry(
        (
            User("staff-a", hashed, channels=None),
            User("staff-b", hashed, channels=("window-reception", "group:desk", "window-recepton")),
            User("staff-c", hashed, channels=None),
        )
    )
    problems = dict(staff_problems(registry, {"window-reception", "group:desk"}))
    assert set(problems) == {"users", "users[1].channels[2]"}
    assert "staff-a, staff-c are not named for any channel" in problems["users"]
    assert "gatewayctl user allow --id staff-a --channel CHANNEL" in problems["users"]
    assert "gatewayctl user allow --id staff-c --channel CHANNEL" in problems["users"]
    unknown = problems["users[1].channels[2]"]
    assert "'window-recepton'" in unknown and "did you mean 'window-reception'?" in unknown
    assert "gatewayctl user deny --id staff-b --channel window-recepton" in unknown
