"""Virus scanning of uploaded files (ウイルス対策): clamd's INSTREAM, as the part arrives.

For a channel with ``scan = true`` the ingress opens a :class:`ScanSession` before it
reads the body; the file part's bytes go to clamd chunk by chunk while they go to the
spool (never after, never to a temporary file of clamd's choosing), and the verdict is
read before the 202. clamd's protocol (``man clamd``): ``zINSTREAM\\0``, then chunks of a
4-byte big-endian length and the bytes, a zero length to end; the answer is ``stream:
OK`` or ``stream: <signature> FOUND``, NUL-terminated.

Anything else (no clamd, an error answer, a size limit, no verdict within
``timeout_seconds``) is :class:`~gateway.errors.ScannerUnavailable`: the submission is
refused 503 with Retry-After, never let through unscanned (fail closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

from gateway.errors import ScannerUnavailable

T = TypeVar("T")
CHUNK = 64 * 1024
MAX_ANSWER = 4096
RETRY_AFTER = 30


class ScanSession:
    """One file part streamed to clamd; :meth:`verdict` ends it."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._timeout = timeout
        self.bytes = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Queue bytes for clamd (sent as the event loop can; see :meth:`drain`)."""
        view = memoryview(data)
        while view:
            piece = view[:CHUNK]
            self._writer.write(struct.pack(">I", len(piece)) + piece)
            self.bytes += len(piece)
            view = view[CHUNK:]

    async def drain(self) -> None:
        """Wait until clamd has taken what was queued (backpressure on the upload)."""
        await self._within(self._writer.drain())

    async def verdict(self) -> str | None:
        """None when clamd says OK, the signature's name when it found one."""
        self._writer.write(struct.pack(">I", 0))
        answer = await self._within(self._answer())
        self.close()
        text = answer.decode("ascii", "replace").strip()
        if text.endswith("FOUND"):
            signature = text.removeprefix("stream:").removesuffix("FOUND").strip()
            return signature or "unknown"
        if text.endswith("OK"):
            return None
        raise ScannerUnavailable(RETRY_AFTER, f"clamd answered an error: {text[:200]}")

    async def _answer(self) -> bytes:
        await self._writer.drain()
        data = await self._reader.readuntil(b"\0")
        if len(data) > MAX_ANSWER:
            raise ScannerUnavailable(RETRY_AFTER, "clamd's answer is too long")
        return data.rstrip(b"\0")

    async def _within(self, step: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self._timeout):
                return await step
        except TimeoutError:
            self.close()
            raise ScannerUnavailable(
                RETRY_AFTER, f"clamd gave no verdict within {self._timeout:g} s"
            ) from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            self.close()
            raise ScannerUnavailable(RETRY_AFTER, f"clamd: {type(exc).__name__}") from None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()


class ClamdScanner:
    """clamd at ``socket``: :meth:`open` starts an INSTREAM session."""

    def __init__(self, socket: Path, timeout: float) -> None:
        self.socket = socket
        self.timeout = timeout

    async def open(self) -> ScanSession:
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_unix_connection(self.socket, limit=MAX_ANSWER)
                writer.write(b"zINSTREAM\0")
                await writer.drain()
        except (OSError, TimeoutError) as exc:
            raise ScannerUnavailable(
                RETRY_AFTER, f"clamd at {self.socket}: {type(exc).__name__}"
            ) from None
        return ScanSession(reader, writer, self.timeout)

    async def ping(self) -> bool:
        """True when clamd answers PONG (for the start-up check and readiness)."""
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_unix_connection(self.socket, limit=MAX_ANSWER)
                writer.write(b"zPING\0")
                await writer.drain()
                answer = await reader.readuntil(b"\0")
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return False
        finally:
            if writer is not None:
                writer.close()
        return answer.rstrip(b"\0") == b"PONG"
