"""The ingress TLS listener: certificate rotation without closing it, handshakes counted.

asyncio's own TLS server takes one ``SSLContext`` for the life of the listening socket
and drops failed handshakes silently. :class:`TlsSite` accepts plain TCP and wraps
each new connection in asyncio's ``SSLProtocol`` itself, with whatever context is
current at that moment: a reload swaps the context (new certificate, key or device CA)
for the next connection while the socket keeps listening and open connections carry
on with the context they started with. Each handshake's outcome arrives on the
protocol's waiter, so failures are counted by reason (never with anything the peer
sent: the reasons are a fixed vocabulary).
"""

from __future__ import annotations

import asyncio
import ssl
from asyncio import sslproto
from collections.abc import Callable
from typing import Any

from aiohttp import web, web_protocol
from aiohttp.web_request import BaseRequest

from gateway.errors import Malformed
from gateway.ingress.problems import ProblemType, problem_of, problem_response

HANDSHAKE_TIMEOUT = 30

_PROTOCOL_REASONS = (
    "UNSUPPORTED_PROTOCOL",
    "WRONG_VERSION_NUMBER",
    "VERSION_TOO_LOW",
    "NO_SHARED_CIPHER",
    "NO_PROTOCOLS_AVAILABLE",
    "HTTP_REQUEST",
    "NO_SUITABLE",
    "INAPPROPRIATE_FALLBACK",
)


class _ProblemRequestHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler, but a request it cannot parse is answered with a
    fixed problem+json: its own text quotes the offending line (a header, a chunk size),
    and a device may have put anything there."""

    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc)  # logs (type only) and checks the writer
        if status < 500:
            malformed = problem_of(Malformed())
            problem = ProblemType(status, malformed.slug, malformed.title)
            response = problem_response(problem, Malformed.detail)
        else:
            response = problem_response(ProblemType(status, "internal-error", "Internal error"))
        response.force_close()
        return response


def handshake_failure_reason(exc: BaseException) -> str:
    """A fixed label for why a handshake failed."""
    reason = str(getattr(exc, "reason", "") or "").upper()
    if isinstance(exc, ssl.SSLError):
        if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reason:
            return "no_client_certificate"
        if isinstance(exc, ssl.SSLCertVerificationError) or "CERTIFICATE" in reason:
            return "certificate"
        if any(code in reason for code in _PROTOCOL_REASONS):
            return "protocol"
        return "tls_error"
    if isinstance(exc, ConnectionAbortedError | TimeoutError):
        return "timeout"  # asyncio aborts a handshake that outlives its timeout this way
    if isinstance(exc, ConnectionError | OSError):
        return "connection_lost"
    return "other"


class _PeerSSLProtocol(sslproto.SSLProtocol):
    """asyncio's TLS protocol, remembering the client's address (for a failed handshake's
    access log entry, when no request ever tells it)."""

    peername: tuple[Any, ...] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        name = transport.get_extra_info("peername")
        self.peername = name if isinstance(name, tuple) else None
        super().connection_made(transport)


class TlsSite(web.BaseSite):
    """A TCP site whose TLS context can be replaced while it listens."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        context: ssl.SSLContext,
        *,
        on_handshake_failure: Callable[[str, tuple[Any, ...] | None], None] = lambda *_: None,
        handshake_timeout: int = HANDSHAKE_TIMEOUT,
        backlog: int = 512,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self.context = context
        """The context for connections accepted from now on; assign to rotate."""
        self._on_failure = on_handshake_failure
        self._handshake_timeout = handshake_timeout

    @property
    def name(self) -> str:
        return f"https://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        app_factory = self._runner.server
        assert app_factory is not None

        def connection() -> asyncio.BaseProtocol:
            waiter = loop.create_future()
            handler = app_factory()
            handler.__class__ = _ProblemRequestHandler  # same layout, one method differs
            protocol = _PeerSSLProtocol(
                loop,
                handler,
                self.context,
                waiter,
                server_side=True,
                ssl_handshake_timeout=self._handshake_timeout,
            )
            waiter.add_done_callback(lambda w: self._handshake_done(w, protocol.peername))
            return protocol

        self._server = await loop.create_server(
            connection, self._host, self._port, backlog=self._backlog, reuse_address=True
        )

    def _handshake_done(
        self, waiter: asyncio.Future[None], peername: tuple[Any, ...] | None
    ) -> None:
        if waiter.cancelled():
            return
        exc = waiter.exception()  # retrieved here, so asyncio never logs it
        if exc is not None:
            self._on_failure(handshake_failure_reason(exc), peername)
