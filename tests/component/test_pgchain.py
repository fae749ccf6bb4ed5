"""The hash chains in PostgreSQL (erasure ledger, audit log): the same entries as the
file's, one gap-free chain whatever the number of writers, and every tampering with
the tables found by verify, naming the chain and the seq."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from gateway.config import AuditConfig
from gateway.errors import StorageFailed, StorageUnavailable
from gateway.ops.audit import AuditLog, audit_chain
from gateway.ops.chain import GENESIS, ChainBroken, HashChainLog, _entry_hash
from gateway.ops.pgchain import PgChainLog
from gateway.retention.ledger import erasure_ledger

NOW = 1738314000.25  # 2025-01-31T09:00:00.250000Z


def clock() -> float:
    return NOW


@pytest.fixture
def chains(pg_dsn: str) -> Iterator[Callable[[str], PgChainLog]]:
    """Chains on the test's database (their connections closed at the end)."""
    made: list[PgChainLog] = []

    def chain(name: str = "ledger") -> PgChainLog:
        made.append(PgChainLog(pg_dsn, name, clock=clock))
        return made[-1]

    yield chain
    for log in made:
        log.close()


def sql(dsn: str, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(statement, params or None)
        return cur.fetchall() if cur.description else []


def bodies(n: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"submission": f"s-{i:04d}", "reason": "delivered", **extra} for i in range(1, n + 1)]


def test_append_head_and_entries(chains: Callable[[str], PgChainLog]) -> None:
    log = chains("ledger")
    assert log.head == (0, GENESIS) and log.verify() == 0 and list(log.entries()) == []
    assert log.append_many([]) == []
    first = log.append({"action": "start", "n": 1, "nested": {"b": [1, 2.5], "a": None}})
    assert (first.seq, first.prev, first.at) == (1, GENESIS, "2025-01-31T09:00:00.250000Z")
    more = log.append_many(bodies(3))
    assert [e.seq for e in more] == [2, 3, 4] and more[0].prev == first.hash
    assert log.head == (4, more[-1].hash)
    assert list(log.entries()) == [first, *more]
    assert log.verify() == 4
    # Another chain in the same tables is another chain.
    other = chains("audit")
    assert other.head == (0, GENESIS)
    assert other.append({"action": "x"}).seq == 1 and log.verify() == 4
    with pytest.raises(TypeError):
        log.append({"not json": {1, 2}})
    with pytest.raises(ValueError):
        log.append({"nan": float("nan")})
    assert log.head == (4, more[-1].hash)


def test_an_entry_hashes_the_same_in_a_file_and_in_postgresql(
    tmp_path: Path, chains: Callable[[str], PgChainLog]
) -> None:
    records = [{"action": "日本語", "detail": {"z": 1, "a": [True, None, 1.5]}}, *bodies(5)]
    in_file = HashChainLog(tmp_path / "log.jsonl", clock=clock)
    in_db = chains("ledger")
    assert in_db.append_many(records) == in_file.append_many(records)
    assert list(in_db.entries()) == list(in_file.entries())
    assert in_db.head == in_file.head
    at = "2025-01-31T09:00:00.250000Z"
    assert next(in_db.entries()).hash == _entry_hash(1, GENESIS, at, records[0])


def test_two_nodes_appending_at_once_make_one_chain(
    pg_dsn: str, chains: Callable[[str], PgChainLog]
) -> None:
    writers = [chains("ledger"), chains("ledger")]
    start = threading.Barrier(len(writers))
    errors: list[BaseException] = []

    def write(node: int) -> None:
        start.wait()
        try:
            for i in range(200):
                writers[node].append({"node": node, "i": i})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(len(writers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    entries = list(chains("ledger").entries())
    assert [e.seq for e in entries] == list(range(1, 401))
    for node in range(len(writers)):
        assert [e.body["i"] for e in entries if e.body["node"] == node] == list(range(200))
    assert writers[0].verify() == 400 and writers[1].head == (400, entries[-1].hash)
    assert sql(pg_dsn, "SELECT seq FROM gateway.chain_heads WHERE chain = 'ledger'") == [(400,)]


TAMPERING = {
    "body edited": (
        "UPDATE gateway.chain_entries SET body = replace(body, 's-0005', 's-9999') "
        "WHERE chain = 'ledger' AND seq = 5",
        "edited",
        5,
    ),
    "time edited": (
        "UPDATE gateway.chain_entries SET at = '2025-01-30T09:00:00.000000Z' "
        "WHERE chain = 'ledger' AND seq = 6",
        "edited",
        6,
    ),
    "middle entry deleted": (
        "DELETE FROM gateway.chain_entries WHERE chain = 'ledger' AND seq = 5",
        "deleted_or_reordered",
        5,
    ),
    "first entry deleted": (
        "DELETE FROM gateway.chain_entries WHERE chain = 'ledger' AND seq = 1",
        "bad_genesis",
        1,
    ),
    "two entries swapped": (
        "UPDATE gateway.chain_entries e SET prev = o.prev, at = o.at, body = o.body, "
        "hash = o.hash FROM gateway.chain_entries o WHERE e.chain = 'ledger' "
        "AND o.chain = 'ledger' AND e.seq IN (3, 4) AND o.seq = 7 - e.seq",
        "edited",
        3,
    ),
    "tail cut": (
        "DELETE FROM gateway.chain_entries WHERE chain = 'ledger' AND seq > 8",
        "truncated",
        10,
    ),
    "head moved back": (
        "UPDATE gateway.chain_heads SET seq = 7 WHERE chain = 'ledger'",
        "edited",
        7,
    ),
    "head moved on": (
        "UPDATE gateway.chain_heads SET seq = 12 WHERE chain = 'ledger'",
        "truncated",
        12,
    ),
    "head hash edited": (
        "UPDATE gateway.chain_heads SET hash = repeat('a', 64) WHERE chain = 'ledger'",
        "edited",
        10,
    ),
    "head row deleted": (
        "DELETE FROM gateway.chain_heads WHERE chain = 'ledger'",
        "truncated",
        None,
    ),
    "body not json": (
        "UPDATE gateway.chain_entries SET body = 'x' || body WHERE chain = 'ledger' AND seq = 2",
        "malformed",
        2,
    ),
}


@pytest.mark.parametrize(("change", "reason", "seq"), TAMPERING.values(), ids=list(TAMPERING))
def test_tampering_is_found_naming_the_chain_and_the_seq(
    pg_dsn: str,
    chains: Callable[[str], PgChainLog],
    change: str,
    reason: str,
    seq: int | None,
) -> None:
    log = chains("ledger")
    log.append_many(bodies(10))
    chains("audit").append_many(bodies(3))
    sql(pg_dsn, change)
    with pytest.raises(ChainBroken) as broken:
        log.verify()
    assert (broken.value.reason, broken.value.seq, broken.value.line) == (reason, seq, None)
    assert "postgresql:gateway.chain_entries[ledger]" in str(broken.value)
    assert broken.value.path.name == "postgresql:gateway.chain_entries[ledger]"
    assert seq is None or f"seq {seq}:" in str(broken.value)
    assert chains("audit").verify() == 3  # the other chain is untouched


def test_a_relinked_entry_is_found_where_its_chain_breaks(
    pg_dsn: str, chains: Callable[[str], PgChainLog]
) -> None:
    """Entry 5 replaced by one with a consistent hash of its own: entry 6 no longer
    chains to it; an entry whose prev was changed (hash recomputed) is found itself."""
    log = chains("ledger")
    entries = log.append_many(bodies(10))
    forged = _entry_hash(5, entries[3].hash, entries[4].at, {"submission": "forged"})
    sql(
        pg_dsn,
        "UPDATE gateway.chain_entries SET body = %s, hash = %s WHERE chain = 'ledger' AND seq = 5",
        '{"submission":"forged"}',
        forged,
    )
    with pytest.raises(ChainBroken) as broken:
        log.verify()
    assert (broken.value.reason, broken.value.seq) == ("deleted_or_reordered", 6)
    relinked = _entry_hash(3, "f" * 64, entries[2].at, entries[2].body)
    sql(
        pg_dsn,
        "UPDATE gateway.chain_entries SET prev = %s, hash = %s WHERE chain = 'ledger' AND seq = 3",
        "f" * 64,
        relinked,
    )
    with pytest.raises(ChainBroken) as broken:
        log.verify()
    assert (broken.value.reason, broken.value.seq) == ("deleted_or_reordered", 3)


def test_append_refuses_a_broken_tail_and_appends_nothing(
    pg_dsn: str, chains: Callable[[str], PgChainLog]
) -> None:
    log = chains("ledger")
    log.append_many(bodies(4))
    sql(pg_dsn, "UPDATE gateway.chain_heads SET seq = 3 WHERE chain = 'ledger'")
    with pytest.raises(ChainBroken, match="head row records seq 3"):
        log.append({"action": "more"})
    with pytest.raises(ChainBroken):
        _ = log.head
    sql(pg_dsn, "DELETE FROM gateway.chain_heads WHERE chain = 'ledger'")
    with pytest.raises(ChainBroken, match="head row missing") as broken:
        log.append({"action": "more"})
    assert broken.value.reason == "truncated"
    assert sql(pg_dsn, "SELECT count(*) FROM gateway.chain_entries") == [(4,)]
    assert sql(pg_dsn, "SELECT count(*) FROM gateway.chain_heads") == [(0,)]


def test_a_reader_sees_the_chain_as_it_stood(chains: Callable[[str], PgChainLog]) -> None:
    log = chains("audit")
    log.append_many(bodies(5))
    reading = log.entries()
    assert next(reading).seq == 1
    chains("audit").append_many(bodies(5))  # another node appends meanwhile
    assert [e.seq for e in reading] == [2, 3, 4, 5]
    assert log.verify() == 10


def test_no_error_quotes_a_body_or_the_password(
    pg_dsn: str, chains: Callable[[str], PgChainLog]
) -> None:
    secret = "planted-" + os.urandom(6).hex()
    log = chains("ledger")
    log.append_many([{"note": secret}, {"note": "other"}])
    for change in (
        f'UPDATE gateway.chain_entries SET body = \'{{"note":"{secret}!"}}\' WHERE seq = 1',
        f"UPDATE gateway.chain_entries SET body = '{secret}' WHERE seq = 1",
    ):
        sql(pg_dsn, change)
        with pytest.raises(ChainBroken) as broken:
            log.verify()
        assert secret not in str(broken.value) and secret not in repr(broken.value.args)
        assert secret not in broken.value.detail
    wrong = pg_dsn.replace("password=", f"password={secret}")
    for call in (
        lambda: PgChainLog(wrong, "ledger").append({"n": 1}),
        lambda: PgChainLog(wrong, "ledger").verify(),
    ):
        with pytest.raises(StorageUnavailable) as down:
            call()
        assert secret not in str(down.value) and down.value.__cause__ is None


def test_an_outage_is_storage_failed_and_the_next_append_reconnects(
    pg_dsn: str, chains: Callable[[str], PgChainLog]
) -> None:
    log = chains("ledger")
    log.append({"n": 1})
    sql(
        pg_dsn,
        "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    with pytest.raises(StorageFailed):  # StorageUnavailable: the audit backlog retries it
        log.append({"n": 2})
    assert log.append({"n": 2}).seq == 2
    assert log.verify() == 2


def test_the_factories_give_the_postgresql_chains_with_a_dsn(tmp_path: Path, pg_dsn: str) -> None:
    config = AuditConfig(log=tmp_path / "audit.jsonl", anchor=tmp_path / "audit.anchor")
    assert isinstance(erasure_ledger(tmp_path), HashChainLog)
    assert isinstance(audit_chain(config), HashChainLog)
    ledger = erasure_ledger(tmp_path, clock=clock, dsn=pg_dsn)
    audit = AuditLog(config, via="gatewayctl", actor="yamada", clock=clock, dsn=pg_dsn)
    try:
        assert isinstance(ledger, PgChainLog) and ledger.chain == "ledger"
        assert isinstance(audit.chain, PgChainLog) and audit.chain.chain == "audit"
        audit.check()
        entry = audit.record("device.revoke", target="tablet-07")
        assert entry.seq == 1 and entry.body["actor"] == "yamada"
        audit.check()
        ledger.append({"submission": "s-1"})
        chain = audit_chain(config, dsn=pg_dsn)
        assert [e.body["action"] for e in chain.entries()] == ["device.revoke"]
        assert ledger.head[0] == 1 and not (tmp_path / "audit.jsonl").exists()
    finally:
        ledger.close()
        if isinstance(audit.chain, PgChainLog):
            audit.chain.close()
