"""The record state table held against the spool itself: what the table refuses, the
spool refuses, and a state outside the table is refused at erasure.
"""

from __future__ import annotations

import pytest

from gateway.errors import SpoolError
from gateway.spool import queries
from gateway.spool.records import NewRecord, new_submission_id
from gateway.spool.store import Spool


async def queued(spool: Spool) -> str:
    pending = spool.begin(new_submission_id())
    pending.write(b"x" * 100)
    record = await spool.commit(
        pending,
        NewRecord(
            channel="online-application",
            destination="dnp-relay",
            device_id="tablet-01",
            user_id="staff-001",
            received_at=1.0,
            expires_at=2.0,
            content_type="multipart/form-data; boundary=x",
            body_sha256="0" * 64,
            content_sha256="1" * 64,
            field_names=("application_id",),
            idempotency_key=None,
        ),
    )
    return record.id


async def state_of(spool: Spool, record_id: str) -> str:
    record = await spool.get(record_id)
    assert record is not None
    return record.state


async def test_the_spool_refuses_what_the_table_refuses(spool: Spool) -> None:
    """A delivered record cannot be held or requeued; a held one cannot be delivered;
    an erased one cannot change at all. Refused moves change neither the index nor the
    counters."""
    delivered, held = await queued(spool), await queued(spool)
    await spool.mark_delivered(delivered, at=5.0, receipt=None)
    await spool.mark_held(held, at=5.0, reason="upstream answered 400")
    counts = dict(spool.counts)
    await spool.mark_held(delivered, at=6.0, reason="late")
    await spool.mark_delivered(held, at=6.0, receipt=None)
    with pytest.raises(SpoolError, match="only a held record can be requeued"):
        await spool.requeue(delivered)
    assert (await state_of(spool, delivered), await state_of(spool, held)) == ("delivered", "held")
    assert dict(spool.counts) == counts
    await spool.erase([delivered], reason="delivered", at=7.0)
    for move in (
        spool.mark_delivered(delivered, at=8.0, receipt=None),
        spool.mark_held(delivered, at=8.0, reason="x"),
    ):
        await move
    with pytest.raises(SpoolError):
        await spool.requeue(delivered)
    assert await spool.erase([delivered], reason="operator", at=9.0) == []
    assert await state_of(spool, delivered) == "erased"


async def test_a_state_outside_the_table_in_the_index_is_refused_at_erasure(
    spool: Spool,
) -> None:
    """erase_rows checks each record's state against the table before it erases."""
    record_id = await queued(spool)

    def corrupt(conn: object) -> None:
        conn.execute("UPDATE records SET state='limbo' WHERE id=?", (record_id,))  # type: ignore[attr-defined]

    await spool._index.run(corrupt)
    with pytest.raises(ValueError, match="limbo"):
        await spool._index.run(lambda c: queries.erase_rows(c, [record_id], reason="x", at=1.0))
