"""A torn final line of an append-only log is cut off at start, kept aside, and said;
damage anywhere else stays an error that names its line."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from gateway.ops.chain import ChainBroken, HashChainLog
from gateway.ops.chain_repair import trim_torn_tail

T0 = 1_800_000_000.0


def a_log(tmp_path: Path, entries: int = 3) -> tuple[HashChainLog, bytes]:
    """A log of ``entries`` entries, and the bytes one more entry's append writes."""
    log = HashChainLog(tmp_path / "audit.jsonl", clock=lambda: T0, anchor=tmp_path / "anchor")
    for n in range(entries):
        log.append({"action": f"entry-{n}"})
    intact = log.path.read_bytes()
    log.append({"action": "the append a power cut tears"})
    line = log.path.read_bytes()[len(intact) :]
    log.path.write_bytes(intact)
    (tmp_path / "anchor").write_text(f"{entries} {log_head(intact)}\n")
    return HashChainLog(log.path, anchor=tmp_path / "anchor"), line


def log_head(raw: bytes) -> str:
    return str(json.loads(raw.splitlines()[-1])["hash"])


def test_a_tear_at_every_byte_offset_of_the_last_append_is_cut_off(tmp_path: Path) -> None:
    """For each offset inside the last line (its newline not yet on disk), the log is
    cut back to the entries before, the torn bytes are kept in a 0600 quarantine file,
    and the chain verifies again and takes appends."""
    log, line = a_log(tmp_path)
    intact = log.path.read_bytes()
    assert line.endswith(b"\n") and len(line) > 100
    for offset in range(1, len(line)):
        log.path.write_bytes(intact + line[:offset])
        with pytest.raises(ChainBroken) as broken:
            log.verify()
        assert broken.value.reason == "truncated"
        torn = trim_torn_tail(log.path, clock=lambda moment=T0 + offset: moment)
        assert torn is not None, offset
        assert (torn.torn_bytes, torn.kept_bytes) == (offset, len(intact))
        assert torn.quarantine.read_bytes() == line[:offset]
        assert stat.S_IMODE(torn.quarantine.stat().st_mode) == 0o600
        assert log.path.read_bytes() == intact
        assert HashChainLog(log.path, anchor=log.anchor).verify() == 3
        torn.quarantine.unlink()
    HashChainLog(log.path, anchor=log.anchor).append({"action": "after the repair"})
    assert HashChainLog(log.path, anchor=log.anchor).verify() == 4


def test_a_whole_last_line_and_a_missing_log_need_no_repair(tmp_path: Path) -> None:
    log, _line = a_log(tmp_path)
    before = log.path.read_bytes()
    assert trim_torn_tail(log.path) is None
    assert log.path.read_bytes() == before
    assert trim_torn_tail(tmp_path / "nothing.jsonl") is None


def test_a_log_that_is_all_torn_is_emptied(tmp_path: Path) -> None:
    """A first append torn: the log is cut to nothing, which is a valid empty chain."""
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(b'{"at":"2026-')
    torn = trim_torn_tail(path)
    assert torn is not None and torn.kept_bytes == 0
    assert path.read_bytes() == b"" and HashChainLog(path).verify() == 0


def test_damage_anywhere_else_stays_an_error_naming_the_line(tmp_path: Path) -> None:
    """An edited middle line (and a malformed complete last line) is not 'repaired':
    the cut touches only bytes after the last newline, and verify names the line."""
    log, _line = a_log(tmp_path)
    lines = log.path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b"entry-1", b"entry-X")
    log.path.write_bytes(b"".join(lines))
    assert trim_torn_tail(log.path) is None
    with pytest.raises(ChainBroken) as broken:
        log.verify()
    assert (broken.value.line, broken.value.reason) == (2, "edited")
    log.path.write_bytes(b"".join([*lines[:1], b"not json at all\n"]))
    assert trim_torn_tail(log.path) is None
    with pytest.raises(ChainBroken) as broken:
        log.verify()
    assert broken.value.line == 2
