"""One delivery attempt to an upstream: the :class:`Sender` seam and its aiohttp implementation.

A sender posts one :class:`Outgoing` request and returns the upstream's :class:`Answer`
(whatever its status: the relay's policy decides what it means), or raises
:class:`SendFailed` when no answer came. It knows nothing of records, retries or the
circuit breaker, so the relay's rules are tested with a fake sender and no network
(:class:`gateway.testing.fakes.FakeSender`).

:class:`AiohttpSender` is the real one: one session per destination whose connector
verifies the upstream's CA and hostname (and SPKI pin when configured), presents the
destination's own client certificate and binds its source address when it has one;
redirects are never followed.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from aiohttp.payload import Payload

from gateway.config import DestinationConfig
from gateway.crypto.certs import spki_sha256_b64
from gateway.crypto.keys import resolve_secret_path
from gateway.crypto.tls import client_context, peer_cert_der
from gateway.errors import GatewayError, RecordCorrupt

MAX_RECEIPT_BYTES = 4096
ROOT = Path("/")  # secret paths in a loaded configuration are already absolute


class Body:
    """A payload read chunk by chunk while it is sent, with a known size.

    When reading a chunk fails for the record's own reasons (it fails authentication,
    or its file cannot be read), :attr:`unreadable` names the exception's type: the
    attempt then failed because of the record, not the network, whatever the sender
    made of it. Iterate it once.
    """

    def __init__(self, chunks: Iterable[bytes | memoryview], size: int, content_type: str) -> None:
        self._chunks = chunks
        self.size = size
        self.content_type = content_type
        self.unreadable: str | None = None

    def __iter__(self) -> Iterator[bytes | memoryview]:
        try:
            yield from self._chunks
        except (RecordCorrupt, OSError) as exc:
            if isinstance(exc, RecordCorrupt) or not isinstance(exc, ConnectionError):
                self.unreadable = type(exc).__name__
            raise


@dataclass(frozen=True)
class Outgoing:
    """One attempt's request: POST ``body`` to ``url`` with ``headers``."""

    url: str
    headers: Mapping[str, str] = field(repr=False)  # may hold the upstream's credential
    body: Body


@dataclass(frozen=True)
class Answer:
    """What the upstream answered to one attempt."""

    status: int
    retry_after: str | None = None
    """The ``Retry-After`` header as sent, if any."""
    receipt: str | None = None
    """A 2xx answer's ``Receipt-Id`` header, else its JSON body's ``receipt_id``, as sent
    (unchecked: see policy.checked_receipt)."""


class SendFailed(GatewayError):
    """No answer came: connection, TLS or timeout, or the body could not be read (then
    the request's :attr:`Body.unreadable` says so). ``error`` is the exception type's
    name, never its text."""

    def __init__(self, error: str) -> None:
        super().__init__(f"send failed: {error}")
        self.error = error


class Sender(Protocol):
    """Delivers one attempt to one destination's upstream."""

    async def send(self, request: Outgoing) -> Answer:
        """Post ``request`` once (redirects not followed); SendFailed if no answer came."""
        ...

    async def close(self) -> None:
        """Release the connections; called once no attempt uses this sender any more."""
        ...


SenderFactory = Callable[[str, DestinationConfig], Sender]
"""Builds the sender of a destination (its name, its configuration); may raise when a
certificate or key cannot be loaded."""


# ------------------------------------------------------------------------ aiohttp


class SpoolPayload(Payload):
    """A :class:`Body` (a record's plaintext streamed from its encrypted file, or a
    sealed payload's parts) as an aiohttp payload with a known length."""

    def __init__(self, body: Body) -> None:
        chunks = iter(body)
        super().__init__(chunks, content_type=body.content_type)
        self._chunks = chunks
        self._size_hint = body.size

    @property
    def size(self) -> int:
        return self._size_hint

    async def write(self, writer: Any) -> None:
        for chunk in self._chunks:
            await writer.write(chunk)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a spooled record is not decoded as text")


class SpkiPinMismatch(aiohttp.ClientConnectionError):
    """The upstream's certificate key is not among the destination's SPKI pins."""


class PinningConnector(aiohttp.TCPConnector):
    """Refuses an upstream whose certificate's SPKI hash is not pinned (when pins are set)."""

    def __init__(self, *, pins: frozenset[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pins = pins

    async def _create_direct_connection(self, *args: Any, **kwargs: Any) -> Any:
        transport, proto = await super()._create_direct_connection(*args, **kwargs)
        if self._pins:
            der = peer_cert_der(transport.get_extra_info("ssl_object"))
            if der is None or spki_sha256_b64(der) not in self._pins:
                transport.close()
                raise SpkiPinMismatch("upstream certificate does not match the SPKI pins")
        return transport, proto


class AiohttpSender:
    """The real sender: one aiohttp session (mutual TLS, pinning) per destination."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    @classmethod
    def for_destination(cls, dest: DestinationConfig) -> AiohttpSender:
        """Reads the destination's CA, client certificate and key (raises when one is
        unusable) and opens nothing yet: connections are made by the first attempt."""
        context = client_context(
            ca=dest.ca,
            cert=dest.client_certificate,
            key=resolve_secret_path(dest.client_key, ROOT),
            profile=dest.tls_profile,
        )
        connector = PinningConnector(
            pins=frozenset(dest.spki_pins),
            ssl=context,
            limit=dest.concurrency,
            enable_cleanup_closed=False,
            # Out by the network this upstream is on, when the host sits on several.
            local_addr=(dest.source_address, 0) if dest.source_address else None,
        )
        timeout = aiohttp.ClientTimeout(
            total=dest.request_timeout, sock_connect=dest.connect_timeout
        )
        return cls(
            aiohttp.ClientSession(
                connector=connector, timeout=timeout, auto_decompress=False, raise_for_status=False
            )
        )

    async def send(self, request: Outgoing) -> Answer:
        payload = SpoolPayload(request.body)
        try:
            async with self._session.post(
                request.url, data=payload, headers=dict(request.headers), allow_redirects=False
            ) as response:
                receipt = None
                if 200 <= response.status < 300:
                    receipt = response.headers.get("Receipt-Id") or await _receipt_field(response)
                return Answer(response.status, response.headers.get("Retry-After"), receipt)
        except (aiohttp.ClientError, ssl.SSLError, OSError, TimeoutError) as exc:
            raise SendFailed(type(exc).__name__) from None

    async def close(self) -> None:
        await self._session.close()


def aiohttp_sender(name: str, dest: DestinationConfig) -> Sender:
    """The default :data:`SenderFactory`: an :class:`AiohttpSender` for ``dest``."""
    return AiohttpSender.for_destination(dest)


async def _receipt_field(response: aiohttp.ClientResponse) -> str | None:
    """The upstream's JSON ``receipt_id`` when its body is a JSON object holding a string.

    The body is read to its end (up to :data:`MAX_RECEIPT_BYTES`), however it arrives:
    one ``read(n)`` returns only what has arrived so far, and a body sent in several
    segments (chunked, or just slow) would be cut and its receipt lost.
    """
    raw = b""
    try:
        while len(raw) <= MAX_RECEIPT_BYTES:
            chunk = await response.content.read(MAX_RECEIPT_BYTES + 1 - len(raw))
            if not chunk:
                break
            raw += chunk
        if len(raw) > MAX_RECEIPT_BYTES:
            return None  # not a receipt: something else, and large
        doc = json.loads(raw)
    except (ValueError, aiohttp.ClientError):
        return None
    value = doc.get("receipt_id") if isinstance(doc, dict) else None
    return value if isinstance(value, str) else None
