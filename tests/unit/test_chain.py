"""The hash-chained log: round trips, every kind of tampering, crashes, anchors, threads."""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gateway.errors import GatewayError
from gateway.ops.chain import GENESIS, ChainBroken, ChainEntry, HashChainLog
from gateway.testing.faults import DiskFaults

T0 = 1_738_281_600.0  # 2025-01-31T00:00:00Z


class StepClock:
    """A clock that moves one second per call."""

    def __init__(self, start: float = T0) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def body(n: int) -> dict[str, object]:
    return {"event": "erased", "record": f"rec-{n:04d}", "n": n}


def make_log(tmp_path: Path, count: int, *, anchored: bool = False) -> HashChainLog:
    log = HashChainLog(
        tmp_path / "ledger.jsonl",
        clock=StepClock(),
        anchor=tmp_path / "ledger.anchor" if anchored else None,
    )
    for n in range(1, count + 1):
        log.append(body(n))
    return log


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def broken(log: HashChainLog) -> ChainBroken:
    with pytest.raises(ChainBroken) as caught:
        log.verify()
    return caught.value


def test_round_trip_of_a_thousand_entries(tmp_path: Path) -> None:
    """1,000 appended entries verify, read back equal, and chain seq and prev from GENESIS."""
    log = HashChainLog(tmp_path / "ledger.jsonl", clock=StepClock())
    written = [log.append(body(n)) for n in range(1, 1001)]
    assert log.verify() == 1000
    assert list(log.entries()) == written
    assert [e.seq for e in written] == list(range(1, 1001))
    assert written[0].prev == GENESIS
    assert all(b.prev == a.hash for a, b in itertools.pairwise(written))
    assert log.head == (1000, written[-1].hash)


def test_hash_is_sha256_of_the_canonical_entry_and_the_line_adds_it(tmp_path: Path) -> None:
    """Each line is the canonical JSON of seq, prev, at, body plus hash = sha256 of the rest."""
    log = make_log(tmp_path, 2)
    for raw in lines_of(log.path):
        obj = json.loads(raw)
        rest = {k: obj[k] for k in ("seq", "prev", "at", "body")}
        canon = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert obj["hash"] == hashlib.sha256(canon.encode()).hexdigest()
        full = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert raw == full.encode() + b"\n"


def test_missing_or_empty_log_verifies_as_empty(tmp_path: Path) -> None:
    """A log that does not exist yet, or is empty, has no entries and the genesis head."""
    log = HashChainLog(tmp_path / "ledger.jsonl")
    assert log.verify() == 0
    assert log.head == (0, GENESIS)
    log.path.touch()
    assert HashChainLog(log.path).verify() == 0
    assert HashChainLog(log.path).head == (0, GENESIS)


@pytest.mark.parametrize("anchored", [False, True], ids=["plain", "anchored"])
def test_append_many_writes_a_batch_with_one_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, anchored: bool
) -> None:
    """A batch costs one fsync of the log, plus the anchor file's and its directory's."""
    log = make_log(tmp_path, 1, anchored=anchored)
    inode = log.path.stat().st_ino
    synced: list[bool] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino == inode)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    entries = log.append_many([body(n) for n in range(2, 2002)])
    assert [e.seq for e in entries] == list(range(2, 2002))
    assert synced.count(True) == 1
    assert len(synced) == (3 if anchored else 1)
    monkeypatch.undo()
    assert log.verify() == 2001


def test_append_many_of_nothing_writes_nothing(tmp_path: Path) -> None:
    """An empty batch returns no entries and does not create the file."""
    log = HashChainLog(tmp_path / "ledger.jsonl")
    assert log.append_many([]) == []
    assert not log.path.exists()


def _edit(line: int, old: bytes, new: bytes) -> Callable[[list[bytes]], bytes]:
    def mutate(lines: list[bytes]) -> bytes:
        assert old in lines[line - 1]
        lines[line - 1] = lines[line - 1].replace(old, new, 1)
        return b"".join(lines)

    return mutate


def _delete(line: int) -> Callable[[list[bytes]], bytes]:
    return lambda lines: b"".join(lines[: line - 1] + lines[line:])


def _swap(line: int) -> Callable[[list[bytes]], bytes]:
    def mutate(lines: list[bytes]) -> bytes:
        lines[line - 1], lines[line] = lines[line], lines[line - 1]
        return b"".join(lines)

    return mutate


def _duplicate(line: int) -> Callable[[list[bytes]], bytes]:
    return lambda lines: b"".join(lines[:line] + lines[line - 1 :])


def _tear_last(lines: list[bytes]) -> bytes:
    return b"".join(lines[:-1]) + lines[-1][:40]


def _drop_last_newline(lines: list[bytes]) -> bytes:
    return b"".join(lines)[:-1]


def _spaced(line: int) -> Callable[[list[bytes]], bytes]:
    def mutate(lines: list[bytes]) -> bytes:
        lines[line - 1] = json.dumps(json.loads(lines[line - 1])).encode() + b"\n"
        return b"".join(lines)

    return mutate


def _garbage(line: int) -> Callable[[list[bytes]], bytes]:
    def mutate(lines: list[bytes]) -> bytes:
        lines[line - 1] = b"not json at all\n"
        return b"".join(lines)

    return mutate


def _not_an_entry(line: int) -> Callable[[list[bytes]], bytes]:
    def mutate(lines: list[bytes]) -> bytes:
        lines[line - 1] = b'{"seq":7}\n'
        return b"".join(lines)

    return mutate


TAMPERING = [
    pytest.param(_edit(7, b"rec-0007", b"rec-0008"), 7, "edited", id="body-one-char"),
    pytest.param(_edit(7, b'"n":7', b'"n":9'), 7, "edited", id="body-number"),
    pytest.param(_edit(4, b"T00:00:04", b"T00:00:05"), 4, "edited", id="timestamp"),
    pytest.param(_edit(3, b'"seq":3', b'"seq":4'), 3, "edited", id="seq"),
    pytest.param(_edit(6, b'"hash":"', b'"hash":"0'), 6, "malformed", id="hash-too-long"),
    pytest.param(_spaced(5), 5, "edited", id="not-canonical"),
    pytest.param(_delete(5), 5, "deleted_or_reordered", id="deleted-middle"),
    pytest.param(_swap(4), 4, "deleted_or_reordered", id="swapped"),
    pytest.param(_duplicate(5), 6, "deleted_or_reordered", id="duplicated"),
    pytest.param(_delete(1), 1, "bad_genesis", id="deleted-first"),
    pytest.param(_swap(1), 1, "bad_genesis", id="swapped-first"),
    pytest.param(_tear_last, 10, "truncated", id="torn-mid-json"),
    pytest.param(_drop_last_newline, 10, "truncated", id="no-final-newline"),
    pytest.param(_garbage(10), 10, "truncated", id="garbage-at-end"),
    pytest.param(_garbage(3), 3, "malformed", id="garbage-middle"),
    pytest.param(_not_an_entry(8), 8, "malformed", id="not-an-entry"),
]


@pytest.mark.parametrize(("mutate", "line", "reason"), TAMPERING)
def test_tampering_is_reported_at_its_line_with_its_reason(
    tmp_path: Path, mutate: Callable[[list[bytes]], bytes], line: int, reason: str
) -> None:
    """Each edit, deletion, reordering or tear raises ChainBroken naming the line and reason."""
    log = make_log(tmp_path, 10)
    log.path.write_bytes(mutate(lines_of(log.path)))
    error = broken(log)
    assert (error.line, error.reason) == (line, reason)
    assert isinstance(error, GatewayError)
    assert str(error).startswith(f"ledger.jsonl line {line}: ")
    with pytest.raises(ChainBroken):
        list(HashChainLog(log.path).entries())


def test_message_says_where_and_why(tmp_path: Path) -> None:
    """An edited line reads 'ledger.jsonl line 7: entry edited (hash mismatch)'."""
    log = make_log(tmp_path, 10)
    log.path.write_bytes(_edit(7, b"rec-0007", b"rec-0008")(lines_of(log.path)))
    assert str(broken(log)) == "ledger.jsonl line 7: entry edited (hash mismatch)"


def test_entries_yields_the_intact_prefix_before_raising(tmp_path: Path) -> None:
    """Iteration yields every entry before the broken line, then raises at it."""
    log = make_log(tmp_path, 10)
    log.path.write_bytes(_delete(5)(lines_of(log.path)))
    seen: list[int] = []
    with pytest.raises(ChainBroken, match="line 5"):
        seen.extend(e.seq for e in log.entries())
    assert seen == [1, 2, 3, 4]


@pytest.mark.parametrize("removed", [1, 3])
def test_removed_trailing_entries_are_caught_only_with_an_anchor(
    tmp_path: Path, removed: int
) -> None:
    """Dropping whole last lines is 'truncated' with an anchor and undetectable without one."""
    anchored = make_log(tmp_path, 10, anchored=True)
    plain = HashChainLog(anchored.path)
    anchored.path.write_bytes(b"".join(lines_of(anchored.path)[:-removed]))
    error = broken(anchored)
    assert (error.line, error.reason) == (None, "truncated")
    assert f"ends at seq {10 - removed}" in str(error)
    assert plain.verify() == 10 - removed  # the documented limitation


def test_append_refuses_to_continue_a_log_shorter_than_its_anchor(tmp_path: Path) -> None:
    """A fresh writer on a truncated anchored log raises instead of re-anchoring the damage."""
    log = make_log(tmp_path, 5, anchored=True)
    log.path.write_bytes(b"".join(lines_of(log.path)[:-2]))
    reopened = HashChainLog(log.path, anchor=log.anchor)
    with pytest.raises(ChainBroken) as caught:
        reopened.append(body(6))
    assert caught.value.reason == "truncated"
    assert len(lines_of(log.path)) == 3
    log.path.unlink()
    with pytest.raises(ChainBroken, match="ends at seq 0") as caught:
        HashChainLog(log.path, anchor=log.anchor).append(body(1))
    assert caught.value.reason == "truncated"


def test_anchor_with_another_hash_reports_the_entry_edited(tmp_path: Path) -> None:
    """A log whose entry at the anchored seq has another hash is 'edited' at that line."""
    log = make_log(tmp_path, 4, anchored=True)
    assert log.anchor is not None
    log.anchor.write_text(f"3 {'a' * 64}\n")
    error = broken(log)
    assert (error.line, error.reason) == (3, "edited")


def test_missing_or_unreadable_anchor_is_an_error(tmp_path: Path) -> None:
    """A non-empty log without its anchor, or with a garbled one, does not verify."""
    log = make_log(tmp_path, 2, anchored=True)
    assert log.anchor is not None
    log.anchor.write_text("two hashes\n")
    error = broken(log)
    assert (error.path, error.line, error.reason) == (log.anchor, None, "malformed")
    log.anchor.unlink()
    error = broken(log)
    assert (error.line, error.reason) == (None, "truncated")


def test_log_may_run_ahead_of_its_anchor_after_a_crash(tmp_path: Path) -> None:
    """An anchor one batch behind (crash between log and anchor) verifies and then catches up."""
    log = make_log(tmp_path, 3, anchored=True)
    assert log.anchor is not None
    behind = log.anchor.read_bytes()
    log.append_many([body(4), body(5)])
    log.anchor.write_bytes(behind)
    assert log.verify() == 5
    reopened = HashChainLog(log.path, anchor=log.anchor)
    entry = reopened.append(body(6))
    assert log.anchor.read_text() == f"6 {entry.hash}\n"
    assert reopened.verify() == 6


def test_torn_final_line_blocks_append_until_repaired(tmp_path: Path) -> None:
    """After a crash mid-append the torn line is never extended; once cut off, the chain goes on."""
    log = make_log(tmp_path, 3)
    intact = log.path.read_bytes()
    with log.path.open("ab") as f:
        f.write(b'{"at":"2025-01-31T00:00:09.000000Z","bo')
    reopened = HashChainLog(log.path)
    with pytest.raises(ChainBroken) as caught:
        reopened.append(body(4))
    assert (caught.value.line, caught.value.reason) == (4, "truncated")
    assert log.path.read_bytes().startswith(intact + b'{"at"')
    os.truncate(log.path, len(intact))  # the operator's repair
    assert reopened.append(body(4)).seq == 4
    assert reopened.verify() == 4


def test_edited_last_entry_blocks_append(tmp_path: Path) -> None:
    """A writer never chains onto a last line whose hash does not match."""
    log = make_log(tmp_path, 3)
    log.path.write_bytes(_edit(3, b"rec-0003", b"rec-0004")(lines_of(log.path)))
    with pytest.raises(ChainBroken) as caught:
        HashChainLog(log.path).append(body(4))
    assert (caught.value.line, caught.value.reason) == (3, "edited")
    assert len(lines_of(log.path)) == 3


def test_failed_write_is_taken_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An fsync error raises, leaves the log as it was, and the next append continues."""
    log = make_log(tmp_path, 2)
    before = log.path.read_bytes()
    real_fsync = os.fsync
    calls: list[int] = []

    def failing_once(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_once)
    with pytest.raises(OSError, match="Input/output"):
        log.append(body(3))
    assert log.path.read_bytes() == before
    assert log.append(body(3)).seq == 3
    assert log.verify() == 3


def test_body_that_is_not_json_appends_nothing(tmp_path: Path) -> None:
    """A body JSON cannot encode raises and leaves the log unchanged."""
    log = make_log(tmp_path, 1)
    before = log.path.read_bytes()
    with pytest.raises(TypeError):
        log.append_many([body(2), {"when": object()}])
    with pytest.raises(ValueError, match="JSON"):
        log.append({"ratio": float("nan")})
    assert log.path.read_bytes() == before
    assert log.append(body(2)).seq == 2


def test_log_and_anchor_are_created_0600(tmp_path: Path) -> None:
    """The log and its anchor are owner-only whatever the umask."""
    old = os.umask(0)
    try:
        log = make_log(tmp_path, 1, anchored=True)
    finally:
        os.umask(old)
    assert log.anchor is not None
    assert log.path.stat().st_mode & 0o777 == 0o600
    assert log.anchor.stat().st_mode & 0o777 == 0o600


def test_reopened_log_continues_the_chain(tmp_path: Path) -> None:
    """A new HashChainLog on an existing file carries on with the next seq and prev."""
    first = make_log(tmp_path, 3, anchored=True)
    last = first.head
    second = HashChainLog(first.path, clock=StepClock(), anchor=first.anchor)
    assert second.head == last
    entry = second.append(body(4))
    assert (entry.seq, entry.prev) == (4, last[1])
    assert second.verify() == 4


def test_two_writers_take_turns_without_breaking_the_chain(tmp_path: Path) -> None:
    """A writer that finds the file grown by another reloads the tail before appending."""
    one = HashChainLog(tmp_path / "ledger.jsonl")
    two = HashChainLog(tmp_path / "ledger.jsonl")
    for n in range(1, 7):
        (one if n % 2 else two).append(body(n))
    assert one.verify() == 6
    assert one.head == two.head


def test_concurrent_appends_keep_a_valid_chain(tmp_path: Path) -> None:
    """8 threads appending 50 entries each leave one valid chain of 400."""
    log = HashChainLog(tmp_path / "ledger.jsonl", anchor=tmp_path / "ledger.anchor")

    def worker(t: int) -> list[ChainEntry]:
        return [log.append({"thread": t, "i": i}) for i in range(50)]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = [f.result() for f in [pool.submit(worker, t) for t in range(8)]]
    assert sorted(e.seq for batch in results for e in batch) == list(range(1, 401))
    assert log.verify() == 400
    bodies = {(e.body["thread"], e.body["i"]) for e in log.entries()}
    assert len(bodies) == 400


def test_japanese_text_round_trips_as_utf8(tmp_path: Path) -> None:
    """A body with Japanese text is stored as UTF-8 (not escaped) and reads back equal."""
    log = HashChainLog(tmp_path / "ledger.jsonl")
    text = {"note": "個人番号カード交付申請の消去", "ward": "世田谷区"}
    written = log.append(text)
    assert "世田谷区".encode() in log.path.read_bytes()
    (read,) = log.entries()
    assert read == written
    assert read.body == text


def test_injected_clock_stamps_at_in_utc(tmp_path: Path) -> None:
    """``at`` is the injected clock's time as ISO 8601 UTC with Z; one stamp per batch."""
    log = HashChainLog(tmp_path / "ledger.jsonl", clock=lambda: T0 + 0.25)
    first = log.append(body(1))
    batch = log.append_many([body(2), body(3)])
    assert first.at == "2025-01-31T00:00:00.250000Z"
    assert {e.at for e in batch} == {first.at}


# ------------------------------------------------------------ a failing disk


def test_an_anchor_the_disk_refuses_fails_no_append_and_the_next_one_catches_up(
    tmp_path: Path,
) -> None:
    """The entries are durable before the anchor is written: an anchor the disk refuses
    (full) does not make the caller believe the entry was not written (it would write it
    twice); the log runs ahead of its anchor until the next append."""
    anchor = tmp_path / "ledger.anchor"
    log = HashChainLog(tmp_path / "ledger.jsonl", anchor=anchor, kind="ledger")
    log.append({"n": 1})
    with DiskFaults() as faults:
        faults.arm(1, errno.ENOSPC, only=("ledger-anchor", "rename"))
        entry = log.append({"n": 2})
    assert entry.seq == 2 and log.anchor_behind
    assert anchor.read_text().split()[0] == "1"
    assert log.verify() == 2
    log.append({"n": 3})
    assert anchor.read_text().split()[0] == "3" and not log.anchor_behind
    assert log.verify() == 3


@pytest.mark.parametrize("operation", ["write", "fsync"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_an_append_the_disk_refuses_is_taken_back(
    tmp_path: Path, operation: str, code: int
) -> None:
    """A write or fsync that fails raises, and the log is cut back to where it was: it
    verifies, and the next append follows the last entry that was written."""
    log = HashChainLog(tmp_path / "audit.jsonl", kind="audit")
    log.append({"n": 1})
    size = log.path.stat().st_size
    with DiskFaults() as faults:
        faults.arm(1, code, only=("audit", operation))
        with pytest.raises(OSError) as raised:
            log.append({"n": 2})
    assert raised.value.errno == code
    assert log.path.stat().st_size == size
    assert log.append({"n": 3}).seq == 2
    assert log.verify() == 2
