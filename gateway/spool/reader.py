"""Reading a spool from outside the daemon: its records' metadata, and whether a
daemon holds it (for ``gatewayctl``)."""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from gateway.errors import SpoolError
from gateway.spool import queries
from gateway.spool.records import Record


def spool_in_use(directory: Path) -> bool:
    """Whether a running gateway holds this spool (its lock), without disturbing it."""
    try:
        fd = os.open(directory / "lock", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False  # no spool there yet: nothing is running on it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing the descriptor releases a lock we took
    return False


def read_records(
    directory: Path,
    *,
    states: Sequence[str] = (),
    channel: str | None = None,
    record_id: str | None = None,
    limit: int = 100,
) -> list[Record]:
    """Records' metadata straight from the index, read-only: works with or without the
    daemon running (records being delivered show as ``queued``), newest first."""
    path = directory / "index.sqlite3"
    if not path.exists():
        raise SpoolError(f"no spool index at {path}")
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        conn.execute("PRAGMA busy_timeout=5000")
        return queries.select_records(
            conn, states=states, channel=channel, record_id=record_id, limit=limit
        )
    except sqlite3.Error as exc:
        raise SpoolError(f"cannot read the spool index {path}: {exc}") from None
    finally:
        conn.close()
