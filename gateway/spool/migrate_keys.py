"""Step 1 of ``gatewayctl spool migrate``: the file epoch keystore's keys into the
PostgreSQL keystore (the tables of :mod:`gateway.crypto.pgkeystore`), sealed by the
same master key.

What is copied: every live epoch key, the idempotency key (the HMAC key of the tokens
the records keep: the database must get the very same one, or no retried upload would
be recognised), and the tombstone of every destroyed epoch. All of it in ONE
transaction, each row inserted only where none is (``ON CONFLICT DO NOTHING``) and then
read back and compared: a run cut short left nothing or everything, and running it
again changes nothing. A row that is already there with another key (or another master
key, or a tombstone against a live key) stops the migration with the epoch named;
nothing is ever overwritten, and the transaction leaves the keystore as it was.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

import psycopg

from gateway import pgutil
from gateway.crypto import pgkeystore
from gateway.crypto.keystore import KeyStore, master_key_id, open_key, seal_key
from gateway.errors import KeystoreError, SpoolError

STEP = "keys"


class MigrationFailed(SpoolError):
    """The migration stopped: the step, the record (if one), the rule it broke. The
    text never holds a value of a record, a key or the DSN."""

    def __init__(self, step: str, rule: str, record_id: str | None = None) -> None:
        self.step, self.rule, self.record_id = step, rule, record_id
        where = f"record {record_id}: " if record_id else ""
        super().__init__(f"spool migrate stopped at step {step}: {where}{rule}")


@dataclass(frozen=True)
class KeysCopied:
    """What step 1 did: epoch keys and tombstones copied now, and already there."""

    epochs: int
    epochs_there: int
    destroyed: int
    destroyed_there: int
    idempotency_copied: bool


def import_keys(dsn: str, source: KeyStore, master: bytes) -> KeysCopied:
    """Copy ``source`` (an open file keystore under ``master``) into the database's
    keystore; MigrationFailed, nothing written, on any conflict (see the module doc)."""
    with pgutil.translated(), pgutil.connect(dsn, autocommit=True) as conn:
        pgutil.ensure_schema(conn, pgkeystore.DDL)
        with conn.transaction():
            copied = _idempotency(conn, source, master)
            epochs = there = 0
            for epoch in source.live():
                key = source.get(epoch)
                assert key is not None
                if _epoch(conn, epoch, key, master):
                    epochs += 1
                else:
                    there += 1
            gone = gone_there = 0
            for epoch in source.destroyed():
                if _tombstone(conn, epoch):
                    gone += 1
                else:
                    gone_there += 1
    return KeysCopied(epochs, there, gone, gone_there, copied)


def _idempotency(conn: psycopg.Connection[Any], source: KeyStore, master: bytes) -> bool:
    """The ``current`` row: made with the file's idempotency key if absent, else checked
    (same master key, same idempotency key). True if it was made now."""
    kid = master_key_id(master)
    made = conn.execute(
        "INSERT INTO gateway_keys.current (master_kid, idempotency) VALUES (%s, %s) "
        "ON CONFLICT DO NOTHING RETURNING master_kid",
        (kid, seal_key(master, "idempotency", source.idempotency_key)),
    ).fetchone()
    row = conn.execute(
        "SELECT master_kid, idempotency FROM gateway_keys.current FOR UPDATE"
    ).fetchone()
    assert row is not None
    if row[0] != kid:
        raise MigrationFailed(
            STEP,
            f"the PostgreSQL keystore is under master key {row[0]}, the local keystore and "
            f"the configuration under {kid}: nothing overwritten",
        )
    try:
        key = open_key(master, "idempotency", bytes(row[1]))
    except KeystoreError:
        raise MigrationFailed(
            STEP, "the PostgreSQL keystore's idempotency key does not open with the master key"
        ) from None
    if not hmac.compare_digest(key, source.idempotency_key):
        raise MigrationFailed(
            STEP,
            "the PostgreSQL keystore already holds another idempotency key (a node made "
            "it before this migration?): the spool's idempotency tokens would no longer "
            "match; nothing overwritten",
        )
    return made is not None


def _lock_epoch(conn: psycopg.Connection[Any], epoch: str) -> None:
    """The lock a node takes to make or destroy the epoch's key (same order)."""
    conn.execute(
        "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (pgkeystore.EPOCH_LOCK_CLASS, epoch)
    )


def _epoch(conn: psycopg.Connection[Any], epoch: str, key: bytes, master: bytes) -> bool:
    """Insert a live epoch's key unless there; True if inserted, MigrationFailed if the
    database holds another key for it or has destroyed it."""
    _lock_epoch(conn, epoch)
    if conn.execute("SELECT 1 FROM gateway_keys.destroyed WHERE epoch = %s", (epoch,)).fetchone():
        raise MigrationFailed(
            STEP,
            f"key epoch {epoch} is live in the local keystore but destroyed in the "
            "PostgreSQL keystore: its records could not be read; nothing overwritten",
        )
    name = f"epoch-{epoch}"
    made = conn.execute(
        "INSERT INTO gateway_keys.epoch_keys (epoch, master_kid, sealed) VALUES (%s, %s, %s) "
        "ON CONFLICT DO NOTHING RETURNING epoch",
        (epoch, master_key_id(master), seal_key(master, name, key)),
    ).fetchone()
    row = conn.execute(
        "SELECT sealed FROM gateway_keys.epoch_keys WHERE epoch = %s", (epoch,)
    ).fetchone()
    assert row is not None
    try:
        held = open_key(master, name, bytes(row[0]))
    except KeystoreError:
        held = b""
    if not hmac.compare_digest(held, key):
        raise MigrationFailed(
            STEP,
            f"the PostgreSQL keystore already holds a different key for epoch {epoch}: "
            "nothing overwritten",
        )
    return made is not None


def _tombstone(conn: psycopg.Connection[Any], epoch: str) -> bool:
    """Insert a destroyed epoch's tombstone unless there; True if inserted,
    MigrationFailed if the database still holds a key for it."""
    _lock_epoch(conn, epoch)
    if conn.execute("SELECT 1 FROM gateway_keys.epoch_keys WHERE epoch = %s", (epoch,)).fetchone():
        raise MigrationFailed(
            STEP,
            f"key epoch {epoch} is destroyed in the local keystore but has a key in the "
            "PostgreSQL keystore: not destroyed here (nothing overwritten); destroy it "
            "deliberately if that is right",
        )
    made = conn.execute(
        "INSERT INTO gateway_keys.destroyed (epoch) VALUES (%s) "
        "ON CONFLICT DO NOTHING RETURNING epoch",
        (epoch,),
    ).fetchone()
    return made is not None
