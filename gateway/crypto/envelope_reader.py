"""Reading a spool envelope back: a seekable plaintext window (for the photo check) and
the whole plaintext, segment by segment (for delivery); every segment authenticated.
The format is described in :mod:`gateway.crypto.envelope`."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import TYPE_CHECKING, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.crypto.envelope import (
    HEADER_SIZE,
    TAG_SIZE,
    check_key,
    ciphertext_size,
    nonce,
    parse_header,
    read_exact,
)
from gateway.errors import RecordCorrupt

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = ["DecryptingReader", "iter_plaintext"]


class DecryptingReader(io.RawIOBase):
    """Seekable, read-only plaintext view of a window of an encrypted record.

    The stream exposes plaintext bytes ``[start, start + length)`` of the record as
    positions ``[0, length)``. Segments are authenticated as they are read; the most
    recent one is cached. ``plaintext_size`` comes from the trusted index: the file's
    length must match it exactly, and the last segment (final flag) is authenticated
    when the reader is created, so truncation fails at open time.
    ``fileobj`` is shared (its position moves) and is not closed by :meth:`close`.
    """

    def __init__(
        self,
        fileobj: BinaryIO,
        dek: bytes,
        aad: bytes,
        plaintext_size: int,
        *,
        start: int = 0,
        length: int | None = None,
    ) -> None:
        super().__init__()
        check_key(dek, "data key")
        if plaintext_size < 0:
            raise ValueError("plaintext_size must not be negative")
        if length is None:
            length = plaintext_size - start
        if start < 0 or length < 0 or start + length > plaintext_size:
            raise ValueError("window lies outside the plaintext")
        self._fileobj = fileobj
        self._aead = AESGCM(dek)
        self._plaintext_size = plaintext_size
        self._start = start
        self._length = length
        self._pos = 0
        self._cache_index = -1
        self._cache = b""

        fileobj.seek(0)
        header = read_exact(fileobj, HEADER_SIZE)
        self._segment_size = parse_header(header)
        self._aad = header + bytes(aad)
        self._last = plaintext_size // self._segment_size
        actual = fileobj.seek(0, io.SEEK_END)
        if actual != ciphertext_size(plaintext_size, self._segment_size):
            raise RecordCorrupt("spool record has the wrong length")
        # Authenticate the final segment now (and keep it cached): it carries the final
        # flag, so a record cut at a segment boundary fails at open time even when the
        # window never reaches the end.
        self._segment(self._last)

    # -- io.RawIOBase ------------------------------------------------------------------

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET, /) -> int:
        self._check_open()
        if whence == io.SEEK_SET:
            target = offset
        elif whence == io.SEEK_CUR:
            target = self._pos + offset
        elif whence == io.SEEK_END:
            target = self._length + offset
        else:
            raise ValueError(f"invalid whence ({whence})")
        if target < 0:
            raise ValueError("negative seek position")
        self._pos = target
        return target

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        self._check_open()
        out = memoryview(buffer).cast("B")
        want = len(out)
        done = 0
        while done < want:
            piece = self._next_piece(want - done)
            if piece is None:
                break
            data, off, n = piece
            out[done : done + n] = memoryview(data)[off : off + n]
            done += n
        return done

    def read(self, size: int | None = -1, /) -> bytes:
        self._check_open()
        if size is None or size < 0:
            return self.readall()
        pieces: list[bytes] = []
        left = size
        while left > 0:
            piece = self._next_piece(left)
            if piece is None:
                break
            data, off, n = piece
            pieces.append(data if off == 0 and n == len(data) else data[off : off + n])
            left -= n
        if len(pieces) == 1:
            return pieces[0]
        return b"".join(pieces)

    def readall(self) -> bytes:
        self._check_open()
        return self.read(max(self._length - self._pos, 0))

    def close(self) -> None:
        self._cache = b""
        self._cache_index = -1
        super().close()

    # -- internals ---------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed DecryptingReader")

    def _next_piece(self, limit: int) -> tuple[bytes, int, int] | None:
        """Plaintext available at the current position, at most ``limit`` bytes."""
        if self._pos >= self._length or limit <= 0:
            return None
        absolute = self._start + self._pos
        index, off = divmod(absolute, self._segment_size)
        data = self._segment(index)
        n = min(limit, len(data) - off, self._length - self._pos)
        self._pos += n
        return data, off, n

    def _segment(self, index: int) -> bytes:
        if index == self._cache_index:
            return self._cache
        size = self._segment_size
        final = index == self._last
        plain_len = self._plaintext_size - index * size if final else size
        self._fileobj.seek(HEADER_SIZE + index * (size + TAG_SIZE))
        sealed = read_exact(self._fileobj, plain_len + TAG_SIZE)
        if len(sealed) != plain_len + TAG_SIZE:
            raise RecordCorrupt(f"spool record is truncated (segment {index})")
        try:
            data = self._aead.decrypt(nonce(index, final), sealed, self._aad)
        except InvalidTag:
            raise RecordCorrupt(f"spool record failed authentication (segment {index})") from None
        self._cache_index = index
        self._cache = data
        return data


def iter_plaintext(
    fileobj: BinaryIO, dek: bytes, aad: bytes, plaintext_size: int
) -> Iterator[bytes]:
    """Yield the record's plaintext segment by segment, authenticating each.

    Reads sequentially from ``fileobj``'s current position, which must be the start of
    the record. Each yielded segment is authentic, but a later segment may still raise
    :class:`RecordCorrupt` (truncation, extension, tampering): a consumer streaming
    upstream must abort the transfer on that error rather than treat it as complete.
    Arguments are checked at call time; the file is read lazily.
    """
    check_key(dek, "data key")
    if plaintext_size < 0:
        raise ValueError("plaintext_size must not be negative")
    return _iter_plaintext(fileobj, AESGCM(dek), bytes(aad), plaintext_size)


def _iter_plaintext(
    fileobj: BinaryIO, aead: AESGCM, aad: bytes, plaintext_size: int
) -> Iterator[bytes]:
    header = read_exact(fileobj, HEADER_SIZE)
    segment_size = parse_header(header)
    full_aad = header + aad
    last = plaintext_size // segment_size
    for index in range(last + 1):
        final = index == last
        plain_len = plaintext_size - index * segment_size if final else segment_size
        sealed = read_exact(fileobj, plain_len + TAG_SIZE)
        if len(sealed) != plain_len + TAG_SIZE:
            raise RecordCorrupt(f"spool record is truncated (segment {index})")
        try:
            data = aead.decrypt(nonce(index, final), sealed, full_aad)
        except InvalidTag:
            raise RecordCorrupt(f"spool record failed authentication (segment {index})") from None
        if data:
            yield data
    if fileobj.read(1):
        raise RecordCorrupt("spool record has trailing data")
