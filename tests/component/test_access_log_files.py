"""The access log's files and exporter: one chain across the day files (JST), verified
with file and line, retention that keeps the chain provable, an exporter that loses
nothing when the disk refuses a write, and failed handshakes rate-limited per address."""

from __future__ import annotations

import errno
import json
import os
from datetime import date, datetime
from pathlib import Path

import pytest

from gateway.ingress.access import HANDSHAKE_BURST, HANDSHAKE_WINDOW, AccessRecorder, encode
from gateway.japan import JST
from gateway.ops.access_log import AccessExporter, AccessLog, Expired
from gateway.ops.chain import ChainBroken
from gateway.ops.metrics import Metrics
from gateway.spool.store import Spool
from gateway.testing.fakes import FakeClock
from gateway.testing.faults import DiskFaults

DAY1 = datetime(2026, 11, 1, 23, 59, tzinfo=JST).timestamp()  # JST: a UTC day would split
DAY = 86400.0


def body(time: float, n: int) -> str:
    entry = {
        "time": datetime.fromtimestamp(time, JST).isoformat(timespec="milliseconds"),
        "outcome": "accepted",
        "request_id": f"{n:016x}",
    }
    return encode(entry)


def write_days(access: AccessLog, days: int, per_day: int = 3) -> None:
    seq = access.head()[0]
    for d in range(days):
        rows = []
        for i in range(per_day):
            seq += 1
            rows.append((seq, body(DAY1 + d * DAY + i, seq)))
        access.append(rows)


def lines_of(path: Path) -> list[str]:
    return path.read_text("utf-8").splitlines()


def test_a_file_a_japan_day_one_chain_across_them(tmp_path: Path) -> None:
    access = AccessLog(tmp_path / "access")
    write_days(access, 3)
    days = [d for d, _ in access.files()]
    assert days == [date(2026, 11, 1), date(2026, 11, 2), date(2026, 11, 3)]  # 23:59 JST
    verified = access.verify()
    assert (verified.files, verified.entries) == (3, 9)
    seqs = [e.seq for _, e in access.entries()]
    assert seqs == list(range(1, 10))
    second = json.loads(lines_of(access.files()[1][1])[0])
    first_last = json.loads(lines_of(access.files()[0][1])[-1])
    assert (second["seq"], second["prev"]) == (4, first_last["hash"])
    assert access.verify(date(2026, 11, 2), date(2026, 11, 2)).entries == 3
    assert all(os.stat(p).st_mode & 0o077 == 0 for _, p in access.files())


@pytest.mark.parametrize(
    ("damage", "reason", "line"),
    [
        ("edit", "edited", 2),
        ("delete", "deleted_or_reordered", 2),
        ("swap", "deleted_or_reordered", 2),
        ("cut_tail", "truncated", None),
        ("drop_day", "bad_genesis", 1),
    ],
)
def test_any_edit_deletion_reordering_or_cut_is_named_with_file_and_line(
    tmp_path: Path, damage: str, reason: str, line: int | None
) -> None:
    access = AccessLog(tmp_path / "access")
    write_days(access, 3)
    middle, newest = access.files()[1][1], access.files()[2][1]
    target = newest if damage == "cut_tail" else middle
    lines = lines_of(target)
    if damage == "edit":
        lines[1] = lines[1].replace('"accepted"', '"refused"')
    elif damage == "delete":
        del lines[1]
    elif damage == "swap":
        lines[1], lines[2] = lines[2], lines[1]
    elif damage == "cut_tail":
        del lines[-1]
    if damage == "drop_day":
        middle.unlink()
        target = newest
    else:
        target.write_text("\n".join(lines) + "\n", "utf-8")
    with pytest.raises(ChainBroken) as broken:
        access.verify()
    assert broken.value.path == target
    assert (broken.value.reason, broken.value.line) == (reason, line)


def test_retention_removes_old_days_and_the_rest_still_proves_it_follows_on(
    tmp_path: Path,
) -> None:
    access = AccessLog(tmp_path / "access")
    write_days(access, 5)
    removed = access.expire(date(2026, 11, 5), keep_days=2)
    assert [e.path.name for e in removed] == ["2026-11-01.jsonl", "2026-11-02.jsonl"]
    assert [(e.first_seq, e.last_seq) for e in removed] == [(1, 3), (4, 6)]
    assert [d.day for d, _ in access.files()] == [3, 4, 5]
    verified = access.verify()
    assert (verified.files, verified.entries, verified.head[0]) == (3, 9, 15)
    # The oldest file left must follow the last one removed: a forged start is caught.
    marker = tmp_path / "access" / "expired"
    kept = marker.read_text("ascii")
    marker.write_text(f"6 {'0' * 64}\n", "ascii")
    with pytest.raises(ChainBroken) as broken:
        access.verify()
    assert broken.value.reason == "bad_genesis"
    marker.write_text(kept, "ascii")
    assert access.expire(date(2030, 1, 1), keep_days=1)[-1:] != []  # never the newest
    assert len(access.files()) == 1


def exporter(
    spool: Spool, access: AccessLog, expired: list[Expired] | None = None
) -> AccessExporter:
    return AccessExporter(
        spool,
        access,
        Metrics(),
        retention_days=400,
        on_expired=(expired if expired is not None else []).append,
        clock=FakeClock(DAY1),
    )


async def test_committed_entries_are_written_out_in_order_and_forgotten(
    spool: Spool, tmp_path: Path
) -> None:
    access = AccessLog(tmp_path / "access")
    out = exporter(spool, access)
    await out.prepare()
    for n in range(10):
        await spool.record_access(body(DAY1 + n * 3600, n))
    assert await out.export() == 10
    assert await spool.pending_access(100) == []
    assert [e.body["request_id"] for _, e in access.entries()] == [f"{n:016x}" for n in range(10)]
    assert len(access.files()) == 2  # 23:59 + hours runs into the next Japan day


async def test_a_crash_after_writing_out_does_not_write_twice_and_a_new_spool_numbers_on(
    spool: Spool, tmp_path: Path
) -> None:
    """Rows written out but not yet forgotten (a crash in between) are forgotten at the
    next start; a fresh spool beside an existing log numbers its entries after its head."""
    access = AccessLog(tmp_path / "access")
    out = exporter(spool, access)
    await out.prepare()
    for n in range(3):
        await spool.record_access(body(DAY1 + n, n))
    access.append(await spool.pending_access(10))  # written out, then "crashed"
    again = exporter(spool, access)
    await again.prepare()
    assert await spool.pending_access(10) == []
    fresh = Spool(tmp_path / "fresh", os.urandom(32))
    await fresh.open()
    try:
        third = exporter(fresh, access)
        await third.prepare()
        assert await fresh.record_access(body(DAY1 + 5, 9)) == 4
        assert await third.export() == 1
    finally:
        await fresh.close()
    assert access.verify().entries == 4


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
async def test_every_write_of_an_export_may_fail_and_nothing_is_lost(
    spool: Spool, tmp_path: Path, code: int
) -> None:
    """Each write of an export (the day file's create, write, fsync, directory fsync, the
    anchor's, the index's forgetting) failed in turn: the export raises, the entries stay
    committed, and the next export writes each of them once, the chain intact."""
    access = AccessLog(tmp_path / "access")
    out = exporter(spool, access)
    await out.prepare()
    n = 0

    async def add(count: int) -> None:
        nonlocal n
        for _ in range(count):
            await spool.record_access(body(DAY1 + n * 600, n))
            n += 1

    await add(3)
    with DiskFaults() as counting:
        counting.arm(10**9, code)
        await out.export()
        points = len(counting.calls)
    assert points >= 8
    for fail_at in range(1, points + 1):
        await add(3)
        with DiskFaults() as faults:
            faults.arm(fail_at, code)
            try:
                await out.export()
            except OSError:
                pass
            except Exception as exc:  # the index reports its own failures as StorageFailed
                assert type(exc).__name__ in ("StorageFull", "StorageFailed"), exc
        await out.export()
        assert await spool.pending_access(10) == []
        ids = [e.body["request_id"] for _, e in access.entries()]
        assert ids == [f"{i:016x}" for i in range(n)], fail_at


def test_failed_handshakes_are_rate_limited_per_address_and_the_rest_summed_up() -> None:
    recorded: list[dict[str, object]] = []
    clock = FakeClock(DAY1)
    metrics = Metrics()
    recorder = AccessRecorder.__new__(AccessRecorder)
    AccessRecorder.__init__(recorder, spool=None, metrics=metrics, clock=clock, wake=lambda: None)  # type: ignore[arg-type]
    recorder.record = recorded.append  # type: ignore[method-assign]
    for _ in range(50):
        recorder.handshake_failed("tablets", ("192.0.2.7", 40000), "no_client_certificate")
    recorder.handshake_failed("tablets", ("192.0.2.8", 40001), "no_client_certificate")
    assert len(recorded) == HANDSHAKE_BURST + 1
    suppressed = "gateway_access_log_suppressed_total"
    assert metrics.registry.get_sample_value(suppressed, {"listener": "tablets"}) == 45
    clock.advance(HANDSHAKE_WINDOW)
    recorder.handshake_failed("tablets", ("192.0.2.7", 40002), "unknown_ca")
    last = recorded[-1]
    assert last["suppressed"] == 45 and last["problem"] == "unknown_ca"
    assert last["remote"] == "192.0.2.7" and last["port"] == 40002
    assert last["outcome"] == "tls-handshake-failed"


async def test_the_exporter_removes_expired_days_and_reports_each_removal(
    spool: Spool, tmp_path: Path
) -> None:
    """Each removal is handed on (the daemon writes it to the audit log) with the head it
    ended on."""
    access = AccessLog(tmp_path / "access")
    write_days(access, 4)
    expired: list[Expired] = []
    out = exporter(spool, access, expired)
    out.retention_days = 1
    removed = await out.expire(date(2026, 11, 4))
    assert [e.path.name for e in expired] == [e.path.name for e in removed]
    assert [e.path.name for e in removed] == ["2026-11-01.jsonl", "2026-11-02.jsonl"]
    assert removed[-1].last_hash == access.expired_head()[1]
    assert access.verify().entries == 6
