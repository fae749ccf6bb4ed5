"""Reading a record's ciphertext back out of PostgreSQL, as a file the envelope reader
(:func:`gateway.crypto.envelope_reader.iter_plaintext`) decrypts segment by segment.

The chunks are streamed from the server in ``seq`` order (single-row mode, binary). A
small record stays in memory, its chunks read in place without being joined; a larger
one goes to an anonymous temporary file in the node's staging directory (ciphertext
only), so a relay delivering several large records holds none of them in memory.
"""

from __future__ import annotations

import asyncio
import io
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from gateway.crypto.envelope_reader import iter_plaintext
from gateway.spool import pgqueries
from gateway.spool.pgqueries import Conn

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

IN_MEMORY = 1024 * 1024
"""Records of at most this many bytes of ciphertext are read into memory."""


class ChunkReader(io.RawIOBase):
    """A read-only file over a list of byte strings, read without copying them
    together (a short read at each chunk's end, which the envelope reader allows)."""

    def __init__(self, chunks: list[bytes]) -> None:
        super().__init__()
        self._chunks = chunks
        self._index = 0
        self._offset = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        out = memoryview(buffer).cast("B")
        while self._index < len(self._chunks):
            chunk = self._chunks[self._index]
            if self._offset >= len(chunk):
                self._index, self._offset = self._index + 1, 0
                continue
            n = min(len(out), len(chunk) - self._offset)
            out[:n] = memoryview(chunk)[self._offset : self._offset + n]
            self._offset += n
            return n
        return 0

    def close(self) -> None:
        self._chunks = []
        super().close()


async def fetch(conn: Conn, record_id: str, size: int, spill: Path) -> tuple[BinaryIO, int]:
    """The record's ciphertext as a file positioned at its start, and how many bytes
    the database held (``size`` is what the row says it should be)."""
    total = 0
    async with conn.cursor() as cur:
        rows = cur.stream(pgqueries.CHUNKS, (record_id,), binary=True)
        if size <= IN_MEMORY:
            chunks: list[bytes] = []
            async for (data,) in rows:
                chunks.append(data)
                total += len(data)
            return io.BufferedReader(ChunkReader(chunks)), total
        fileobj: BinaryIO = await asyncio.to_thread(tempfile.TemporaryFile, "w+b", dir=spill)
        try:
            async for (data,) in rows:
                await asyncio.to_thread(fileobj.write, data)
                total += len(data)
            await asyncio.to_thread(fileobj.seek, 0)
        except BaseException:
            fileobj.close()
            raise
        return fileobj, total


def plaintext(fileobj: BinaryIO, dek: bytes, aad: bytes, plaintext_size: int) -> Iterator[bytes]:
    """Decrypt ``fileobj`` segment by segment (each authenticated), closing it at the end."""
    with fileobj:
        yield from iter_plaintext(fileobj, dek, aad, plaintext_size)
