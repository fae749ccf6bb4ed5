"""The relay's rules as a component: a real Relay over a real spool, with a fake upstream.

No TLS, no sockets, no waiting: :class:`FakeSender` answers from a script and records
every attempt (headers, body bytes, when), :class:`FakeSleep` returns at once and
moves the shared fake clock by what the relay asked to sleep. Records are committed
to the spool the way the ingress does, without HTTP.
"""

from __future__ import annotations

import asyncio
import email.utils
import errno
import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog

from gateway.config import GatewayConfig, RetryConfig
from gateway.identity.auth import basic_authorization
from gateway.ops.metrics import Metrics
from gateway.relay import policy
from gateway.relay.outcomes import OUTCOME_RETRY
from gateway.relay.workers import WORKER_RESTART, WORKER_RESTART_MAX, Relay
from gateway.spool.records import NewRecord, Record, new_submission_id
from gateway.spool.store import Spool
from gateway.testing.fakes import FakeSender, FakeSleep
from gateway.testing.faults import DiskFaults

DEST = "upstream"
URL = "https://upstream.invalid/v1/submissions"
CHANNEL = "online-application"
PAYLOAD = b"payload " * 1000
INITIAL_BACKOFF = 0.05
MAX_BACKOFF = 0.5
WEEK = 7 * 86400
MASTER_KEY = os.urandom(32)  # one per run: a rig built again on the same spool reads it


def gateway_config(
    tmp_path: Path, *, concurrency: int, credential: str | None, retry: dict[str, Any]
) -> GatewayConfig:
    """A valid configuration with one destination; its TLS files are never read (the
    fake sender stands in for the network)."""
    unused = tmp_path / "unused"
    return GatewayConfig.model_validate(
        {
            "listeners": {
                "tablets": {
                    "host": "127.0.0.1",
                    "certificate": unused / "server.crt",
                    "private_key": str(unused / "server.key"),
                    "client_ca": unused / "device-ca.crt",
                }
            },
            "spool": {"directory": tmp_path / "spool", "master_key": str(unused / "master.key")},
            "auth": {"devices_file": unused / "devices.toml", "users_file": unused / "users.toml"},
            "destinations": {
                DEST: {
                    "url": URL,
                    "ca": unused / "upstream-ca.crt",
                    "client_certificate": unused / "client.crt",
                    "client_key": str(unused / "client.key"),
                    "credential": credential,
                    "concurrency": concurrency,
                    "retry": {
                        "initial_backoff": INITIAL_BACKOFF,
                        "max_backoff": MAX_BACKOFF,
                        **retry,
                    },
                }
            },
            "channels": {},
        }
    )


@dataclass
class Rig:
    """A relay over a real spool, with a fake upstream, sleep and clock."""

    spool: Spool
    sleep: FakeSleep
    upstream: FakeSender
    metrics: Metrics
    relay: Relay
    delivered: list[str] = field(default_factory=list)
    """Record ids the relay's on_delivered hook was called with."""

    async def put(self, payload: bytes = PAYLOAD) -> str:
        """Commit a record as the ingress does (no HTTP) and hand it to the relay."""
        pending = self.spool.begin(new_submission_id(self.sleep.clock))
        pending.write(payload)
        received = self.sleep.now
        record = await self.spool.commit(
            pending,
            NewRecord(
                channel=CHANNEL,
                destination=DEST,
                device_id="tablet-01",
                user_id="staff-001",
                received_at=received,
                expires_at=received + WEEK,
                content_type="multipart/form-data; boundary=x",
                body_sha256="0" * 64,
                content_sha256="1" * 64,
                field_names=("application_id",),
                idempotency_key=None,
            ),
        )
        self.relay.enqueue(record)
        return record.id

    async def settled(self, record_id: str) -> Record:
        """Wait (on the spool, not the clock) until the record is delivered or held."""
        async with asyncio.timeout(5):
            while True:
                record = await self.spool.get(record_id)
                assert record is not None
                if record.state in ("delivered", "held"):
                    return record

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def attempts(self, outcome: str) -> float:
        return self.sample("gateway_relay_attempts_total", destination=DEST, outcome=outcome)


MakeRig = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def make_rig(tmp_path: Path) -> AsyncIterator[MakeRig]:
    """Build (and at the end stop) a rig; keyword arguments shape its destination."""
    made: list[Rig] = []

    async def make(
        *,
        start: bool = True,
        concurrency: int = 1,
        credential: str | None = None,
        sleep: FakeSleep | None = None,
        **retry: Any,
    ) -> Rig:
        config = gateway_config(
            tmp_path, concurrency=concurrency, credential=credential, retry=retry
        )
        sleep = sleep or FakeSleep()
        spool = Spool(tmp_path / "spool", MASTER_KEY, clock=sleep.clock)
        await spool.open()
        metrics = Metrics()
        upstream = FakeSender(clock=sleep.clock)
        relay = Relay(
            config, spool, metrics, sleep=sleep, clock=sleep.clock, sender_factory=upstream.factory
        )
        rig = Rig(spool, sleep, upstream, metrics, relay)

        async def on_delivered(record: Record) -> None:
            rig.delivered.append(record.id)

        relay.on_delivered = on_delivered
        made.append(rig)
        if start:
            await relay.start()
        return rig

    yield make
    for rig in made:
        rig.upstream.release()
        await rig.relay.stop(drain_timeout=1)
        await rig.spool.close()


@pytest.fixture
async def rig(make_rig: MakeRig) -> Rig:
    return await make_rig()


# ------------------------------------------------------------------- delivered


@pytest.mark.parametrize("status", [200, 201, 202, 204])
async def test_a_2xx_answer_delivers_the_record_and_calls_on_delivered(
    rig: Rig, status: int
) -> None:
    """A 2xx is a delivery: marked delivered with the receipt, on_delivered called, no retry."""
    rig.upstream.answer(status, receipt="JLIS-2025/000123")
    record_id = await rig.put()
    record = await rig.settled(record_id)
    assert record.state == "delivered"
    assert record.delivered_at == rig.sleep.now
    assert record.upstream_receipt == "JLIS-2025/000123"
    assert record.attempts == 1
    assert rig.delivered == [record_id]
    assert rig.sleep.calls == []
    assert [s.body for s in rig.upstream.sent] == [PAYLOAD]
    assert rig.attempts("delivered") == 1
    assert rig.sample("gateway_deliveries_total", channel=CHANNEL) == 1


async def test_a_receipt_that_does_not_look_like_an_id_is_not_kept(rig: Rig) -> None:
    """Free text in the upstream's receipt_id (it could echo a name) is dropped, not stored."""
    rig.upstream.answer(200, receipt="Yamada Taro, born 1980-01-01")
    record = await rig.settled(await rig.put())
    assert record.state == "delivered"
    assert record.upstream_receipt is None


# --------------------------------------------------------------------- retried


async def test_a_5xx_is_retried_with_full_jitter_backoff_within_bounds(rig: Rig) -> None:
    """Three 503s then a 200: four attempts, each backoff within [0, initial * 2**n] and max."""
    rig.upstream.answer(503, times=3)
    record = await rig.settled(await rig.put())
    assert record.state == "delivered"
    assert len(rig.upstream.sent) == 4
    assert len(rig.sleep.calls) == 3
    for attempt, delay in enumerate(rig.sleep.calls):
        assert 0 <= delay <= min(MAX_BACKOFF, INITIAL_BACKOFF * 2**attempt), rig.sleep.calls
    assert record.attempts == 4
    assert rig.attempts("503") == 3
    assert rig.sample("gateway_relay_retries_total", destination=DEST) == 3


@pytest.mark.parametrize("status", [408, 429, 500, 502, 504])
async def test_408_429_and_5xx_are_retried(rig: Rig, status: int) -> None:
    """408 Request Timeout, 429 Too Many Requests and any 5xx are retried, then delivered."""
    rig.upstream.answer(status)
    record = await rig.settled(await rig.put())
    assert record.state == "delivered"
    assert len(rig.upstream.sent) == 2
    assert len(rig.sleep.calls) == 1
    assert rig.attempts(str(status)) == 1
    assert rig.attempts("delivered") == 1


async def test_connection_errors_are_retried(rig: Rig) -> None:
    """Two attempts without an answer are retried as connection errors, then delivered."""
    rig.upstream.fail_connection(times=2)
    record = await rig.settled(await rig.put())
    assert record.state == "delivered"
    assert len(rig.upstream.sent) == 3
    assert len(rig.sleep.calls) == 2
    assert rig.attempts("connection_error") == 2
    assert rig.attempts("delivered") == 1


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_in_seconds_is_honoured(rig: Rig, status: int) -> None:
    """Retry-After: 7 makes the relay wait seven seconds (longer than its own backoff)."""
    rig.upstream.answer(status, retry_after="7")
    record = await rig.settled(await rig.put())
    assert record.state == "delivered"
    assert rig.sleep.calls == [7.0]
    sent = rig.upstream.sent
    assert sent[1].at - sent[0].at == pytest.approx(7.0)


async def test_retry_after_as_an_http_date_is_honoured(rig: Rig) -> None:
    """A Retry-After HTTP-date a minute ahead of the relay's clock makes it wait that long."""
    when = email.utils.formatdate(rig.sleep.now + 60, usegmt=True)
    rig.upstream.answer(503, retry_after=when)
    record = await rig.settled(await rig.put())
    assert record.state == "delivered"
    (delay,) = rig.sleep.calls
    assert 59 <= delay <= 60  # the date has whole seconds


@pytest.mark.parametrize("asked", ["99999999", "Fri, 01 Jan 2100 00:00:00 GMT"])
async def test_retry_after_is_capped_by_max_retry_after(make_rig: MakeRig, asked: str) -> None:
    """An absurd Retry-After (seconds or date) is capped at the destination's max_retry_after."""
    rig = await make_rig(max_retry_after=120)
    rig.upstream.answer(429, retry_after=asked)
    record = await rig.settled(await rig.put())
    assert record.state == "delivered"
    assert rig.sleep.calls == [120.0]


async def test_an_unreadable_retry_after_falls_back_to_the_backoff(rig: Rig) -> None:
    """A Retry-After that is neither seconds nor a date is ignored: the jittered backoff applies."""
    rig.upstream.answer(503, retry_after="in a moment")
    record = await rig.settled(await rig.put())
    assert record.state == "delivered"
    (delay,) = rig.sleep.calls
    assert 0 <= delay <= INITIAL_BACKOFF


# ------------------------------------------------------------------------ held


@pytest.mark.parametrize("status", [400, 403, 404, 409, 422, 301, 302, 303, 307, 308])
async def test_other_4xx_and_redirects_hold_the_record_with_the_reason(
    rig: Rig, status: int
) -> None:
    """Any other 4xx, and a 3xx (never followed), holds the record at once; others still go."""
    rig.upstream.answer(status)
    held_id = await rig.put()
    held = await rig.settled(held_id)
    later = await rig.settled(await rig.put())
    assert held.state == "held"
    assert held.last_error == f"upstream answered {status}"
    assert held.held_at is not None
    assert held.delivered_at is None
    assert held.attempts == 1
    assert later.state == "delivered"
    assert rig.delivered == [later.id]
    assert rig.sleep.calls == []
    assert [s.headers["Idempotency-Key"] for s in rig.upstream.sent] == [held_id, later.id]
    assert rig.attempts(str(status)) == 1
    assert rig.sample("gateway_relay_circuit_open", destination=DEST) == 0


async def test_an_unreadable_record_is_held_and_is_no_breaker_failure(make_rig: MakeRig) -> None:
    """A record failing authentication is held (not retried) and does not open the circuit."""
    rig = await make_rig(start=False, circuit_threshold=1)
    corrupt = await rig.put()
    rig.sleep.clock.advance(1)  # queued after the corrupt one
    sound = await rig.put()
    path = rig.spool.directory / "records" / corrupt
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last segment's tag
    path.write_bytes(bytes(data))
    await rig.relay.start()
    held = await rig.settled(corrupt)
    delivered = await rig.settled(sound)
    assert held.state == "held"
    assert held.last_error == "record unreadable: RecordCorrupt"
    assert delivered.state == "delivered"
    # With a threshold of 1, a breaker failure would have held the second record back.
    assert rig.sleep.calls == []
    assert [s.body for s in rig.upstream.sent] == [None, PAYLOAD]
    assert rig.attempts("record_unreadable") == 1
    assert rig.sample("gateway_relay_circuit_open", destination=DEST) == 0


# --------------------------------------------------------------------- breaker


async def test_the_circuit_holds_attempts_back_then_probes_once_per_doubling_cooldown(
    make_rig: MakeRig,
) -> None:
    """After 3 failures nothing is sent for the cool-down; then one probe, and each
    failed probe doubles the cool-down (30, 60, 120 s) until one succeeds."""
    rig = await make_rig(
        circuit_threshold=3, circuit_cooldown=30, initial_backoff=0.1, max_backoff=0.1
    )
    rig.upstream.answer(503, times=5)  # 3 to open, then 2 failed probes
    with structlog.testing.capture_logs() as logs:
        record = await rig.settled(await rig.put())
    assert record.state == "delivered"
    times = [s.at for s in rig.upstream.sent]
    assert len(times) == 6  # nothing was sent while the circuit was open
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap <= 0.1 + 1e-6 for gap in gaps[:2])  # closed: only the backoff
    for gap, cooldown in zip(gaps[2:], [30, 60, 120], strict=True):
        assert cooldown - 1e-6 <= gap <= cooldown + 0.1 + 1e-6, gaps
    assert record.attempts == 6  # held back is no attempt
    assert rig.sample("gateway_relay_retries_total", destination=DEST) == 5
    assert rig.sample("gateway_relay_circuit_open", destination=DEST) == 0
    events = [e["event"] for e in logs if e["event"].startswith("circuit_")]
    assert events == ["circuit_open", "circuit_closed"]


# ----------------------------------------------------------------- concurrency


async def test_the_concurrency_limit_is_never_exceeded(make_rig: MakeRig) -> None:
    """With the upstream stalled, exactly `concurrency` attempts are open; the rest wait."""
    rig = await make_rig(concurrency=3)
    rig.upstream.hold()
    ids = [await rig.put() for _ in range(7)]
    async with asyncio.timeout(5):
        await rig.upstream.wait_inside(DEST, 3)
    for _ in range(10):  # real round trips through the spool: every chance to overrun
        await rig.spool.queued_ids(DEST)
    assert rig.upstream.inside[DEST] == 3
    assert rig.spool.delivering == 3
    assert rig.sample("gateway_relay_in_flight", destination=DEST) == 3
    rig.upstream.release()
    states = [(await rig.settled(i)).state for i in ids]
    assert states == ["delivered"] * 7
    assert rig.upstream.peak[DEST] == 3
    assert len(rig.upstream.sent) == 7


async def test_stop_lets_an_attempt_under_way_finish(rig: Rig) -> None:
    """stop() waits for an attempt in flight to be answered and its outcome recorded."""
    rig.upstream.hold()
    record_id = await rig.put()
    async with asyncio.timeout(5):
        await rig.upstream.wait_inside(DEST, 1)
    stopping = asyncio.create_task(rig.relay.stop(drain_timeout=5))
    await asyncio.sleep(0)
    assert not stopping.done()
    rig.upstream.release()
    async with asyncio.timeout(5):
        await stopping
    record = await rig.spool.get(record_id)
    assert record is not None and record.state == "delivered"


# --------------------------------------------------------------------- headers


async def test_every_attempt_carries_the_idempotency_key_channel_and_credential(
    make_rig: MakeRig, tmp_path: Path
) -> None:
    """Each attempt, retried or not, sends Idempotency-Key, Gateway-Channel, the Basic
    credential and the same body to the configured URL."""
    secret = tmp_path / "upstream.credential"
    secret.write_text("ward-13101:correct horse\n")
    secret.chmod(0o600)
    rig = await make_rig(credential=str(secret))
    rig.upstream.answer(503)
    rig.upstream.fail_connection()
    record_id = await rig.put()
    assert (await rig.settled(record_id)).state == "delivered"
    expected = {
        "Idempotency-Key": record_id,
        "Gateway-Channel": CHANNEL,
        "Authorization": basic_authorization("ward-13101", "correct horse"),
    }
    assert [s.headers for s in rig.upstream.sent] == [expected] * 3
    assert {s.url for s in rig.upstream.sent} == {URL}
    assert [s.body for s in rig.upstream.sent] == [PAYLOAD, None, PAYLOAD]  # None: no connection


# ----------------------------------------------------------------- supervision


def fail_claims(monkeypatch: pytest.MonkeyPatch, spool: Spool, times: int | None) -> list[str]:
    """Make the spool's claim raise ``times`` times (None: always); returns the ids tried."""
    real = spool.claim
    tried: list[str] = []

    def claim(record_id: str) -> bool:
        tried.append(record_id)
        if times is None or len(tried) <= times:
            raise RuntimeError(f"injected fault for {record_id}")
        return real(record_id)

    monkeypatch.setattr(spool, "claim", claim)
    return tried


async def test_a_worker_that_raises_is_logged_counted_and_restarted(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker failing outside a record's handling is logged (name and type, no text),
    counted in gateway_task_failures_total, restarted after a backoff, and the record
    it had taken is still delivered."""
    fail_claims(monkeypatch, rig.spool, times=1)
    with structlog.testing.capture_logs() as logs:
        record = await rig.settled(await rig.put())
    assert record.state == "delivered"
    assert rig.sample("gateway_task_failures_total", task=f"relay-{DEST}") == 1
    assert rig.sleep.calls == [WORKER_RESTART]
    (failed,) = [e for e in logs if e["event"] == "task_failed"]
    assert failed["task"] == f"relay-{DEST}-0"
    assert failed["destination"] == DEST
    assert failed["error"] == "RuntimeError"
    assert "injected" not in repr(logs)
    assert rig.delivered == [record.id]


async def test_worker_restarts_back_off_doubling_up_to_a_cap(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each further failure doubles the restart backoff, up to WORKER_RESTART_MAX."""
    fail_claims(monkeypatch, rig.spool, times=8)
    record = await rig.settled(await rig.put())
    assert record.state == "delivered"
    expected = [min(WORKER_RESTART * 2**n, WORKER_RESTART_MAX) for n in range(8)]
    assert rig.sleep.calls == expected
    assert expected[-1] == WORKER_RESTART_MAX
    assert rig.sample("gateway_task_failures_total", task=f"relay-{DEST}") == 8


@dataclass
class ParkingSleep(FakeSleep):
    """Records delays and never returns: a worker waiting to restart stays waiting."""

    parked: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        self.parked.set()
        await asyncio.Event().wait()


async def test_a_worker_waiting_to_restart_does_not_hold_up_stop(
    make_rig: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stop() does not wait out a failed worker's restart backoff, nor its drain timeout."""
    sleep = ParkingSleep()
    rig = await make_rig(sleep=sleep)
    fail_claims(monkeypatch, rig.spool, times=None)
    await rig.put()
    async with asyncio.timeout(5):
        await sleep.parked.wait()
        await rig.relay.stop(drain_timeout=60)
    assert sleep.calls == [WORKER_RESTART]
    assert rig.sample("gateway_task_failures_total", task=f"relay-{DEST}") == 1


# ---------------------------------------------------------------------- policy


def test_the_backoff_ceiling_doubles_from_initial_up_to_max_backoff() -> None:
    """The jitter's upper bound is initial * 2**(attempt - 1), capped; the draw is injected."""
    retry = RetryConfig(initial_backoff=1, max_backoff=10, max_retry_after=100)

    def top(low: float, high: float) -> float:
        return high

    assert [policy.retry_wait(n, None, retry, top) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert policy.retry_wait(5000, None, retry, top) == 10  # no overflow
    assert policy.retry_wait(1, 30, retry, top) == 30  # Retry-After wins when longer
    assert policy.retry_wait(1, 1e9, retry, top) == 100  # ... up to max_retry_after


# ------------------------------------------------------------ outcomes kept


class ParkedSleep(FakeSleep):
    """Returns at once for the relay's backoffs; the outcome retries park until released
    (a disk that stays full), so the test decides when the disk recovers."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        await super().__call__(seconds)
        self.entered.set()
        await self.gate.wait()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
async def test_an_outcome_the_disk_refuses_is_written_again_until_it_is_taken(
    rig: Rig, code: int
) -> None:
    """The upstream has the record, but the index will not take "delivered" three times:
    the outcome is kept and written again with doubling backoff, each failure counted;
    the record is sent once, marked delivered, and on_delivered runs once."""
    with DiskFaults() as faults, structlog.testing.capture_logs() as logs:
        faults.arm(2, code, times=3, only=("index", "commit"))  # the 1st commit is the insert
        record = await rig.settled(await rig.put())
    assert record.state == "delivered"
    assert len(rig.upstream.sent) == 1
    assert rig.delivered == [record.id]
    assert rig.sleep.calls == [OUTCOME_RETRY, OUTCOME_RETRY * 2, OUTCOME_RETRY * 4]
    failures = "gateway_relay_outcome_write_failures_total"
    assert rig.sample(failures, destination=DEST, outcome="delivered") == 3
    assert rig.sample("gateway_relay_outcomes_unrecorded") == 0
    assert rig.sample("gateway_deliveries_total", channel=CHANNEL) == 1
    unrecorded = [e for e in logs if e["event"] == "outcome_unrecorded"]
    assert [e["outcome"] for e in unrecorded] == ["delivered"] * 3
    assert [e["event"] for e in logs if e["submission_id"] == record.id][-2:] == [
        "outcome_recorded",
        "delivered",
    ]


async def test_a_held_outcome_is_kept_too(rig: Rig) -> None:
    """A refusal for good (422) whose "held" the disk will not take is written again."""
    rig.upstream.answer(422)
    with DiskFaults() as faults:
        faults.arm(2, errno.ENOSPC, times=2, only=("index", "commit"))
        record = await rig.settled(await rig.put())
    assert record.state == "held"
    assert len(rig.upstream.sent) == 1
    failures = "gateway_relay_outcome_write_failures_total"
    assert rig.sample(failures, destination=DEST, outcome="held") == 2


async def test_the_record_is_held_by_its_worker_while_its_outcome_waits(
    make_rig: MakeRig,
) -> None:
    """While "delivered" waits for the disk, the record stays claimed: nobody sends it
    again, the gauge of unrecorded outcomes says 1, and it is delivered once the disk
    takes the write."""
    sleep = ParkedSleep()
    rig = await make_rig(sleep=sleep, concurrency=2)
    with DiskFaults() as faults:
        faults.arm(2, errno.ENOSPC, times=None, only=("index", "commit"))
        record_id = await rig.put()
        async with asyncio.timeout(5):
            await sleep.entered.wait()
        assert rig.sample("gateway_relay_outcomes_unrecorded") == 1
        stored = await rig.spool.get(record_id)
        assert stored is not None and stored.state == "delivering"
        rig.relay.enqueue(stored)  # offered to the idle worker: it is not taken again
        faults.clear()
        sleep.gate.set()
        record = await rig.settled(record_id)
    assert record.state == "delivered"
    assert len(rig.upstream.sent) == 1
    assert rig.sample("gateway_relay_outcomes_unrecorded") == 0


async def test_an_outcome_still_unwritten_at_stop_is_delivered_again_after_a_restart(
    make_rig: MakeRig, tmp_path: Path
) -> None:
    """Only when the daemon stops before the disk took the outcome is it lost: logged,
    and the record (still queued) is sent again after the restart, under the same
    Idempotency-Key."""
    sleep = ParkedSleep()
    rig = await make_rig(sleep=sleep)
    with DiskFaults() as faults, structlog.testing.capture_logs() as logs:
        faults.arm(2, errno.ENOSPC, times=None, only=("index", "commit"))
        record_id = await rig.put()
        async with asyncio.timeout(5):
            await sleep.entered.wait()
        await rig.relay.stop(drain_timeout=0)
    (lost,) = [e for e in logs if e["event"] == "outcome_lost_at_stop"]
    assert lost["submission_id"] == record_id
    assert lost["outcome"] == "delivered"
    await rig.spool.close()
    again = await make_rig()  # the same spool directory: a restart
    record = await again.settled(record_id)
    assert record.state == "delivered"
    assert [s.headers["Idempotency-Key"] for s in rig.upstream.sent + again.upstream.sent] == [
        record_id,
        record_id,
    ]
