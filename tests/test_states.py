"""The record state table: walked pair by pair, and held against the spool itself."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.errors import SpoolError
from gateway.spool import queries
from gateway.spool.records import (
    LIVE,
    TRANSITIONS,
    IllegalTransition,
    NewRecord,
    State,
    check_transition,
    new_submission_id,
    sources_of,
)
from gateway.spool.store import Spool

LEGAL = {
    (State.QUEUED, State.DELIVERED),
    (State.QUEUED, State.HELD),
    (State.QUEUED, State.ERASED),
    (State.HELD, State.QUEUED),
    (State.HELD, State.ERASED),
    (State.DELIVERED, State.ERASED),
}
"""Written out by hand: the table must say exactly this."""


@pytest.mark.parametrize(("old", "new"), list(itertools.product(State, State)))
def test_every_pair_of_states_is_legal_exactly_when_the_table_says(old: State, new: State) -> None:
    if (old, new) in LEGAL:
        check_transition(old, new)
        assert new in TRANSITIONS[old] and old in sources_of(new)
    else:
        with pytest.raises(IllegalTransition, match=f"from {old} to {new}"):
            check_transition(old, new)
        assert old not in sources_of(new)


def test_erased_is_final_and_every_other_state_may_be_erased() -> None:
    assert TRANSITIONS[State.ERASED] == frozenset()
    assert set(LIVE) == {State.QUEUED, State.HELD, State.DELIVERED}


def test_no_statement_outside_the_two_state_changers_writes_the_state() -> None:
    """Only queries.move and queries.erase_rows change a record's state: every UPDATE of
    ``state`` in the spool's code is in one of them."""
    root = Path(__file__).resolve().parent.parent / "gateway" / "spool"
    writers = []
    for path in root.glob("*.py"):
        for match in re.finditer(r"UPDATE records SET[^\"]*state=", path.read_text()):
            writers.append((path.name, match.group(0)))
    assert {name for name, _ in writers} == {"queries.py"}
    text = (root / "queries.py").read_text()
    functions = [m.group(1) for m in re.finditer(r"^def (\w+)\(", text, re.M)]
    holders = set()
    for name in functions:
        body = text.split(f"def {name}(", 1)[1].split("\ndef ", 1)[0]
        if re.search(r"UPDATE records SET[^\"]*state=", body):
            holders.add(name)
    assert holders == {"move", "erase_rows"}


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    spool = Spool(tmp_path / "spool", os.urandom(32))
    await spool.open()
    yield spool
    await spool.close()


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
