"""The epoch keystore in PostgreSQL, shared by every gateway node (the shared backend's
:class:`~gateway.crypto.keystore.KeyStore`; same interface, same sealing).

Tables, in their own schema ``gateway_keys`` (:data:`gateway.pgutil.KEYS_SCHEMA`)::

    current      one row: the id of the master key that seals the rows below, and the
                 sealed idempotency key
    epoch_keys   epoch (PK), master_kid, sealed: one row per live epoch
    destroyed    epoch (PK), destroyed_at: a tombstone per destroyed epoch

Keys are sealed as the files are (:func:`~gateway.crypto.keystore.seal_key`, the name
and the master key's id bound in): a row copied to another epoch does not open.

Several nodes: :meth:`PgKeyStore.key_for` inserts a new epoch's key with ``ON CONFLICT
DO NOTHING`` and reads back the row that won, so nodes making the same epoch at once
agree on one key; creation and destruction of an epoch hold a transaction-level
advisory lock on that epoch, so a key is never made again after its tombstone.
:meth:`~PgKeyStore.destroy` deletes the row and writes the tombstone in one
transaction; of two nodes destroying an epoch at once, exactly one is told it did. A
node learns of the epochs other nodes made by :meth:`~PgKeyStore.refresh`, or at once
when :meth:`~PgKeyStore.get` misses (a primary-key lookup).

Every open keystore holds a *shared* session advisory lock; a master-key rotation
(:meth:`PgKeyStore.rotate`) needs it exclusively and is refused while any node runs.
A session lock needs a real session: no pooler in transaction mode.

What destruction means here: the key's row is deleted when the transaction commits, so
no query and no ``pg_dump`` taken from then on sees it. Its bytes live on for a while
where PostgreSQL keeps old row versions: the dead tuple in the table's file until
VACUUM (:func:`vacuum_keystore`, to run after destroying epochs; even then the freed
space is reused, not wiped), and the write-ahead log until its segments
are recycled (longer in a WAL archive or a base backup, and on a replica until it
replays). All of those copies are sealed by the master key: a rotation of the master
key (whose old key is then destroyed) makes every one of them unreadable. Backups: the
keystore has a schema of its own, so ``pg_dump --exclude-schema=gateway_keys`` (or
keeping the keystore in a separate cluster) leaves it out of the spool's backups; a
backup that includes it is readable until its epochs are destroyed.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import psycopg

from gateway import pgutil
from gateway.crypto.keystore import (
    KEY_SIZE,
    EpochSets,
    check_epoch,
    first_idempotency_key,
    master_key_id,
    open_key,
    seal_key,
)
from gateway.errors import KeystoreError

S = pgutil.KEYS_SCHEMA  # "gateway_keys", spelled out in the statements
DDL = f"""
CREATE TABLE IF NOT EXISTS {S}.current (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    master_kid text NOT NULL,
    idempotency bytea NOT NULL
);
CREATE TABLE IF NOT EXISTS {S}.epoch_keys (
    epoch text PRIMARY KEY,
    master_kid text NOT NULL,
    sealed bytea NOT NULL
);
CREATE TABLE IF NOT EXISTS {S}.destroyed (
    epoch text PRIMARY KEY,
    destroyed_at timestamptz NOT NULL DEFAULT now()
);
"""
KEYSTORE_LOCK = 0x6761_7465_7761_7902
"""The session advisory lock: shared by every open keystore, exclusive for a rotation."""
EPOCH_LOCK_CLASS = 0x6777_6B73
"""With ``hashtext(epoch)``, the transaction lock that orders an epoch's creation and
destruction (the two-key form: no clash with the one-key locks)."""
ROTATION_REFUSED = "stop every gatewayd node before rotating its master key"


class KeystoreState(NamedTuple):
    """The keystore as its tables say, without opening a key (``gatewayctl keys status``)."""

    master_key_id: str | None
    live: list[str]
    destroyed: list[str]


def _unseal(master: bytes, name: str, blob: bytes) -> bytes:
    try:
        return open_key(master, name, blob)
    except KeystoreError:
        raise KeystoreError(
            f"keystore row {name} in {S} does not open with master key {master_key_id(master)}"
        ) from None


def _close(slot: list[psycopg.Connection[Any] | None]) -> None:
    conn, slot[0] = slot[0], None
    if conn is not None:
        _release(conn)


def _release(conn: psycopg.Connection[Any]) -> None:
    """Unlock, then close (a closed session's locks go a moment later: not soon enough)."""
    if not conn.closed and not conn.broken:
        with contextlib.suppress(psycopg.Error):
            conn.execute("SELECT pg_advisory_unlock_all()")
    conn.close()


class PgKeyStore(EpochSets):
    """The epoch keys of every node, in PostgreSQL; held in memory once opened.

    Synchronous (one connection, which also holds the session lock): callers run it on
    a thread. Thread-safe."""

    def __init__(self, dsn: str, master: bytes) -> None:
        super().__init__(master)
        self._dsn = dsn
        self._slot: list[psycopg.Connection[Any] | None] = [None]
        self._closer = weakref.finalize(self, _close, self._slot)
        self._opened = False
        self.location = f"postgresql:{S}"
        """Where the keystore is, for messages (never the DSN: it holds a password)."""

    # ---------------------------------------------------------------- lifecycle

    def open(self) -> None:
        """Create the tables (first node), take the shared lock, check the master key,
        load the keys. KeystoreError for a wrong master key or a rotation under way."""
        with self._lock, pgutil.translated():
            _close(self._slot)
            conn = self._connect()
            try:
                self._load(conn)
            except BaseException:
                _release(conn)
                raise
            self._slot[0] = conn
            self._opened = True

    def close(self) -> None:
        """Release the shared lock and close the connection."""
        with self._lock:
            self._opened = False
            _close(self._slot)

    def _connect(self) -> psycopg.Connection[Any]:
        """A new connection, the tables made, holding the shared lock (or closed)."""
        conn = pgutil.connect(self._dsn, autocommit=True)
        try:
            pgutil.ensure_schema(conn, DDL)
            locked = conn.execute(
                "SELECT pg_try_advisory_lock_shared(%s)", (KEYSTORE_LOCK,)
            ).fetchone()
            if not (locked and locked[0]):
                raise KeystoreError(
                    f"keystore {self.location} is being rotated to a new master key "
                    "(gatewayctl keys rotate-master): start gatewayd again once it is done"
                )
        except BaseException:
            conn.close()
            raise
        return conn

    def _conn(self) -> psycopg.Connection[Any]:
        """The connection; a new one (shared lock taken again, master key checked again)
        after the server went away."""
        conn = self._slot[0]
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        if not self._opened:
            raise KeystoreError("open the keystore first")
        _close(self._slot)
        conn = self._connect()
        try:
            row = conn.execute("SELECT master_kid FROM gateway_keys.current").fetchone()
        except BaseException:
            _release(conn)
            raise
        if row is None or row[0] != self.kid:
            _release(conn)
            raise KeystoreError(
                f"keystore {self.location} is now under master key "
                f"{row[0] if row else None}; this node's master key is {self.kid}: restart "
                "gatewayd with the keystore's master key"
            )
        self._slot[0] = conn
        return conn

    def _load(self, conn: psycopg.Connection[Any]) -> None:
        with conn.transaction():
            current = conn.execute(
                "SELECT master_kid, idempotency FROM gateway_keys.current"
            ).fetchone()
            rows = conn.execute(
                "SELECT epoch, master_kid, sealed FROM gateway_keys.epoch_keys"
            ).fetchall()
            if current is None:
                if rows:
                    raise KeystoreError(
                        f"keystore {self.location} holds epoch keys but no current master "
                        "key id (the row that names the master key sealing them): restore it"
                    )
                sealed = seal_key(self._master, "idempotency", first_idempotency_key(self._master))
                conn.execute(
                    "INSERT INTO gateway_keys.current (master_kid, idempotency) VALUES (%s, %s) "
                    "ON CONFLICT DO NOTHING",
                    (self.kid, sealed),
                )
                current = conn.execute(
                    "SELECT master_kid, idempotency FROM gateway_keys.current"
                ).fetchone()
                assert current is not None
            destroyed = conn.execute("SELECT epoch FROM gateway_keys.destroyed").fetchall()
        if current[0] != self.kid:
            raise KeystoreError(
                f"keystore {self.location} is under master key {current[0]}; the configured "
                f"master key is {self.kid}"
            )
        self._idempotency = _unseal(self._master, "idempotency", bytes(current[1]))
        self._keys = {e: _unseal(self._master, f"epoch-{e}", bytes(s)) for e, _, s in rows}
        self._destroyed = {e for (e,) in destroyed}

    def refresh(self) -> None:
        """Learn the epochs other nodes made, and those they destroyed, since the last
        look: two small queries, keys unsealed only for new epochs."""
        with self._lock, pgutil.translated():
            conn = self._conn()
            with conn.transaction():
                rows = conn.execute(
                    "SELECT epoch, sealed FROM gateway_keys.epoch_keys WHERE NOT epoch = ANY(%s)",
                    (list(self._keys),),
                ).fetchall()
                gone = conn.execute(
                    "SELECT epoch FROM gateway_keys.destroyed WHERE NOT epoch = ANY(%s)",
                    (list(self._destroyed),),
                ).fetchall()
            for epoch, sealed in rows:
                self._keys[epoch] = _unseal(self._master, f"epoch-{epoch}", bytes(sealed))
            for (epoch,) in gone:
                self._destroyed.add(epoch)
                self._keys.pop(epoch, None)

    # ------------------------------------------------------------------- keys

    def get(self, epoch: str) -> bytes | None:
        """The epoch's key; None once destroyed (or never made). An epoch not held here
        is looked up (another node may have made it): None means gone, so an outage
        raises StorageUnavailable rather than answering None."""
        key = self._keys.get(epoch)
        if key is not None or epoch in self._destroyed:
            return key
        with self._lock, pgutil.translated():
            conn = self._conn()
            with conn.transaction():
                row = conn.execute(
                    "SELECT sealed FROM gateway_keys.epoch_keys WHERE epoch = %s", (epoch,)
                ).fetchone()
                if row is None:
                    if conn.execute(
                        "SELECT 1 FROM gateway_keys.destroyed WHERE epoch = %s", (epoch,)
                    ).fetchone():
                        self._destroyed.add(epoch)
                    return None
            key = _unseal(self._master, f"epoch-{epoch}", bytes(row[0]))
            self._keys[epoch] = key
            return key

    def key_for(self, epoch: str) -> bytes:
        """The epoch's key, made (committed, before it is used) if it is new; every node
        gets the same key for the same epoch."""
        key = self._keys.get(epoch)
        if key is not None:
            return key
        check_epoch(epoch)
        with self._lock, pgutil.translated():
            if epoch in self._destroyed:
                raise KeystoreError(f"key epoch {epoch} was destroyed; it is not made again")
            name = f"epoch-{epoch}"
            sealed = self._make(self._conn(), epoch, os.urandom(KEY_SIZE))
            if sealed is None:
                self._destroyed.add(epoch)
                raise KeystoreError(f"key epoch {epoch} was destroyed; it is not made again")
            key = self._keys[epoch] = _unseal(self._master, name, sealed)
            return key

    def _make(self, conn: psycopg.Connection[Any], epoch: str, key: bytes) -> bytes | None:
        """The sealed key of ``epoch`` that won (``key`` when this node's did); None when
        the epoch has a tombstone."""
        with conn.transaction():
            conn.execute(
                "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (EPOCH_LOCK_CLASS, epoch)
            )
            if conn.execute(
                "SELECT 1 FROM gateway_keys.destroyed WHERE epoch = %s", (epoch,)
            ).fetchone():
                return None
            conn.execute(
                "INSERT INTO gateway_keys.epoch_keys (epoch, master_kid, sealed) "
                "VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                (epoch, self.kid, seal_key(self._master, f"epoch-{epoch}", key)),
            )
            row = conn.execute(
                "SELECT sealed FROM gateway_keys.epoch_keys WHERE epoch = %s", (epoch,)
            ).fetchone()
        assert row is not None
        return bytes(row[0])

    def destroy(self, epoch: str) -> bool:
        """Destroy an epoch's key: its row deleted and its tombstone written, in one
        transaction. True for the one call (of every node's) that destroyed it."""
        with self._lock, pgutil.translated():
            conn = self._conn()
            with conn.transaction():
                conn.execute(
                    "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (EPOCH_LOCK_CLASS, epoch)
                )
                conn.execute("DELETE FROM gateway_keys.epoch_keys WHERE epoch = %s", (epoch,))
                made = conn.execute(
                    "INSERT INTO gateway_keys.destroyed (epoch) VALUES (%s) "
                    "ON CONFLICT DO NOTHING RETURNING epoch",
                    (epoch,),
                ).fetchone()
            self._destroyed.add(epoch)
            self._keys.pop(epoch, None)
            return made is not None

    def vacuum(self) -> None:
        """:func:`vacuum_keystore` on this keystore's database (a connection of its own)."""
        vacuum_keystore(self._dsn)

    # --------------------------------------------------------------- rotation

    def rotate(self, new_master: bytes, on_step: Callable[[str], None] = lambda _: None) -> int:
        """Seal every epoch key and the idempotency key under ``new_master`` and switch
        ``current``, in ONE transaction: a crash at any point leaves all of it under the
        old key or all under the new one, so there is nothing to recover (unlike the
        files' rotation). Refused unless this is the only open keystore ("stop every
        gatewayd node"). ``on_step`` hears each row re-sealed (not yet committed), then
        ``committed``. Returns how many epoch keys were re-sealed. The old row versions
        (until VACUUM, and in the WAL) are sealed by the old key: destroy its copies."""
        new_kid = master_key_id(new_master)
        if new_kid == self.kid:
            raise KeystoreError("the new master key is the one already in use")
        with self._lock, pgutil.translated():
            conn = self._conn()
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (KEYSTORE_LOCK,)).fetchone()
            if not (row and row[0]):
                raise KeystoreError(
                    f"keystore {self.location} is open on another gateway node or "
                    f"gatewayctl: {ROTATION_REFUSED}"
                )
            try:
                keys = self._reseal(conn, new_master, on_step)
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (KEYSTORE_LOCK,))
            self._master, self.kid, self._keys = new_master, new_kid, keys
            on_step("committed")
            return len(keys)

    def _reseal(
        self, conn: psycopg.Connection[Any], new: bytes, on_step: Callable[[str], None]
    ) -> dict[str, bytes]:
        with conn.transaction():
            current = conn.execute(
                "SELECT master_kid, idempotency FROM gateway_keys.current FOR UPDATE"
            ).fetchone()
            if current is None or current[0] != self.kid:
                raise KeystoreError(f"keystore {self.location} is no longer under {self.kid}")
            rows = conn.execute(
                "SELECT epoch, sealed FROM gateway_keys.epoch_keys ORDER BY epoch FOR UPDATE"
            ).fetchall()
            keys = {}
            for epoch, sealed in rows:
                name = f"epoch-{epoch}"
                keys[epoch] = _unseal(self._master, name, bytes(sealed))
                conn.execute(
                    "UPDATE gateway_keys.epoch_keys SET master_kid = %s, sealed = %s "
                    "WHERE epoch = %s",
                    (master_key_id(new), seal_key(new, name, keys[epoch]), epoch),
                )
                on_step(f"wrapped {name}")
            idempotency = _unseal(self._master, "idempotency", bytes(current[1]))
            conn.execute(
                "UPDATE gateway_keys.current SET master_kid = %s, idempotency = %s",
                (master_key_id(new), seal_key(new, "idempotency", idempotency)),
            )
            on_step("wrapped idempotency")
        return keys


def keystore_state(dsn: str) -> KeystoreState:
    """The master key id and the epochs, live and destroyed, without opening a key
    (works while gatewayd runs); all empty when no node has made the keystore yet."""
    with pgutil.translated(), pgutil.connect(dsn, autocommit=True) as conn:
        made = conn.execute("SELECT to_regclass(%s)", ("gateway_keys.current",)).fetchone()
        if made is None or made[0] is None:
            return KeystoreState(None, [], [])
        row = conn.execute(
            "SELECT (SELECT master_kid FROM gateway_keys.current), "
            "ARRAY(SELECT epoch FROM gateway_keys.epoch_keys ORDER BY epoch), "
            "ARRAY(SELECT epoch FROM gateway_keys.destroyed ORDER BY epoch)"
        ).fetchone()
    assert row is not None
    return KeystoreState(row[0], list(row[1]), list(row[2]))


def vacuum_keystore(dsn: str) -> None:
    """VACUUM the keystore's tables: the dead row versions of destroyed epochs (and of
    a rotation's old seals) are removed from the tables' pages. Run it after destroying
    epochs. A transaction still open elsewhere that could see them delays it."""
    with pgutil.translated(), pgutil.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM gateway_keys.epoch_keys, gateway_keys.current, gateway_keys.destroyed")
