"""The registry watcher over real files and a fake clock, and staff authentication with
lockout and its cache (the registry files themselves: ``tests/unit/test_registry.py``)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

import gateway.identity.auth
from gateway.errors import Refusal
from gateway.identity.auth import PasswordChecks, StaffAuthenticator, basic_authorization
from gateway.identity.passwords import hash_password
from gateway.identity.registry import (
    Device,
    DeviceRegistry,
    User,
    UserRegistry,
    save_devices,
    save_users,
)
from gateway.identity.watcher import RegistryWatcher
from gateway.ingress.problems import Answered, answered, document, problem_of

FAST_N = 2**10
PASSWORD = "correct horse battery"
FP_A = "sha256:" + "a" * 64
FP_B = "sha256:" + "b" * 64


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


# ------------------------------------------------------- bounded password checks


async def test_password_checks_are_bounded_and_one_past_the_bound_is_503(
    staff_hash: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of wrong passwords for made-up users (no lockout holds it back) runs two
    scrypt checks at a time with a bounded queue; one more is answered 503 with
    Retry-After at once, counted as checks_busy, and never reaches scrypt."""
    entered: list[str] = []
    release, two_in = threading.Event(), threading.Event()

    def slow(password: str, encoded: str) -> bool:
        entered.append(password)
        if len(entered) == 2:
            two_in.set()
        release.wait(5)
        return False

    monkeypatch.setattr(gateway.identity.auth, "verify_password", slow)
    reasons: list[str] = []
    auth = StaffAuthenticator(
        lambda: UserRegistry((User("staff-001", staff_hash),)),
        max_failures=3,
        lockout_seconds=900,
        cache_seconds=300,
        clock=FakeClock(),
        on_failure=reasons.append,
        checks=PasswordChecks(workers=2, max_waiting=3),
    )

    async def guess(i: int) -> Answered:
        with pytest.raises(Refusal) as info:
            await auth.authenticate(basic_authorization(f"made-up-{i:03d}", f"guess-{i}"))
        return answered(info.value)

    tasks = [asyncio.create_task(guess(i)) for i in range(5)]
    assert await asyncio.to_thread(two_in.wait, 5)
    for _ in range(5):  # the other three reach the queue
        await asyncio.sleep(0)
    busy = await guess(99)
    assert (busy.status, busy.slug) == (503, "sign-in-busy")
    assert busy.retry_after == 1
    assert "guess-99" not in entered and reasons == ["checks_busy"]
    assert len(entered) == 2  # two at a time: the other three wait, holding no work area
    release.set()
    answers = await asyncio.gather(*tasks)
    assert {a.status for a in answers} == {401}
    assert len(entered) == 5
