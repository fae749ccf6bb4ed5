"""The durable encrypted spool: commit, idempotency, crash recovery, states, group commit."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.crypto.keystore import master_key_id
from gateway.errors import (
    KeystoreError,
    RecordCorrupt,
    SpoolError,
    StorageFailed,
    StorageFull,
    is_disk_full,
)
from gateway.spool.index import IndexThread, sqlite_error_for, storage_error
from gateway.spool.pending import PendingRecord
from gateway.spool.records import (
    DuplicateIdempotencyKey,
    NewRecord,
    Record,
    is_submission_id,
    new_submission_id,
)
from gateway.spool.store import Spool
from gateway.testing.faults import DiskFaults

MARKER = b"PLANTED-983205673214-\xe6\x96\xb0\xe5\xae\xbf"  # a 個人番号 and 新宿


@dataclass
class FakeClock:
    """A clock tests move by hand."""

    now: float = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Store:
    """A spool directory with its master key; opens fresh Spool objects on it."""

    directory: Path
    master: bytes
    clock: FakeClock = field(default_factory=FakeClock)
    opened: list[Spool] = field(default_factory=list)
    ids: Iterable[int] = field(default_factory=lambda: iter(range(1, 1_000_000)))

    async def open(self) -> Spool:
        spool = Spool(self.directory, self.master, clock=self.clock)
        await spool.open()
        self.opened.append(spool)
        return spool

    async def reopen(self, spool: Spool) -> tuple[Spool, Any]:
        """Close ``spool`` and open the directory again, as after a restart."""
        await spool.close()
        self.opened.remove(spool)
        fresh = Spool(self.directory, self.master, clock=self.clock)
        report = await fresh.open()
        self.opened.append(fresh)
        return fresh, report

    def new_id(self) -> str:
        """Sortable submission ids from the fake clock, one millisecond apart."""
        self.clock.now += 0.001
        return new_submission_id(self.clock)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    box = Store(tmp_path / "spool", os.urandom(32))
    yield box
    for spool in box.opened:
        await spool.close()


@pytest.fixture
async def spool(store: Store) -> Spool:
    return await store.open()


def meta(
    *,
    destination: str = "dnp-relay",
    device_id: str = "tablet-01",
    received_at: float = 1_800_000_000.0,
    key: str | None = None,
    body: bytes = b"",
) -> NewRecord:
    return NewRecord(
        channel="online-application",
        destination=destination,
        device_id=device_id,
        user_id="staff-001",
        received_at=received_at,
        expires_at=received_at + 7 * 86400,
        content_type="multipart/form-data; boundary=gw-test",
        body_sha256=hashlib.sha256(body).hexdigest(),
        content_sha256=hashlib.sha256(b"content" + body).hexdigest(),
        field_names=("application_id", "face_photo"),
        idempotency_key=key,
    )


def payload(n: int, size: int = 1000) -> bytes:
    """Distinct plaintext per record, with the planted marker in the middle."""
    head = f"record-{n:06d}:".encode()
    return head + MARKER + bytes(range(256)) * (size // 256) + head


async def put(
    store: Store, spool: Spool, data: bytes, **kwargs: Any
) -> tuple[Record, PendingRecord]:
    pending = spool.begin(store.new_id())
    pending.write(data)
    record = await spool.commit(pending, meta(body=data, **kwargs))
    return record, pending


async def plaintext(spool: Spool, record: Record) -> bytes:
    return b"".join(await spool.open_plaintext(record))


def index_rows(directory: Path) -> list[tuple[str, str, bool]]:
    """(id, state, has key) of every row, read with a separate connection."""
    with sqlite3.connect(directory / "index.sqlite3") as conn:
        rows = conn.execute("SELECT id, state, wrapped_key IS NOT NULL FROM records").fetchall()
    conn.close()
    return [(r[0], r[1], bool(r[2])) for r in rows]


def record_files(directory: Path) -> set[str]:
    return {p.name for p in (directory / "records").iterdir()}


# ---------------------------------------------------------------------- ids


def test_submission_ids_sort_by_time_and_are_recognised() -> None:
    """Ids are 32 hex digits that start with the millisecond clock, so they sort by time."""
    early = new_submission_id(lambda: 1_800_000_000.000)
    late = new_submission_id(lambda: 1_800_000_000.001)
    assert is_submission_id(early) and is_submission_id(late)
    assert early[:12] == f"{1_800_000_000_000:012x}"
    assert early < late
    assert new_submission_id(lambda: 1.0) != new_submission_id(lambda: 1.0)
    for bad in ("", "x" * 32, early.upper(), early[:-1], early + "0"):
        assert not is_submission_id(bad)


# ------------------------------------------------------------------- commit


async def test_commit_then_get(store: Store, spool: Spool) -> None:
    """A committed record is queued, with its metadata, and decrypts to what was written."""
    data = payload(1, 200_000)  # several 64 KiB segments
    record, pending = await put(store, spool, data, key="key-1")
    assert record.state == "queued"
    assert record.plaintext_size == len(data)
    assert record.ciphertext_size == pending.path.stat().st_size
    assert record.ciphertext_sha256 == hashlib.sha256(pending.path.read_bytes()).hexdigest()
    assert record.field_names == ("application_id", "face_photo")
    got = await spool.get(record.id)
    assert got == record
    assert await plaintext(spool, record) == data


async def test_get_unknown_is_none(spool: Spool) -> None:
    """get() of an id the spool never saw is None."""
    assert await spool.get(new_submission_id()) is None


async def test_commit_updates_counts_bytes_and_oldest(store: Store, spool: Spool) -> None:
    """Each commit counts one queued record, its ciphertext bytes, and the oldest receipt."""
    assert spool.oldest_queued_at is None
    first, _ = await put(store, spool, payload(1), received_at=100.0)
    second, _ = await put(store, spool, payload(2), received_at=200.0)
    assert spool.counts["queued"] == 2
    assert spool.bytes == first.ciphertext_size + second.ciphertext_size
    assert spool.oldest_queued_at == 100.0


async def test_record_file_never_holds_plaintext(store: Store, spool: Spool) -> None:
    """Neither the record file nor the index holds the planted marker or the data key."""
    record, pending = await put(store, spool, payload(1, 5000))
    assert MARKER not in pending.path.read_bytes()
    dek = pending._dek
    for path in store.directory.iterdir():
        if path.is_file():
            content = path.read_bytes()
            assert MARKER not in content, path.name
            assert dek not in content, path.name
    assert MARKER in await plaintext(spool, record)


async def test_find_idempotent_is_per_device(store: Store, spool: Spool) -> None:
    """An Idempotency-Key finds the device's own record only; other devices may reuse it."""
    mine, _ = await put(store, spool, payload(1), key="k-1", device_id="tablet-01")
    theirs, _ = await put(store, spool, payload(2), key="k-1", device_id="tablet-02")
    assert await spool.find_idempotent("tablet-01", "k-1") == mine
    assert await spool.find_idempotent("tablet-02", "k-1") == theirs
    assert await spool.find_idempotent("tablet-01", "k-2") is None
    assert await spool.find_idempotent("tablet-03", "k-1") is None


async def test_records_without_key_do_not_collide(store: Store, spool: Spool) -> None:
    """Many records of one device without an Idempotency-Key all commit."""
    for n in range(3):
        await put(store, spool, payload(n))
    assert spool.counts["queued"] == 3


async def test_duplicate_idempotency_key_is_refused_and_file_removed(
    store: Store, spool: Spool
) -> None:
    """A second record with the same device and key raises and leaves no file behind."""
    first, _ = await put(store, spool, payload(1), key="k-1")
    pending = spool.begin(store.new_id())
    pending.write(payload(2))
    with pytest.raises(DuplicateIdempotencyKey):
        await spool.commit(pending, meta(body=payload(2), key="k-1"))
    assert not pending.path.exists()
    assert await spool.get(pending.id) is None
    assert record_files(store.directory) == {first.id}
    assert spool.counts["queued"] == 1
    assert spool.bytes == first.ciphertext_size
    assert await spool.find_idempotent("tablet-01", "k-1") == first


async def test_discard_removes_an_uncommitted_file(store: Store, spool: Spool) -> None:
    """discard() of a record that was never committed deletes its file."""
    pending = spool.begin(store.new_id())
    pending.write(MARKER)
    pending.finish()
    assert pending.path.exists()
    spool.discard(pending)
    assert not pending.path.exists()


async def test_discard_after_commit_keeps_the_file(store: Store, spool: Spool) -> None:
    """A caller's cleanup that discards a committed record does not delete its file."""
    record, pending = await put(store, spool, payload(1))
    spool.discard(pending)
    assert pending.path.exists()
    assert await plaintext(spool, record) == payload(1)


async def test_pending_window_reads_a_range_before_commit(store: Store, spool: Spool) -> None:
    """A finished pending record can be read back in a window before it is committed."""
    data = payload(7, 150_000)
    pending = spool.begin(store.new_id())
    pending.write(data[:70_000])
    pending.write(data[70_000:])
    pending.finish()
    with pending.window(65_000, 10_000) as stream:
        assert stream.read() == data[65_000:75_000]
    spool.discard(pending)


# --------------------------------------------------------------- corruption


async def test_tampered_byte_raises_record_corrupt(store: Store, spool: Spool) -> None:
    """Flipping one ciphertext byte makes reading the record raise RecordCorrupt."""
    data = payload(1, 150_000)
    record, pending = await put(store, spool, data)
    raw = bytearray(pending.path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    pending.path.write_bytes(bytes(raw))
    with pytest.raises(RecordCorrupt):
        await plaintext(spool, record)


async def test_truncated_file_raises_record_corrupt(store: Store, spool: Spool) -> None:
    """A record file cut short raises RecordCorrupt, never yields a partial record silently."""
    record, pending = await put(store, spool, payload(1, 5000))
    raw = pending.path.read_bytes()
    pending.path.write_bytes(raw[:-10])
    with pytest.raises(RecordCorrupt):
        await plaintext(spool, record)


async def test_swapped_files_do_not_decrypt(store: Store, spool: Spool) -> None:
    """One record's file put in another's place fails authentication (keys and AAD differ)."""
    first, a = await put(store, spool, payload(1))
    second, b = await put(store, spool, payload(2))
    a_bytes, b_bytes = a.path.read_bytes(), b.path.read_bytes()
    a.path.write_bytes(b_bytes)
    b.path.write_bytes(a_bytes)
    for record in (first, second):
        with pytest.raises(RecordCorrupt):
            await plaintext(spool, record)


async def test_wrong_master_key_cannot_open_the_keystore(store: Store, spool: Spool) -> None:
    """Opened with another master key, the spool refuses to start, naming both keys'
    ids (never a key), and leaves the spool unlocked for the right key."""
    record, _ = await put(store, spool, payload(1))
    await spool.close()
    store.opened.remove(spool)
    other_key = os.urandom(32)
    other = Spool(store.directory, other_key)
    with pytest.raises(KeystoreError) as refused:
        await other.open()
    message = str(refused.value)
    assert master_key_id(store.master) in message and master_key_id(other_key) in message
    assert store.master.hex() not in message and other_key.hex() not in message
    again = Spool(store.directory, store.master)
    await again.open()
    store.opened.append(again)
    assert b"".join(await again.open_plaintext(record)) == payload(1)


async def test_a_tampered_wrapped_key_is_record_corrupt(store: Store, spool: Spool) -> None:
    """A wrapped data key altered in the index fails its integrity check."""
    record, _ = await put(store, spool, payload(1))
    await spool._index.run(
        lambda c: c.execute("UPDATE records SET wrapped_key=zeroblob(40) WHERE id=?", (record.id,))
    )
    with pytest.raises(RecordCorrupt):
        await spool.open_plaintext(record)


async def test_open_plaintext_of_unknown_record_is_spool_error(store: Store, spool: Spool) -> None:
    """Reading a record the index does not hold raises SpoolError."""
    record, _ = await put(store, spool, payload(1))
    ghost = Record(**{**record.__dict__, "id": new_submission_id()})
    with pytest.raises(SpoolError):
        await spool.open_plaintext(ghost)


# ----------------------------------------------------------------- recovery


async def test_open_after_crash_removes_orphans_and_keeps_records(
    store: Store, spool: Spool
) -> None:
    """After a crash, a written but uncommitted file is removed; committed records survive."""
    kept = [await put(store, spool, payload(n, 70_000)) for n in range(3)]
    orphan = spool.begin(store.new_id())
    orphan.write(payload(99))
    orphan.finish()
    orphan.sync_and_close()  # durable file, but the crash came before the index row
    stray = store.directory / "records" / "half-written.tmp"
    stray.write_bytes(b"junk")

    fresh, report = await store.reopen(spool)
    assert report.records == 3
    assert report.requeued == 3
    assert report.orphans_removed == 2
    assert report.missing_files == 0
    assert not orphan.path.exists() and not stray.exists()
    assert record_files(store.directory) == {r.id for r, _ in kept}
    for n, (record, _) in enumerate(kept):
        assert await fresh.get(record.id) == record
        assert await plaintext(fresh, record) == payload(n, 70_000)
    assert fresh.counts["queued"] == 3
    assert fresh.bytes == sum(r.ciphertext_size for r, _ in kept)


async def test_missing_file_of_queued_record_puts_it_on_hold(store: Store, spool: Spool) -> None:
    """A queued record whose file vanished is held with a reason, not silently delivered."""
    record, pending = await put(store, spool, payload(1))
    pending.path.unlink()
    fresh, report = await store.reopen(spool)
    assert report.missing_files == 1
    held = await fresh.get(record.id)
    assert held is not None
    assert held.state == "held"
    assert held.last_error == "data file missing"
    assert held.held_at == store.clock.now
    assert fresh.counts == {"held": 1}


async def test_missing_file_of_delivered_record_stays_delivered(store: Store, spool: Spool) -> None:
    """A delivered record whose file vanished is not rewritten into an undelivered state."""
    record, pending = await put(store, spool, payload(1))
    await spool.mark_delivered(record.id, at=5.0, receipt="upstream-1")
    pending.path.unlink()
    fresh, _ = await store.reopen(spool)
    got = await fresh.get(record.id)
    assert got is not None
    assert (got.state, got.delivered_at, got.held_at) == ("delivered", 5.0, None)
    assert fresh.oldest_queued_at is None


async def test_restart_forgets_delivering(store: Store, spool: Spool) -> None:
    """A record claimed for delivery when the process died is queued again after restart."""
    record, _ = await put(store, spool, payload(1))
    assert await spool.claim(record.id)
    fresh, report = await store.reopen(spool)
    assert report.requeued == 1
    got = await fresh.get(record.id)
    assert got is not None and got.state == "queued"
    assert await fresh.queued_ids("dnp-relay") == [record.id]


async def test_reopen_after_clean_close_changes_nothing(store: Store, spool: Spool) -> None:
    """Closing and reopening a healthy spool removes nothing and keeps every state."""
    a, _ = await put(store, spool, payload(1), received_at=10.0)
    b, _ = await put(store, spool, payload(2), received_at=20.0)
    c, _ = await put(store, spool, payload(3), received_at=30.0)
    await spool.mark_delivered(a.id, at=40.0, receipt=None)
    await spool.mark_held(b.id, at=50.0, reason="upstream 400")
    fresh, report = await store.reopen(spool)
    assert (report.records, report.requeued, report.orphans_removed) == (3, 1, 0)
    assert fresh.counts == {"delivered": 1, "held": 1, "queued": 1}
    assert fresh.oldest_queued_at == 20.0  # the held record is still undelivered
    assert await fresh.queued_ids("dnp-relay") == [c.id]


# ------------------------------------------------------------------- states


async def test_claim_release_and_delivering_state(store: Store, spool: Spool) -> None:
    """claim() shows the record as delivering, once; release() makes it queued again."""
    record, _ = await put(store, spool, payload(1), key="k")
    assert await spool.claim(record.id)
    assert not await spool.claim(record.id)
    assert spool.delivering == 1
    got = await spool.get(record.id)
    assert got is not None and got.state == "delivering"
    found = await spool.find_idempotent("tablet-01", "k")
    assert found is not None and found.state == "delivering"
    await spool.release(record.id)
    assert spool.delivering == 0
    got = await spool.get(record.id)
    assert got is not None and got.state == "queued"


async def test_mark_delivered(store: Store, spool: Spool) -> None:
    """mark_delivered records time and receipt, moves the count, and ends the claim."""
    record, _ = await put(store, spool, payload(1), received_at=10.0)
    await spool.claim(record.id)
    await spool.mark_delivered(record.id, at=20.0, receipt="JLIS-0001")
    got = await spool.get(record.id)
    assert got is not None
    assert (got.state, got.delivered_at, got.upstream_receipt, got.attempts) == (
        "delivered",
        20.0,
        "JLIS-0001",
        1,
    )
    assert spool.counts["queued"] == 0 and spool.counts["delivered"] == 1
    assert spool.delivering == 0
    assert spool.oldest_queued_at is None


async def test_mark_held(store: Store, spool: Spool) -> None:
    """mark_held records the reason; a held record still counts as undelivered."""
    record, _ = await put(store, spool, payload(1), received_at=10.0)
    await spool.note_failed_attempt(record.id, "connect timeout")
    await spool.mark_held(record.id, at=30.0, reason="upstream 422")
    got = await spool.get(record.id)
    assert got is not None
    assert (got.state, got.held_at, got.last_error, got.attempts) == (
        "held",
        30.0,
        "upstream 422",
        2,
    )
    assert spool.counts["queued"] == 0 and spool.counts["held"] == 1
    assert spool.oldest_queued_at == 10.0
    assert await spool.queued_ids("dnp-relay") == []


async def test_transition_only_from_queued(store: Store, spool: Spool) -> None:
    """A delivered record cannot be held afterwards, and counts do not drift."""
    record, _ = await put(store, spool, payload(1))
    await spool.mark_delivered(record.id, at=1.0, receipt=None)
    await spool.mark_held(record.id, at=2.0, reason="late")
    await spool.mark_delivered(record.id, at=3.0, receipt="again")
    got = await spool.get(record.id)
    assert got is not None
    assert (got.state, got.delivered_at, got.upstream_receipt) == ("delivered", 1.0, None)
    assert spool.counts == {"queued": 0, "delivered": 1}


async def test_queued_ids_oldest_first_per_destination(store: Store, spool: Spool) -> None:
    """queued_ids lists only queued records of one destination, by receipt time then id."""
    late, _ = await put(store, spool, payload(1), received_at=30.0)
    early, _ = await put(store, spool, payload(2), received_at=10.0)
    tie_a, _ = await put(store, spool, payload(3), received_at=20.0)
    tie_b, _ = await put(store, spool, payload(4), received_at=20.0)
    other, _ = await put(store, spool, payload(5), received_at=5.0, destination="jlis-express")
    done, _ = await put(store, spool, payload(6), received_at=1.0)
    await spool.mark_delivered(done.id, at=2.0, receipt=None)
    ties = sorted([tie_a.id, tie_b.id])
    assert await spool.queued_ids("dnp-relay") == [early.id, *ties, late.id]
    assert await spool.queued_ids("jlis-express") == [other.id]
    assert await spool.queued_ids("nowhere") == []


# ------------------------------------------------------------- concurrency


async def test_concurrent_commits_share_index_commits(store: Store, spool: Spool) -> None:
    """50 concurrent commits all succeed using fewer index commits than records."""
    before = spool._index.commits
    records = await asyncio.gather(*(put(store, spool, payload(n)) for n in range(50)))
    assert spool._index.commits - before < 50
    assert len({r.id for r, _ in records}) == 50
    assert spool.counts["queued"] == 50
    for n, (record, _) in enumerate(records):
        assert await plaintext(spool, record) == payload(n)


async def test_waiting_commits_go_in_one_batch(store: Store, spool: Spool) -> None:
    """Inserts that wait while the index is busy are committed together in one transaction."""
    gate = threading.Event()
    busy = asyncio.ensure_future(spool._index.run(lambda conn: gate.wait(10)))
    queued = asyncio.Event()
    calls: list[int] = []
    real_run = spool._index.run

    async def counting_run(fn: Callable[[sqlite3.Connection], Any], **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 50:
            queued.set()
        return await real_run(fn, **kwargs)

    spool._index.run = counting_run  # type: ignore[method-assign]
    before = spool._index.commits
    puts = asyncio.gather(*(put(store, spool, payload(n)) for n in range(50)))
    await queued.wait()
    gate.set()
    records = await puts
    await busy
    assert len(records) == 50
    assert spool._index.commits - before <= 2  # the busy batch, then all 50 inserts


async def _submit(spool: Spool, store: Store, n: int, sent: dict[str, bytes]) -> None:
    """What ingress does: write, commit, and discard the pending record if commit failed."""
    pending = spool.begin(store.new_id())
    data = payload(n, 3000)
    sent[pending.id] = data
    pending.write(data)
    committed = False
    try:
        await spool.commit(pending, meta(body=data))
        committed = True
    finally:
        if not committed:
            spool.discard(pending)


async def _check_every_row_has_its_file(store: Store, spool: Spool, sent: dict[str, bytes]) -> None:
    fresh, report = await store.reopen(spool)
    assert report.missing_files == 0
    rows = index_rows(store.directory)
    assert {rid for rid, _, _ in rows} == record_files(store.directory)
    for rid, state, _ in rows:
        assert state == "queued"
        record = await fresh.get(rid)
        assert record is not None
        assert await plaintext(fresh, record) == sent[rid]


async def test_cancel_while_index_commits_keeps_the_file(store: Store, spool: Spool) -> None:
    """A caller cancelled while its insert commits never leaves a row without its file."""
    sent: dict[str, bytes] = {}
    real_run = spool._index.run
    task: asyncio.Task[None] | None = None

    async def cancelling_run(fn: Callable[[sqlite3.Connection], Any], **kwargs: Any) -> Any:
        if kwargs.get("sync_dirs") and task is not None:
            task.cancel()  # the caller gives up just as the insert is queued
        return await real_run(fn, **kwargs)

    spool._index.run = cancelling_run  # type: ignore[method-assign]
    task = asyncio.create_task(_submit(spool, store, 1, sent))
    with pytest.raises(asyncio.CancelledError):
        await task
    (rid,) = sent
    assert (store.directory / "records" / rid).exists()
    assert spool.counts["queued"] == 1
    spool._index.run = real_run  # type: ignore[method-assign]
    await _check_every_row_has_its_file(store, spool, sent)
    assert len(index_rows(store.directory)) == 1


async def test_cancel_at_any_point_of_commit_never_orphans_a_row(
    store: Store, spool: Spool
) -> None:
    """Cancelled after 0..40 loop turns, every committed row still has its file on reopen."""
    sent: dict[str, bytes] = {}
    outcomes = []
    for turns in range(40):
        task = asyncio.create_task(_submit(spool, store, turns, sent))
        for _ in range(turns):
            await asyncio.sleep(0)  # a yield to the event loop, not a wait
        task.cancel()
        outcomes.append((await asyncio.gather(task, return_exceptions=True))[0])
    assert any(isinstance(o, asyncio.CancelledError) for o in outcomes)
    await _check_every_row_has_its_file(store, spool, sent)


async def test_closed_spool_fails_instead_of_hanging(store: Store) -> None:
    """An index operation after close() raises SpoolError rather than waiting forever."""
    spool = await store.open()
    record, _ = await put(store, spool, payload(1))
    await spool.close()
    store.opened.remove(spool)
    async with asyncio.timeout(30):  # a guard against a regression that hangs, not a wait
        with pytest.raises(SpoolError):
            await spool.get(record.id)


async def test_unopened_spool_fails_instead_of_hanging(store: Store) -> None:
    """Using a spool before open() raises SpoolError rather than waiting forever."""
    spool = Spool(store.directory, store.master)
    async with asyncio.timeout(30):
        with pytest.raises(SpoolError):
            await spool.queued_ids("dnp-relay")


async def test_an_index_of_another_schema_version_is_refused(tmp_path: Path) -> None:
    """A spool index written by another schema version is refused with a clear error."""
    key = os.urandom(32)
    spool = Spool(tmp_path / "spool", key)
    await spool.open()
    await spool.close()
    with sqlite3.connect(tmp_path / "spool" / "index.sqlite3") as conn:
        conn.execute("PRAGMA user_version=99")
    again = Spool(tmp_path / "spool", key)
    with pytest.raises(SpoolError, match="schema version 99"):
        await again.open()


async def test_a_second_process_cannot_open_a_spool_in_use(tmp_path: Path) -> None:
    """Only one spool per directory: a second open is refused until the first closes."""
    key = os.urandom(32)
    first = Spool(tmp_path / "spool", key)
    await first.open()
    second = Spool(tmp_path / "spool", key)
    with pytest.raises(SpoolError, match="in use"):
        await second.open()
    await first.close()
    third = Spool(tmp_path / "spool", key)
    await third.open()
    await third.close()


async def test_a_cancelled_create_leaves_no_file_behind(tmp_path: Path) -> None:
    """Cancelling the caller while its record file is being created removes the file."""
    spool = Spool(tmp_path / "spool", os.urandom(32))
    await spool.open()
    task = asyncio.create_task(spool.create("0" * 32))
    await asyncio.sleep(0)  # the creation is on the spool thread now
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await spool.close()  # waits for the spool threads: the creation has finished
    for _ in range(3):  # its completion reaches the loop, then the clean-up callback runs
        await asyncio.sleep(0)
    assert list((tmp_path / "spool" / "records").iterdir()) == []


# ------------------------------------------------------------------------ erasure


async def test_erased_records_cannot_be_decrypted_from_anything_left_on_disk(
    store: Store, spool: Spool
) -> None:
    """After erasure no file under the spool holds the data key or the ciphertext."""
    kept, _ = await put(store, spool, payload(1, 200_000))
    gone, _ = await put(store, spool, payload(2, 200_000))
    with sqlite3.connect(store.directory / "index.sqlite3") as conn:
        wrapped = conn.execute("SELECT wrapped_key FROM records WHERE id=?", (gone.id,)).fetchone()[
            0
        ]
    conn.close()
    ciphertext = (store.directory / "records" / gone.id).read_bytes()
    erased = await spool.erase([gone.id], reason="retention", at=1_800_000_100.0)
    assert [e.submission_id for e in erased] == [gone.id]
    assert erased[0].ciphertext_sha256 == hashlib.sha256(ciphertext).hexdigest()
    assert erased[0].state_before == "queued" and erased[0].reason == "retention"
    leftovers = b"".join(p.read_bytes() for p in store.directory.rglob("*") if p.is_file())
    assert bytes(wrapped) not in leftovers
    assert ciphertext[16:4096] not in leftovers
    record = await spool.get(gone.id)
    assert record is not None and record.state == "erased" and record.erased_at is not None
    with pytest.raises(SpoolError):
        await spool.open_plaintext(record)
    assert await plaintext(spool, kept) == payload(1, 200_000)


async def test_erasure_updates_counts_bytes_and_is_idempotent(store: Store, spool: Spool) -> None:
    """Erasing frees the record's bytes and count once; erasing again is a no-op."""
    record, _ = await put(store, spool, payload(3))
    before = spool.bytes
    assert spool.counts["queued"] == 1
    assert len(await spool.erase([record.id], reason="operator", at=1.0)) == 1
    assert spool.bytes == before - record.ciphertext_size
    assert spool.counts["queued"] == 0
    assert spool.oldest_queued_at is None
    assert await spool.erase([record.id, "f" * 32], reason="operator", at=2.0) == []
    reopened, report = await store.reopen(spool)
    assert report.records == 0 and report.orphans_removed == 0
    assert reopened.bytes == 0


# ------------------------------------------------------------- a failing disk


@pytest.mark.parametrize(
    ("point", "code", "error"),
    [
        (("record", "create"), errno.ENOSPC, StorageFull),
        (("record", "write"), errno.EIO, StorageFailed),
        (("record", "fsync"), errno.ENOSPC, StorageFull),
        (("record", "fsync-dir"), errno.EIO, StorageFailed),
        (("index", "commit"), errno.ENOSPC, StorageFull),
        (("index", "commit"), errno.EIO, StorageFailed),
    ],
)
async def test_a_commit_the_disk_refuses_leaves_nothing_behind_and_the_next_one_works(
    store: Store, spool: Spool, point: tuple[str, str], code: int, error: type[Exception]
) -> None:
    """Whichever write of a record fails (its file's create, a write, the fsync, the
    directory fsync, the index's commit, which SQLite reports as SQLITE_FULL or
    SQLITE_IOERR), the commit raises, neither a file nor a row is left, the counters
    are unchanged, and the next record commits."""
    with DiskFaults() as faults:
        faults.arm(1, code, only=point)
        with pytest.raises((OSError, StorageFailed)) as raised:
            await put(store, spool, payload(1, 200_000))
    assert is_disk_full(raised.value) is (error is StorageFull)
    if point == ("index", "commit"):
        assert type(raised.value) is error
    assert record_files(store.directory) == set()
    assert index_rows(store.directory) == []
    assert spool.counts["queued"] == 0 and spool.bytes == 0
    record, _ = await put(store, spool, payload(2))
    assert await plaintext(spool, record) == payload(2)


async def test_a_failed_fsync_fails_only_its_own_record_of_the_group(
    store: Store, spool: Spool
) -> None:
    """The index thread fsyncs every file of its group before the inserts: the record
    whose fsync fails gets no row and no file, the others of the same group commit."""
    await put(store, spool, payload(0))  # the epoch's key exists: nothing else waits
    started, release = threading.Event(), threading.Event()

    def block(_conn: sqlite3.Connection) -> None:
        started.set()
        release.wait(5)

    blocker = asyncio.ensure_future(spool._index.run(block))
    await asyncio.to_thread(started.wait, 5)
    queued = asyncio.Event()
    real_run = spool._index.run
    inserts: list[int] = []

    async def counting_run(fn: Callable[[sqlite3.Connection], Any], **kwargs: Any) -> Any:
        if kwargs.get("sync_files"):
            inserts.append(1)
            if len(inserts) == 3:
                queued.set()
        return await real_run(fn, **kwargs)

    spool._index.run = counting_run  # type: ignore[method-assign]
    before = spool._index.commits
    with DiskFaults() as faults:
        faults.arm(2, errno.EIO, only=("record", "fsync"))
        puts = asyncio.gather(
            *(put(store, spool, payload(n, 100_000)) for n in (1, 2, 3)), return_exceptions=True
        )
        await queued.wait()
        release.set()
        await blocker
        outcomes = await puts
    assert spool._index.commits - before == 2  # the blocker's group, then all three inserts
    assert faults.failed == [("", "record", "fsync")]
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(failed) == 1 and type(failed[0]) is StorageFailed
    committed = {n: o[0] for n, o in zip((1, 2, 3), outcomes, strict=True) if isinstance(o, tuple)}
    assert len(committed) == 2
    rows = {rid for rid, _, _ in index_rows(store.directory)}
    assert rows == record_files(store.directory) and len(rows) == 3  # the first one's too
    for n, record in committed.items():
        assert record.id in rows
        assert await plaintext(spool, record) == payload(n, 100_000)
    assert spool.counts["queued"] == 3


async def test_reads_that_shared_a_batch_with_a_failed_write_run_again(
    store: Store, spool: Spool
) -> None:
    """A status query committed in the same group as someone's write that the disk
    refused is not failed with it: it runs again in the next group."""
    record, _ = await put(store, spool, payload(1))
    started, release = threading.Event(), threading.Event()

    def block(_conn: sqlite3.Connection) -> None:
        started.set()
        release.wait(5)

    blocker = asyncio.ensure_future(spool._index.run(block))
    await asyncio.to_thread(started.wait, 5)
    with DiskFaults() as faults:
        faults.arm(1, errno.ENOSPC, only=("index", "commit"))
        write = asyncio.ensure_future(spool.mark_held(record.id, at=1.0, reason="x"))
        read = asyncio.ensure_future(spool.get(record.id))
        await asyncio.sleep(0)  # both queued behind the blocker: one group
        release.set()
        await blocker
        with pytest.raises(StorageFull):
            await write
        got = await read
    assert got is not None and got.state == "queued"
    assert faults.failed == [("", "index", "commit")]


async def test_a_connection_a_failed_rollback_left_unusable_is_opened_again(
    store: Store, spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a failing disk even the rollback may fail: the connection is closed and the
    next group opens a new one; the spool goes on."""
    record, _ = await put(store, spool, payload(1))
    rolled: list[bool] = []

    def rollback_fails(conn: sqlite3.Connection) -> bool:
        conn.close()
        rolled.append(False)
        return False

    monkeypatch.setattr(IndexThread, "_rolled_back", staticmethod(rollback_fails))
    with DiskFaults() as faults:
        faults.arm(1, errno.EIO, only=("index", "commit"))
        with pytest.raises(StorageFailed):
            await spool.mark_held(record.id, at=1.0, reason="x")
    monkeypatch.undo()
    assert rolled == [False]
    await spool.mark_held(record.id, at=2.0, reason="y")
    held = await spool.get(record.id)
    assert held is not None and held.state == "held" and held.held_at == 2.0


def test_storage_errors_say_full_or_failed_and_carry_no_path() -> None:
    """ENOSPC and EDQUOT (and SQLITE_FULL) are a full disk; EIO (and SQLITE_IOERR) a
    failing one; other errors, such as a constraint, pass through as they are."""
    full = storage_error(OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(full, StorageFull) and is_disk_full(full)
    assert isinstance(storage_error(OSError(errno.EDQUOT, "quota")), StorageFull)
    failed = storage_error(OSError(errno.EIO, "Input/output error"))
    assert isinstance(failed, StorageFailed) and not is_disk_full(failed)
    sqlite_full = sqlite_error_for(OSError(errno.ENOSPC, "x"))
    assert str(sqlite_full) == "database or disk is full"
    assert isinstance(storage_error(sqlite_full), StorageFull)
    assert isinstance(storage_error(sqlite_error_for(OSError(errno.EIO, "x"))), StorageFailed)
    constraint = sqlite3.IntegrityError("UNIQUE constraint failed")
    assert storage_error(constraint) is constraint
