"""The one repair an append-only log gets by itself: cutting off a torn final line.

A power cut during an append can keep only part of the last line (the write was not
acknowledged: the caller waits for the fsync of the whole line). Such a line was never
anyone's record, so at start the daemon moves those bytes to a quarantine file beside
the log (0600, kept for inspection), cuts the log back to its last newline, and says so
in the log and the audit log. Anything else wrong with a log (an edited, missing or
reordered line anywhere, a malformed complete line) is not repaired: it stays an error
that names the line, for an operator to look at.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from gateway.fsutil import fsync_dir, write_atomic

_CHUNK = 1 << 16


@dataclass(frozen=True)
class TornTail:
    """What was cut off a log, and where it was kept."""

    log: Path
    quarantine: Path
    torn_bytes: int
    kept_bytes: int


def trim_torn_tail(path: Path, *, clock: Callable[[], float] = time.time) -> TornTail | None:
    """Cut a torn final line (bytes after the last newline) off the log at ``path``,
    keeping them in ``<name>.torn-<UTC time>``; None when the log ends in a newline (or
    does not exist). Durable before it returns: quarantine, then the cut, then the
    directory."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # no writer appends meanwhile
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return None
        keep = _after_last_newline(fd, size)
        torn = os.pread(fd, size - keep, keep)
        stamp = datetime.fromtimestamp(clock(), UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        quarantine = path.with_name(f"{path.name}.torn-{stamp}")
        write_atomic(quarantine, torn, mode=0o600)
        os.ftruncate(fd, keep)
        os.fsync(fd)
        fsync_dir(path.parent)
        return TornTail(path, quarantine, len(torn), keep)
    finally:
        os.close(fd)


def _after_last_newline(fd: int, size: int) -> int:
    """The offset just after the file's last newline (0 when it has none)."""
    end = size
    while end > 0:
        low = max(0, end - _CHUNK)
        cut = os.pread(fd, end - low, low).rfind(b"\n")
        if cut >= 0:
            return low + cut + 1
        end = low
    return 0
