"""Staff passwords, the device and staff registry files, and HTTP Basic parsing."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from gateway.identity.auth import basic_authorization, parse_basic
from gateway.identity.passwords import check_password_rule, hash_password, verify_password
from gateway.identity.registry import (
    Device,
    DeviceRegistry,
    RegistryError,
    User,
    UserRegistry,
    load_devices,
    load_users,
    save_devices,
    save_users,
    upsert_device,
    upsert_user,
)

FAST_N = 2**10
PASSWORD = "correct horse battery"
FP_A = "sha256:" + "a" * 64
FP_B = "sha256:" + "b" * 64
FP_C = "sha256:" + "c" * 64


@pytest.fixture(scope="module")
def staff_hash() -> str:
    """One fast scrypt hash of PASSWORD shared by the module (n=2**10)."""
    return hash_password(PASSWORD, n=FAST_N)


def write_json(path: Path, doc: Any) -> None:
    path.write_text(json.dumps(doc), encoding="utf-8")


# ------------------------------------------------------------------- passwords


def test_hash_verify_round_trip(staff_hash: str) -> None:
    """A password verifies against its own hash."""
    assert verify_password(PASSWORD, staff_hash)


def test_hash_has_the_documented_shape(staff_hash: str) -> None:
    """Hashes are scrypt$N$r$p$salt$hash, salted so two hashes of one password differ."""
    scheme, n, r, p, salt, digest = staff_hash.split("$")
    assert (scheme, n, r, p) == ("scrypt", str(FAST_N), "8", "1")
    assert "=" not in salt + digest
    assert hash_password(PASSWORD, n=FAST_N) != staff_hash


def test_wrong_password_does_not_verify(staff_hash: str) -> None:
    """A different password, or the right one with a changed case, is refused."""
    assert not verify_password("correct horse batterY", staff_hash)
    assert not verify_password("", staff_hash)


def test_non_ascii_password_round_trip() -> None:
    """A password in Japanese verifies (UTF-8), and its prefix does not."""
    encoded = hash_password("新宿区役所のパスワード", n=FAST_N)
    assert verify_password("新宿区役所のパスワード", encoded)
    assert not verify_password("新宿区役所の", encoded)


def _variants(good: str) -> list[str]:
    scheme, n, r, p, salt, digest = good.split("$")
    return [
        "",
        "scrypt",
        "not-a-hash",
        "$".join(["bcrypt", n, r, p, salt, digest]),
        "$".join([scheme, n, r, p, salt, digest, "extra"]),
        "$".join([scheme, n, r, p, "!!!not-base64!!!", digest]),
        "$".join([scheme, n, r, p, salt, digest[:-4]]),  # short digest
        "$".join([scheme, "1000", r, p, salt, digest]),  # N not a power of two
        "$".join([scheme, "0", r, p, salt, digest]),
        "$".join([scheme, "-1024", r, p, salt, digest]),
        "$".join([scheme, "x", r, p, salt, digest]),
        "$".join([scheme, "９", r, p, salt, digest]),  # a full-width digit
        "$".join([scheme, "9" * 40, r, p, salt, digest]),  # overflows a C integer
        "$".join([scheme, str(2**32), r, p, salt, digest]),  # would need terabytes
        "$".join([scheme, n, "99999999999", p, salt, digest]),
        "$".join([scheme, n, r, "0", salt, digest]),
    ]


def test_malformed_hashes_verify_false_without_raising(staff_hash: str) -> None:
    """Every malformed or absurd-cost hash answers False: never an exception, never a huge KDF."""
    for encoded in _variants(staff_hash):
        assert verify_password(PASSWORD, encoded) is False, encoded[:24]


def test_password_rule_and_constant_time_equal() -> None:
    """Short staff passwords are refused by the rule."""
    assert check_password_rule("short") is not None
    assert check_password_rule("long enough password") is None


# -------------------------------------------------------------------- devices


def test_devices_round_trip(tmp_path: Path) -> None:
    """save_devices then load_devices gives back the same devices, file mode 0600."""
    path = tmp_path / "reg" / "devices.json"
    registry = DeviceRegistry(
        (
            Device("tablet-01", FP_A, "assist-tablet"),
            Device("pc.intranet-7", FP_B, "intranet-pc", revoked=True),
        )
    )
    save_devices(path, registry)
    assert load_devices(path) == registry
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["devices.json"]


def test_device_lookup_by_fingerprint_and_id() -> None:
    """A registry finds a device by certificate fingerprint or id, None otherwise."""
    registry = DeviceRegistry((Device("tablet-01", FP_A, "g"), Device("tablet-02", FP_B, "g")))
    device = registry.by_fingerprint(FP_B)
    assert device is not None and device.id == "tablet-02"
    assert registry.by_fingerprint(FP_C) is None
    assert registry.by_id("tablet-01") == Device("tablet-01", FP_A, "g")
    assert registry.by_id("tablet-03") is None


def test_missing_registry_files_are_empty(tmp_path: Path) -> None:
    """A registry file that does not exist is an empty registry, not an error."""
    assert load_devices(tmp_path / "none.json").devices == ()
    assert load_users(tmp_path / "none.json").users == ()


def test_device_defaults(tmp_path: Path) -> None:
    """group defaults to empty and revoked to false."""
    path = tmp_path / "devices.json"
    write_json(path, {"version": 1, "devices": [{"id": "tablet-01", "fingerprint": FP_A}]})
    assert load_devices(path).devices == (Device("tablet-01", FP_A, "", False),)


@pytest.mark.parametrize(
    ("entry", "where"),
    [
        ({"id": "tablet-02"}, "devices[1]: needs id and fingerprint"),
        ("tablet-02", "devices[1]: needs id and fingerprint"),
        ({"id": "Tablet 02", "fingerprint": FP_B}, "devices[1].id"),
        ({"id": "tablet-02", "fingerprint": "sha256:" + "A" * 64}, "devices[1].fingerprint"),
        ({"id": "tablet-02", "fingerprint": "md5:abc"}, "devices[1].fingerprint"),
        ({"id": "tablet-02", "fingerprint": FP_B, "revoked": "false"}, "devices[1].revoked"),
    ],
)
def test_malformed_device_entry_names_file_and_index(
    tmp_path: Path, entry: object, where: str
) -> None:
    """A bad device entry is refused with the file and devices[i] in the message."""
    path = tmp_path / "devices.json"
    write_json(path, {"version": 1, "devices": [{"id": "tablet-01", "fingerprint": FP_A}, entry]})
    with pytest.raises(RegistryError) as info:
        load_devices(path)
    assert str(info.value).startswith(f"{path}: {where}")


@pytest.mark.parametrize(
    "doc",
    [
        [],
        {"devices": []},
        {"version": 2, "devices": []},
        {"version": 1, "devices": {"tablet-01": FP_A}},
    ],
)
def test_wrong_document_shape_is_refused(tmp_path: Path, doc: object) -> None:
    """The registry must be {"version": 1, "devices": [...]}; anything else names the file."""
    path = tmp_path / "devices.json"
    write_json(path, doc)
    with pytest.raises(RegistryError, match="expected"):
        load_devices(path)


def test_registry_that_is_not_json_is_refused(tmp_path: Path) -> None:
    """A truncated JSON file is a RegistryError naming the file."""
    path = tmp_path / "devices.json"
    path.write_text('{"version": 1, "devices": [', encoding="utf-8")
    with pytest.raises(RegistryError, match=str(path)):
        load_devices(path)


def test_duplicate_fingerprints_in_file_are_refused(tmp_path: Path) -> None:
    """Two devices with one certificate fingerprint make the file invalid."""
    path = tmp_path / "devices.json"
    entries = [{"id": "tablet-01", "fingerprint": FP_A}, {"id": "tablet-02", "fingerprint": FP_A}]
    write_json(path, {"version": 1, "devices": entries})
    with pytest.raises(RegistryError, match="share one fingerprint"):
        load_devices(path)


def test_duplicate_device_ids_in_file_are_refused(tmp_path: Path) -> None:
    """Two devices with one id make the file invalid."""
    path = tmp_path / "devices.json"
    entries = [{"id": "tablet-01", "fingerprint": FP_A}, {"id": "tablet-01", "fingerprint": FP_B}]
    write_json(path, {"version": 1, "devices": entries})
    with pytest.raises(RegistryError, match="share one id"):
        load_devices(path)


def test_upsert_device_adds_replaces_and_refuses_duplicate_fingerprint(tmp_path: Path) -> None:
    """upsert adds a device, replaces one by id, and refuses another device's fingerprint."""
    path = tmp_path / "devices.json"
    upsert_device(path, Device("tablet-01", FP_A, "assist-tablet"))
    upsert_device(path, Device("tablet-02", FP_B, "assist-tablet"))
    registry = upsert_device(path, Device("tablet-01", FP_A, "assist-tablet", revoked=True))
    assert load_devices(path) == registry
    assert [d.id for d in registry.devices] == ["tablet-02", "tablet-01"]
    assert registry.by_id("tablet-01") == Device("tablet-01", FP_A, "assist-tablet", True)
    with pytest.raises(RegistryError, match="fingerprint"):
        upsert_device(path, Device("tablet-03", FP_B, "assist-tablet"))
    assert load_devices(path) == registry


# ---------------------------------------------------------------------- users


def test_users_round_trip(tmp_path: Path, staff_hash: str) -> None:
    """save_users then load_users gives back the same users."""
    path = tmp_path / "users.json"
    registry = UserRegistry(
        (User("staff-001", staff_hash), User("staff-002", staff_hash, enabled=False))
    )
    save_users(path, registry)
    assert load_users(path) == registry
    assert load_users(path).get("staff-002") == User("staff-002", staff_hash, False)
    assert load_users(path).get("staff-003") is None


@pytest.mark.parametrize(
    ("entry", "where"),
    [
        ({"id": "staff-002"}, "users[1]: needs id and password_hash"),
        (42, "users[1]: needs id and password_hash"),
        ({"id": "staff 002", "password_hash": "scrypt$x"}, "users[1].id"),
        ({"id": "staff-002", "password_hash": "plain-text"}, "users[1].password_hash"),
        ({"id": "staff-002", "password_hash": "scrypt$x", "enabled": "false"}, "users[1].enabled"),
        ({"id": "staff-002", "password_hash": "scrypt$x", "enabled": 0}, "users[1].enabled"),
    ],
)
def test_malformed_user_entry_names_file_and_index(
    tmp_path: Path, staff_hash: str, entry: object, where: str
) -> None:
    """A bad user entry is refused with the file and users[i]; a string "false" is not a bool."""
    path = tmp_path / "users.json"
    write_json(
        path,
        {"version": 1, "users": [{"id": "staff-001", "password_hash": staff_hash}, entry]},
    )
    with pytest.raises(RegistryError) as info:
        load_users(path)
    assert str(info.value).startswith(f"{path}: {where}")


def test_user_error_never_carries_the_hash(tmp_path: Path) -> None:
    """A malformed users file's error names the entry, not the hash it holds."""
    path = tmp_path / "users.json"
    write_json(path, {"version": 1, "users": [{"id": "staff-001", "password_hash": "pw-SECRET"}]})
    with pytest.raises(RegistryError) as info:
        load_users(path)
    assert "pw-SECRET" not in str(info.value)


def test_duplicate_user_ids_are_refused(tmp_path: Path, staff_hash: str) -> None:
    """Two users with one id make the file invalid."""
    path = tmp_path / "users.json"
    entry = {"id": "staff-001", "password_hash": staff_hash}
    write_json(path, {"version": 1, "users": [entry, entry]})
    with pytest.raises(RegistryError, match="share one id"):
        load_users(path)


def test_upsert_user_replaces_by_id(tmp_path: Path, staff_hash: str) -> None:
    """upsert_user replaces the entry with the same id (disable keeps one entry)."""
    path = tmp_path / "users.json"
    upsert_user(path, User("staff-001", staff_hash))
    registry = upsert_user(path, User("staff-001", staff_hash, enabled=False))
    assert registry.users == (User("staff-001", staff_hash, False),)
    assert load_users(path) == registry


# ------------------------------------------------------------------ basic auth


def test_basic_round_trip_with_colon_and_unicode() -> None:
    """basic_authorization and parse_basic agree; the password may hold ':' and kanji."""
    header = basic_authorization("staff-001", "pa:ss 新宿")
    assert parse_basic(header) == ("staff-001", "pa:ss 新宿")
    assert parse_basic(header.replace("Basic", "basic")) == ("staff-001", "pa:ss 新宿")


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Basic",
        "Basic ",
        "Bearer abc",
        "Basic !!!not-base64!!!",
        "Basic " + "bm8tY29sb24=",  # "no-colon"
        "Basic " + "OnB3",  # ":pw", empty user
        "Basic " + "/w==",  # not UTF-8
    ],
)
def test_parse_basic_refuses_malformed(header: str | None) -> None:
    """Missing, non-Basic, non-base64, colon-less or empty-user headers give None."""
    assert parse_basic(header) is None
