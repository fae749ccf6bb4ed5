"""Admission: every check a submission passes before a byte of its body is read, and
the last check before it is committed.

Cheapest first: the gate, the device's certificate and registration, the channel
(served on this listener, or it does not exist here), the device's right to it, the
source network, the active window, the staff credential (401 first, so a stranger
learns nothing more), the staff user's right to the channel, the media type, the
size, the spool's room, the Idempotency-Key's form. The answers are refusals of the
domain; :mod:`gateway.ingress.problems` says how each is answered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway.channels.policy import (
    ChannelPolicy,
    device_allowed,
    source_allowed,
    window_closed,
)
from gateway.crypto.certs import cert_fingerprint
from gateway.crypto.tls import peer_cert_der
from gateway.errors import (
    DeviceNotAllowed,
    DeviceRevoked,
    DeviceUnknown,
    DiskLow,
    Malformed,
    NoClientCertificate,
    ShuttingDown,
    SourceNetworkNotAllowed,
    SpoolFull,
    TooLarge,
    UnknownChannel,
    UnsupportedMediaType,
    UserNotAllowedOnChannel,
)
from gateway.identity.auth import unauthorized
from gateway.identity.registry import Device
from gateway.ingress.access import PEER, Peer
from gateway.ingress.intake import multipart_boundary
from gateway.ingress.runtime import RUNTIME, Runtime, listener_of

IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


def count_auth_failure(rt: Runtime, request: web.Request, reason: str) -> None:
    rt.metrics.auth_failures.labels(listener=listener_of(request), reason=reason).inc()


def identify_device(rt: Runtime, request: web.Request) -> Device:
    """The registered, unrevoked device behind the TLS client certificate."""
    transport = request.transport
    der = peer_cert_der(transport.get_extra_info("ssl_object") if transport else None)
    if der is None:
        count_auth_failure(rt, request, "no_client_certificate")
        raise NoClientCertificate
    rt.registries.refresh()
    fingerprint = cert_fingerprint(der)
    device = rt.registries.devices.by_fingerprint(fingerprint)
    details = transport.get_extra_info("peercert") if transport else None
    serial = details.get("serialNumber") if isinstance(details, dict) else None
    request[PEER] = Peer(fingerprint, serial, device.id if device is not None else None)
    if device is None:
        count_auth_failure(rt, request, "device_unknown")
        raise DeviceUnknown
    if device.revoked:
        count_auth_failure(rt, request, "device_revoked")
        raise DeviceRevoked
    return device


def _admission(rt: Runtime, request: web.Request, channel: str, device: Device) -> ChannelPolicy:
    policy = rt.policies.get(channel)
    config = rt.config.channels.get(channel)
    if policy is None or config is None or listener_of(request) not in config.listeners:
        # A channel not served on this listener does not exist here: the same answer as
        # for a name that is no channel at all, whatever the device's certificate.
        raise UnknownChannel
    if not device_allowed(config, device.id, device.group):
        count_auth_failure(rt, request, "device_not_allowed")
        raise DeviceNotAllowed
    if not source_allowed(config, request.remote):
        count_auth_failure(rt, request, "source_network")
        raise SourceNetworkNotAllowed
    inactive = window_closed(config, datetime.fromtimestamp(rt.clock(), UTC))
    if inactive is not None:
        raise inactive
    return policy


def _check_room(rt: Runtime, expected: int) -> None:
    """Refused unless the spool and the disk have room for this body and every body under
    way."""
    spool_cfg = rt.config.spool
    expected += rt.gate.reserved_bytes
    if rt.spool.bytes + expected > spool_cfg.quota_bytes:
        raise SpoolFull(retry_after=spool_cfg.retry_after_seconds)
    if rt.spool.free_bytes() - expected < spool_cfg.min_free_bytes:
        raise DiskLow(retry_after=spool_cfg.retry_after_seconds)


async def authenticate(rt: Runtime, request: web.Request) -> str:
    """The staff user behind HTTP Basic (401 first: a stranger learns nothing more)."""
    return await rt.auth.authenticate(
        request.headers.get("Authorization"),
        on_failure=lambda reason: count_auth_failure(rt, request, reason),
    )


def check_staff_channel(rt: Runtime, request: web.Request, user_id: str, channel: str) -> None:
    """Refused unless the registry names this staff user for this channel (取扱者の指定)."""
    user = rt.registries.users.get(user_id)
    if user is None or channel not in rt.config.expand_staff_scope(user.channels or ()):
        count_auth_failure(rt, request, "user_not_allowed_on_channel")
        raise UserNotAllowedOnChannel


def still_allowed(request: web.Request, device: Device, user_id: str) -> None:
    """Device and user checked again against the registries as they are now, before the
    record is committed: a revocation that lands while the body uploads wins."""
    rt = request.app[RUNTIME].current  # the latest: a reload may have replaced ours
    rt.registries.refresh()
    now = rt.registries.devices.by_fingerprint(device.fingerprint)
    if now is None or now.revoked:
        count_auth_failure(rt, request, "device_revoked")
        raise DeviceRevoked
    user = rt.registries.users.get(user_id)
    if user is None or not user.enabled:
        count_auth_failure(rt, request, "user_disabled")
        raise unauthorized("unknown staff user ID or wrong password")


@dataclass(frozen=True)
class Admission:
    """Everything decided about a submission before a byte of its body is read."""

    device: Device
    policy: ChannelPolicy
    user_id: str
    boundary: bytes = field(repr=False)  # chosen by the device
    key: str | None = field(repr=False)  # chosen by the device, may be anything
    expected_bytes: int


async def admit(
    rt: Runtime, request: web.Request, channel: str, context: dict[str, Any]
) -> Admission:
    """Every check that needs only the headers, cheapest first (also run for 100-continue)."""
    if not rt.gate.accepting:
        raise ShuttingDown(retry_after=5)
    device = identify_device(rt, request)
    context["device_id"] = device.id
    policy = _admission(rt, request, channel, device)
    user_id = await authenticate(rt, request)
    context["user_id"] = user_id
    check_staff_channel(rt, request, user_id, channel)
    boundary = multipart_boundary(request.headers.get("Content-Type", ""))
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding != "identity":
        raise UnsupportedMediaType("send the multipart body without Content-Encoding")
    declared = request.content_length
    if declared is not None and declared > policy.max_body_bytes:
        raise TooLarge(policy.max_body_bytes)
    expected = declared if declared is not None else policy.max_body_bytes
    _check_room(rt, expected)
    key = request.headers.get("Idempotency-Key")
    if key is not None and not IDEMPOTENCY_KEY.match(key):
        raise Malformed("Idempotency-Key must be 1 to 255 visible ASCII characters")
    return Admission(device, policy, user_id, boundary, key, expected)
