"""The device API (docs/contract.md, "Ingress"): one aiohttp app per listener.

``POST /v1/channels/{channel}/submissions`` (admitted by :mod:`.admission`, received by
:mod:`.receive`), ``GET /v1/submissions/{id}``, and ``Expect: 100-continue``, which runs
the admission before the device sends its body. Every request is one ``request`` log
line and one count; every refusal is answered from the problem catalogue
(:mod:`.problems`), an unexpected error without details.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.errors import (
    DiskLow,
    ExpectationFailed,
    Refusal,
    SpoolError,
    SpoolUnavailable,
    UnknownSubmission,
    is_disk_full,
)
from gateway.ingress.access import LOGGED, outcome_of_status
from gateway.ingress.admission import admit, authenticate, identify_device
from gateway.ingress.problems import (
    INTERNAL_ERROR,
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    ProblemType,
    problem_of,
    problem_response,
    refusal_response,
)
from gateway.ingress.receive import iso, submit_body
from gateway.ingress.runtime import (
    LISTENER,
    RUNTIME,
    Gate,
    Runtime,
    RuntimeRef,
    listener_of,
    peer_fields,
)
from gateway.ops.logs import get_logger
from gateway.spool.records import is_submission_id

__all__ = ["Gate", "Runtime", "RuntimeRef", "build_app"]

log = get_logger("gateway.ingress")


def _channel_label(rt: Runtime, channel: str) -> str:
    """The channel for logs and metrics: a configured name (also when this listener does
    not serve it, which operators want to see), else ``unknown``: never a device's word."""
    return channel if channel in rt.config.channels else "unknown"


async def submit(request: web.Request) -> web.StreamResponse:
    """POST /v1/channels/{channel}/submissions"""
    rt = request.app[RUNTIME].current
    channel = request.match_info["channel"]
    label = _channel_label(rt, channel)
    return await _handle(request, rt, label, lambda ctx: submit_body(rt, request, channel, ctx))


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue``: refuse before the device sends its body, not after.

    The header checks run here; a refusal is answered (and counted and logged) at once
    and the body is never read. Otherwise ``100 Continue`` goes out and the handler runs
    the same checks again (the staff credential from the verification cache).
    """
    rt = request.app[RUNTIME].current
    channel = request.match_info["channel"]
    if request.headers.get("Expect", "").lower() != "100-continue":

        async def expectation_failed(_context: dict[str, Any]) -> web.Response:
            raise ExpectationFailed  # answered, counted, logged and access-logged

        return await _handle(request, rt, _channel_label(rt, channel), expectation_failed)
    failure: Refusal | None = None
    learned: dict[str, Any] = {}
    try:
        await admit(rt, request, channel, learned)
    except Refusal as exc:
        failure = exc
    except Exception as exc:
        # Expect handlers run before the middlewares: the entry is recorded here.
        response = _unexpected(exc)
        _record_unlogged(request, rt, response.status)
        return response
    if failure is None:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return None
    refused: Refusal = failure

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
        context["user_id"] = await authenticate(rt, request)
        submission_id = request.match_info["submission_id"]
        record = await rt.spool.get(submission_id) if is_submission_id(submission_id) else None
        if (
            record is None
            or record.device_id != device.id
            or listener_of(request) not in rt.config.listeners_of(record.channel)
        ):
            raise UnknownSubmission
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
    except Refusal as refusal:
        context.pop("outcome", None)
        response = refusal_response(refusal, instance=f"urn:request:{request_id}")
        outcome = problem_of(refusal).slug
        level = "warning"  # journalctl -p warning lists every refusal
    except ConnectionResetError:
        # The device went away mid-request; nothing was stored and nobody reads an answer.
        response = web.Response(status=400)
        outcome = "client_gone"
        level = "info"
    except (SpoolError, OSError) as exc:
        # Nothing was stored; the device tries again later: after Retry-After, a full
        # disk (507) or a failing one (503) may well take the submission.
        retry_after = rt.config.spool.retry_after_seconds
        unavailable: Refusal = (
            DiskLow(retry_after=retry_after)
            if is_disk_full(exc)
            else SpoolUnavailable(retry_after=retry_after)
        )
        response = refusal_response(unavailable, instance=f"urn:request:{request_id}")
        outcome = problem_of(unavailable).slug
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
    if not context.pop("access_logged", False):  # an accepted one is, with its record
        rt.access.record(rt.access.entry(request, context, status=response.status, outcome=outcome))
    request[LOGGED] = True
    context.pop("bytes", None)
    if level != "info":  # a refusal or a fault: who and from where, to act on it
        context = {**peer_fields(request), **context}
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
async def access_logged(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every request attempt has its access log entry: those the API's handlers did not
    record (an unknown path, a method the API does not have) are recorded here."""
    response = await handler(request)
    if not request.get(LOGGED):
        _record_unlogged(request, request.app[RUNTIME].current, response.status)
    return response


def _record_unlogged(request: web.Request, rt: Runtime, status: int) -> None:
    """The access log entry of a request no handler recorded, from its status alone."""
    context = {"listener": listener_of(request), "request_id": secrets.token_hex(8)}
    outcome = outcome_of_status(status)
    rt.access.record(rt.access.entry(request, context, status=status, outcome=outcome))
    request[LOGGED] = True


@web.middleware
async def last_resort(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Unknown routes and unexpected errors still answer problem+json, without details."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        known = {404: NOT_FOUND, 405: METHOD_NOT_ALLOWED}.get(exc.status)
        if known is None:
            known = ProblemType(exc.status, "http-error", exc.reason or "Error")
        return problem_response(ProblemType(exc.status, known.slug, exc.reason or known.title))
    except Exception as exc:
        return _unexpected(exc)


def _unexpected(exc: Exception) -> web.Response:
    """A bug, answered without details: logged by type and place, never by message."""
    frame = exc.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    where = f"{frame.tb_frame.f_code.co_filename}:{frame.tb_lineno}" if frame else "?"
    log.error("unexpected_error", error=type(exc).__name__, reason=where)
    return problem_response(INTERNAL_ERROR, "the gateway failed; the submission was not accepted")


def build_app(runtime: RuntimeRef, listener: str) -> web.Application:
    """The device API as served on one listener (network)."""
    app = web.Application(middlewares=[access_logged, last_resort], client_max_size=64 * 1024)
    app[RUNTIME] = runtime
    app[LISTENER] = listener
    app.router.add_post(
        "/v1/channels/{channel}/submissions", submit, expect_handler=expect_continue
    )
    app.router.add_get("/v1/submissions/{submission_id}", status)
    return app
