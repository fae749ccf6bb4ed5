"""Reads a buffered ``multipart/form-data`` body back into text fields and file parts
(the simulated upstream's side of the gateway's egress body)."""

from __future__ import annotations

import asyncio

from aiohttp import MultipartReader
from aiohttp.base_protocol import BaseProtocol
from aiohttp.streams import StreamReader
from multidict import CIMultiDictProxy

__all__ = ["MalformedBody", "parse_multipart"]


class MalformedBody(Exception):
    """The multipart body cannot be parsed (message names the rule, never a value)."""


class _DetachedProtocol(BaseProtocol):
    """Flow-control sink for a StreamReader fed from bytes already in memory."""

    def pause_reading(self) -> None:
        return None

    def resume_reading(self, resume_parser: bool = True) -> None:
        return None


async def parse_multipart(
    headers: CIMultiDictProxy[str], body: bytes
) -> tuple[dict[str, str], dict[str, bytes]]:
    """Split a buffered multipart/form-data body into text fields and file parts."""
    loop = asyncio.get_running_loop()
    stream = StreamReader(_DetachedProtocol(loop), limit=max(len(body), 2**16), loop=loop)
    stream.feed_data(body)
    stream.feed_eof()
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    try:
        reader = MultipartReader(headers, stream)
        while (part := await reader.next()) is not None:
            if isinstance(part, MultipartReader):
                raise MalformedBody("nested multipart parts are not accepted")
            name = part.name
            if not name:
                raise MalformedBody("part without a name")
            if name in fields or name in files:
                raise MalformedBody(f"part {name!r} appears more than once")
            if part.filename is not None:
                files[name] = bytes(await part.read(decode=True))
            else:
                fields[name] = await part.text()
    except MalformedBody:
        raise
    except (ValueError, LookupError, AssertionError, RuntimeError) as exc:
        raise MalformedBody(f"malformed multipart body ({type(exc).__name__})") from None
    return fields, files
