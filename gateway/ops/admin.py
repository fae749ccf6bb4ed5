"""The admin listener's app: ``/metrics``, ``/healthz`` and ``/readyz`` (no personal
data; loopback by default)."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import __version__
from gateway.ops.metrics import Metrics


def admin_app(
    accepting: Callable[[], bool],
    metrics: Metrics,
    readiness: Mapping[str, str],
    *,
    bearer_token: bytes | None = None,
) -> web.Application:
    """``/readyz`` is 200 only while the daemon accepts and its state is ``ready``; it
        says the state otherwise (``starting``, ``erasing_overdue_copies``, ``draining``,
        ``failing`` with the ``task`` that kept failing), and with a shared spool whether its
    ``database`` is ``up`` (503 while ``down``). With ``bearer_token``, ``/metrics``
        answers 401 to a request without ``Authorization: Bearer`` and that token."""

    async def metrics_handler(request: web.Request) -> web.Response:
        if bearer_token is not None:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), bearer_token
            ):
                return web.Response(
                    status=401,
                    text="metrics need Authorization: Bearer (admin.bearer_token)\n",
                    headers={"WWW-Authenticate": 'Bearer realm="gatewayd metrics"'},
                )
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "version": __version__})

    async def readyz(_request: web.Request) -> web.Response:
        database = readiness.get("database")  # only with a shared spool (PostgreSQL)
        ready = accepting() and readiness.get("state") == "ready" and database != "down"
        answer = {"ready": ready, "state": readiness.get("state", "starting")}
        for key in ("task", "database"):
            if key in readiness:
                answer[key] = readiness[key]
        return web.json_response(answer, status=200 if ready else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
