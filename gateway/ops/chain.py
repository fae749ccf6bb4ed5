"""An append-only, hash-chained JSON-lines log (改ざん検知付き追記専用ログ).

Under the erasure ledger (消去台帳), the operations audit log (監査ログ) and the access
log (アクセスログ). Every line is one entry::

    {"at":"2025-01-31T09:00:00.000000Z","body":{...},"hash":"<hex>","prev":"<hex>","seq":7}

written in canonical form (sorted keys, no spaces, UTF-8) and ended by a newline. ``hash``
is the SHA-256 of the canonical bytes of ``{seq, prev, at, body}``; ``prev`` is the
previous entry's ``hash`` (:data:`GENESIS` for seq 1); ``seq`` counts 1, 2, 3, ...
Bodies never hold personal data. A log kept as several files (the access log, a file a
day) chains each file from the last one's head (``start``).

:meth:`HashChainLog.verify` re-reads the whole file and raises :class:`ChainBroken` at
the first problem, naming the line and the reason: ``edited`` (the hash does not match,
or the line is not in canonical form), ``deleted_or_reordered`` (seq or prev does not
follow from the line before), ``bad_genesis`` (the first line is not seq 1 after
GENESIS), ``malformed`` (not an entry at all) or ``truncated`` (a torn final line).

Durability: :meth:`~HashChainLog.append` and :meth:`~HashChainLog.append_many` write with
``O_APPEND`` and fsync before returning (the directory too when they create the file,
mode 0600); a write that fails is cut back off. A crash mid-append can leave a torn
final line: ``verify`` reports it as ``truncated`` and ``append`` refuses, until
``gatewayd`` trims it at start into a quarantine file (:mod:`gateway.ops.chain_repair`).

Limitations, by design of an unkeyed hash chain:

- Removing whole entries from the end leaves a valid, shorter chain. Only an *anchor*
  detects it: with ``anchor=`` the log keeps ``"<seq> <hash>"`` of its head in that file,
  rewritten atomically after every append, and ``verify`` reports ``truncated`` when the
  log ends before the anchored seq and ``edited`` when the entry there has another hash.
  A log may run ahead of its anchor (a crash between the two writes); a missing anchor
  beside a non-empty log is reported as ``truncated``.
- Whoever can write the log (and its anchor) can rewrite the whole chain consistently:
  keep the anchor out of that reach, or copy it elsewhere from time to time.
- Writers and readers take ``flock``: a reader sees whole lines, and several processes
  may append (the audit log has the daemon and ``gatewayctl`` as writers).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from gateway import fsutil
from gateway.errors import GatewayError
from gateway.fsutil import fsync_dir, own_like_parent, write_atomic

GENESIS = "0" * 64
"""The ``prev`` of the first entry."""

BreakReason = Literal["edited", "deleted_or_reordered", "truncated", "malformed", "bad_genesis"]

_KEYS = frozenset({"seq", "prev", "at", "body", "hash"})
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ANCHOR = re.compile(r"(0|[1-9][0-9]*) ([0-9a-f]{64})\n?")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ChainEntry:
    """One entry of a hash-chained log, as written and as read back."""

    seq: int
    prev: str
    hash: str
    at: str
    body: Mapping[str, Any]


class ChainBroken(GatewayError):
    """A hash-chained log (or its anchor) is not intact; says where and why.

    ``line`` is 1-based, or None when the problem is not one line (an anchor that the
    log falls short of, a missing or unreadable anchor). A log kept in PostgreSQL gives
    its place as a string (then ``path.name`` is all of it) and the entry's ``seq``
    instead of a line (``seq`` None: not one entry). The text never quotes a body.
    """

    def __init__(
        self, path: Path | str, line: int | None, reason: BreakReason, detail: str, *, seq: int = 0
    ) -> None:
        self.path = Path(path)
        self.line, self.seq = line, seq or None
        self.reason: BreakReason = reason
        self.detail = detail
        where = self.path.name if line is None else f"{self.path.name} line {line}"
        super().__init__(f"{where}{f' seq {seq}' if seq else ''}: {detail}")


def _canonical(obj: Mapping[str, Any]) -> bytes:
    text = json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


def _entry_hash(seq: int, prev: str, at: str, body: Mapping[str, Any]) -> str:
    record = {"seq": seq, "prev": prev, "at": at, "body": body}
    return hashlib.sha256(_canonical(record)).hexdigest()


def _iso_utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def _read_lines(fd: int, size: int) -> Iterator[tuple[bytes, bool, bool]]:
    """Yield ``(line, complete, last)`` for the first ``size`` bytes of ``fd``."""
    offset = 0
    start = 0  # file offset of pending's first byte
    pending = b""
    while offset < size:
        chunk = os.pread(fd, min(_CHUNK, size - offset), offset)
        if not chunk:
            break  # the file shrank under us: what is left shows as a torn line
        offset += len(chunk)
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            start += len(line) + 1
            yield line, True, start >= size
    if pending:
        yield pending, False, True


def _last_line(fd: int, size: int) -> bytes | None:
    """The last line of a non-empty file without its newline; None if the line is torn."""
    if os.pread(fd, 1, size - 1) != b"\n":
        return None
    end = size - 1
    tail = b""
    while end > 0:
        low = max(0, end - 65536)
        data = os.pread(fd, end - low, low)
        cut = data.rfind(b"\n")
        if cut >= 0:
            return data[cut + 1 :] + tail
        tail = data + tail
        end = low
    return tail


class HashChainLog:
    """An append-only, hash-chained JSON-lines file; thread- and process-safe."""

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
        anchor: Path | None = None,
        kind: str = "log",
        start: tuple[int, str] = (0, GENESIS),
    ) -> None:
        self.path = path
        self.anchor = anchor
        self.kind = kind
        self.start = start  # (seq, hash) this file continues from: another file's head
        """What this log is (audit, ledger), as the file layer's fault seam names it."""
        self._clock = clock
        self._lock = threading.Lock()
        self._head: tuple[int, str] | None = None
        self._size = -1  # the file's size after this writer's last look at it
        self.anchor_behind = False  # the last anchor write failed; the next one catches up

    @property
    def head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the last entry; :attr:`start` for an empty log.

        Raises ChainBroken when the tail or the anchor is not intact.
        """
        with self._lock:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                self._check_anchor(self.start[0], dict([self.start]), self._read_anchor())
                return self.start
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                size = os.fstat(fd).st_size
                if self._head is None or size != self._size:
                    self._head = self._load_tail(fd, size)
                    self._size = size
                return self._head
            finally:
                os.close(fd)

    def append(self, body: Mapping[str, Any]) -> ChainEntry:
        """Append one entry and return it once it is on disk."""
        return self.append_many([body])[0]

    def append_many(self, bodies: Sequence[Mapping[str, Any]]) -> list[ChainEntry]:
        """Append entries with one write and one fsync; all are on disk when this returns.

        Raises ChainBroken, appending nothing, when the log's tail (or its anchor) is not
        intact; TypeError or ValueError, appending nothing, for a body that is not JSON.
        """
        if not bodies:
            return []
        with self._lock:
            fd, created = self._open_for_append()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                size = os.fstat(fd).st_size
                if self._head is None or size != self._size:
                    self._head = self._load_tail(fd, size)
                    self._size = size
                seq, prev = self._head
                if self.anchor is not None and seq == 0 and not self.anchor.exists():
                    self._write_anchor(0, GENESIS)  # so a crash below never loses the anchor
                at = _iso_utc(self._clock())
                entries: list[ChainEntry] = []
                lines: list[bytes] = []
                for body in bodies:
                    seq += 1
                    digest = _entry_hash(seq, prev, at, body)
                    record = {"seq": seq, "prev": prev, "at": at, "body": body, "hash": digest}
                    line = _canonical(record) + b"\n"
                    stored = json.loads(line)["body"]  # a copy, as verify will read it back
                    entries.append(ChainEntry(seq, prev, digest, at, stored))
                    lines.append(line)
                    prev = digest
                self._write(fd, b"".join(lines), size)
                if created:
                    fsync_dir(self.path.parent, kind=self.kind)
                self._head = (seq, prev)
                if self.anchor is not None:
                    # The entries are durable: the log may run ahead of its anchor, never
                    # behind it, so a refused anchor (full disk) fails no append.
                    try:
                        self._write_anchor(seq, prev)
                        self.anchor_behind = False
                    except OSError:
                        self.anchor_behind = True
                return entries
            finally:
                os.close(fd)  # releases the flock

    def verify(self) -> int:
        """Re-read the whole log; return its number of entries or raise ChainBroken."""
        return sum(1 for _ in self.entries())

    def entries(self) -> Iterator[ChainEntry]:
        """Yield the log's entries, each verified; raise ChainBroken at the first problem.

        The anchor is checked after the last entry. The log is read as it stood when
        iteration began; entries appended meanwhile are not included.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._check_anchor(self.start[0], dict([self.start]), self._read_anchor())
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                anchor = self._read_anchor()
                size = os.fstat(fd).st_size
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            yield from self._scan(fd, size, anchor)
        finally:
            os.close(fd)

    # -- internals -----------------------------------------------------------------

    def _open_for_append(self) -> tuple[int, bool]:
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = fsutil.create(self.path, flags | os.O_EXCL, 0o600, kind=self.kind)
        except FileExistsError:
            return os.open(self.path, flags), False
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            own_like_parent(fd, self.path)
        except BaseException:
            os.close(fd)
            raise
        return fd, True

    def _write(self, fd: int, data: bytes, size: int) -> None:
        try:
            fsutil.write_all(fd, data, kind=self.kind)
            fsutil.fsync(fd, kind=self.kind)
        except OSError:
            self._head = None  # reload the tail next time, whatever happens below
            try:
                os.ftruncate(fd, size)  # unacknowledged: take the partial write back
                os.fsync(fd)
            except OSError:
                pass  # a torn line stays; verify and append will report it
            raise
        self._size = size + len(data)

    def _load_tail(self, fd: int, size: int) -> tuple[int, str]:
        """The head from the last line alone when it and the anchor agree; else a full scan."""
        anchor = self._read_anchor()
        if size == 0:
            if self.anchor is None or anchor in (None, self.start):
                return self.start
        else:
            last = _last_line(fd, size)
            entry = None if last is None else self._parse_quietly(last)
            if entry is not None and (self.anchor is None or anchor == (entry.seq, entry.hash)):
                return (entry.seq, entry.hash)
        head = self.start  # something is off, or the log ran ahead of its anchor
        for entry in self._scan(fd, size, anchor):
            head = (entry.seq, entry.hash)
        return head

    def _parse_quietly(self, raw: bytes) -> ChainEntry | None:
        try:
            return self._parse(raw, 0, last=False)
        except ChainBroken:
            return None

    def _scan(self, fd: int, size: int, anchor: tuple[int, str] | None) -> Iterator[ChainEntry]:
        seq, prev = self.start
        hashes = dict([self.start])
        wanted = -1 if anchor is None else anchor[0]
        for lineno, (raw, complete, last) in enumerate(_read_lines(fd, size), start=1):
            if not complete:
                raise ChainBroken(
                    self.path,
                    lineno,
                    "truncated",
                    "torn final line without newline (a crash mid-append?); "
                    "cut it off after inspection before appending",
                )
            entry = self._parse(raw, lineno, last=last)
            if lineno == 1 and (entry.seq, entry.prev) != (seq + 1, prev):
                raise ChainBroken(
                    self.path,
                    lineno,
                    "bad_genesis",
                    f"first entry is seq {entry.seq}, not seq {seq + 1} after "
                    + ("the genesis hash" if seq == 0 else "the previous file's last entry"),
                )
            if (entry.seq, entry.prev) != (seq + 1, prev):
                raise ChainBroken(
                    self.path,
                    lineno,
                    "deleted_or_reordered",
                    f"expected seq {seq + 1} chained to the line before, found seq {entry.seq}"
                    + ("" if entry.seq == seq + 1 else " (entry deleted or moved)"),
                )
            seq, prev = entry.seq, entry.hash
            if seq == wanted:
                hashes[seq] = prev
            yield entry
        self._check_anchor(seq, hashes, anchor)

    def _parse(self, raw: bytes, lineno: int, *, last: bool) -> ChainEntry:
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):
            if last:
                raise ChainBroken(
                    self.path, lineno, "truncated", "final line is not a whole entry"
                ) from None
            raise ChainBroken(self.path, lineno, "malformed", "not a JSON entry") from None
        if not (
            isinstance(obj, dict)
            and obj.keys() == _KEYS
            and type(obj["seq"]) is int
            and obj["seq"] >= 1
            and isinstance(obj["prev"], str)
            and _HEX64.fullmatch(obj["prev"])
            and isinstance(obj["hash"], str)
            and _HEX64.fullmatch(obj["hash"])
            and isinstance(obj["at"], str)
            and isinstance(obj["body"], dict)
        ):
            raise ChainBroken(self.path, lineno, "malformed", "not a chain entry")
        entry = ChainEntry(obj["seq"], obj["prev"], obj["hash"], obj["at"], obj["body"])
        if _entry_hash(entry.seq, entry.prev, entry.at, entry.body) != entry.hash:
            raise ChainBroken(self.path, lineno, "edited", "entry edited (hash mismatch)")
        if _canonical(obj) != raw:
            raise ChainBroken(self.path, lineno, "edited", "entry edited (not canonical JSON)")
        return entry

    def _read_anchor(self) -> tuple[int, str] | None:
        if self.anchor is None:
            return None
        try:
            text = self.anchor.read_text(encoding="ascii")
        except FileNotFoundError:
            return None
        except UnicodeDecodeError:
            text = ""
        match = _ANCHOR.fullmatch(text)
        if match is None:
            raise ChainBroken(self.anchor, None, "malformed", "anchor is not '<seq> <hash>'")
        return int(match[1]), match[2]

    def _check_anchor(
        self, seq: int, hashes: Mapping[int, str], anchor: tuple[int, str] | None
    ) -> None:
        if self.anchor is None:
            return
        if anchor is None:
            if seq:
                raise ChainBroken(
                    self.path,
                    None,
                    "truncated",
                    f"anchor {self.anchor.name} is missing: removed entries cannot be ruled out",
                )
            return
        anchored_seq, anchored_hash = anchor
        if anchored_seq > seq:
            raise ChainBroken(
                self.path,
                None,
                "truncated",
                f"log ends at seq {seq} but anchor {self.anchor.name} records seq "
                f"{anchored_seq}: trailing entries removed",
            )
        if hashes.get(anchored_seq) != anchored_hash:
            raise ChainBroken(
                self.path,
                anchored_seq or None,
                "edited",
                f"entry differs from anchor {self.anchor.name} (hash mismatch)",
            )

    def _write_anchor(self, seq: int, digest: str) -> None:
        assert self.anchor is not None
        line = f"{seq} {digest}\n".encode("ascii")
        write_atomic(self.anchor, line, mode=0o600, kind=f"{self.kind}-anchor")
