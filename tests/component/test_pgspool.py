"""The shared spool on PostgreSQL: two nodes on one database (leases, concurrent
erasure, group commit, idempotency across nodes), its tables, its errors, and an
outage of the server that the same spool outlives."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import traceback
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from gateway.crypto.keystore import KeyStore, epoch_of
from gateway.errors import KeyEpochGone, SpoolError, StorageUnavailable
from gateway.spool.backend import SpoolBackend
from gateway.spool.pgstore import PgSpool
from gateway.spool.records import (
    DuplicateIdempotencyKey,
    NewRecord,
    Record,
    RecoveryReport,
    new_submission_id,
)
from gateway.testing.postgres import Postgres

MARKER = b"PLANTED-983205673214-\xe6\x96\xb0\xe5\xae\xbf"  # a 個人番号 and 新宿
PLANTED_DEVICE = "tablet-PLANTED-983205673214"
T0 = 1_800_000_000.0
LEASE = 60.0


@dataclass
class FakeClock:
    now: float = T0

    def __call__(self) -> float:
        return self.now


class Ticks:
    """A sleep that returns when the test says so (one tick per call)."""

    def __init__(self) -> None:
        self.asked: list[float] = []
        self._ticks: asyncio.Queue[None] = asyncio.Queue()
        self._asked = asyncio.Condition()

    async def __call__(self, seconds: float) -> None:
        async with self._asked:
            self.asked.append(seconds)
            self._asked.notify_all()
        await self._ticks.get()

    def tick(self) -> None:
        self._ticks.put_nowait(None)

    async def asked_times(self, count: int) -> None:
        """Until the sleeper has asked to sleep ``count`` times (its work in between done)."""
        async with asyncio.timeout(10), self._asked:
            await self._asked.wait_for(lambda: len(self.asked) >= count)


@dataclass
class Cluster:
    """Nodes sharing one database and one keystore object."""

    tmp: Path
    dsn: str
    master: bytes = field(default_factory=lambda: os.urandom(32))
    keys: KeyStore | None = None
    nodes: list[PgSpool] = field(default_factory=list)
    clocks: dict[str, FakeClock] = field(default_factory=dict)
    reports: dict[str, RecoveryReport] = field(default_factory=dict)

    async def node(self, name: str, **kwargs: object) -> PgSpool:
        if self.keys is None:
            self.keys = KeyStore(self.tmp / "keystore", self.master)
        clock = self.clocks.setdefault(name, FakeClock())
        spool = PgSpool(
            self.tmp / f"stage-{name}-{len(self.nodes)}",
            self.master,
            dsn=self.dsn,
            node_id=name,
            keys=self.keys,
            clock=clock,
            lease_seconds=LEASE,
            **kwargs,  # type: ignore[arg-type]
        )
        self.reports[name] = await spool.open()
        self.nodes.append(spool)
        return spool

    async def close(self, spool: PgSpool) -> None:
        await spool.close()
        self.nodes.remove(spool)

    def sql(self, query: str, *params: object) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []


@pytest.fixture
async def cluster(tmp_path: Path, pg_dsn: str) -> AsyncIterator[Cluster]:
    box = Cluster(tmp_path, pg_dsn)
    yield box
    for spool in list(box.nodes):
        await spool.close()


def meta(
    *,
    received_at: float = T0,
    key: str | None = None,
    device_id: str = "tablet-01",
    body: bytes = b"",
) -> NewRecord:
    return NewRecord(
        channel="online-application",
        destination="dnp-relay",
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


async def put(
    spool: PgSpool, data: bytes = b"", *, access: str | None = None, **kwargs: object
) -> Record:
    data = data or MARKER + os.urandom(500)
    pending = await spool.create(new_submission_id())
    committed = False
    try:
        pending.write(data)
        record = await spool.commit(pending, meta(body=data, **kwargs), access=access)  # type: ignore[arg-type]
        committed = True
        return record
    finally:
        if not committed:
            spool.discard(pending)


def staged(spool: PgSpool) -> list[Path]:
    return sorted((spool.directory / "incoming").iterdir())


def text_of(error: BaseException) -> str:
    """What a log of ``error`` would print of it: the message of each exception of its
    chain, as ``traceback`` shows the chain (the source lines are the tests' own)."""
    shown = traceback.TracebackException.from_exception(error)
    parts: list[str] = []
    link: traceback.TracebackException | None = shown
    while link is not None:
        parts.extend(link.format_exception_only())
        link = link.__cause__ or (None if link.__suppress_context__ else link.__context__)
    return "".join(parts)


def test_pgspool_is_a_spool_backend() -> None:
    """PgSpool offers the whole interface (mypy checks this assignment too)."""

    def as_backend(spool: PgSpool) -> SpoolBackend:
        return spool

    assert as_backend.__name__ == "as_backend" and PgSpool.shared


# ---------------------------------------------------------------- leases


async def test_a_live_lease_keeps_other_nodes_out_until_it_lapses(cluster: Cluster) -> None:
    """A record claimed by a is not claimable by b while a's lease lives; once b's clock
    passes it, b takes it over, and a's renewal finds it lost. a's late outcome changes
    nothing once b delivered it."""
    a, b = await cluster.node("a"), await cluster.node("b")
    record = await put(a)
    assert await b.queued_ids("dnp-relay") == [record.id]
    assert await a.claim(record.id)
    assert not await b.claim(record.id)
    assert await b.queued_ids("dnp-relay") == []
    assert await a.queued_ids("dnp-relay") == [record.id]  # its own claim
    seen = await b.get(record.id)
    assert seen is not None and seen.state == "delivering"

    cluster.clocks["b"].now = T0 + LEASE - 1
    assert not await b.claim(record.id)
    cluster.clocks["b"].now = T0 + LEASE + 1
    assert await b.queued_ids("dnp-relay") == [record.id]
    assert await b.claim(record.id)
    assert (b.claims_taken_over, b.delivering) == (1, 1)

    assert await a.renew_leases() == [record.id]
    assert (a.leases_lost, a.delivering) == (1, 0)
    await b.mark_delivered(record.id, at=T0 + 70, receipt="from-b")
    await a.mark_delivered(record.id, at=T0 + 80, receipt="from-a")
    await a.mark_held(record.id, at=T0 + 81, reason="late")
    done = await a.get(record.id)
    assert done is not None
    assert (done.state, done.delivered_at, done.upstream_receipt) == (
        "delivered",
        T0 + 70,
        "from-b",
    )
    assert b.delivering == 0
    assert cluster.sql("SELECT claimed_by FROM gateway.records") == [(None,)]


async def test_renewal_keeps_a_lease_alive(cluster: Cluster) -> None:
    """The renewal task (its sleep injected) pushes the lease on, so a claim outlives
    its first lease while the node lives; release clears it for everyone."""
    ticks = Ticks()
    a = await cluster.node("a", sleep=ticks)
    b = await cluster.node("b")
    record = await put(a)
    assert await a.claim(record.id)
    cluster.clocks["a"].now = T0 + 50
    await ticks.asked_times(1)
    ticks.tick()
    await ticks.asked_times(2)  # asleep again: the renewal in between is done
    assert a.leases_renewed == 1 and ticks.asked == [LEASE / 3, LEASE / 3]
    ((until,),) = cluster.sql("SELECT lease_until FROM gateway.records")
    assert until == T0 + 50 + LEASE
    cluster.clocks["b"].now = T0 + LEASE + 30
    assert not await b.claim(record.id)
    await a.release(record.id)
    assert await b.claim(record.id)
    assert b.claims_taken_over == 0  # released, not taken over


async def test_a_restarted_node_releases_only_its_own_claims(cluster: Cluster) -> None:
    """A node starting again (its previous run died holding claims) releases those
    claims, and leaves other nodes' alone."""
    a, b = await cluster.node("a"), await cluster.node("b")
    mine, theirs = await put(a), await put(a)
    assert await a.claim(mine.id) and await b.claim(theirs.id)
    again = await cluster.node("a")  # a's next run, while the dead one's rows say "a"
    assert cluster.reports["a"].requeued == 1
    rows = dict(cluster.sql("SELECT id, claimed_by FROM gateway.records"))
    assert rows == {mine.id: None, theirs.id: "b"}
    assert await again.claim(mine.id) and not await again.claim(theirs.id)


async def test_concurrent_erasure_erases_each_record_once(cluster: Cluster) -> None:
    """Two nodes' sweepers erasing the same 50 records at once: each record is in
    exactly one of their results, and no ciphertext is left."""
    a, b = await cluster.node("a"), await cluster.node("b")
    records = await asyncio.gather(*(put(a) for _ in range(50)))
    ids = [r.id for r in records]
    assert await b.claim(ids[0])
    first, second = await asyncio.gather(
        a.erase(ids, reason="retention", at=T0 + 1),
        b.erase(list(reversed(ids)), reason="retention", at=T0 + 1),
    )
    got_a, got_b = {e.submission_id for e in first}, {e.submission_id for e in second}
    assert not got_a & got_b
    assert got_a | got_b == set(ids)
    assert len(first) + len(second) == 50
    assert cluster.sql("SELECT count(*) FROM gateway.record_chunks") == [(0,)]
    assert cluster.sql(
        "SELECT count(*) FROM gateway.records "
        "WHERE wrapped_key IS NOT NULL OR claimed_by IS NOT NULL"
    ) == [(0,)]
    # b's claim went with the erasure, whichever node erased it: dropped, not "lost"
    assert await b.renew_leases() == []
    assert (b.delivering, b.leases_lost) == (0, 0)


# ------------------------------------------------------------ group commit


async def test_concurrent_commits_share_transactions(cluster: Cluster) -> None:
    """20 concurrent commits go in fewer than 20 transactions, each answered only
    after its transaction committed; the staging files are gone."""
    a = await cluster.node("a")
    before = a.commit_batches
    records = await asyncio.gather(*(put(a, access=f'{{"n": {n}}}') for n in range(20)))
    assert a.commit_batches - before < 20
    assert a.committed_records == 20 and a.largest_commit_batch > 1
    assert cluster.sql("SELECT count(*) FROM gateway.records") == [(20,)]
    assert [seq for seq, _ in await a.pending_access(100)] == list(range(1, 21))
    assert staged(a) == []
    for record in records[:3]:
        assert MARKER in b"".join(await a.open_plaintext(record))


async def test_a_duplicate_in_a_batch_fails_alone_and_numbers_stay_continuous(
    cluster: Cluster,
) -> None:
    """One duplicate Idempotency-Key in a group fails only its own commit (its savepoint);
    the others commit, and their access entries are numbered without a gap."""
    a = await cluster.node("a")
    await put(a, key="k-dup")
    before = a.commit_batches
    outcomes = await asyncio.gather(
        *(put(a, key=f"k-{n}", access=f'{{"n": {n}}}') for n in range(4)),
        put(a, key="k-dup", access='{"dup": true}'),
        *(put(a, key=f"k-{n}", access=f'{{"n": {n}}}') for n in range(4, 8)),
        return_exceptions=True,
    )
    assert a.commit_batches - before <= 2
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(failed) == 1 and isinstance(failed[0], DuplicateIdempotencyKey)
    pending = await a.pending_access(100)
    assert [seq for seq, _ in pending] == list(range(1, 9))
    assert '{"dup": true}' not in {body for _, body in pending}
    assert staged(a) == []


async def test_idempotency_keys_are_unique_across_nodes(cluster: Cluster) -> None:
    """A key a node committed is refused at another node, which finds the first record;
    the nodes share one keystore, so they make the same tokens."""
    a, b = await cluster.node("a"), await cluster.node("b")
    token = a.idempotency_token("tablet-01", "online-application", "key-1")
    assert token == b.idempotency_token("tablet-01", "online-application", "key-1")
    first = await put(a, key=token)
    with pytest.raises(DuplicateIdempotencyKey):
        await put(b, key=token)
    assert await b.find_idempotent("tablet-01", token) == first
    assert staged(b) == []


async def test_nodes_see_each_others_records_and_counts(cluster: Cluster) -> None:
    """A record one node committed is read and delivered by another; the other node's
    counters include it after refresh_stats."""
    a, b = await cluster.node("a"), await cluster.node("b")
    data = MARKER + os.urandom(2_000_000)
    record = await put(a, data)
    assert b.counts["queued"] == 0
    await b.refresh_stats()
    assert b.counts["queued"] == 1 and b.bytes == record.ciphertext_size
    assert b.oldest_queued_at == T0
    assert b"".join(await b.open_plaintext(record)) == data
    assert staged(b) == []  # the large record's temporary copy went with its reader
    assert await b.claim(record.id)
    await b.mark_delivered(record.id, at=T0 + 1, receipt=None)
    await a.refresh_stats()
    assert a.counts["delivered"] == 1 and a.counts["queued"] == 0


async def test_each_node_numbers_its_own_access_entries(cluster: Cluster) -> None:
    """Access entries are per node: each node numbers its own from 1, sees only its own,
    and goes on after its highest number when it starts again."""
    a, b = await cluster.node("a"), await cluster.node("b")
    assert [await a.record_access("a1"), await a.record_access("a2")] == [1, 2]
    assert await b.record_access("b1") == 1
    assert await a.pending_access(10) == [(1, "a1"), (2, "a2")]
    assert await b.pending_access(10) == [(1, "b1")]
    await b.forget_access(1)
    assert await a.pending_access(10) == [(1, "a1"), (2, "a2")]
    await cluster.close(a)
    again = await cluster.node("a")
    assert await again.record_access("a3") == 3


# ------------------------------------------------------------ tables, keys


async def test_ciphertext_is_stored_in_256_kib_chunks_without_plaintext(cluster: Cluster) -> None:
    """A 1.4 MB record is six chunks of at most 256 KiB, stored uncompressed out of
    line; no row of the database holds the planted plaintext."""
    a = await cluster.node("a")
    data = MARKER + os.urandom(1_400_000) + MARKER
    record = await put(a, data)
    sizes = cluster.sql(
        "SELECT seq, length(data) FROM gateway.record_chunks WHERE record_id=%s ORDER BY seq",
        record.id,
    )
    assert [s for s, _ in sizes] == list(range(6))
    assert all(n == 256 * 1024 for _, n in sizes[:-1])
    assert sum(n for _, n in sizes) == record.ciphertext_size
    assert cluster.sql(
        "SELECT attstorage FROM pg_attribute WHERE attname='data' "
        "AND attrelid='gateway.record_chunks'::regclass"
    ) == [("e",)]
    ciphertext = b"".join(
        bytes(c)
        for (c,) in cluster.sql(
            "SELECT data FROM gateway.record_chunks WHERE record_id=%s ORDER BY seq", record.id
        )
    )
    assert hashlib.sha256(ciphertext).hexdigest() == record.ciphertext_sha256
    assert MARKER not in ciphertext
    rows = cluster.sql("SELECT r::text FROM gateway.records r")
    assert MARKER.decode("utf-8", "replace") not in str(rows)


async def test_a_destroyed_epoch_holds_its_queued_records(cluster: Cluster) -> None:
    """A queued record whose epoch key is destroyed cannot be read (KeyEpochGone, and it
    is held); at the next start every such queued record is held too."""
    a = await cluster.node("a")
    first, second = await put(a), await put(a)
    assert cluster.keys is not None
    cluster.keys.destroy(epoch_of(first.expires_at))
    with pytest.raises(KeyEpochGone):
        await a.open_plaintext(first)
    held = await a.get(first.id)
    assert held is not None and held.state == "held"
    await cluster.close(a)
    again = await cluster.node("a")
    report = await again.get(second.id)
    assert report is not None and report.state == "held"
    assert report.last_error is not None and "destroyed" in report.last_error


class LateKeys:
    """A node's view of a shared keystore that learns of the epochs other nodes made
    only when refreshed (as :class:`gateway.crypto.pgkeystore.PgKeyStore` between two
    refreshes); the keystore itself is another node's, already open."""

    def __init__(self, shared: KeyStore) -> None:
        self._shared = shared
        self._known: set[str] = set()
        self.refreshes = 0

    def open(self) -> None:
        self._known = set(self._shared.live())

    def close(self) -> None:
        pass

    def refresh(self) -> None:
        self.refreshes += 1
        self._known = set(self._shared.live())

    @property
    def idempotency_key(self) -> bytes:
        return self._shared.idempotency_key

    def idempotency_token(self, device_id: str, channel: str, key: str) -> str:
        return self._shared.idempotency_token(device_id, channel, key)

    def holds(self, epoch: str) -> bool:
        return epoch in self._known

    def get(self, epoch: str) -> bytes | None:
        return self._shared.get(epoch) if epoch in self._known else None

    def key_for(self, epoch: str) -> bytes:
        self._known.add(epoch)
        return self._shared.key_for(epoch)

    def live(self) -> list[str]:
        return sorted(self._known & set(self._shared.live()))

    def destroyed(self) -> list[str]:
        return self._shared.destroyed()

    def is_destroyed(self, epoch: str) -> bool:
        return self._shared.is_destroyed(epoch)

    def destroy(self, epoch: str) -> bool:
        return self._shared.destroy(epoch)


async def test_a_key_another_node_made_is_found_by_refreshing(cluster: Cluster) -> None:
    """A node reading a record of an epoch another node made refreshes its keystore
    (on a thread) before it would call the epoch gone; a destroyed epoch is not looked
    for again."""
    a = await cluster.node("a")
    assert cluster.keys is not None
    late = LateKeys(cluster.keys)
    b = PgSpool(cluster.tmp / "late", cluster.master, dsn=cluster.dsn, node_id="b", keys=late)
    await b.open()
    cluster.nodes.append(b)
    record = await put(a)
    assert epoch_of(record.expires_at) not in late.live()
    assert MARKER in b"".join(await b.open_plaintext(record))
    assert late.refreshes == 1
    assert MARKER in b"".join(await b.open_plaintext(record))
    assert late.refreshes == 1
    cluster.keys.destroy(epoch_of(record.expires_at))
    with pytest.raises(KeyEpochGone):
        await b.open_plaintext(record)
    assert late.refreshes == 1


async def test_an_open_that_cannot_connect_fails_cleanly(cluster: Cluster) -> None:
    """A wrong password fails open() with StorageUnavailable (no password in it), and
    leaves the staging directory and the keystore free for the next attempt."""
    password = cluster.dsn.split("password=")[1].split()[0]
    wrong = cluster.dsn.replace(password, "PLANTED-wrong-password")
    keys = KeyStore(cluster.tmp / "keystore", cluster.master)
    spool = PgSpool(
        cluster.tmp / "stage", cluster.master, dsn=wrong, node_id="a", keys=keys, pool_timeout=1
    )
    with pytest.raises(StorageUnavailable) as refused:
        await spool.open()
    assert "PLANTED" not in text_of(refused.value) and password not in text_of(refused.value)
    again = PgSpool(cluster.tmp / "stage", cluster.master, dsn=cluster.dsn, node_id="a", keys=keys)
    await again.open()
    cluster.nodes.append(again)
    assert (await put(again)).state == "queued"


async def test_a_restart_removes_staging_files_and_the_directory_is_locked(
    cluster: Cluster,
) -> None:
    """Uploads a node was receiving when it stopped are removed at its next start; a
    second process cannot use a staging directory in use."""
    a = await cluster.node("a")
    pending = await a.create(new_submission_id())
    pending.write(MARKER)
    pending.finish()
    directory = a.directory
    await cluster.close(a)
    keys = KeyStore(cluster.tmp / "other-keystore", cluster.master)
    spool = PgSpool(directory, cluster.master, dsn=cluster.dsn, node_id="a", keys=keys)
    report = await spool.open()
    cluster.nodes.append(spool)
    assert report.orphans_removed == 1 and staged(spool) == []
    intruder = PgSpool(directory, cluster.master, dsn=cluster.dsn, node_id="z", keys=keys)
    with pytest.raises(SpoolError, match="in use"):
        await intruder.open()


async def test_cancelled_commits_never_leave_a_partial_record(cluster: Cluster) -> None:
    """Callers cancelled after 0..30 loop turns: every committed row has all its chunks
    and decrypts, and no staging file is left."""
    a = await cluster.node("a")
    tasks = []
    for turns in range(30):
        task = asyncio.create_task(put(a, MARKER + os.urandom(300_000)))
        for _ in range(turns):
            await asyncio.sleep(0)
        task.cancel()
        tasks.append(task)
    await asyncio.gather(*tasks, return_exceptions=True)
    for (record_id,) in cluster.sql("SELECT id FROM gateway.records"):
        record = await a.get(str(record_id))
        assert record is not None
        assert MARKER in b"".join(await a.open_plaintext(record))
    assert staged(a) == []


async def test_errors_name_no_value_and_no_dsn(cluster: Cluster) -> None:
    """A refused row (a duplicate key, a duplicate id) raises an error whose text,
    traceback included, names neither the row's values nor the database password."""
    a = await cluster.node("a")
    token = "PLANTED-token-983205673214"
    record = await put(a, key=token, device_id=PLANTED_DEVICE)
    with pytest.raises(DuplicateIdempotencyKey) as duplicate:
        await put(a, key=token, device_id=PLANTED_DEVICE)
    again = a.begin(record.id)  # the same id again: the primary key refuses it
    again.write(MARKER)
    with pytest.raises(SpoolError) as clash:
        await a.commit(again, meta(device_id=PLANTED_DEVICE))
    assert not isinstance(clash.value, DuplicateIdempotencyKey)
    assert staged(a) == []
    password = cluster.dsn.split("password=")[1].split()[0]
    for error in (duplicate.value, clash.value):
        text = text_of(error)
        for secret in (token, PLANTED_DEVICE, record.id, password):
            assert secret not in text
    assert password not in repr(a)


# ------------------------------------------------------------------ outage


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[Postgres]:
    """A server of this module's own, which the outage test stops and starts."""
    with Postgres() as server:
        yield server


async def test_an_outage_is_a_quick_error_and_the_same_spool_recovers(
    private_postgres: Postgres, tmp_path: Path
) -> None:
    """With the server down a commit fails with StorageUnavailable within seconds and
    leaves no staging file; once the server is back the same spool commits again."""
    dsn = private_postgres.new_database()
    master = os.urandom(32)
    spool = PgSpool(
        tmp_path / "stage",
        master,
        dsn=dsn,
        node_id="a",
        keys=KeyStore(tmp_path / "ks", master),
        pool_timeout=1.0,
    )
    await spool.open()
    try:
        before = await put(spool)
        private_postgres.stop(mode="immediate")
        try:
            started = time.monotonic()
            with pytest.raises(StorageUnavailable) as raised:
                await put(spool, key="PLANTED-key")
            assert time.monotonic() - started < 6
            assert isinstance(raised.value, SpoolError)
            assert staged(spool) == []
            with pytest.raises(StorageUnavailable):
                await spool.check()
            with pytest.raises(StorageUnavailable):
                await spool.get(before.id)
            text = text_of(raised.value)
            assert private_postgres.password not in text
            assert "PLANTED" not in text
        finally:
            private_postgres.restart()
        after = await put(spool)
        await spool.check()
        assert await spool.get(after.id) == after
        assert await spool.get(before.id) == before
        assert spool.pool_stats()["pool_max"] >= 2
    finally:
        await spool.close()
