"""Staff authentication: HTTP Basic against scrypt hashes, with lockout.

scrypt is deliberately slow (tens of milliseconds), so a credential that verified once
is remembered for a short while as an HMAC under a key that lives only in this
process; the password itself is never kept. A user is locked out for
``lockout_seconds`` after ``max_failures`` consecutive failures (429 with Retry-After).

Each scrypt check holds 16 MiB while it runs, so checks are bounded
(:class:`PasswordChecks`): two at a time on their own threads, 64 more waiting; past
that a sign-in is answered 503 with Retry-After at once. A burst of wrong passwords
(made-up user IDs, so no lockout stops it) then costs a fixed amount of memory.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from gateway.errors import LockedOut, SignInBusy, Unauthenticated
from gateway.identity.passwords import dummy_hash, verify_password
from gateway.identity.registry import ID_PATTERN, UserRegistry

MAX_TRACKED = 10_000
CHECKERS = 2
"""scrypt checks run at once (each holds 16 MiB of work area)."""
MAX_WAITING = 64
"""Checks waiting for a checker; past that a sign-in is refused (503) at once."""


class PasswordChecks:
    """Runs scrypt checks on a pool of its own, ``workers`` at a time, with at most
    ``max_waiting`` more queued; one more raises SignInBusy."""

    def __init__(self, workers: int = CHECKERS, max_waiting: int = MAX_WAITING) -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="password-check")
        self._capacity = workers + max_waiting
        self.in_flight = 0

    async def verify(self, password: str, encoded: str) -> bool:
        if self.in_flight >= self._capacity:
            raise SignInBusy(retry_after=1)
        self.in_flight += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, verify_password, password, encoded)
        finally:
            self.in_flight -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class _Failures:
    count: int = 0
    locked_until: float = 0.0


@dataclass
class _Gate:
    """Serialises the checks of one user ID; dropped when nobody waits on it."""

    lock: asyncio.Lock
    users: int = 0


def parse_basic(header: str | None) -> tuple[str, str] | None:
    """``(user_id, password)`` from an ``Authorization: Basic`` header, or None."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except ValueError:  # not base64 (non-ASCII included: binascii.Error), not UTF-8
        return None
    user, sep, password = decoded.partition(":")
    if not sep or not user:
        return None
    return user, password


def basic_authorization(user_id: str, password: str) -> str:
    """An ``Authorization`` header value for HTTP Basic (RFC 7617, UTF-8)."""
    return "Basic " + base64.b64encode(f"{user_id}:{password}".encode()).decode()


def unauthorized(detail: str) -> Unauthenticated:
    return Unauthenticated(detail)


class StaffAuthenticator:
    """Checks staff credentials; the clock and the verifier are injected for tests."""

    def __init__(
        self,
        users: Callable[[], UserRegistry],
        *,
        max_failures: int,
        lockout_seconds: int,
        cache_seconds: int,
        clock: Callable[[], float],
        on_failure: Callable[[str], None] = lambda reason: None,
        checks: PasswordChecks | None = None,
    ) -> None:
        self._users = users
        self._checks = checks or PasswordChecks()
        self._max_failures = max_failures
        self._lockout = lockout_seconds
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._on_failure = on_failure
        self._cache_key = secrets.token_bytes(32)
        self._verified: OrderedDict[bytes, float] = OrderedDict()
        self._failures: OrderedDict[str, _Failures] = OrderedDict()
        self._gates: dict[str, _Gate] = {}

    def _fingerprint(self, user_id: str, password: str, password_hash: str) -> bytes:
        material = f"{user_id}\0{password}\0{password_hash}".encode()
        return hmac.new(self._cache_key, material, hashlib.sha256).digest()

    async def authenticate(
        self, header: str | None, *, on_failure: Callable[[str], None] | None = None
    ) -> str:
        """The staff user ID, or :class:`Unauthenticated` (:class:`LockedOut` once locked out).

        ``on_failure`` (the reason of a refusal) replaces the constructor's for this call:
        the ingress passes one that also knows the listener.
        """
        report = on_failure or self._on_failure
        parsed = parse_basic(header)
        if parsed is None:
            report("missing_credential")
            raise unauthorized("send the staff user ID and password as HTTP Basic")
        user_id, password = parsed
        key = user_id if ID_PATTERN.fullmatch(user_id) else "\0invalid"
        # One check at a time per user ID: otherwise concurrent guesses would all pass
        # the lockout test while scrypt runs, before the first failure is counted.
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = _Gate(asyncio.Lock())
        gate.users += 1
        try:
            async with gate.lock:
                return await self._check(key, user_id, password, report)
        finally:
            gate.users -= 1
            if gate.users == 0:
                del self._gates[key]

    async def _check(
        self, key: str, user_id: str, password: str, report: Callable[[str], None]
    ) -> str:
        now = self._clock()
        state = self._failures.get(key)
        if state and state.locked_until > now:
            report("locked_out")
            raise LockedOut(retry_after=max(1, int(state.locked_until - now + 0.999)))
        user = self._users().get(user_id) if key == user_id else None
        password_hash = user.password_hash if user else dummy_hash()
        fingerprint = self._fingerprint(user_id, password, password_hash)
        cached_at = self._verified.get(fingerprint)
        ok: bool
        if user is not None and cached_at is not None and now - cached_at < self._cache_seconds:
            ok = True
        else:
            try:
                ok = await self._checks.verify(password, password_hash)
            except SignInBusy:
                report("checks_busy")
                raise
            ok = ok and user is not None
        if ok and user is not None and user.enabled:
            self._failures.pop(key, None)
            if cached_at is None or now - cached_at >= self._cache_seconds:
                self._remember(fingerprint, now)
            return user_id
        self._count_failure(key, now)
        if ok and user is not None and not user.enabled:
            # The answer is the same as for a wrong password, or it would confirm the
            # password of a disabled account; the metric and the log say which it was.
            report("user_disabled")
            raise unauthorized("unknown staff user ID or wrong password")
        report("bad_credential")
        raise unauthorized("unknown staff user ID or wrong password")

    def _remember(self, fingerprint: bytes, now: float) -> None:
        if self._cache_seconds <= 0:
            return
        self._verified[fingerprint] = now
        self._verified.move_to_end(fingerprint)
        while len(self._verified) > MAX_TRACKED:
            self._verified.popitem(last=False)

    def _count_failure(self, key: str, now: float) -> None:
        state = self._failures.setdefault(key, _Failures())
        self._failures.move_to_end(key)
        state.count += 1
        if state.count >= self._max_failures:
            state.locked_until = now + self._lockout
            state.count = 0
        while len(self._failures) > MAX_TRACKED:
            # Forget the oldest user who is not locked out: spraying made-up user IDs
            # must not push a locked-out user out of the table and so unlock them.
            victim = next((k for k, s in self._failures.items() if s.locked_until <= now), None)
            self._failures.pop(victim if victim is not None else next(iter(self._failures)))
