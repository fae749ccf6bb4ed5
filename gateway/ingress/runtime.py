"""What every request of the device API shares: the runtime a configuration built
(swapped whole on reload) and the gate that counts requests and drains them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from gateway.channels.policy import ChannelPolicy
from gateway.config import GatewayConfig
from gateway.identity.auth import StaffAuthenticator
from gateway.identity.watcher import Registries
from gateway.ingress.access import PEER, AccessRecorder, client_address
from gateway.ingress.photos import PhotoChecker
from gateway.ingress.scanner import ClamdScanner
from gateway.ops.metrics import Metrics
from gateway.spool.backend import SpoolBackend as Spool
from gateway.spool.records import Record


@dataclass
class Gate:
    """The state every request shares, whatever configuration it was admitted under."""

    reserved_bytes: int = 0
    """Room promised to bodies being received (their declared or maximum size)."""
    accepting: bool = True
    in_flight: int = 0
    """Requests being handled (exported as gateway_ingress_requests_in_flight)."""
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def drained(self, within: float) -> bool:
        """Wait until no request is being handled (True), or ``within`` seconds pass (False).

        The drain waits here, not in aiohttp's shutdown: that stops reading from every
        connection at once, so a body still arriving could never finish.
        """
        if self.in_flight == 0:
            return True
        try:
            async with asyncio.timeout(within):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True


@dataclass(frozen=True)
class Runtime:
    """What the handlers need. A reload builds a new one and swaps it in whole: a request
    keeps the one it started with, so it never sees half of each configuration."""

    config: GatewayConfig
    policies: dict[str, ChannelPolicy]
    registries: Registries
    auth: StaffAuthenticator
    spool: Spool
    metrics: Metrics
    clock: Callable[[], float]
    on_accepted: Callable[[Record], None]
    photos: PhotoChecker
    gate: Gate
    access: AccessRecorder
    scanner: ClamdScanner | None = None


@dataclass
class RuntimeRef:
    """The runtime new requests start with; the daemon replaces ``current`` on reload."""

    current: Runtime


RUNTIME = web.AppKey("runtime", RuntimeRef)
LISTENER = web.AppKey("listener", str)
"""The name of the listener (network) this app serves."""


def listener_of(request: web.Request) -> str:
    return request.app[LISTENER]


def peer_fields(request: web.Request) -> dict[str, str | int]:
    """The client's address and port, and its certificate's fingerprint and device (or
    ``unregistered``) once identified: what security staff need to act on a refusal."""
    fields: dict[str, str | int] = {}
    remote, port = client_address(request)
    if remote is not None:
        fields["remote"] = remote
    if port is not None:
        fields["client_port"] = port
    peer = request.get(PEER)
    if peer is not None:
        fields["fingerprint"] = peer.fingerprint
        fields["device_id"] = peer.device_id or "unregistered"
    return fields
