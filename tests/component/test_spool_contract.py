"""The spool interface's contract, run against both backends: the local one (SQLite and
files) and the shared one (PostgreSQL). Whatever keeps the records, the relay, the
sweeper and the ingress see the same behaviour."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.crypto.keystore import KeyStore, epoch_of
from gateway.errors import SpoolError
from gateway.spool.backend import SpoolBackend
from gateway.spool.pgstore import PgSpool
from gateway.spool.records import (
    DuplicateIdempotencyKey,
    NewRecord,
    Record,
    RecoveryReport,
    new_submission_id,
)
from gateway.spool.store import Spool

MARKER = b"PLANTED-983205673214-\xe6\x96\xb0\xe5\xae\xbf"  # a 個人番号 and 新宿
T0 = 1_800_000_000.0
DAY = 86400.0


@dataclass
class FakeClock:
    now: float = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    """One backend's spool, opened on its storage; opens it again as after a restart."""

    kind: str
    tmp: Path
    master: bytes
    dsn: str | None
    clock: FakeClock = field(default_factory=FakeClock)
    spool: SpoolBackend | None = None

    def make(self) -> SpoolBackend:
        if self.dsn is None:
            return Spool(self.tmp / "spool", self.master, clock=self.clock)
        return PgSpool(
            self.tmp / "stage",
            self.master,
            dsn=self.dsn,
            node_id="a",
            keys=KeyStore(self.tmp / "ks", self.master),
            clock=self.clock,
        )

    async def open(self) -> SpoolBackend:
        self.spool = self.make()
        await self.spool.open()
        return self.spool

    async def reopen(self) -> tuple[SpoolBackend, RecoveryReport]:
        assert self.spool is not None
        await self.spool.close()
        self.spool = self.make()
        report = await self.spool.open()
        return self.spool, report

    def staged(self) -> list[str]:
        """Files under the PostgreSQL node's staging directory (none for SQLite)."""
        incoming = self.tmp / "stage" / "incoming"
        return sorted(p.name for p in incoming.iterdir()) if incoming.exists() else []


@pytest.fixture(params=["sqlite", "postgresql"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    dsn = request.getfixturevalue("pg_dsn") if request.param == "postgresql" else None
    box = Backend(request.param, tmp_path, os.urandom(32), dsn)
    await box.open()
    yield box
    if box.spool is not None:
        await box.spool.close()


def meta(
    *,
    received_at: float = T0,
    key: str | None = None,
    device_id: str = "tablet-01",
    destination: str = "dnp-relay",
    body: bytes = b"",
    retention: float = 7 * DAY,
) -> NewRecord:
    return NewRecord(
        channel="online-application",
        destination=destination,
        device_id=device_id,
        user_id="staff-001",
        received_at=received_at,
        expires_at=received_at + retention,
        content_type="multipart/form-data; boundary=gw-test",
        body_sha256=hashlib.sha256(body).hexdigest(),
        content_sha256=hashlib.sha256(b"content" + body).hexdigest(),
        field_names=("application_id", "face_photo"),
        idempotency_key=key,
    )


def payload(n: int, size: int = 1000) -> bytes:
    head = f"record-{n:06d}:".encode()
    return head + MARKER + bytes(range(256)) * (size // 256) + head


async def put(box: Backend, data: bytes, **kwargs: object) -> Record:
    """What the ingress does: create, write, commit (discarding on failure)."""
    spool = box.spool
    assert spool is not None
    box.clock.now += 0.001
    pending = await spool.create(new_submission_id(box.clock))
    committed = False
    try:
        pending.write(data)
        record = await spool.commit(pending, meta(body=data, **kwargs))  # type: ignore[arg-type]
        committed = True
        return record
    finally:
        if not committed:
            spool.discard(pending)


async def plaintext(spool: SpoolBackend, record: Record) -> bytes:
    return b"".join(await spool.open_plaintext(record))


def live(box: Backend) -> SpoolBackend:
    assert box.spool is not None
    return box.spool


# ------------------------------------------------------------------ writing


async def test_commit_then_get(backend: Backend) -> None:
    """A committed record is queued with its metadata and decrypts to what was written."""
    spool = live(backend)
    data = payload(1, 200_000)
    record = await put(backend, data, key="key-1")
    assert record.state == "queued" and record.plaintext_size == len(data)
    assert record.field_names == ("application_id", "face_photo")
    assert await spool.get(record.id) == record
    assert await plaintext(spool, record) == data
    assert await spool.get(new_submission_id()) is None
    assert backend.staged() == []


async def test_a_record_of_several_chunks_round_trips(backend: Backend) -> None:
    """A record over 1 MiB (several 256 KiB chunks in PostgreSQL) decrypts whole, and
    a small one beside it too."""
    spool = live(backend)
    big = os.urandom(1_300_000) + MARKER
    small = payload(2, 300)
    first = await put(backend, big)
    second = await put(backend, small)
    assert first.ciphertext_size > 1024 * 1024
    assert await plaintext(spool, first) == big
    assert await plaintext(spool, second) == small


async def test_a_duplicate_idempotency_key_is_refused_and_the_first_stays(
    backend: Backend,
) -> None:
    """A second record with the same device and key raises DuplicateIdempotencyKey,
    leaves nothing behind, and the first record is the one found."""
    spool = live(backend)
    first = await put(backend, payload(1), key="k-1")
    with pytest.raises(DuplicateIdempotencyKey):
        await put(backend, payload(2), key="k-1")
    other = await put(backend, payload(3), key="k-1", device_id="tablet-02")
    assert await spool.find_idempotent("tablet-01", "k-1") == first
    assert await spool.find_idempotent("tablet-02", "k-1") == other
    assert await spool.find_idempotent("tablet-01", "k-2") is None
    assert spool.counts["queued"] == 2
    assert spool.bytes == first.ciphertext_size + other.ciphertext_size
    assert backend.staged() == []


async def test_discard_removes_an_uncommitted_record(backend: Backend) -> None:
    """discard() of a record never committed deletes what was written of it."""
    spool = live(backend)
    pending = await spool.create(new_submission_id(backend.clock))
    pending.write(MARKER)
    pending.finish()
    assert pending.path.exists()
    spool.discard(pending)
    assert not pending.path.exists()
    assert await spool.get(pending.id) is None


async def test_the_idempotency_token_is_a_keyed_hash(backend: Backend) -> None:
    """The token binds device, channel and key, and never holds the key itself."""
    spool = live(backend)
    token = spool.idempotency_token("tablet-01", "online-application", "secret-key")
    assert len(token) == 64 and "secret-key" not in token
    assert token == spool.idempotency_token("tablet-01", "online-application", "secret-key")
    assert token != spool.idempotency_token("tablet-02", "online-application", "secret-key")


# ------------------------------------------------------------------- states


async def test_state_changes_follow_the_state_table(backend: Backend) -> None:
    """Only the table's transitions happen: held -> delivered does nothing, requeue
    works only from held, delivered is final until erasure."""
    spool = live(backend)
    record = await put(backend, payload(1))
    await spool.note_failed_attempt(record.id, "upstream 503")
    await spool.mark_held(record.id, at=T0 + 1, reason="upstream 400")
    held = await spool.get(record.id)
    assert held is not None
    assert (held.state, held.held_at, held.last_error, held.attempts) == (
        "held",
        T0 + 1,
        "upstream 400",
        2,
    )
    await spool.mark_delivered(record.id, at=T0 + 2, receipt="r-1")
    still = await spool.get(record.id)
    assert still is not None and still.state == "held" and still.delivered_at is None
    requeued = await spool.requeue(record.id)
    assert requeued.state == "queued" and requeued.held_at is None
    with pytest.raises(SpoolError):
        await spool.requeue(record.id)
    with pytest.raises(SpoolError):
        await spool.requeue(new_submission_id())
    await spool.mark_delivered(record.id, at=T0 + 3, receipt="r-2")
    await spool.mark_held(record.id, at=T0 + 4, reason="late")
    done = await spool.get(record.id)
    assert done is not None
    assert (done.state, done.delivered_at, done.upstream_receipt) == ("delivered", T0 + 3, "r-2")
    assert spool.counts["delivered"] == 1 and spool.counts["queued"] == 0
    assert spool.counts["held"] == 0


async def test_claim_and_release(backend: Backend) -> None:
    """A queued record is claimed once; it shows as delivering until released."""
    spool = live(backend)
    record = await put(backend, payload(1))
    assert await spool.claim(record.id)
    assert not await spool.claim(record.id)
    assert spool.delivering == 1
    got = await spool.get(record.id)
    assert got is not None and got.state == "delivering"
    await spool.release(record.id)
    assert spool.delivering == 0
    got = await spool.get(record.id)
    assert got is not None and got.state == "queued"
    assert await spool.claim(record.id)
    await spool.mark_delivered(record.id, at=T0 + 1, receipt=None)
    assert spool.delivering == 0


async def test_a_restart_forgets_claims(backend: Backend) -> None:
    """Reopened, the spool holds no claim: the records are queued again."""
    spool = live(backend)
    records = [await put(backend, payload(n)) for n in range(2)]
    assert await spool.claim(records[0].id)
    spool, report = await backend.reopen()
    assert report.records == 2
    assert spool.delivering == 0
    assert await spool.claim(records[0].id)
    assert spool.counts["queued"] == 2


async def test_queued_ids_oldest_first_per_destination(backend: Backend) -> None:
    """queued_ids lists the queued records of one destination by receipt time, then id."""
    spool = live(backend)
    late = await put(backend, payload(1), received_at=T0 + 30)
    early = await put(backend, payload(2), received_at=T0 + 10)
    tie_a = await put(backend, payload(3), received_at=T0 + 20)
    tie_b = await put(backend, payload(4), received_at=T0 + 20)
    other = await put(backend, payload(5), destination="jlis-express")
    done = await put(backend, payload(6), received_at=T0 + 1)
    await spool.mark_delivered(done.id, at=T0 + 2, receipt=None)
    ties = sorted([tie_a.id, tie_b.id])
    assert await spool.queued_ids("dnp-relay") == [early.id, *ties, late.id]
    assert await spool.queued_ids("jlis-express") == [other.id]
    assert await spool.queued_ids("nowhere") == []


# ------------------------------------------------------------------ erasure


async def test_erasure_reports_each_record_once_and_leaves_it_unreadable(
    backend: Backend,
) -> None:
    """erase() returns the facts of each live record once; erasing again returns
    nothing; an erased record cannot be read; the counters follow."""
    spool = live(backend)
    gone = await put(backend, payload(2, 5000), received_at=T0 - 10)
    kept = await put(backend, payload(1, 5000), received_at=T0)
    assert spool.oldest_queued_at == T0 - 10
    await spool.mark_delivered(kept.id, at=T0 + 5, receipt=None)
    erased = await spool.erase([gone.id, kept.id, gone.id], reason="retention", at=T0 + 9)
    assert [e.submission_id for e in erased] == [gone.id, kept.id]
    first = erased[0]
    assert (first.state_before, first.reason, first.erased_at) == ("queued", "retention", T0 + 9)
    assert first.ciphertext_sha256 == gone.ciphertext_sha256
    assert (erased[1].state_before, erased[1].delivered_at) == ("delivered", T0 + 5)
    assert await spool.erase([gone.id, new_submission_id()], reason="operator", at=T0 + 10) == []
    record = await spool.get(gone.id)
    assert record is not None and record.state == "erased" and record.erased_at == T0 + 9
    with pytest.raises(SpoolError):
        await spool.open_plaintext(record)
    with pytest.raises(SpoolError):
        await spool.open_plaintext(gone)
    assert spool.counts["queued"] == 0 and spool.counts["delivered"] == 0
    assert spool.bytes == 0 and spool.oldest_queued_at is None
    spool, report = await backend.reopen()
    assert report.records == 0 and spool.bytes == 0


async def test_the_retention_view(backend: Backend) -> None:
    """due, overdue, expiring_undelivered, live_epochs, in_epoch and describe answer
    as the sweeper expects."""
    spool = live(backend)
    expired = await put(backend, payload(1), received_at=T0 - 8 * DAY)
    fresh = await put(backend, payload(2), received_at=T0)
    delivered = await put(backend, payload(3), received_at=T0 - DAY)
    held = await put(backend, payload(4), received_at=T0 - 6.5 * DAY)
    await spool.mark_delivered(delivered.id, at=T0 - 100, receipt=None)
    await spool.mark_held(held.id, at=T0 - 50, reason="upstream 400")

    due = await spool.due(T0)
    assert [d.submission_id for d in due] == [delivered.id, expired.id]
    assert due[0].state == "delivered" and due[0].delivered_at == T0 - 100
    assert due[1].key_epoch == epoch_of(expired.expires_at)
    assert await spool.overdue(T0, delivered_grace=60) == 2
    assert await spool.overdue(T0, delivered_grace=3600) == 1
    assert await spool.expiring_undelivered(T0, within=DAY) == {"online-application": 2}
    epochs = await spool.live_epochs()
    assert sum(epochs.values()) == 4
    assert epochs[epoch_of(fresh.expires_at)] >= 1
    in_epoch = await spool.in_epoch(epoch_of(fresh.expires_at))
    assert fresh.id in {d.submission_id for d in in_epoch}
    await spool.erase([expired.id], reason="retention", at=T0)
    described = await spool.describe_many([held.id, expired.id, fresh.id, held.id, "f" * 32])
    assert [d.submission_id for d in described] == [held.id, fresh.id]
    one = await spool.describe(fresh.id)
    assert one is not None and one.state == "queued" and one.channel == "online-application"
    assert await spool.describe(expired.id) is None
    assert sum((await spool.live_epochs()).values()) == 3


# --------------------------------------------------------------- access log


async def test_access_entries_are_numbered_without_gaps(backend: Backend) -> None:
    """Access entries are numbered in order, with a record's own entry among them;
    forget_access drops those written out; number_access_after moves the numbering on."""
    spool = live(backend)
    first = await spool.record_access('{"n": 1}')
    assert first == 1
    pending = await spool.create(new_submission_id(backend.clock))
    pending.write(payload(1))
    await spool.commit(pending, meta(body=payload(1)), access='{"n": 2}')
    third = await spool.record_access('{"n": 3}')
    assert third == 3
    assert await spool.pending_access(10) == [(1, '{"n": 1}'), (2, '{"n": 2}'), (3, '{"n": 3}')]
    assert await spool.pending_access(1) == [(1, '{"n": 1}')]
    await spool.forget_access(2)
    assert await spool.pending_access(10) == [(3, '{"n": 3}')]
    await spool.number_access_after(41)
    assert await spool.record_access('{"n": 42}') == 42
    await spool.number_access_after(5)  # never backwards
    assert await spool.record_access('{"n": 43}') == 43
    entries = await asyncio.gather(*(spool.record_access(f'{{"n": {n}}}') for n in range(5)))
    assert sorted(entries) == [44, 45, 46, 47, 48]


# ---------------------------------------------------------------- counters


async def test_counts_bytes_and_oldest_follow_the_records(backend: Backend) -> None:
    """Commits, deliveries, holds and erasures move the counters; a reopen agrees."""
    spool = live(backend)
    assert spool.oldest_queued_at is None and spool.bytes == 0
    a = await put(backend, payload(1), received_at=T0 + 100)
    b = await put(backend, payload(2), received_at=T0 + 200)
    c = await put(backend, payload(3), received_at=T0 + 300)
    assert spool.counts["queued"] == 3
    assert spool.bytes == a.ciphertext_size + b.ciphertext_size + c.ciphertext_size
    assert spool.oldest_queued_at == T0 + 100
    await spool.mark_delivered(a.id, at=T0 + 400, receipt=None)
    assert spool.oldest_queued_at == T0 + 200
    await spool.mark_held(b.id, at=T0 + 400, reason="x")
    assert spool.oldest_queued_at == T0 + 200  # held is still undelivered
    assert (spool.counts["queued"], spool.counts["held"], spool.counts["delivered"]) == (1, 1, 1)
    await spool.erase([a.id], reason="delivered", at=T0 + 500)
    assert spool.bytes == b.ciphertext_size + c.ciphertext_size
    before = (dict(+spool.counts), spool.bytes, spool.oldest_queued_at)
    spool, _ = await backend.reopen()
    assert (dict(+spool.counts), spool.bytes, spool.oldest_queued_at) == before
    assert spool.free_bytes() > 0


async def test_a_closed_or_unopened_spool_fails_instead_of_hanging(backend: Backend) -> None:
    """After close() (and before open()) the spool raises SpoolError, never waits."""
    spool = live(backend)
    record = await put(backend, payload(1))
    await spool.close()
    backend.spool = None
    async with asyncio.timeout(30):  # a guard against a regression that hangs, not a wait
        with pytest.raises(SpoolError):
            await spool.get(record.id)
        with pytest.raises(SpoolError):
            await backend.make().queued_ids("dnp-relay")
