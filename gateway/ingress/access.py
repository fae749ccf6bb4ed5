"""Access log entries (アクセスログ): one for every request attempt, from what the ingress
knows, and never a field value, a password or a part name.

An entry holds the time (Japan time, with milliseconds), the listener, the client's
address and port, its certificate's SHA-256 fingerprint and serial, the device (a revoked
one too; ``unregistered`` for a certificate the registry does not know), the staff
user, the channel (a configured name, else ``unknown``), the method, the outcome with
its problem type and status, the body bytes read, the submission id and the request id.
The sequence number is the entry's place in the chain (:mod:`gateway.ops.access_log`).

A failed TLS handshake is an attempt too, logged with the reason; to keep a flood from
filling the disk, at most :data:`HANDSHAKE_BURST` per client address are logged in any
:data:`HANDSHAKE_WINDOW` seconds, the rest counted in
``gateway_access_log_suppressed_total{listener}`` and summed up in that address's next
entry (``suppressed``).
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.ops.access_log import jst_iso
from gateway.ops.metrics import Metrics
from gateway.spool.backend import SpoolBackend as Spool

HANDSHAKE_BURST = 5
HANDSHAKE_WINDOW = 60.0
MAX_BACKLOG = 10_000
"""Entries kept in memory while the disk refuses them; beyond, the oldest are dropped
(counted in ``gateway_access_log_dropped_total``)."""
MAX_ADDRESSES = 10_000
"""Client addresses whose handshake failures are tracked (the oldest forgotten first)."""

LOGGED = web.RequestKey("access_logged", bool)
"""Set once a request's entry is recorded (so the outer middleware does not again)."""

STATUS_OUTCOMES = {404: "not-found", 405: "method-not-allowed", 500: "internal-error"}


@dataclass(frozen=True)
class Peer:
    """Who is at the other end, as far as its certificate says: the fingerprint, the
    serial, and the device it belongs to, revoked or not (None: not registered)."""

    fingerprint: str
    serial: str | None
    device_id: str | None


PEER = web.RequestKey("peer", Peer)


def client_address(request: web.Request) -> tuple[str | None, int | None]:
    """The client's address and port, from the connection."""
    peername = request.transport.get_extra_info("peername") if request.transport else None
    if isinstance(peername, tuple) and len(peername) >= 2:
        return str(peername[0]), int(peername[1])
    return request.remote, None


@dataclass
class _Window:
    started: float
    logged: int = 0
    suppressed: int = 0


def encode(body: Mapping[str, Any]) -> str:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


class AccessRecorder:
    """Builds entries and queues them in the spool index for the exporter."""

    def __init__(
        self,
        spool: Spool,
        metrics: Metrics,
        *,
        clock: Callable[[], float],
        wake: Callable[[], None],
    ) -> None:
        self._spool = spool
        self._metrics = metrics
        self._clock = clock
        self.wake = wake
        self.backlog: deque[str] = deque()
        """Entries the disk refused, oldest first, waiting to be queued again."""
        self._windows: OrderedDict[tuple[str, str], _Window] = OrderedDict()

    def entry(
        self,
        request: web.Request,
        context: Mapping[str, Any],
        *,
        status: int,
        outcome: str,
    ) -> dict[str, Any]:
        """The entry of a request: ``context`` is what the handler learned (ids, channel,
        bytes read); the certificate and the address come from the connection."""
        peer = request.get(PEER)
        remote, port = client_address(request)
        return {
            "time": jst_iso(self._clock()),
            "listener": context.get("listener"),
            "remote": remote,
            "port": port,
            "fingerprint": peer.fingerprint if peer else None,
            "serial": peer.serial if peer else None,
            "device_id": (peer.device_id or "unregistered") if peer else None,
            "user_id": context.get("user_id"),
            "channel": context.get("channel"),
            "method": request.method,
            "outcome": outcome,
            "problem": outcome if status >= 400 else None,
            "status": status,
            "bytes": int(context.get("bytes", 0)),
            "submission_id": context.get("submission_id"),
            "request_id": context.get("request_id"),
        }

    def record(self, body: Mapping[str, Any]) -> None:
        """Queue an entry for the next group commit (not waited for). One the disk
        refuses (full) is kept, up to :data:`MAX_BACKLOG`, and queued again by
        :meth:`retry_backlog` (the exporter calls it before each export)."""
        self._queue(encode(body))

    def _queue(self, text: str) -> None:
        future = self._spool.record_access(text)
        future.add_done_callback(lambda f: self._kept(f, text))
        self.wake()

    def _kept(self, future: asyncio.Future[int], text: str) -> None:
        if future.cancelled() or future.exception() is None:
            return
        self.backlog.append(text)
        while len(self.backlog) > MAX_BACKLOG:
            self.backlog.popleft()
            self._metrics.access_log_dropped.inc()

    def retry_backlog(self) -> None:
        waiting, self.backlog = self.backlog, deque()
        for text in waiting:
            self._queue(text)

    def handshake_failed(
        self, listener: str, peername: tuple[Any, ...] | None, reason: str
    ) -> None:
        """A failed TLS handshake, rate-limited per client address."""
        remote = str(peername[0]) if peername else None
        port = int(peername[1]) if peername and len(peername) > 1 else None
        now = self._clock()
        key = (listener, remote or "")
        window = self._windows.get(key)
        if window is None or now - window.started >= HANDSHAKE_WINDOW:
            suppressed = window.suppressed if window else 0
            window = self._windows[key] = _Window(now, suppressed=suppressed)
        self._windows.move_to_end(key)
        while len(self._windows) > MAX_ADDRESSES:
            self._windows.popitem(last=False)
        if window.logged >= HANDSHAKE_BURST:
            window.suppressed += 1
            self._metrics.access_log_suppressed.labels(listener=listener).inc()
            return
        window.logged += 1
        body: dict[str, Any] = {
            "time": jst_iso(now),
            "listener": listener,
            "remote": remote,
            "port": port,
            "outcome": "tls-handshake-failed",
            "problem": reason,
            "status": None,
        }
        if window.suppressed:
            body["suppressed"] = window.suppressed
            window.suppressed = 0
        self.record(body)


def outcome_of_status(status: int) -> str:
    """The outcome of a request answered outside the API's handlers (an unknown path)."""
    return STATUS_OUTCOMES.get(status, "ok" if status < 400 else "http-error")
