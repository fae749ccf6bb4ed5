"""Every node runs a sweeper over the shared spool: two nodes sweeping the same due
records at once erase each once and record each once, one ledger entry per destroyed
key epoch, whichever node made the epoch; the chain verifies. The erasure lock of the
shared ledger (:class:`gateway.retention.shared_ledger.SharedLedger`) is released by
the end of its block, by a waiter that is cancelled, and names no DSN when the server
refuses it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import traceback
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import until

from gateway.crypto.keystore import epoch_end, epoch_of
from gateway.crypto.pgkeystore import PgKeyStore, keystore_state
from gateway.errors import StorageUnavailable
from gateway.ops.metrics import Metrics
from gateway.retention.shared_ledger import ERASURE_LOCK, SharedLedger
from gateway.retention.sweeper import Exclusive, Sweeper
from gateway.spool.pgstore import PgSpool
from gateway.spool.records import Due, NewRecord, new_submission_id

DAY = 86400.0
T0 = 1_800_000_000.0  # 2027-01-15 17:00 JST
RECORDS = 40


@dataclass
class Clock:
    now: float = T0

    def __call__(self) -> float:
        return self.now


class Rendezvous(PgSpool):
    """A real node whose first look for due records waits until the other node has
    looked too: both then hold the same due records when they start erasing."""

    barrier: asyncio.Barrier | None = None

    async def due(self, now: float, limit: int = 1000) -> list[Due]:
        found = await super().due(now, limit)
        barrier, self.barrier = self.barrier, None
        if barrier is not None:
            await barrier.wait()
        return found


@dataclass
class Node:
    spool: Rendezvous
    keys: PgKeyStore
    ledger: SharedLedger
    sweeper: Sweeper


@dataclass
class Cluster:
    tmp: Path
    dsn: str
    clock: Clock = field(default_factory=Clock)
    master: bytes = field(default_factory=lambda: os.urandom(32))
    nodes: list[Node] = field(default_factory=list)

    async def node(self, name: str) -> Node:
        keys = PgKeyStore(self.dsn, self.master)
        spool = Rendezvous(
            self.tmp / name, self.master, dsn=self.dsn, node_id=name, keys=keys, clock=self.clock
        )
        await spool.open()
        ledger = SharedLedger(self.dsn, clock=self.clock)
        sweeper = Sweeper(spool, ledger, Metrics(), clock=self.clock, interval=60.0)
        node = Node(spool, keys, ledger, sweeper)
        self.nodes.append(node)
        return node

    def sql(self, query: str, *params: object) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []


@pytest.fixture
async def cluster(tmp_path: Path, pg_dsn: str) -> AsyncIterator[Cluster]:
    box = Cluster(tmp_path, pg_dsn)
    yield box
    for node in box.nodes:
        await node.sweeper.close()
        await node.spool.close()


async def put(spool: PgSpool, received_at: float) -> str:
    data = os.urandom(300)
    pending = await spool.create(new_submission_id())
    pending.write(data)
    record = await spool.commit(
        pending,
        NewRecord(
            channel="online-application",
            destination="dnp-relay",
            device_id="tablet-01",
            user_id="staff-001",
            received_at=received_at,
            expires_at=received_at + 7 * DAY,
            content_type="multipart/form-data; boundary=gw-test",
            body_sha256=hashlib.sha256(data).hexdigest(),
            content_sha256=hashlib.sha256(b"content" + data).hexdigest(),
            field_names=("application_id",),
            idempotency_key=None,
        ),
    )
    return record.id


def test_the_shared_ledger_offers_the_lock_the_sweeper_looks_for(pg_dsn: str) -> None:
    assert isinstance(SharedLedger(pg_dsn), Exclusive)


async def test_two_sweepers_erase_and_record_each_record_and_epoch_once(
    cluster: Cluster,
) -> None:
    a, b = await cluster.node("a"), await cluster.node("b")
    received = T0 - 8 * DAY  # expired a day ago; its epoch's day is over
    ids = [await put(a.spool if n % 2 else b.spool, received + n) for n in range(RECORDS)]
    epoch = epoch_of(received + 7 * DAY)
    assert epoch_end(epoch) < T0
    barrier = asyncio.Barrier(2)
    a.spool.barrier = b.spool.barrier = barrier
    erased = await asyncio.gather(a.sweeper.sweep(), b.sweeper.sweep())
    assert sum(erased) == RECORDS  # each record erased by one node
    entries = list(a.ledger.entries())
    assert a.ledger.verify() == len(entries) == RECORDS + 1
    recorded = Counter(e.body.get("submission_id") for e in entries if "submission_id" in e.body)
    assert set(recorded) == set(ids) and set(recorded.values()) == {1}
    assert {e.body["reason"] for e in entries if "submission_id" in e.body} == {
        "expired_undelivered"
    }
    destroyed = [e.body for e in entries if e.body.get("event") == "key_epoch_destroyed"]
    assert [d["key_epoch"] for d in destroyed] == [epoch]
    assert entries[-1].body == destroyed[0]  # after its records, as the ledger goes
    assert keystore_state(cluster.dsn).destroyed == [epoch]
    live = cluster.sql("SELECT count(*) FROM gateway.records WHERE wrapped_key IS NOT NULL")
    assert live == [(0,)]
    # The epoch's row was vacuumed out of the keystore's table after its destruction.
    assert cluster.sql(
        "SELECT last_vacuum IS NOT NULL FROM pg_stat_user_tables "
        "WHERE schemaname = 'gateway_keys' AND relname = 'epoch_keys'"
    ) == [(True,)]


async def test_epochs_another_node_made_are_destroyed_once_by_one_node(
    cluster: Cluster,
) -> None:
    """Node a made three epochs (b never saw them made): both nodes judge them at once;
    each epoch is destroyed by exactly one, with one ledger entry."""
    a, b = await cluster.node("a"), await cluster.node("b")
    epochs = [epoch_of(T0 - n * DAY) for n in (5, 4, 3)]
    for epoch in epochs:
        a.keys.key_for(epoch)
    assert not set(epochs) & set(b.keys.live())
    now = T0
    by_a, by_b = await asyncio.gather(a.sweeper.destroy_epochs(now), b.sweeper.destroy_epochs(now))
    assert not set(by_a) & set(by_b)
    assert sorted(by_a + by_b) == epochs
    bodies = [e.body for e in a.ledger.entries()]
    assert sorted(body["key_epoch"] for body in bodies) == epochs
    assert {body["event"] for body in bodies} == {"key_epoch_destroyed"}
    assert a.keys.destroyed() == b.keys.destroyed() == epochs  # both views refreshed
    # A later sweep of either node finds nothing left to destroy or record.
    assert await a.sweeper.destroy_epochs(now + DAY) == []
    assert await b.sweeper.destroy_epochs(now + DAY) == []
    assert a.ledger.verify() == len(epochs)


async def test_an_erasure_another_node_made_meanwhile_is_not_recorded_again(
    cluster: Cluster,
) -> None:
    """b erases (ledger first) while a waits for the lock holding the same record: a
    then finds it erased, and records nothing."""
    a, b = await cluster.node("a"), await cluster.node("b")
    record_id = await put(a.spool, T0)
    async with b.ledger.exclusive():
        waiting = asyncio.create_task(a.sweeper.erase_by_operator(record_id))
        await until(lambda: waits_for_lock(cluster) == 1)
        # b's own sweeper cannot take the lock while this block holds it: erase directly
        [due] = await b.spool.describe_many([record_id])
        b.ledger.append_many([{"submission_id": due.submission_id, "reason": "operator"}])
        await b.spool.erase([record_id], reason="operator", at=T0)
    assert await waiting is False
    assert [e.body["submission_id"] for e in a.ledger.entries()] == [record_id]


def waits_for_lock(cluster: Cluster) -> int:
    """How many sessions wait for the erasure lock now."""
    rows = cluster.sql(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
        "AND ((classid::bigint << 32) | objid::bigint) = %s",
        ERASURE_LOCK,
    )
    return int(rows[0][0])


async def test_a_waiter_cancelled_leaves_the_lock_free(cluster: Cluster) -> None:
    first, second, third = (SharedLedger(cluster.dsn) for _ in range(3))
    try:
        async with first.exclusive():
            entered = asyncio.Event()

            async def take() -> None:
                async with second.exclusive():
                    entered.set()

            waiter = asyncio.create_task(take())
            await until(lambda: waits_for_lock(cluster) == 1)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert not entered.is_set()
            assert waits_for_lock(cluster) == 0
        async with asyncio.timeout(10):
            async with third.exclusive():  # free: nobody kept it
                assert waits_for_lock(cluster) == 0
            async with second.exclusive():  # the cancelled one connects again
                pass
    finally:
        for ledger in (first, second, third):
            await ledger.aclose()


async def test_a_refused_connection_is_storage_unavailable_without_the_dsn(
    cluster: Cluster,
) -> None:
    password = cluster.dsn.split("password=")[1].split()[0]
    wrong = cluster.dsn.replace(password, "PLANTED-wrong-password-55")
    ledger = SharedLedger(wrong)
    with pytest.raises(StorageUnavailable) as refused:
        async with ledger.exclusive():
            pytest.fail("entered without the lock")
    shown = "".join(traceback.format_exception(refused.value))
    assert "PLANTED" not in shown and password not in shown
    await ledger.aclose()


async def test_a_lock_held_too_long_elsewhere_fails_the_wait_as_unavailable(
    cluster: Cluster,
) -> None:
    """A node frozen with the lock (its connection open) does not stop the others'
    erasures for ever: their wait ends (lock_timeout) with StorageUnavailable."""
    frozen, waiting = SharedLedger(cluster.dsn), SharedLedger(cluster.dsn, lock_wait=0.2)
    try:
        async with frozen.exclusive():
            with pytest.raises(StorageUnavailable, match="LockNotAvailable"):
                async with waiting.exclusive():
                    pytest.fail("entered while another node held the lock")
        async with waiting.exclusive():  # free again: taken at once
            pass
    finally:
        await frozen.aclose()
        await waiting.aclose()


async def test_a_lock_connection_the_server_dropped_is_replaced(cluster: Cluster) -> None:
    ledger = SharedLedger(cluster.dsn)
    try:
        async with ledger.exclusive():
            pass
        cluster.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        async with ledger.exclusive():  # a new connection, without an error
            assert waits_for_lock(cluster) == 0
    finally:
        await ledger.aclose()
