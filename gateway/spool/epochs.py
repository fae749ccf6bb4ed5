"""The spool's side of key epochs (:mod:`gateway.crypto.keystore`) at start-up.

- **Migration.** A spool from before key epochs wraps each data key with the master key
  directly. At start each such key is unwrapped and wrapped again by the key of its
  record's epoch, a batch per index transaction (the epoch keys are on disk before any
  row names them), then a TRUNCATE checkpoint clears the old wrapped keys from the
  write-ahead log. A crash at any point leaves every row either as it was or migrated,
  and the next start carries on.
- **Unreadable records.** A live queued record whose epoch key is gone (a backup of the
  spool restored after its epoch was destroyed, or a keystore lost) is held as
  unreadable; the sweeper erases it under the reason ``epoch_destroyed`` once its
  deadline has passed, which for a destroyed epoch it already has.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from gateway.crypto.envelope import unwrap_key, wrap_key
from gateway.crypto.keystore import KeyStore, epoch_of
from gateway.spool import queries
from gateway.spool.index import IndexThread
from gateway.spool.records import State

BATCH = 1000


async def migrate_legacy_keys(index: IndexThread, keys: KeyStore, master: bytes) -> int:
    """Wrap every master-wrapped data key by its epoch's key; returns how many."""
    total = 0
    while rows := await index.run(lambda c: queries.legacy_keys(c, BATCH)):
        rewrapped = []
        for record_id, expires_at, wrapped in rows:
            epoch = epoch_of(expires_at)
            dek = unwrap_key(master, wrapped)
            epoch_key = keys.get(epoch)
            if epoch_key is None:  # a new epoch: made durable on a thread, not the loop
                epoch_key = await asyncio.to_thread(keys.key_for, epoch)
            rewrapped.append((record_id, epoch, wrap_key(epoch_key, dek)))
        await index.run(functools.partial(queries.set_epoch_keys, rows=rewrapped), checkpoint=True)
        total += len(rows)
    return total


async def hold_unreadable(index: IndexThread, keys: KeyStore, at: float) -> int:
    """Hold the queued records whose epoch key is gone; returns how many were held."""
    gone = [e for e in await index.run(queries.live_epochs) if e and keys.get(e) is None]
    if not gone:
        return 0

    def hold(conn: Any) -> int:
        held = 0
        for epoch in gone:
            why = "destroyed" if keys.is_destroyed(epoch) else "missing from the keystore"
            for due in queries.in_epoch(conn, epoch):
                held += queries.move(
                    conn,
                    due.submission_id,
                    State.HELD,
                    queries.SET_FOUND_MISSING,
                    (at, f"unreadable: key epoch {epoch} {why}"),
                )
        return held

    return await index.run(hold)
