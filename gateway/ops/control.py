"""The daemon's control socket: what ``gatewayctl spool requeue|erase``, ``gatewayctl
reload`` and ``gatewayctl device revoke`` / ``user disable`` ask of it.

A Unix socket (mode 0600, so only the daemon's own user and root) speaking plain HTTP
with JSON answers, served by the running daemon so that its relay queues, spool
counters and erasure ledger stay consistent: a requeued record goes straight to its
destination's workers, an erased one through the same ledger-first path as the
retention sweeper (reason ``operator``), and a registry change is applied before the
command that made it returns (the answer says what the daemon now holds for that device
or user). Answers carry identifiers and states only.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gateway.errors import GatewayError, SpoolError
from gateway.identity.watcher import Registries
from gateway.ops.logs import get_logger
from gateway.retention.sweeper import Sweeper
from gateway.spool.backend import SpoolBackend as Spool
from gateway.spool.records import Record, State, is_submission_id

log = get_logger("gateway.control")


class ControlError(GatewayError):
    """The daemon could not be reached or refused the operation; the message says why."""


class DaemonUnavailable(ControlError):
    """The daemon could not be reached at all (not running, a stale socket, no right)."""


def peer_uid(request: web.Request) -> int | None:
    """The connecting process's uid, from the kernel (SO_PEERCRED), not from its word."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport else None
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


def build_control_app(
    spool: Spool,
    sweeper: Sweeper,
    enqueue: Callable[[Record], None],
    reload: Callable[..., Awaitable[tuple[bool, str]]],
    registries: Callable[[], Registries],
) -> web.Application:
    def record_id(request: web.Request) -> str:
        value = request.match_info["submission_id"]
        if not is_submission_id(value):
            raise web.HTTPBadRequest(text="not a submission id")
        return value

    async def requeue(request: web.Request) -> web.Response:
        submission_id = record_id(request)
        try:
            record = await spool.requeue(submission_id)
        except SpoolError as exc:
            return web.json_response({"error": str(exc)}, status=409)
        enqueue(record)
        log.info("requeued", submission_id=submission_id, destination=record.destination)
        return web.json_response({"submission_id": submission_id, "state": State.QUEUED})

    async def erase(request: web.Request) -> web.Response:
        submission_id = record_id(request)
        if not await sweeper.erase_by_operator(submission_id):
            return web.json_response(
                {"error": f"{submission_id} is unknown or already erased"}, status=404
            )
        return web.json_response({"submission_id": submission_id, "state": State.ERASED})

    async def reload_handler(request: web.Request) -> web.Response:
        # The actor is what gatewayctl says of its user; the uid is the kernel's word.
        claimed = request.headers.get("X-Actor", "unknown")[:64]
        uid = peer_uid(request)
        actor = f"{claimed} (uid {uid})" if uid is not None else claimed
        applied, reason = await reload(actor=actor)
        return web.json_response(
            {"applied": applied, "reason": reason}, status=200 if applied else 409
        )

    async def registries_handler(request: web.Request) -> web.Response:
        """Read the device and staff registries now, and say what the daemon holds for
        the device or user named (``?device=ID`` or ``?user=ID``) once it is applied."""
        watcher = registries()
        problems = watcher.refresh(force=True)
        if problems:
            return web.json_response({"error": "; ".join(problems)}, status=409)
        answer: dict[str, Any] = {"applied": True}
        device_id = request.query.get("device")
        if device_id is not None:
            device = watcher.devices.by_id(device_id)
            answer["device"] = {
                "id": device_id,
                "revoked": None if device is None else device.revoked,
            }
        user_id = request.query.get("user")
        if user_id is not None:
            user = watcher.users.get(user_id)
            answer["user"] = {
                "id": user_id,
                "enabled": None if user is None else user.enabled,
                "channels": None if user is None or user.channels is None else list(user.channels),
            }
        log.info("registries_applied", reason="gatewayctl")
        return web.json_response(answer)

    app = web.Application()
    app.router.add_post("/v1/reload", reload_handler)
    app.router.add_post("/v1/registries/apply", registries_handler)
    app.router.add_post("/v1/spool/{submission_id}/requeue", requeue)
    app.router.add_post("/v1/spool/{submission_id}/erase", erase)
    return app


async def start_control_site(runner: web.AppRunner, path: Path) -> None:
    """Listen on ``path`` (replacing a stale socket) with mode 0600."""
    await runner.setup()
    old_umask = os.umask(0o177)  # the socket is never, even briefly, open to others
    try:
        await web.UnixSite(runner, str(path)).start()
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)


async def control_request(
    socket_path: Path,
    method: str,
    path: str,
    *,
    actor: str | None = None,
    query: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One request to the running daemon: DaemonUnavailable when it cannot be reached,
    ControlError when it refuses (the message says why, in words)."""
    headers = {"X-Actor": actor} if actor else {}
    try:
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket_path))) as s,
            s.request(
                method, f"http://gatewayd{path}", headers=headers, params=query or {}
            ) as response,
        ):
            text = await response.text()
            status = response.status
    except (aiohttp.ClientError, OSError) as exc:
        raise DaemonUnavailable(unreachable(socket_path, exc)) from None
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {"error": text.strip()[:200]}
    if status >= 400:
        reason = body.get("error") or body.get("reason") or f"refused (HTTP {status})"
        raise ControlError(str(reason))
    return body


def unreachable(socket_path: Path, exc: BaseException) -> str:
    """Why the control socket could not be used, in words (never the exception's name)."""
    cause = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
    start = "start it (systemctl start gatewayd), or check admin.control_socket"
    if isinstance(cause, FileNotFoundError):
        return f"gatewayd is not answering on {socket_path}: there is no such socket; {start}"
    if isinstance(cause, ConnectionRefusedError) or (
        isinstance(cause, OSError) and cause.errno in (errno.ECONNREFUSED, errno.ENOTSOCK)
    ):
        return (
            f"gatewayd is not answering on {socket_path}: nothing listens there (it is not "
            f"running, or this is not its socket); {start}"
        )
    if isinstance(cause, PermissionError):
        return (
            f"gatewayd cannot be reached on {socket_path}: permission denied; run gatewayctl "
            "as the gateway's user or root"
        )
    return (
        f"gatewayd is not answering on {socket_path}: the connection failed before it "
        f"answered; {start}"
    )
