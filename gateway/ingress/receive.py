"""Receiving an admitted submission: the body streams once through the intake into an
encrypted pending record, the photo is checked, the device and user are checked again,
and only once the record and its index row are on disk is the receipt (202) sent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway.channels.policy import ChannelPolicy, expires_at, field_label
from gateway.errors import (
    BodyTimeout,
    IdempotencyConflict,
    InvalidFields,
    Malformed,
    MalwareDetected,
    ScannerUnavailable,
    TooLarge,
    Violation,
)
from gateway.ingress.access import encode
from gateway.ingress.admission import Admission, admit, still_allowed
from gateway.ingress.intake import MultipartIntake
from gateway.ingress.photos import PhotoHold
from gateway.ingress.runtime import Runtime
from gateway.ingress.scanner import ScanSession
from gateway.ops.logs import get_logger
from gateway.spool.pending import PendingRecord
from gateway.spool.records import DuplicateIdempotencyKey, NewRecord, Record, new_submission_id

log = get_logger("gateway.ingress")


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    moment = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
    return moment.replace("+00:00", "Z")


def receipt(record: Record) -> dict[str, Any]:
    return {
        "submission_id": record.id,
        "channel": record.channel,
        "sha256": record.body_sha256,
        "received_at": iso(record.received_at),
        "expires_at": iso(record.expires_at),
    }


def _replay(existing: Record, content_sha256: str) -> web.Response:
    """The original receipt for a repeat; a conflict when the key came with other content."""
    if existing.content_sha256 != content_sha256:
        raise IdempotencyConflict
    return web.json_response(receipt(existing), status=202, headers={"Idempotent-Replayed": "true"})


async def _body_chunks(request: web.Request, idle_timeout: float) -> AsyncIterator[bytes]:
    """The body as it arrives; refused when it stalls or its framing is broken."""
    while True:
        try:
            async with asyncio.timeout(idle_timeout):
                chunk = await request.content.readany()
        except TimeoutError:
            raise BodyTimeout(f"no body bytes arrived for {idle_timeout:g} seconds") from None
        except web.RequestPayloadError:
            raise Malformed("the request body's framing is broken") from None
        if not chunk:
            return
        yield chunk


def _scanner_unavailable(rt: Runtime, channel: str, exc: ScannerUnavailable) -> None:
    """Counted and logged (fail closed: the submission is refused 503)."""
    rt.metrics.scans.labels(channel=channel, result="unavailable").inc()
    log.error("scanner_unavailable", channel=channel, reason=exc.reason)


async def open_scan(rt: Runtime, channel: str) -> ScanSession | None:
    """A clamd session for a channel that scans (None otherwise); 503 if clamd is not
    there, before the body is read."""
    if not rt.config.channels[channel].scan or rt.scanner is None:
        return None
    try:
        return await rt.scanner.open()
    except ScannerUnavailable as exc:
        _scanner_unavailable(rt, channel, exc)
        raise


async def check_scan(rt: Runtime, channel: str, scan: ScanSession, intake: MultipartIntake) -> None:
    """The scanner's verdict on the file part, before anything is committed."""
    try:
        signature = await scan.verdict()
    except ScannerUnavailable as exc:
        _scanner_unavailable(rt, channel, exc)
        raise
    if signature is None:
        rt.metrics.scans.labels(channel=channel, result="clean").inc()
        return
    rt.metrics.scans.labels(channel=channel, result="infected").inc()
    file = intake.result.file
    part = file.rule.name if file is not None else "file"
    log.warning("malware_detected", channel=channel, reason=signature)
    raise MalwareDetected(part, signature)


async def _check_photo(
    rt: Runtime,
    pending: PendingRecord,
    intake: MultipartIntake,
    policy: ChannelPolicy,
    hold: PhotoHold | None,
) -> Violation | None:
    """The photo's check: from its bytes in memory when they were kept (``hold`` is
    then released once the check is done with them), else read back from the record."""
    file = intake.result.file
    if file is None or file.rule.format != "jpeg_photo":
        return None
    if any(v.field == file.rule.name for v in intake.result.violations):
        return None
    method = rt.config.channels[policy.name].photo_check
    data, file.data = file.data, None  # freed once the check is done with it
    if data is not None and data.tell() == file.length:
        return await rt.photos.check(file.rule.name, data, policy.photo, method, hold=hold)
    if hold is not None:
        hold.release()  # nothing kept: the room goes back before the read-back
    where = pending.location(file.start, file.length)
    return await rt.photos.check(file.rule.name, where, policy.photo, method)


async def submit_body(
    rt: Runtime, request: web.Request, channel: str, context: dict[str, Any]
) -> web.Response:
    """Admit, receive and commit one submission; its room is reserved meanwhile."""
    admitted = await admit(rt, request, channel, context)
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
    scan = await open_scan(rt, channel)  # before a file is made: no clamd, no record
    try:
        pending = await rt.spool.create(new_submission_id(rt.clock))
    except BaseException:
        if scan is not None:
            scan.close()
        raise
    committed = False
    intake: MultipartIntake | None = None
    # Room to keep a small photo in memory for its check, from the photo budget.
    photo = policy.file_field
    hold = None
    if photo is not None and photo.format == "jpeg_photo":
        hold = rt.photos.hold(admitted.expected_bytes)
    try:
        intake = MultipartIntake(
            policy,
            pending,
            boundary,
            on_file_bytes=scan.feed if scan else None,
            content_digest=token is not None,
            keep_photo=hold.amount if hold is not None else 0,
        )
        async for chunk in _body_chunks(request, rt.config.ingress.body_idle_timeout):
            if intake.result.body_bytes + len(chunk) > policy.max_body_bytes:
                raise TooLarge(policy.max_body_bytes)
            intake.feed(chunk)
            if scan is not None:
                await scan.drain()
        result = intake.finish()
        pending.finish()
        if scan is not None:
            await check_scan(rt, channel, scan, intake)
        if token is not None:
            existing = await rt.spool.find_idempotent(device.id, token)
            if existing is not None:
                context["outcome"] = "replayed"
                return _replay(existing, result.content_sha256)
        photo_violation = await _check_photo(rt, pending, intake, policy, hold)
        if photo_violation is not None:
            result.violations.append(photo_violation)
        context["fields"] = sorted(result.fields)
        context["dropped"] = sorted(field_label(n) for n in result.dropped)
        if result.violations:
            context["rules"] = sorted({f"{v.field}:{v.rule}" for v in result.violations})
            raise InvalidFields(violations=tuple(result.violations))
        still_allowed(request, device, user_id)
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
        # The access log entry goes into the index with the record: durable before the
        # 202, at no fsync of its own.
        entry = {**context, "submission_id": pending.id, "bytes": result.body_bytes}
        access = rt.access.entry(request, entry, status=202, outcome="accepted")
        try:
            record = await rt.spool.commit(pending, meta, access=encode(access))
        except DuplicateIdempotencyKey:
            # A concurrent request with the same key won the race.
            existing = await rt.spool.find_idempotent(device.id, token or "")
            if existing is None:
                raise
            context["outcome"] = "replayed"
            return _replay(existing, result.content_sha256)
        committed = True
        context["access_logged"] = True
        rt.access.wake()
    finally:
        context["bytes"] = intake.result.body_bytes if intake is not None else 0
        if hold is not None and not hold.handed:  # else its check releases it
            hold.release()
        if scan is not None:
            scan.close()
        if not committed:
            rt.spool.discard(pending)
    for name in result.dropped:
        rt.metrics.fields_dropped.labels(channel=channel, field=field_label(name)).inc()
    context["submission_id"] = record.id
    context["outcome"] = "accepted"
    rt.on_accepted(record)
    return web.json_response(receipt(record), status=202)
