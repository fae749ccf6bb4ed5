"""An mutual-TLS HTTP server that plays an upstream (J-LIS or a contractor).

Used by the tests, the bench and ``gatewayctl demo``; ``python -m gateway.testing.upstream``
runs one alone (:mod:`gateway.testing.upstream_cli`). It accepts the gateway's egress
requests (docs/contract.md, "Egress"): ``POST`` with ``Idempotency-Key`` and
``Gateway-Channel`` headers and a ``multipart/form-data`` body (or an opaque
``application/*`` body when payload encryption is on), and answers ``201`` with a
receipt. A repeat of an accepted key is answered ``200`` with the original receipt and
not recorded again: how a good upstream turns at-least-once delivery into exactly-once.

Faults can be injected: error statuses (``fail_next``), slowness (``set_delay``) and
dropped connections (``reset_connection_next``).

Only the gateway's client certificate (signed by the gateway CA) passes the handshake.
Logs carry field names and sizes, never field values.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Self

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.crypto.certs import cert_fingerprint
from gateway.crypto.sealed.errors import SealOpenError
from gateway.crypto.sealed.format import MEDIA_TYPE as SEALED_MEDIA_TYPE
from gateway.crypto.sealed.format import SealedHeader
from gateway.crypto.sealed.keys import VerifyKey
from gateway.crypto.sealed.open import open_sealed
from gateway.crypto.sealed.upstream_keys import RecipientPrivateKey
from gateway.crypto.tls import peer_cert_der, server_context
from gateway.testing.multipart import MalformedBody, parse_multipart

__all__ = ["Opener", "Received", "UpstreamSimulator"]

log = logging.getLogger("gateway.simulator")

PROBLEM_BASE = "https://upstream.invalid/problems/"
MAX_BODY = 64 * 1024 * 1024


@dataclass(frozen=True)
class Received:
    """One submission the simulated upstream accepted (first delivery of its key)."""

    idempotency_key: str
    channel: str
    content_type: str
    body: bytes
    fields: Mapping[str, str]
    files: Mapping[str, bytes]
    client_fingerprint: str
    authorization_user: str | None
    receipt_id: str
    wire: bytes = b""
    """The request body as it arrived (the sealed payload when sealed, else ``body``)."""
    sealed: SealedHeader | None = None
    """The verified header of a sealed payload; ``body`` is then its opened plaintext."""
    peer_address: str | None = None
    """The address the gateway's connection came from (its ``source_address``)."""


@dataclass(frozen=True)
class Opener:
    """What a recipient needs to verify and open sealed payloads addressed to it."""

    recipient_key: RecipientPrivateKey
    trusted_signers: tuple[VerifyKey, ...]


@dataclass(frozen=True)
class _Failure:
    status: int
    retry_after: str | None


def _problem(
    status: int, slug: str, title: str, *, headers: Mapping[str, str] | None = None
) -> web.Response:
    body = {"type": PROBLEM_BASE + slug, "title": title, "status": status}
    return web.Response(
        status=status,
        text=json.dumps(body),
        content_type="application/problem+json",
        headers=headers,
    )


class UpstreamSimulator:
    """A simulated upstream endpoint on loopback, behind mutual TLS."""

    def __init__(
        self,
        name: str,
        *,
        cert: Path,
        key: Path,
        client_ca: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        path: str = "/submissions",
        credential: tuple[str, str] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        opener: Opener | None = None,
    ) -> None:
        self.name = name
        self.host = host
        self.path = path
        self.credential = credential
        self._cert = cert
        self._key = key
        self._client_ca = client_ca
        self._requested_port = port
        self._port: int | None = None
        self._sleep = sleep
        self._runner: web.AppRunner | None = None
        self.opener = opener
        """Set to verify and open sealed payloads (and refuse plain ones)."""

        self.received: list[Received] = []
        self.sealed_refusals: list[str] = []
        """Why each refused sealed payload was refused (SealOpenError reasons)."""
        self.deliveries: dict[str, Received] = {}
        self.attempts = 0
        self.duplicates = 0
        self.received_event = asyncio.Event()
        self._condition = asyncio.Condition()
        self._counter = 0
        self._received_at: dict[str, str] = {}
        self._failures: deque[_Failure] = deque()
        self._resets = 0
        self._delay = 0.0
        self.receipt_style = "json"
        """How a receipt is sent: ``json`` (a body ``{"receipt_id": ...}``), ``header``
        (``Receipt-Id`` only), or ``trickled`` (the JSON body in several writes)."""

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Bind and start serving; ``port`` 0 picks an ephemeral port."""
        if self._runner is not None:
            raise RuntimeError(f"simulator {self.name!r} is already running")
        ctx = server_context(self._cert, self._key, client_ca=self._client_ca)
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post(self.path, self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self._requested_port, ssl_context=ctx)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        addresses: list[Any] = runner.addresses
        self._port = int(addresses[0][1])

    async def stop(self) -> None:
        """Stop serving and release the socket (safe to call twice)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"simulator {self.name!r} has not been started")
        return self._port

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}{self.path}"

    # ------------------------------------------------------------------ fault injection

    def fail_next(self, n: int, status: int = 503, *, retry_after: str | None = None) -> None:
        """Answer the next ``n`` requests with ``status`` (problem+json), plus Retry-After."""
        if n < 0:
            raise ValueError("n must not be negative")
        self._failures.extend(_Failure(status, retry_after) for _ in range(n))

    def clear_failures(self) -> None:
        """Forget the failures :meth:`fail_next` scripted that were not used yet."""
        self._failures.clear()

    def set_delay(self, seconds: float) -> None:
        """Make every request wait ``seconds`` (through the injected sleep) before answering."""
        if seconds < 0:
            raise ValueError("seconds must not be negative")
        self._delay = seconds

    def reset_connection_next(self, n: int) -> None:
        """Drop the connection, without answering, on the next ``n`` requests."""
        if n < 0:
            raise ValueError("n must not be negative")
        self._resets += n

    # ------------------------------------------------------------------ observation

    def forget(self) -> None:
        """Drop every body received so far (a bench holds thousands of 300 KB bodies
        otherwise, in its load generator's process); a key seen before is new again."""
        self.received.clear()
        self.deliveries.clear()
        self._received_at.clear()

    async def wait_for(self, count: int, timeout: float) -> None:  # noqa: ASYNC109 (brief API)
        """Wait until at least ``count`` submissions were received; TimeoutError otherwise."""
        async with asyncio.timeout(timeout), self._condition:
            await self._condition.wait_for(lambda: len(self.received) >= count)

    # ------------------------------------------------------------------ handler

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.attempts += 1
        if self._delay > 0:
            await self._sleep(self._delay)
        if self._resets > 0:
            self._resets -= 1
            transport = request.transport
            if transport is not None:
                transport.abort()
            # Writing this to the aborted transport fails; aiohttp drops it quietly.
            return web.Response(status=500)
        if self._failures:
            failure = self._failures.popleft()
            headers = {"Retry-After": failure.retry_after} if failure.retry_after else None
            return _problem(failure.status, "injected-failure", "Injected failure", headers=headers)

        fingerprint = self._client_fingerprint(request)
        if fingerprint is None:
            return _problem(403, "no-client-certificate", "Client certificate required")

        auth = _basic_auth(request.headers.get("Authorization"))
        user = auth[0] if auth is not None else None
        if self.credential is not None and not self._credential_matches(auth):
            return _unauthorized()

        key = request.headers.get("Idempotency-Key", "").strip()
        if not key:
            return _problem(400, "missing-idempotency-key", "Idempotency-Key header required")
        channel = request.headers.get("Gateway-Channel", "").strip()
        if not channel:
            return _problem(400, "missing-channel", "Gateway-Channel header required")

        original = self.deliveries.get(key)
        if original is not None:
            self.duplicates += 1
            return await self._receipt(request, original, status=200)

        content_type = request.content_type
        sealed: SealedHeader | None = None
        wire = b""
        if self.opener is not None or content_type == SEALED_MEDIA_TYPE:
            if self.opener is None:
                return _problem(415, "unsupported-media-type", "not expecting sealed payloads")
            if content_type != SEALED_MEDIA_TYPE:
                return _problem(415, "unsupported-media-type", f"{SEALED_MEDIA_TYPE} required")
            wire = await request.read()
            try:
                opened = open_sealed(
                    wire,
                    recipient_key=self.opener.recipient_key,
                    trusted_signers=self.opener.trusted_signers,
                    channel=channel,
                    submission_id=key,
                    destination=self.name,
                )
            except SealOpenError as exc:
                self.sealed_refusals.append(exc.reason)
                return _problem(400, "sealed-payload-refused", f"refused: {exc.reason}")
            sealed, body = opened.header, opened.plaintext
            inner = CIMultiDictProxy(CIMultiDict({"Content-Type": opened.content_type}))
            try:
                fields, files = await parse_multipart(inner, body)
            except MalformedBody as exc:
                return _problem(400, "malformed-body", str(exc))
            content_type = opened.content_type
        elif content_type == "multipart/form-data":
            body = await request.read()
            try:
                fields, files = await parse_multipart(request.headers, body)
            except MalformedBody as exc:
                return _problem(400, "malformed-body", str(exc))
        elif content_type.startswith("application/"):
            body = await request.read()
            fields, files = {}, {}
        else:
            return _problem(415, "unsupported-media-type", "multipart/form-data required")

        if key in self.deliveries:  # accepted by a concurrent request while reading
            self.duplicates += 1
            return await self._receipt(request, self.deliveries[key], status=200)

        self._counter += 1
        received = Received(
            idempotency_key=key,
            channel=channel,
            content_type=content_type
            if sealed is not None
            else request.headers.get("Content-Type", content_type),
            body=body,
            fields=MappingProxyType(fields),
            files=MappingProxyType(files),
            client_fingerprint=fingerprint,
            peer_address=request.remote,
            authorization_user=user,
            receipt_id=f"{self.name}-{self._counter:08d}",
            wire=wire or body,
            sealed=sealed,
        )
        self._received_at[key] = datetime.now(UTC).isoformat()
        self.deliveries[key] = received
        self.received.append(received)
        log.info(
            json.dumps(
                {
                    "name": self.name,
                    "idempotency_key": key,
                    "channel": channel,
                    "fields": sorted([*fields, *files]),
                    "bytes": len(body),
                },
                ensure_ascii=False,
            )
        )
        self.received_event.set()
        async with self._condition:
            self._condition.notify_all()
        return await self._receipt(request, received, status=201)

    async def _receipt(
        self, request: web.Request, received: Received, *, status: int
    ) -> web.StreamResponse:
        if self.receipt_style == "header":
            return web.Response(status=status, headers={"Receipt-Id": received.receipt_id})
        body = {
            "receipt_id": received.receipt_id,
            "received_at": self._received_at[received.idempotency_key],
        }
        if self.receipt_style != "trickled":
            return web.json_response(body, status=status)
        response = web.StreamResponse(status=status)
        response.content_type = "application/json"
        await response.prepare(request)
        text = json.dumps(body).encode()
        for start in range(0, len(text), 7):  # several chunks, flushed one by one
            await response.write(text[start : start + 7])
            await asyncio.sleep(0)
        await response.write_eof()
        return response

    def _credential_matches(self, auth: tuple[str, str] | None) -> bool:
        if auth is None or self.credential is None:
            return False
        user, password = self.credential
        user_ok = hmac.compare_digest(auth[0].encode(), user.encode())
        password_ok = hmac.compare_digest(auth[1].encode(), password.encode())
        return user_ok and password_ok

    @staticmethod
    def _client_fingerprint(request: web.Request) -> str | None:
        transport = request.transport
        if transport is None:
            return None
        der = peer_cert_der(transport.get_extra_info("ssl_object"))
        return cert_fingerprint(der) if der else None


def _basic_auth(header: str | None) -> tuple[str, str] | None:
    """(user, password) from an HTTP Basic ``Authorization`` value, or None."""
    if header is None:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        raw = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    user, sep, password = text.partition(":")
    return (user, password) if sep else None


def _unauthorized() -> web.Response:
    return _problem(
        401,
        "unauthorized",
        "Upstream credential required",
        headers={"WWW-Authenticate": 'Basic realm="upstream"'},
    )


if __name__ == "__main__":  # python -m gateway.testing.upstream: its command line
    from gateway.testing.upstream_cli import main

    raise SystemExit(main())
