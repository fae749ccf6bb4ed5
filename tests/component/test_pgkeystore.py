"""The epoch keystore in PostgreSQL: one key per epoch whatever the number of nodes,
destroyed exactly once, bound to its epoch and its master key, and a master-key
rotation that is one transaction and waits for every node to stop."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, TypeVar

import psycopg
import pytest

from gateway import pgutil
from gateway.crypto.keystore import first_idempotency_key, master_key_id
from gateway.crypto.pgkeystore import (
    ROTATION_REFUSED,
    PgKeyStore,
    keystore_state,
    vacuum_keystore,
)
from gateway.errors import KeystoreError, StorageUnavailable

EPOCHS = ("2026-12-01", "2026-12-02", "2026-12-08")
T = TypeVar("T")


@pytest.fixture
def stores(pg_dsn: str) -> Iterator[Callable[[bytes], PgKeyStore]]:
    """Open keystores on the test's database (closed at the end)."""
    made: list[PgKeyStore] = []

    def open_store(master: bytes) -> PgKeyStore:
        store = PgKeyStore(pg_dsn, master)
        made.append(store)
        store.open()
        return store

    yield open_store
    for store in made:
        store.close()


def together(*calls: Callable[[], T]) -> list[T]:
    """Run the calls on threads released at the same moment; their results in order."""
    start = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(index: int, call: Callable[[], T]) -> None:
        start.wait()
        try:
            results[index] = call()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def rows(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql).fetchall()


def test_keys_are_made_once_sealed_and_the_same_when_opened_again(
    pg_dsn: str, stores: Callable[[bytes], PgKeyStore]
) -> None:
    assert pgutil.KEYS_SCHEMA == "gateway_keys"
    master = os.urandom(32)
    store = stores(master)
    assert store.live() == [] and store.destroyed() == []
    assert store.idempotency_key == first_idempotency_key(master)
    keys = {e: store.key_for(e) for e in EPOCHS}
    assert store.key_for(EPOCHS[0]) == keys[EPOCHS[0]]
    assert store.get("2026-12-03") is None
    with pytest.raises(ValueError, match="not an epoch"):
        store.key_for("tomorrow")
    store.close()
    again = stores(master)
    assert {e: again.get(e) for e in again.live()} == keys
    assert again.idempotency_key == first_idempotency_key(master)
    # Sealed, never in the clear; the master key is in no row.
    stored = b"".join(
        bytes(s)
        for (s,) in rows(pg_dsn, "SELECT sealed FROM gateway_keys.epoch_keys")
        + rows(pg_dsn, "SELECT idempotency FROM gateway_keys.current")
    )
    assert not any(key in stored for key in [*keys.values(), again.idempotency_key, master])
    assert rows(pg_dsn, "SELECT master_kid FROM gateway_keys.current") == [(master_key_id(master),)]
    assert keystore_state(pg_dsn) == (master_key_id(master), list(EPOCHS), [])


def test_two_nodes_making_the_same_epochs_at_once_agree_on_one_key_each(
    stores: Callable[[bytes], PgKeyStore],
) -> None:
    master = os.urandom(32)
    first, second = stores(master), stores(master)
    epochs = [f"2026-11-{day:02d}" for day in range(1, 21)]
    for epoch in epochs:
        mine, theirs = together(partial(first.key_for, epoch), partial(second.key_for, epoch))
        assert mine == theirs, epoch
    assert first.live() == second.live() == epochs


def test_the_wrong_master_key_is_refused_naming_both_ids(
    pg_dsn: str, stores: Callable[[bytes], PgKeyStore]
) -> None:
    master, other = os.urandom(32), os.urandom(32)
    stores(master).key_for(EPOCHS[0])
    with pytest.raises(KeystoreError) as wrong:
        stores(other)
    message = str(wrong.value)
    assert master_key_id(master) in message and master_key_id(other) in message
    assert master.hex() not in message and other.hex() not in message


def test_a_row_copied_to_another_epoch_does_not_open(
    pg_dsn: str, stores: Callable[[bytes], PgKeyStore]
) -> None:
    master = os.urandom(32)
    stores(master).key_for(EPOCHS[0])
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO gateway_keys.epoch_keys SELECT '2026-12-03', master_kid, sealed "
            "FROM gateway_keys.epoch_keys WHERE epoch = %s",
            (EPOCHS[0],),
        )
    with pytest.raises(KeystoreError, match=r"epoch-2026-12-03 .* does not open"):
        stores(master)


def test_an_epoch_is_destroyed_exactly_once_across_nodes(
    pg_dsn: str, stores: Callable[[bytes], PgKeyStore]
) -> None:
    master = os.urandom(32)
    first, second = stores(master), stores(master)
    epochs = [f"2026-10-{day:02d}" for day in range(1, 11)]
    for epoch in epochs:
        first.key_for(epoch)
    second.refresh()
    for epoch in epochs:
        told = together(partial(first.destroy, epoch), partial(second.destroy, epoch))
        assert sorted(told) == [False, True], epoch
    for store in (first, second):
        assert store.live() == [] and store.destroyed() == epochs
        assert store.get(epochs[0]) is None and store.is_destroyed(epochs[0])
        with pytest.raises(KeystoreError, match="destroyed"):
            store.key_for(epochs[0])
    assert rows(pg_dsn, "SELECT count(*) FROM gateway_keys.epoch_keys") == [(0,)]
    tombstones = rows(pg_dsn, "SELECT epoch, destroyed_at FROM gateway_keys.destroyed")
    assert sorted(e for e, _ in tombstones) == epochs and all(at for _, at in tombstones)
    assert keystore_state(pg_dsn).destroyed == epochs
    first.vacuum()


def test_a_node_learns_what_another_made_and_destroyed(
    stores: Callable[[bytes], PgKeyStore],
) -> None:
    master = os.urandom(32)
    first, second = stores(master), stores(master)
    made = first.key_for(EPOCHS[0])
    assert second.live() == []
    second.refresh()
    assert second.live() == [EPOCHS[0]] and second.get(EPOCHS[0]) == made
    # A miss is looked up at once: the key exists, another node made it.
    other = first.key_for(EPOCHS[1])
    assert second.get(EPOCHS[1]) == other
    # A destruction elsewhere is learnt by refresh, and is never undone by key_for.
    assert first.destroy(EPOCHS[0]) is True
    second.refresh()
    assert second.get(EPOCHS[0]) is None and second.destroyed() == [EPOCHS[0]]
    assert first.destroy(EPOCHS[2]) is True  # never made: a tombstone all the same
    with pytest.raises(KeystoreError, match="destroyed"):
        second.key_for(EPOCHS[2])
    assert second.is_destroyed(EPOCHS[2])


def test_rotation_is_refused_while_another_node_has_the_keystore_open(
    stores: Callable[[bytes], PgKeyStore],
) -> None:
    old, new = os.urandom(32), os.urandom(32)
    first, second = stores(old), stores(old)
    first.key_for(EPOCHS[0])
    with pytest.raises(KeystoreError, match=ROTATION_REFUSED):
        first.rotate(new)
    second.close()
    assert first.rotate(new) == 1
    assert first.kid == master_key_id(new)


def test_rotation_then_only_the_new_master_opens_with_every_epoch(
    pg_dsn: str, stores: Callable[[bytes], PgKeyStore]
) -> None:
    old, new = os.urandom(32), os.urandom(32)
    first = stores(old)
    keys = {e: first.key_for(e) for e in EPOCHS}
    first.destroy("2026-11-30")
    idempotency = first.idempotency_key
    other = stores(old)
    keys["2026-12-09"] = other.key_for("2026-12-09")  # not in the first one's memory
    other.close()
    steps: list[str] = []
    assert first.rotate(new, steps.append) == 4
    assert steps == [
        *(f"wrapped epoch-{e}" for e in sorted(keys)),
        "wrapped idempotency",
        "committed",
    ]
    assert {e: first.get(e) for e in first.live()} == keys
    first.close()
    with pytest.raises(KeystoreError) as refused:
        stores(old)
    assert master_key_id(old) in str(refused.value) and master_key_id(new) in str(refused.value)
    reopened = stores(new)
    assert {e: reopened.get(e) for e in reopened.live()} == keys
    assert reopened.idempotency_key == idempotency == first_idempotency_key(old)
    assert reopened.destroyed() == ["2026-11-30"]
    assert set(rows(pg_dsn, "SELECT master_kid FROM gateway_keys.epoch_keys")) == {
        (master_key_id(new),)
    }
    vacuum_keystore(pg_dsn)


def test_a_rotation_cut_short_leaves_everything_under_the_old_key(
    stores: Callable[[bytes], PgKeyStore],
) -> None:
    old, new = os.urandom(32), os.urandom(32)
    store = stores(old)
    keys = {e: store.key_for(e) for e in EPOCHS}

    def die_at_the_second_row(step: str) -> None:
        if step == f"wrapped epoch-{EPOCHS[1]}":
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        store.rotate(new, die_at_the_second_row)
    assert store.kid == master_key_id(old)
    store.close()
    with pytest.raises(KeystoreError, match="is under master key"):
        stores(new)
    again = stores(old)
    assert {e: again.get(e) for e in again.live()} == keys
    assert again.rotate(new) == 3  # and the lock was given back: it runs again


def test_a_lost_connection_is_made_again_and_an_outage_is_storage_unavailable(
    pg_dsn: str, stores: Callable[[bytes], PgKeyStore]
) -> None:
    master = os.urandom(32)
    store = stores(master)
    store.key_for(EPOCHS[0])
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    with pytest.raises(StorageUnavailable) as down:
        store.key_for(EPOCHS[1])
    assert "password" not in str(down.value)
    made = store.key_for(EPOCHS[1])  # a new connection, the shared lock taken again
    assert store.get(EPOCHS[1]) == made
    with pytest.raises(KeystoreError, match=ROTATION_REFUSED):
        stores(master).rotate(os.urandom(32))


def test_no_error_carries_the_password_or_a_key(pg_dsn: str) -> None:
    secret = "planted-secret-" + os.urandom(6).hex()
    wrong = pg_dsn.replace("password=", f"password={secret}")
    store = PgKeyStore(wrong, os.urandom(32))
    with pytest.raises(StorageUnavailable) as refused:
        store.open()
    assert secret not in str(refused.value) and secret not in repr(refused.value)
    assert refused.value.__cause__ is None and refused.value.__suppress_context__
    with pytest.raises(StorageUnavailable) as state:
        keystore_state(wrong)
    assert secret not in str(state.value)


def test_a_node_that_lost_its_connection_during_a_rotation_is_refused(
    pg_dsn: str, stores: Callable[[bytes], PgKeyStore]
) -> None:
    """Its shared lock went with its connection, so the rotation could run: when it
    connects again it finds another master key in force, and says so."""
    old, new = os.urandom(32), os.urandom(32)
    node = stores(old)
    node.key_for(EPOCHS[0])
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    assert stores(old).rotate(new) == 1
    with pytest.raises(StorageUnavailable):
        node.key_for(EPOCHS[1])
    with pytest.raises(KeystoreError) as refused:
        node.key_for(EPOCHS[1])
    assert master_key_id(new) in str(refused.value) and master_key_id(old) in str(refused.value)
    assert keystore_state(pg_dsn).live == [EPOCHS[0]]
