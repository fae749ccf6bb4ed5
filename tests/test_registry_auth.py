"""Device and staff registries, the registry watcher, and staff authentication with lockout."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

import gateway.identity.auth
from gateway.errors import Refusal
from gateway.identity.auth import StaffAuthenticator, basic_authorization, parse_basic
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
from gateway.identity.watcher import RegistryWatcher
from gateway.ingress.problems import Answered, answered, document, problem_of

FAST_N = 2**10
PASSWORD = "correct horse battery"
FP_A = "sha256:" + "a" * 64
FP_B = "sha256:" + "b" * 64
FP_C = "sha256:" + "c" * 64


@dataclass
class FakeClock:
    """A clock tests move by hand."""

    now: float = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


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


# -------------------------------------------------------------------- watcher


@dataclass
class Watched:
    devices: Path
    users: Path
    clock: FakeClock
    errors: list[str] = field(default_factory=list)

    def watcher(self, interval: float = 0.5) -> RegistryWatcher:
        return RegistryWatcher(
            self.devices,
            self.users,
            clock=self.clock,
            interval=interval,
            on_error=self.errors.append,
        )


@pytest.fixture
def watched(tmp_path: Path, staff_hash: str) -> Watched:
    devices = tmp_path / "devices.json"
    users = tmp_path / "users.json"
    save_devices(devices, DeviceRegistry((Device("tablet-01", FP_A, "assist-tablet"),)))
    save_users(users, UserRegistry((User("staff-001", staff_hash),)))
    return Watched(devices, users, FakeClock())


def revoke_tablet(path: Path) -> None:
    save_devices(path, DeviceRegistry((Device("tablet-01", FP_A, "assist-tablet", True),)))


def test_watcher_loads_both_registries(watched: Watched) -> None:
    """The watcher starts with the current devices and users."""
    watcher = watched.watcher()
    assert watcher.devices.by_id("tablet-01") is not None
    assert watcher.users.get("staff-001") is not None


def test_watcher_rereads_only_after_its_interval(watched: Watched) -> None:
    """A change is seen at the first refresh once the interval has passed, not before."""
    watcher = watched.watcher(interval=0.5)
    watcher.refresh()  # the first refresh checks at once
    revoke_tablet(watched.devices)
    watched.clock.advance(0.4)
    watcher.refresh()
    device = watcher.devices.by_id("tablet-01")
    assert device is not None and not device.revoked
    watched.clock.advance(0.1)
    watcher.refresh()
    device = watcher.devices.by_id("tablet-01")
    assert device is not None and device.revoked


def test_watcher_force_rereads_at_once(watched: Watched) -> None:
    """refresh(force=True) re-reads whatever the interval says."""
    watcher = watched.watcher(interval=60)
    watcher.refresh()
    revoke_tablet(watched.devices)
    watcher.refresh(force=True)
    device = watcher.devices.by_id("tablet-01")
    assert device is not None and device.revoked


def test_watcher_sees_user_disable(watched: Watched, staff_hash: str) -> None:
    """Disabling a user is picked up like a device revocation."""
    watcher = watched.watcher()
    save_users(watched.users, UserRegistry((User("staff-001", staff_hash, enabled=False),)))
    watched.clock.advance(1)
    watcher.refresh()
    user = watcher.users.get("staff-001")
    assert user is not None and not user.enabled


def test_watcher_sees_same_size_replacement_with_restored_mtime(watched: Watched) -> None:
    """A replaced file of identical size and mtime (coarse clocks, copied files) is re-read."""
    watcher = watched.watcher()
    before = watched.devices.stat()
    save_devices(watched.devices, DeviceRegistry((Device("tablet-01", FP_B, "assist-tablet"),)))
    os.utime(watched.devices, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert watched.devices.stat().st_size == before.st_size
    watched.clock.advance(1)
    watcher.refresh()
    assert watcher.devices.by_fingerprint(FP_A) is None
    assert watcher.devices.by_fingerprint(FP_B) is not None


def test_watcher_keeps_old_snapshot_on_broken_file(watched: Watched) -> None:
    """A half-written registry keeps the last good snapshot and reports through on_error."""
    watcher = watched.watcher()
    old = watcher.devices
    watched.devices.write_text('{"version": 1, "devices": [{"id": ', encoding="utf-8")
    watched.clock.advance(1)
    watcher.refresh()
    assert watcher.devices is old
    assert len(watched.errors) == 1
    assert str(watched.devices) in watched.errors[0]


def test_watcher_recovers_when_broken_file_is_fixed(watched: Watched) -> None:
    """After a broken file is repaired, the next refresh loads the repaired registry."""
    watcher = watched.watcher()
    watched.devices.write_text("not json", encoding="utf-8")
    watched.clock.advance(1)
    watcher.refresh()
    revoke_tablet(watched.devices)
    watched.clock.advance(1)
    watcher.refresh()
    device = watcher.devices.by_id("tablet-01")
    assert device is not None and device.revoked
    assert len(watched.errors) == 1


def test_broken_users_file_never_holds_back_a_revocation(watched: Watched) -> None:
    """A broken users file keeps the old users, but a device revoked at the same time is
    revoked: each file is read on its own, so a typo cannot keep a lost tablet in."""
    watcher = watched.watcher()
    old_users = watcher.users
    revoke_tablet(watched.devices)
    watched.users.write_text("[]", encoding="utf-8")
    watched.clock.advance(1)
    problems = watcher.refresh()
    device = watcher.devices.by_id("tablet-01")
    assert device is not None and device.revoked
    assert watcher.users == old_users
    assert problems and str(watched.users) in problems[0]
    assert watched.errors == problems


def test_watcher_without_error_callback_keeps_snapshot(watched: Watched) -> None:
    """A broken file with no on_error callback still keeps the old snapshot silently."""
    watcher = RegistryWatcher(watched.devices, watched.users, clock=watched.clock)
    old = watcher.devices
    watched.devices.write_text("{", encoding="utf-8")
    watched.clock.advance(1)
    watcher.refresh()
    assert watcher.devices is old


def test_deleted_devices_file_empties_the_registry(watched: Watched) -> None:
    """Deleting the devices file removes every device (fail closed), as a missing file reads."""
    watcher = watched.watcher()
    watched.devices.unlink()
    watched.clock.advance(1)
    watcher.refresh()
    assert watcher.devices.devices == ()


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


# ------------------------------------------------------------- authenticator


@dataclass
class AuthRig:
    auth: StaffAuthenticator
    clock: FakeClock
    registry: list[UserRegistry]
    reasons: list[str]
    verifies: list[str]

    async def login(self, user: str = "staff-001", password: str = PASSWORD) -> str:
        return await self.auth.authenticate(basic_authorization(user, password))

    async def refused(self, user: str = "staff-001", password: str = PASSWORD) -> Answered:
        with pytest.raises(Refusal) as info:
            await self.login(user, password)
        return answered(info.value)


@pytest.fixture
def rig(staff_hash: str, monkeypatch: pytest.MonkeyPatch) -> AuthRig:
    clock = FakeClock()
    registry = [
        UserRegistry((User("staff-001", staff_hash), User("staff-009", staff_hash, enabled=False)))
    ]
    reasons: list[str] = []
    verifies: list[str] = []
    real = gateway.identity.auth.verify_password

    def counting(password: str, encoded: str) -> bool:
        verifies.append(encoded)
        return real(password, encoded)

    monkeypatch.setattr(gateway.identity.auth, "verify_password", counting)
    auth = StaffAuthenticator(
        lambda: registry[0],
        max_failures=3,
        lockout_seconds=900,
        cache_seconds=300,
        clock=clock,
        on_failure=reasons.append,
    )
    return AuthRig(auth, clock, registry, reasons, verifies)


async def test_right_password_is_accepted(rig: AuthRig) -> None:
    """The right staff ID and password give the user ID back."""
    assert await rig.login() == "staff-001"
    assert rig.reasons == []


async def test_wrong_password_is_401(rig: AuthRig) -> None:
    """A wrong password is 401 unauthorized with reason bad_credential."""
    error = await rig.refused(password="wrong password!")
    assert (error.status, error.slug) == (401, "unauthorized")
    assert rig.reasons == ["bad_credential"]


async def test_unknown_user_is_401_after_a_dummy_verify(rig: AuthRig) -> None:
    """An unknown user ID is 401 like a wrong password, still paying one scrypt verify."""
    error = await rig.refused(user="staff-404")
    assert error.status == 401
    assert rig.reasons == ["bad_credential"]
    assert len(rig.verifies) == 1


async def test_unknown_and_wrong_password_answers_are_identical(rig: AuthRig) -> None:
    """An unknown ID and a wrong password get the same answer: IDs cannot be enumerated."""
    unknown = await rig.refused(user="staff-404")
    wrong = await rig.refused(password="wrong password!")
    assert unknown == wrong  # status, type, title, detail and Retry-After alike


async def test_disabled_user_is_401(rig: AuthRig) -> None:
    """A disabled user with the right password gets the wrong-password 401; reason user_disabled."""
    error = await rig.refused(user="staff-009")
    assert error.status == 401
    assert "disabled" not in error.detail  # no oracle for a disabled account's password
    assert rig.reasons == ["user_disabled"]


async def test_missing_header_is_401(rig: AuthRig) -> None:
    """No Authorization header is 401 with reason missing_credential, and no scrypt."""
    with pytest.raises(Refusal) as info:
        await rig.auth.authenticate(None)
    assert answered(info.value).status == 401
    assert rig.reasons == ["missing_credential"]
    assert rig.verifies == []


async def test_error_never_contains_the_password(rig: AuthRig) -> None:
    """Neither the problem body nor the exception text carries the tried password."""
    with pytest.raises(Refusal) as info:
        await rig.login(password="hunter2-SECRET")
    body = document(problem_of(info.value), info.value.detail)
    assert "hunter2-SECRET" not in json.dumps(body) + str(info.value) + repr(info.value)


async def test_lockout_after_max_failures_then_unlock(rig: AuthRig) -> None:
    """After 3 failures even the right password is 429 until lockout_seconds have passed."""
    for _ in range(3):
        assert (await rig.refused(password="wrong password!")).status == 401
    locked = await rig.refused()
    assert (locked.status, locked.slug, locked.retry_after) == (429, "locked-out", 900)
    rig.clock.advance(899.5)
    locked = await rig.refused()
    assert (locked.status, locked.retry_after) == (429, 1)
    rig.clock.advance(0.5)
    assert await rig.login() == "staff-001"
    assert rig.reasons == ["bad_credential"] * 3 + ["locked_out"] * 2


async def test_locked_out_attempts_do_not_run_scrypt(rig: AuthRig) -> None:
    """While locked out, attempts are refused before any password check."""
    for _ in range(3):
        await rig.refused(password="wrong password!")
    before = len(rig.verifies)
    await rig.refused()
    await rig.refused(password="wrong password!")
    assert len(rig.verifies) == before


async def test_lockout_is_per_user(rig: AuthRig, staff_hash: str) -> None:
    """One user's lockout does not lock another user out."""
    rig.registry[0] = UserRegistry((*rig.registry[0].users, User("staff-002", staff_hash)))
    for _ in range(3):
        await rig.refused(password="wrong password!")
    assert await rig.login("staff-002") == "staff-002"


async def test_failure_counter_resets_on_success(rig: AuthRig) -> None:
    """Two failures, a success, two failures: still 401, not locked out."""
    for _ in range(2):
        await rig.refused(password="wrong password!")
    assert await rig.login() == "staff-001"
    for _ in range(2):
        assert (await rig.refused(password="wrong password!")).status == 401
    assert await rig.login() == "staff-001"


async def test_concurrent_guesses_cannot_exceed_max_failures(rig: AuthRig) -> None:
    """Ten parallel wrong guesses: three are checked (401), the other seven are 429."""
    results = await asyncio.gather(
        *(rig.login(password=f"wrong password {i}") for i in range(10)), return_exceptions=True
    )
    statuses = sorted(answered(r).status for r in results if isinstance(r, Refusal))
    assert statuses == [401] * 3 + [429] * 7
    assert len(rig.verifies) == 3


async def test_concurrent_right_logins_all_succeed(rig: AuthRig) -> None:
    """Parallel logins with the right password all succeed, with one scrypt between them."""
    results = await asyncio.gather(*(rig.login() for _ in range(5)))
    assert results == ["staff-001"] * 5
    assert len(rig.verifies) == 1


async def test_invalid_user_ids_share_one_bucket(rig: AuthRig) -> None:
    """Malformed user IDs lock out their shared bucket, never a real user."""
    for i in range(3):
        await rig.refused(user=f"NOT A VALID ID {i}")
    assert (await rig.refused(user="ANOTHER BAD ID")).status == 429
    assert await rig.login() == "staff-001"


async def test_spraying_user_ids_does_not_unlock_a_locked_user(
    rig: AuthRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Filling the failure table with made-up IDs does not evict a locked-out user."""
    monkeypatch.setattr(gateway.identity.auth, "MAX_TRACKED", 3)
    for _ in range(3):
        await rig.refused(password="wrong password!")
    for i in range(6):
        await rig.refused(user=f"sprayed-{i}")
    assert (await rig.refused()).status == 429


async def test_second_success_uses_the_cache(rig: AuthRig) -> None:
    """A repeated right password within cache_seconds does not run scrypt again."""
    await rig.login()
    await rig.login()
    rig.clock.advance(299)
    await rig.login()
    assert len(rig.verifies) == 1


async def test_cache_expires(rig: AuthRig) -> None:
    """After cache_seconds the password is verified with scrypt again."""
    await rig.login()
    rig.clock.advance(300)
    await rig.login()
    assert len(rig.verifies) == 2


async def test_cache_does_not_accept_a_wrong_password(rig: AuthRig) -> None:
    """A cached right password does not help a wrong one, which is checked and refused."""
    await rig.login()
    assert (await rig.refused(password="wrong password!")).status == 401
    assert len(rig.verifies) == 2


async def test_changed_password_hash_invalidates_the_cache(rig: AuthRig) -> None:
    """After a password change the old password is refused at once and the new one works."""
    await rig.login()
    new_hash = hash_password("a brand new password", n=FAST_N)
    users = rig.registry[0].users
    rig.registry[0] = UserRegistry(
        tuple(replace(u, password_hash=new_hash) if u.id == "staff-001" else u for u in users)
    )
    assert (await rig.refused()).status == 401
    assert await rig.login(password="a brand new password") == "staff-001"
    assert len(rig.verifies) == 3


async def test_disable_takes_effect_despite_cache(rig: AuthRig, staff_hash: str) -> None:
    """A user disabled after a cached success is refused on the next request."""
    await rig.login()
    rig.registry[0] = UserRegistry((User("staff-001", staff_hash, enabled=False),))
    error = await rig.refused()
    assert "disabled" not in error.detail  # no oracle for a disabled account's password
    assert rig.reasons == ["user_disabled"]


async def test_zero_cache_seconds_always_verifies(staff_hash: str) -> None:
    """With credential_cache_seconds = 0 every request runs scrypt."""
    calls: list[int] = []
    registry = UserRegistry((User("staff-001", staff_hash),))
    auth = StaffAuthenticator(
        lambda: registry, max_failures=5, lockout_seconds=60, cache_seconds=0, clock=FakeClock()
    )
    real = gateway.identity.auth.verify_password

    def counting(password: str, encoded: str) -> bool:
        calls.append(1)
        return real(password, encoded)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gateway.identity.auth, "verify_password", counting)
        for _ in range(2):
            await auth.authenticate(basic_authorization("staff-001", PASSWORD))
    assert len(calls) == 2


async def test_on_failure_default_is_a_no_op(staff_hash: str) -> None:
    """The authenticator works without an on_failure callback."""
    registry = UserRegistry((User("staff-001", staff_hash),))
    auth = StaffAuthenticator(
        lambda: registry, max_failures=1, lockout_seconds=1, cache_seconds=1, clock=FakeClock()
    )
    with pytest.raises(Refusal) as info:
        await auth.authenticate("Bearer x")
    assert answered(info.value).status == 401
