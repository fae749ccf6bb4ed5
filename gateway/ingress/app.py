"""The device-facing HTTPS API (docs/contract.md, "Ingress").

Each listener (one per network) serves its own copy of this app, which knows the
listener's name. Checks run cheapest first and all of them before the body is read: the
device's certificate, the channel (served on this listener, or it does not exist here),
the device's right to it, the source network, the active window, the staff credential,
the staff user's right to the channel, the media type, the size, and the spool's room.
Then the body streams once through :mod:`gateway.intake` into an encrypted pending
record, the photo is decode-checked from that record, the device and user are checked
again against the registries as they are now (a revocation during the upload wins), and
only when the record and its index row are on disk does the device get its 202.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway.channels.policy import (
    ChannelPolicy,
    device_allowed,
    expires_at,
    field_label,
    source_allowed,
    window_problem,
)
from gateway.config import GatewayConfig
from gateway.crypto.pki import cert_fingerprint
from gateway.crypto.tls import peer_cert_der
from gateway.errors import ProblemError, SpoolError, Violation
from gateway.identity.auth import StaffAuthenticator, unauthorized
from gateway.identity.registry import Device
from gateway.identity.watcher import RegistryWatcher
from gateway.ingress.intake import MultipartIntake, multipart_boundary
from gateway.ingress.photos import PhotoChecker
from gateway.ops.logs import get_logger
from gateway.ops.metrics import Metrics
from gateway.spool.pending import PendingRecord
from gateway.spool.records import (
    DuplicateIdempotencyKey,
    NewRecord,
    Record,
    is_submission_id,
    new_submission_id,
)
from gateway.spool.store import Spool

IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
PROBLEM_JSON = "application/problem+json"

log = get_logger("gateway.ingress")


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    moment = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
    return moment.replace("+00:00", "Z")


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
    registries: RegistryWatcher
    auth: StaffAuthenticator
    spool: Spool
    metrics: Metrics
    clock: Callable[[], float]
    on_accepted: Callable[[Record], None]
    photos: PhotoChecker
    gate: Gate


@dataclass
class RuntimeRef:
    """The runtime new requests start with; the daemon replaces ``current`` on reload."""

    current: Runtime


RUNTIME = web.AppKey("runtime", RuntimeRef)
LISTENER = web.AppKey("listener", str)
"""The name of the listener (network) this app serves."""


def listener_of(request: web.Request) -> str:
    return request.app[LISTENER]


def _count_auth_failure(rt: Runtime, request: web.Request, reason: str) -> None:
    rt.metrics.auth_failures.labels(listener=listener_of(request), reason=reason).inc()


def receipt(record: Record) -> dict[str, Any]:
    return {
        "submission_id": record.id,
        "channel": record.channel,
        "sha256": record.body_sha256,
        "received_at": iso(record.received_at),
        "expires_at": iso(record.expires_at),
    }


def problem_response(problem: ProblemError, instance: str | None = None) -> web.Response:
    headers = {}
    if problem.retry_after is not None:
        headers["Retry-After"] = str(problem.retry_after)
    if problem.status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="gateway", charset="UTF-8"'
    return web.json_response(
        problem.body(instance), status=problem.status, content_type=PROBLEM_JSON, headers=headers
    )


def identify_device(rt: Runtime, request: web.Request) -> Device:
    """The registered, unrevoked device behind the TLS client certificate, or 403."""
    transport = request.transport
    der = peer_cert_der(transport.get_extra_info("ssl_object") if transport else None)
    if der is None:
        _count_auth_failure(rt, request, "no_client_certificate")
        raise ProblemError(
            403,
            "device-unknown",
            "Device not recognised",
            "a device client certificate is required",
        )
    rt.registries.refresh()
    device = rt.registries.devices.by_fingerprint(cert_fingerprint(der))
    if device is None:
        _count_auth_failure(rt, request, "device_unknown")
        raise ProblemError(
            403,
            "device-unknown",
            "Device not recognised",
            "this device certificate is not registered",
        )
    if device.revoked:
        _count_auth_failure(rt, request, "device_revoked")
        raise _revoked()
    return device


def _revoked() -> ProblemError:
    return ProblemError(
        403, "device-revoked", "Device revoked", "this device has been disabled (端末無効化)"
    )


def _unknown_channel() -> ProblemError:
    return ProblemError(404, "unknown-channel", "Unknown channel", "no channel by that name")


def _admission(rt: Runtime, request: web.Request, channel: str, device: Device) -> ChannelPolicy:
    policy = rt.policies.get(channel)
    config = rt.config.channels.get(channel)
    if policy is None or config is None or listener_of(request) not in config.listeners:
        # A channel not served on this listener does not exist here: the same answer as
        # for a name that is no channel at all, whatever the device's certificate.
        raise _unknown_channel()
    if not device_allowed(config, device.id, device.group):
        _count_auth_failure(rt, request, "device_not_allowed")
        raise ProblemError(
            403,
            "device-not-allowed",
            "Device not allowed on this channel",
            "this device may not post on this channel",
        )
    if not source_allowed(config, request.remote):
        _count_auth_failure(rt, request, "source_network")
        raise ProblemError(
            403,
            "source-network-not-allowed",
            "Source network not allowed",
            "this channel does not accept submissions from this network",
        )
    inactive = window_problem(config, datetime.fromtimestamp(rt.clock(), UTC))
    if inactive is not None:
        raise inactive
    return policy


def _check_room(rt: Runtime, expected: int) -> None:
    """507 unless the spool and the disk have room for this body and every body under way."""
    spool_cfg = rt.config.spool
    expected += rt.gate.reserved_bytes
    if rt.spool.bytes + expected > spool_cfg.quota_bytes:
        raise ProblemError(
            507,
            "spool-full",
            "Spool full",
            "the gateway's spool is at its quota; retry later",
            retry_after=spool_cfg.retry_after_seconds,
        )
    if rt.spool.free_bytes() - expected < spool_cfg.min_free_bytes:
        raise ProblemError(
            507,
            "disk-low",
            "Disk space low",
            "the gateway's disk is nearly full; retry later",
            retry_after=spool_cfg.retry_after_seconds,
        )


def _too_large(limit: int) -> ProblemError:
    return ProblemError(
        413, "too-large", "Request too large", f"this channel takes at most {limit} bytes"
    )


def _replay(existing: Record, content_sha256: str) -> web.Response:
    """The original receipt for a repeat; 409 when the key came with other content."""
    if existing.content_sha256 != content_sha256:
        raise ProblemError(
            409,
            "idempotency-conflict",
            "Idempotency-Key reused",
            "this Idempotency-Key was used for a different body",
        )
    return web.json_response(receipt(existing), status=202, headers={"Idempotent-Replayed": "true"})


async def _body_chunks(request: web.Request, idle_timeout: float) -> AsyncIterator[bytes]:
    """The body as it arrives; 408 when it stalls, 400 when its framing is broken."""
    while True:
        try:
            async with asyncio.timeout(idle_timeout):
                chunk = await request.content.readany()
        except TimeoutError:
            raise ProblemError(
                408,
                "body-timeout",
                "Request body stalled",
                f"no body bytes arrived for {idle_timeout:g} seconds",
            ) from None
        except web.RequestPayloadError:
            raise ProblemError(
                400, "malformed", "Malformed request", "the request body's framing is broken"
            ) from None
        if not chunk:
            return
        yield chunk


async def _check_photo(
    rt: Runtime, pending: PendingRecord, intake: MultipartIntake, policy: ChannelPolicy
) -> Violation | None:
    file = intake.result.file
    if file is None or file.rule.format != "jpeg_photo":
        return None
    if any(v.field == file.rule.name for v in intake.result.violations):
        return None
    where = pending.location(file.start, file.length)
    return await rt.photos.check(file.rule.name, where, policy.photo)


async def _authenticate(rt: Runtime, request: web.Request) -> str:
    """The staff user behind HTTP Basic (401 first: a stranger learns nothing more)."""
    return await rt.auth.authenticate(
        request.headers.get("Authorization"),
        on_failure=lambda reason: _count_auth_failure(rt, request, reason),
    )


def _check_staff_channel(rt: Runtime, request: web.Request, user_id: str, channel: str) -> None:
    """403 unless the registry names this staff user for this channel (取扱者の指定)."""
    user = rt.registries.users.get(user_id)
    if user is None or channel not in rt.config.expand_staff_scope(user.channels or ()):
        _count_auth_failure(rt, request, "user_not_allowed_on_channel")
        raise ProblemError(
            403,
            "user-not-allowed-on-channel",
            "Staff user not named for this channel",
            "this staff user is not named to handle this channel",
        )


def _still_allowed(request: web.Request, device: Device, user_id: str) -> None:
    """Device and user checked again against the registries as they are now, before the
    record is committed: a revocation that lands while the body uploads wins."""
    rt = request.app[RUNTIME].current  # the latest: a reload may have replaced ours
    rt.registries.refresh()
    now = rt.registries.devices.by_fingerprint(device.fingerprint)
    if now is None or now.revoked:
        _count_auth_failure(rt, request, "device_revoked")
        raise _revoked()
    user = rt.registries.users.get(user_id)
    if user is None or not user.enabled:
        _count_auth_failure(rt, request, "user_disabled")
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


async def _admit(
    rt: Runtime, request: web.Request, channel: str, context: dict[str, Any]
) -> Admission:
    """Every check that needs only the headers, cheapest first (also run for 100-continue)."""
    if not rt.gate.accepting:
        raise ProblemError(
            503,
            "shutting-down",
            "Gateway is shutting down",
            "retry on another node or later",
            retry_after=5,
        )
    device = identify_device(rt, request)
    context["device_id"] = device.id
    policy = _admission(rt, request, channel, device)
    user_id = await _authenticate(rt, request)
    context["user_id"] = user_id
    _check_staff_channel(rt, request, user_id, channel)
    boundary = multipart_boundary(request.headers.get("Content-Type", ""))
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding != "identity":
        raise ProblemError(
            415,
            "unsupported-media-type",
            "Unsupported content encoding",
            "send the multipart body without Content-Encoding",
        )
    declared = request.content_length
    if declared is not None and declared > policy.max_body_bytes:
        raise _too_large(policy.max_body_bytes)
    expected = declared if declared is not None else policy.max_body_bytes
    _check_room(rt, expected)
    key = request.headers.get("Idempotency-Key")
    if key is not None and not IDEMPOTENCY_KEY.match(key):
        raise ProblemError(
            400,
            "malformed",
            "Malformed request",
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
        )
    return Admission(device, policy, user_id, boundary, key, expected)


async def _submit(
    rt: Runtime, request: web.Request, channel: str, context: dict[str, Any]
) -> web.Response:
    admitted = await _admit(rt, request, channel, context)
    rt.gate.reserved_bytes += admitted.expected_bytes
    try:
        return await _receive(rt, request, channel, context, admitted)
    finally:
        rt.gate.reserved_bytes -= admitted.expected_bytes


async def _receive(
    rt: Runtime,
    request: web.Request,
    channel: str,
    context: dict[str, Any],
    admitted: Admission,
) -> web.Response:
    """Stream the admitted body into an encrypted record, check it, commit it."""
    device, policy, user_id = admitted.device, admitted.policy, admitted.user_id
    boundary, key = admitted.boundary, admitted.key
    # The device chooses the key and may put personal data in it: only a keyed hash of
    # it (bound to device and channel) is ever stored.
    token = None if key is None else rt.spool.idempotency_token(device.id, channel, key)
    received_at = rt.clock()
    pending = await rt.spool.create(new_submission_id(rt.clock))
    committed = False
    try:
        intake = MultipartIntake(policy, pending, boundary)
        async for chunk in _body_chunks(request, rt.config.ingress.body_idle_timeout):
            if intake.result.body_bytes + len(chunk) > policy.max_body_bytes:
                raise _too_large(policy.max_body_bytes)
            intake.feed(chunk)
        result = intake.finish()
        pending.finish()
        if token is not None:
            existing = await rt.spool.find_idempotent(device.id, token)
            if existing is not None:
                context["outcome"] = "replayed"
                return _replay(existing, result.content_sha256)
        rt.spool.start_sync(pending)  # fsync the record while the photo is checked
        photo_violation = await _check_photo(rt, pending, intake, policy)
        if photo_violation is not None:
            result.violations.append(photo_violation)
        context["fields"] = sorted(result.fields)
        context["dropped"] = sorted(field_label(n) for n in result.dropped)
        if result.violations:
            context["rules"] = sorted({f"{v.field}:{v.rule}" for v in result.violations})
            raise ProblemError(
                422,
                "invalid-fields",
                "Invalid fields",
                "one or more fields break the channel's rules",
                violations=tuple(result.violations),
            )
        _still_allowed(request, device, user_id)
        config = rt.config.channels[channel]
        meta = NewRecord(
            channel=channel,
            destination=config.destination,
            device_id=device.id,
            user_id=user_id,
            received_at=received_at,
            expires_at=expires_at(received_at, config.retention_days),
            content_type=intake.content_type,
            body_sha256=result.body_sha256,
            content_sha256=result.content_sha256,
            field_names=tuple(result.fields),
            idempotency_key=token,
        )
        try:
            record = await rt.spool.commit(pending, meta)
        except DuplicateIdempotencyKey:
            # A concurrent request with the same key won the race.
            existing = await rt.spool.find_idempotent(device.id, token or "")
            if existing is None:
                raise
            context["outcome"] = "replayed"
            return _replay(existing, result.content_sha256)
        committed = True
    finally:
        if not committed:
            rt.spool.discard(pending)
    for name in result.dropped:
        rt.metrics.fields_dropped.labels(channel=channel, field=field_label(name)).inc()
    context["submission_id"] = record.id
    context["outcome"] = "accepted"
    rt.on_accepted(record)
    return web.json_response(receipt(record), status=202)


def _channel_label(rt: Runtime, channel: str) -> str:
    """The channel for logs and metrics: a configured name (also when this listener does
    not serve it, which operators want to see), else ``unknown``: never a device's word."""
    return channel if channel in rt.config.channels else "unknown"


async def submit(request: web.Request) -> web.StreamResponse:
    """POST /v1/channels/{channel}/submissions"""
    rt = request.app[RUNTIME].current
    channel = request.match_info["channel"]
    label = _channel_label(rt, channel)
    return await _handle(request, rt, label, lambda ctx: _submit(rt, request, channel, ctx))


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue``: refuse before the device sends its body, not after.

    The header checks run here; a refusal is answered (and counted and logged) at once
    and the body is never read. Otherwise ``100 Continue`` goes out and the handler runs
    the same checks again (the staff credential from the verification cache).
    """
    if request.headers.get("Expect", "").lower() != "100-continue":
        return problem_response(
            ProblemError(
                417,
                "expectation-failed",
                "Expectation failed",
                "only Expect: 100-continue is understood",
            )
        )
    rt = request.app[RUNTIME].current
    channel = request.match_info["channel"]
    failure: ProblemError | None = None
    learned: dict[str, Any] = {}
    try:
        await _admit(rt, request, channel, learned)
    except ProblemError as exc:
        failure = exc
    except Exception as exc:
        return _unexpected(exc)
    if failure is None:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return None
    refused: ProblemError = failure

    async def refuse(context: dict[str, Any]) -> web.Response:
        context.update(learned)  # device and user ids, when they were established
        raise refused  # answered, counted and logged like any refusal

    return await _handle(request, rt, _channel_label(rt, channel), refuse)


async def status(request: web.Request) -> web.StreamResponse:
    """GET /v1/submissions/{submission_id}: the state, for the submitting device only."""
    rt = request.app[RUNTIME].current

    async def run(context: dict[str, Any]) -> web.Response:
        device = identify_device(rt, request)
        context["device_id"] = device.id
        context["user_id"] = await _authenticate(rt, request)
        submission_id = request.match_info["submission_id"]
        record = await rt.spool.get(submission_id) if is_submission_id(submission_id) else None
        if (
            record is None
            or record.device_id != device.id
            or listener_of(request) not in rt.config.listeners_of(record.channel)
        ):
            raise ProblemError(
                404,
                "unknown-submission",
                "Unknown submission",
                "no submission by that id for this device",
            )
        context["submission_id"] = record.id
        context["outcome"] = "ok"
        return web.json_response(
            {
                "submission_id": record.id,
                "channel": record.channel,
                "state": record.state,
                "received_at": iso(record.received_at),
                "expires_at": iso(record.expires_at),
                "delivered_at": iso(record.delivered_at),
                "held_at": iso(record.held_at),
                "erased_at": iso(record.erased_at),
                "attempts": record.attempts,
                "upstream_receipt": record.upstream_receipt,
            }
        )

    return await _handle(request, rt, None, run)


async def _handle(
    request: web.Request,
    rt: Runtime,
    channel_label: str | None,
    run: Callable[[dict[str, Any]], Awaitable[web.Response]],
) -> web.StreamResponse:
    request_id = secrets.token_hex(8)
    listener = listener_of(request)
    context: dict[str, Any] = {"request_id": request_id, "listener": listener}
    if channel_label is not None:
        context["channel"] = channel_label
    started = time.perf_counter()
    rt.gate.enter()
    try:
        response = await run(context)
        outcome = context.pop("outcome", "ok")
        level = "info"
    except ProblemError as problem:
        context.pop("outcome", None)
        response = problem_response(problem, instance=f"urn:request:{request_id}")
        outcome = problem.slug
        level = "warning" if problem.status >= 500 else "info"
    except ConnectionResetError:
        # The device went away mid-request; nothing was stored and nobody reads an answer.
        response = web.Response(status=400)
        outcome = "client_gone"
        level = "info"
    except (SpoolError, OSError) as exc:
        unavailable = ProblemError(
            503,
            "spool-unavailable",
            "Spool unavailable",
            "the gateway cannot store submissions right now",
            retry_after=rt.config.spool.retry_after_seconds,
        )
        response = problem_response(unavailable, instance=f"urn:request:{request_id}")
        outcome = unavailable.slug
        level = "error"
        context["error"] = type(exc).__name__
    finally:
        rt.gate.leave()
    duration = time.perf_counter() - started
    if channel_label is not None:
        rt.metrics.submissions.labels(
            listener=listener, channel=channel_label, outcome=outcome
        ).inc()
        if outcome == "accepted":
            rt.metrics.time_to_accept.labels(listener=listener, channel=channel_label).observe(
                duration
            )
    response.headers["X-Request-Id"] = request_id
    if isinstance(response, web.Response) and not request.content.at_eof():
        # A refusal before the whole body arrived: close rather than drain the rest.
        response.force_close()
    getattr(log, level)(
        "request",
        method=request.method,
        status=response.status,
        outcome=outcome,
        duration_ms=round(duration * 1000, 2),
        **context,
    )
    return response


@web.middleware
async def last_resort(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Unknown routes and unexpected errors still answer problem+json, without details."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status, "http-error")
        problem = ProblemError(exc.status, slug, exc.reason or "Error")
        return problem_response(problem)
    except Exception as exc:
        return _unexpected(exc)


def _unexpected(exc: Exception) -> web.Response:
    """A bug, answered without details: logged by type and place, never by message."""
    frame = exc.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    where = f"{frame.tb_frame.f_code.co_filename}:{frame.tb_lineno}" if frame else "?"
    log.error("unexpected_error", error=type(exc).__name__, reason=where)
    problem = ProblemError(
        500,
        "internal-error",
        "Internal error",
        "the gateway failed; the submission was not accepted",
    )
    return problem_response(problem)


def build_app(runtime: RuntimeRef, listener: str) -> web.Application:
    """The device API as served on one listener (network)."""
    app = web.Application(middlewares=[last_resort], client_max_size=64 * 1024)
    app[RUNTIME] = runtime
    app[LISTENER] = listener
    app.router.add_post(
        "/v1/channels/{channel}/submissions", submit, expect_handler=expect_continue
    )
    app.router.add_get("/v1/submissions/{submission_id}", status)
    return app
