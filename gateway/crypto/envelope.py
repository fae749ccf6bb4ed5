"""Chunked AES-256-GCM file envelope for spooled submissions (STREAM construction).

Every spooled body is encrypted with its own random 256-bit data key (DEK). The DEK is
wrapped (RFC 3394) by the master key and stored in the index, never in the file, so
dropping the index row crypto-erases the file.

File layout::

    header   16 bytes  b"GWSPOOL1" | segment plaintext size (uint32 BE) | 4 zero bytes
    segment  n times   AES-GCM ciphertext of up to ``segment_size`` bytes | 16-byte tag

Segment ``i`` is sealed with nonce ``i`` (11 bytes big-endian) ``|`` final flag (1 byte,
0x01 on the last segment only) and associated data ``header | caller aad``. Every
plaintext is followed by exactly one final segment shorter than ``segment_size`` (empty
when the plaintext length is a multiple of it), so a record of ``p`` plaintext bytes has
``p // segment_size + 1`` segments. Truncation, reordering, extension, bit flips, a wrong
key or wrong associated data all surface as :class:`RecordCorrupt` whose message names
no data (Hoang, Reyhanitabar, Rogaway, Vizár 2015, "Online Authenticated-Encryption and
its Nonce-Reuse Misuse-Resistance").
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import TYPE_CHECKING, BinaryIO

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap,
    aes_key_wrap,
)

from gateway.errors import RecordCorrupt

if TYPE_CHECKING:
    pass

__all__ = [
    "HEADER_SIZE",
    "KEY_SIZE",
    "MAGIC",
    "MAX_SEGMENT_SIZE",
    "SEGMENT_SIZE",
    "TAG_SIZE",
    "EncryptingWriter",
    "ciphertext_size",
    "new_data_key",
    "segment_count",
    "unwrap_key",
    "wrap_key",
]

MAGIC = b"GWSPOOL1"
SEGMENT_SIZE = 65536
MAX_SEGMENT_SIZE = 1 << 24
HEADER_SIZE = 16
TAG_SIZE = 16
KEY_SIZE = 32

_HEADER = struct.Struct(">8sII")
_FINAL = b"\x01"
_NOT_FINAL = b"\x00"


def check_key(key: bytes, what: str) -> None:
    if len(key) != KEY_SIZE:
        raise ValueError(f"{what} must be {KEY_SIZE} bytes")


def _check_segment_size(segment_size: int) -> None:
    if not 1 <= segment_size <= MAX_SEGMENT_SIZE:
        raise ValueError(f"segment_size must be between 1 and {MAX_SEGMENT_SIZE}")


def nonce(index: int, final: bool) -> bytes:
    return index.to_bytes(11, "big") + (_FINAL if final else _NOT_FINAL)


def _header(segment_size: int) -> bytes:
    return _HEADER.pack(MAGIC, segment_size, 0)


def parse_header(header: bytes) -> int:
    """Return the segment size recorded in ``header``; RecordCorrupt if malformed."""
    if len(header) != HEADER_SIZE:
        raise RecordCorrupt("spool record is truncated (header)")
    magic, segment_size, reserved = _HEADER.unpack(header)
    if magic != MAGIC or reserved != 0 or not 1 <= segment_size <= MAX_SEGMENT_SIZE:
        raise RecordCorrupt("spool record has an invalid header")
    return int(segment_size)


def read_exact(fileobj: BinaryIO, n: int) -> bytes:
    """Read up to ``n`` bytes, retrying short reads; fewer only at end of file."""
    data = fileobj.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = fileobj.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def new_data_key() -> bytes:
    """A fresh random 256-bit data key."""
    return os.urandom(KEY_SIZE)


def wrap_key(master: bytes, dek: bytes) -> bytes:
    """Wrap ``dek`` under ``master`` with RFC 3394 AES key wrap (40 bytes out)."""
    check_key(master, "master key")
    check_key(dek, "data key")
    return aes_key_wrap(master, dek)


def unwrap_key(master: bytes, wrapped: bytes) -> bytes:
    """Unwrap a data key; RecordCorrupt if it fails the RFC 3394 integrity check."""
    check_key(master, "master key")
    try:
        dek = aes_key_unwrap(master, wrapped)
    except (InvalidUnwrap, ValueError):
        raise RecordCorrupt("wrapped data key failed to unwrap") from None
    if len(dek) != KEY_SIZE:
        raise RecordCorrupt("wrapped data key has the wrong length")
    return dek


def segment_count(plaintext_size: int, segment_size: int = SEGMENT_SIZE) -> int:
    """Number of segments in a record holding ``plaintext_size`` bytes."""
    if plaintext_size < 0:
        raise ValueError("plaintext_size must not be negative")
    _check_segment_size(segment_size)
    return plaintext_size // segment_size + 1


def ciphertext_size(plaintext_size: int, segment_size: int = SEGMENT_SIZE) -> int:
    """Exact file size of a record holding ``plaintext_size`` bytes."""
    return HEADER_SIZE + plaintext_size + TAG_SIZE * segment_count(plaintext_size, segment_size)


class EncryptingWriter:
    """Encrypts a byte stream into ``fileobj`` segment by segment.

    Holds at most one segment of plaintext. The header is written at construction;
    :meth:`close` seals the final segment but neither closes nor fsyncs ``fileobj``.
    """

    def __init__(
        self,
        fileobj: BinaryIO,
        dek: bytes,
        aad: bytes,
        segment_size: int = SEGMENT_SIZE,
    ) -> None:
        check_key(dek, "data key")
        _check_segment_size(segment_size)
        self._fileobj = fileobj
        self._aead = AESGCM(dek)
        self._segment_size = segment_size
        header = _header(segment_size)
        self._aad = header + bytes(aad)
        self._buf = bytearray(segment_size)
        self._view: memoryview | None = memoryview(self._buf)
        self._fill = 0
        self._index = 0
        self._plaintext_size = 0
        self._ciphertext_size = 0
        self._sha256 = hashlib.sha256()
        self._closed = False
        self._put(header)

    @property
    def plaintext_size(self) -> int:
        """Plaintext bytes accepted so far."""
        return self._plaintext_size

    @property
    def ciphertext_size(self) -> int:
        """Bytes written to ``fileobj`` so far, header included."""
        return self._ciphertext_size

    @property
    def closed(self) -> bool:
        return self._closed

    def ciphertext_sha256(self) -> str:
        """Hex SHA-256 of every byte written to ``fileobj`` so far."""
        return self._sha256.hexdigest()

    def _put(self, chunk: bytes) -> None:
        self._sha256.update(chunk)
        view = memoryview(chunk)
        while view:
            written = self._fileobj.write(view)
            if written is None or written <= 0:
                raise OSError("short write to spool file")
            view = view[written:]
        self._ciphertext_size += len(chunk)

    def _seal(self, plaintext: bytes | bytearray | memoryview, final: bool) -> None:
        ciphertext = self._aead.encrypt(nonce(self._index, final), plaintext, self._aad)
        self._index += 1
        self._put(ciphertext)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Accept more plaintext; full segments are sealed and written at once."""
        if self._closed or self._view is None:
            raise ValueError("write to a closed EncryptingWriter")
        src = memoryview(data).cast("B")
        n = len(src)
        if not n:
            return
        self._plaintext_size += n
        size = self._segment_size
        pos = 0
        if self._fill:
            take = min(size - self._fill, n)
            self._view[self._fill : self._fill + take] = src[:take]
            self._fill += take
            pos = take
            if self._fill < size:
                return
            self._seal(self._view, final=False)
            self._fill = 0
        # Full segments straight from the caller's buffer: no copy into ours.
        while n - pos >= size:
            self._seal(src[pos : pos + size], final=False)
            pos += size
        rest = n - pos
        if rest:
            self._view[:rest] = src[pos:]
            self._fill = rest

    def close(self) -> None:
        """Seal the final (possibly empty) segment. Idempotent."""
        if self._closed or self._view is None:
            return
        self._seal(self._view[: self._fill], final=True)
        self._fill = 0
        self._view.release()
        self._view = None
        self._closed = True
