"""An mutual-TLS HTTP server that plays an upstream (J-LIS or a contractor).

Used by the tests and by ``gatewayctl demo``. It accepts the gateway's egress requests
(docs/contract.md, "Egress"): ``POST`` with ``Idempotency-Key`` and ``Gateway-Channel``
headers and a ``multipart/form-data`` body (or an opaque ``application/*`` body when
payload encryption is on), and answers ``201`` with a receipt. A repeat of an accepted
``Idempotency-Key`` is answered ``200`` with the original receipt and not recorded
again, which is how a good upstream turns at-least-once delivery into exactly-once.

Faults can be injected: error statuses (``fail_next``), slowness (``set_delay``) and
dropped connections (``reset_connection_next``).

Only the gateway's client certificate (signed by the gateway CA) passes the handshake.
Logs carry field names and sizes, never field values.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import signal
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Self

from aiohttp import MultipartReader, web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.crypto.certs import cert_fingerprint
from gateway.crypto.sealed.errors import SealOpenError
from gateway.crypto.sealed.format import MEDIA_TYPE as SEALED_MEDIA_TYPE
from gateway.crypto.sealed.format import SealedHeader
from gateway.crypto.sealed.keys import VerifyKey
from gateway.crypto.sealed.open import open_sealed
from gateway.crypto.sealed.upstream_keys import (
    RecipientPrivateKey,
    load_recipient_private_key,
    load_verify_key,
)
from gateway.crypto.tls import peer_cert_der, server_context
from gateway.errors import GatewayError

__all__ = ["Received", "UpstreamSimulator", "main"]

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


class _MalformedBody(Exception):
    """The multipart body cannot be parsed (message names the rule, never a value)."""


class _DetachedProtocol(BaseProtocol):
    """Flow-control sink for a StreamReader fed from bytes already in memory."""

    def pause_reading(self) -> None:
        return None

    def resume_reading(self, resume_parser: bool = True) -> None:
        return None


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


async def _parse_multipart(
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
                raise _MalformedBody("nested multipart parts are not accepted")
            name = part.name
            if not name:
                raise _MalformedBody("part without a name")
            if name in fields or name in files:
                raise _MalformedBody(f"part {name!r} appears more than once")
            if part.filename is not None:
                files[name] = bytes(await part.read(decode=True))
            else:
                fields[name] = await part.text()
    except _MalformedBody:
        raise
    except (ValueError, LookupError, AssertionError, RuntimeError) as exc:
        raise _MalformedBody(f"malformed multipart body ({type(exc).__name__})") from None
    return fields, files


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
            return self._receipt(original, status=200)

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
                fields, files = await _parse_multipart(inner, body)
            except _MalformedBody as exc:
                return _problem(400, "malformed-body", str(exc))
            content_type = opened.content_type
        elif content_type == "multipart/form-data":
            body = await request.read()
            try:
                fields, files = await _parse_multipart(request.headers, body)
            except _MalformedBody as exc:
                return _problem(400, "malformed-body", str(exc))
        elif content_type.startswith("application/"):
            body = await request.read()
            fields, files = {}, {}
        else:
            return _problem(415, "unsupported-media-type", "multipart/form-data required")

        if key in self.deliveries:  # accepted by a concurrent request while reading
            self.duplicates += 1
            return self._receipt(self.deliveries[key], status=200)

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
        return self._receipt(received, status=201)

    def _receipt(self, received: Received, *, status: int) -> web.Response:
        return web.json_response(
            {
                "receipt_id": received.receipt_id,
                "received_at": self._received_at[received.idempotency_key],
            },
            status=status,
        )

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


# ---------------------------------------------------------------------- command line


def _read_credential(path: Path) -> tuple[str, str]:
    text = path.read_text(encoding="utf-8").strip()
    user, sep, password = text.partition(":")
    if not sep or not user:
        raise ValueError(f"{path}: expected one line 'user:password'")
    return user, password


async def _serve(args: argparse.Namespace) -> None:
    credential = _read_credential(args.credential_file) if args.credential_file else None
    opener = None
    if args.recipient_key:
        if not args.trusted_signer:
            raise ValueError("--recipient-key needs at least one --trusted-signer")
        opener = Opener(
            load_recipient_private_key(args.recipient_key, certificate=args.recipient_cert),
            tuple(load_verify_key(path) for path in args.trusted_signer),
        )
    sim = UpstreamSimulator(
        args.name,
        cert=args.cert,
        key=args.key,
        client_ca=args.client_ca,
        host=args.host,
        port=args.port,
        path=args.path,
        credential=credential,
        opener=opener,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with sim:
            log.info(json.dumps({"name": sim.name, "event": "listening", "url": sim.url}))
            await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info(json.dumps({"name": sim.name, "event": "stopped", "received": len(sim.received)}))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gateway.testing.upstream``: a simulated upstream until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(
        prog="python -m gateway.testing.upstream",
        description="Simulated upstream (J-LIS / contractor) behind mutual TLS.",
    )
    parser.add_argument("--name", required=True, help="name used in receipt ids and logs")
    parser.add_argument("--cert", type=Path, required=True, help="server certificate (PEM)")
    parser.add_argument("--key", type=Path, required=True, help="server private key (PEM)")
    parser.add_argument(
        "--client-ca", type=Path, required=True, help="CA that signs the gateway client cert"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--path", default="/submissions")
    parser.add_argument(
        "--credential-file",
        type=Path,
        default=None,
        help="file holding 'user:password' to require as HTTP Basic",
    )
    parser.add_argument(
        "--recipient-key",
        type=Path,
        help="accept only sealed payloads (docs/sealed-payload.md), opened with this private key",
    )
    parser.add_argument(
        "--recipient-cert", type=Path, help="with a CMS recipient key: its certificate"
    )
    parser.add_argument(
        "--trusted-signer",
        type=Path,
        action="append",
        help="a signer public key (PEM) whose sealed payloads are trusted (repeat)",
    )
    args = parser.parse_args(argv)

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(args))
    except (OSError, ValueError, GatewayError) as exc:
        print(f"simulator: {exc}", file=sys.stderr)
        return 1
    finally:
        log.removeHandler(handler)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
