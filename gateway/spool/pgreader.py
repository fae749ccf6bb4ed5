"""Reading a shared (PostgreSQL) spool from outside the daemon: records' metadata for
``gatewayctl spool list`` and ``spool show``, as :func:`gateway.spool.reader.read_records`
reads the local index. A record a node is delivering shows as ``delivering`` while its
lease lives (whichever node holds it)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from psycopg.rows import dict_row

from gateway import pgutil
from gateway.spool.records import DELIVERING, RECORD_COLUMNS, Record, State


def read_pg_records(
    dsn: str,
    *,
    states: Sequence[str] = (),
    channel: str | None = None,
    record_id: str | None = None,
    limit: int = 100,
    now: float | None = None,
) -> list[Record]:
    """Records' metadata, newest first, filtered like the local reader."""
    where: list[str] = ["true"]
    params: list[Any] = []
    if states:
        where.append("state = ANY(%s)")
        params.append([s for s in states if s != DELIVERING] or ["-"])
    if channel is not None:
        where.append("channel = %s")
        params.append(channel)
    if record_id is not None:
        where.append("id = %s")
        params.append(record_id)
    columns = ", ".join(RECORD_COLUMNS)
    sql = (
        f"SELECT {columns}, claimed_by, lease_until FROM gateway.records "  # noqa: S608 - constants
        f"WHERE {' AND '.join(where)} ORDER BY received_at DESC LIMIT %s"
    )
    at = time.time() if now is None else now
    with pgutil.translated(), pgutil.connect(dsn) as conn:
        exists = conn.execute("SELECT to_regclass('gateway.records') IS NOT NULL").fetchone()
        if not (exists and exists[0]):
            return []
        with conn.cursor(row_factory=dict_row) as cursor:
            rows = cursor.execute(sql, (*params, limit)).fetchall()
    records = []
    for row in rows:
        record = Record.from_columns(row)
        leased = row["claimed_by"] is not None and (row["lease_until"] or 0) > at
        if record.state == State.QUEUED and leased:
            record = Record(**{**record.__dict__, "state": DELIVERING})
        records.append(record)
    return records
