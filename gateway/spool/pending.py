"""A record being written, and a plaintext window of a written record's file.

:class:`PendingRecord` owns the record's file while its body streams in, encrypted
with the record's own data key; it belongs to the spool once its index row commits.
:class:`RecordWindow` says where a byte range of a record's plaintext is (the file, its
data key, the range), free of the bytes themselves, so a check on another thread (the
photo's) decrypts only what it reads.
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from gateway import fsutil
from gateway.crypto.envelope import SEGMENT_SIZE, EncryptingWriter
from gateway.crypto.envelope_reader import DecryptingReader


@dataclass(frozen=True)
class RecordWindow:
    """Where a byte range sits inside an encrypted record (no plaintext)."""

    path: Path
    data_key: bytes = field(repr=False)
    aad: bytes
    plaintext_size: int
    start: int
    length: int


@contextmanager
def open_window(where: RecordWindow) -> Iterator[BinaryIO]:
    """A seekable plaintext view of the byte range ``where`` names."""
    with where.path.open("rb") as fileobj:
        reader = DecryptingReader(
            fileobj,
            where.data_key,
            where.aad,
            where.plaintext_size,
            start=where.start,
            length=where.length,
        )
        with io.BufferedReader(reader, buffer_size=SEGMENT_SIZE) as buffered:
            yield buffered


class RecordFile(io.RawIOBase):
    """A record's file, open for writing; every write and the fsync pass the file
    layer's fault seam (:func:`gateway.fsutil.fault_point`)."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return fsutil.write_some(self._fd, data, kind="record")

    def sync(self) -> None:
        fsutil.fsync(self._fd, kind="record")

    def close(self) -> None:
        if not self.closed:
            try:
                os.close(self._fd)
            finally:
                super().close()


class PendingRecord:
    """A record being written: its encrypted file is open, it is not in the index yet."""

    def __init__(self, record_id: str, path: Path, dek: bytes) -> None:
        self.id = record_id
        self.path = path
        self._dek = dek
        # 0600 whatever the umask: encrypted, but still nobody else's to read.
        fd = fsutil.create(path, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC, 0o600, kind="record")
        self._file = RecordFile(fd)
        try:
            self.writer = EncryptingWriter(self._file, dek, record_id.encode())  # type: ignore[arg-type]
        except BaseException:  # the header could not be written: no file is left behind
            self._file.close()
            path.unlink(missing_ok=True)
            raise
        self.finished = False
        self.committed = False
        """True once the index row is committed: from then on the file is the record's."""

    @property
    def aad(self) -> bytes:
        return self.id.encode()

    @property
    def data_key(self) -> bytes:
        """The record's own key (to be wrapped into the index row)."""
        return self._dek

    @property
    def fd(self) -> int:
        """The open file's descriptor (to fsync it; the file stays this object's)."""
        return self._file.fileno()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writer.write(data)

    def finish(self) -> None:
        """Seal the last segment; the file is complete but not yet durable."""
        if not self.finished:
            self.writer.close()
            self.finished = True

    def window(self, start: int, length: int) -> AbstractContextManager[BinaryIO]:
        """A seekable plaintext view of ``[start, start+length)`` of the finished file."""
        return open_window(self.location(start, length))

    def location(self, start: int, length: int) -> RecordWindow:
        """Where a byte range of the finished file is, for a check in another process."""
        return RecordWindow(
            self.path, self._dek, self.aad, self.writer.plaintext_size, start, length
        )

    def close(self) -> None:
        """Seal the last segment and close the file without an fsync: for a spool whose
        durability comes from elsewhere (PostgreSQL copies the file into the database;
        the file is only the staging of the upload)."""
        self.finish()
        self._file.close()

    def sync_and_close(self) -> None:
        try:
            self._file.sync()
        finally:
            self._file.close()

    def abandon(self) -> None:
        """Close and delete the file, unless its row committed (then the file is kept)."""
        self._file.close()
        if not self.committed:
            self.path.unlink(missing_ok=True)


def abandon_unclaimed(future: asyncio.Future[PendingRecord]) -> None:
    """For a pending record whose creator went away before it got it: delete its file."""
    if not future.cancelled() and future.exception() is None:
        future.result().abandon()
