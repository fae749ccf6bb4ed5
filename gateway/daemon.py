"""The daemon's lifecycle: ``serve(config, shutdown_trigger=...)``.

Only the entry point knows about signals; tests and the demo stop the daemon by
resolving ``shutdown_trigger``. Start-up: check secrets, open the spool (recovering
from any crash), start the relay, then listen. Shutdown: stop accepting, let in-flight
requests finish within ``ingress.shutdown_timeout``, stop the relay, close the spool.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import __version__, logs
from gateway.auth import StaffAuthenticator
from gateway.chain import HashChainLog
from gateway.channels.policy import ChannelPolicy
from gateway.config import GatewayConfig, load_config
from gateway.crypto.keys import load_master_key, read_secret_file, resolve_secret_path
from gateway.crypto.tls import cert_not_after, server_context
from gateway.errors import ConfigError, ConfigProblem, GatewayError
from gateway.ingress import Runtime, build_app
from gateway.logs import get_logger
from gateway.metrics import Metrics
from gateway.photo_check import PhotoChecker
from gateway.registry import RegistryWatcher
from gateway.relay import Relay, Sleep
from gateway.retention.sweeper import Sweeper
from gateway.spool import Record, Spool

ROOT = Path("/")
log = get_logger("gateway.daemon")


@dataclass(frozen=True)
class Bound:
    """Where the daemon listens once it is ready (ports resolved when 0 was asked)."""

    ingress_port: int
    admin_port: int | None


def secret_problems(config: GatewayConfig, file: str = "<config>") -> list[ConfigProblem]:
    """Every secret the configuration names must exist and be readable by us alone."""
    problems = []
    secrets_ = [
        ("ingress.private_key", config.ingress.private_key, "ingress private key"),
        ("spool.master_key", config.spool.master_key, "spool master key"),
    ]
    for name, dest in config.destinations.items():
        secrets_.append((f"destinations.{name}.client_key", dest.client_key, "client key"))
        if dest.credential:
            secrets_.append(
                (f"destinations.{name}.credential", dest.credential, "upstream credential")
            )
    for key, spec, what in secrets_:
        try:
            read_secret_file(resolve_secret_path(spec, ROOT), what=what)
        except Exception as exc:
            problems.append(ConfigProblem(file, key, str(exc)))
    files = [
        ("ingress.certificate", config.ingress.certificate),
        ("ingress.client_ca", config.ingress.client_ca),
    ]
    for name, dest in config.destinations.items():
        files += [
            (f"destinations.{name}.ca", dest.ca),
            (f"destinations.{name}.client_certificate", dest.client_certificate),
        ]
    for key, path in files:
        if not path.is_file():
            problems.append(ConfigProblem(file, key, f"{path}: file not found"))
    return problems


def _admin_app(runtime: Runtime, metrics: Metrics) -> web.Application:
    async def metrics_handler(_request: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "version": __version__})

    async def readyz(_request: web.Request) -> web.Response:
        ready = runtime.accepting
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


def _oldest_undelivered(spool: Spool, clock: Callable[[], float]) -> float | None:
    oldest = spool.oldest_queued_at
    return None if oldest is None else max(0.0, clock() - oldest)


def _port(runner: web.AppRunner) -> int:
    address = runner.addresses[0]
    return int(address[1])


async def serve(
    config: GatewayConfig,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]],
    clock: Callable[[], float] = time.time,
    sleep: Sleep = asyncio.sleep,
    on_ready: Callable[[Bound], None] | None = None,
    metrics: Metrics | None = None,
    inline_photo_checks: bool = False,
) -> None:
    """Run the gateway until ``shutdown_trigger`` returns, then drain and stop."""
    metrics = metrics or Metrics()
    master = load_master_key(resolve_secret_path(config.spool.master_key, ROOT))
    spool = Spool(config.spool.directory, master, clock=clock)
    report = await spool.open()
    log.info(
        "spool_opened",
        records=report.records,
        requeued=report.requeued,
        orphans_removed=report.orphans_removed,
        missing_files=report.missing_files,
    )
    metrics.watch_spool(
        lambda: (
            {
                **spool.counts,
                "queued": spool.counts["queued"] - spool.delivering,
                "delivering": spool.delivering,
            },
            spool.bytes,
            _oldest_undelivered(spool, clock),
        )
    )
    _export_certificate_expiry(config, metrics)
    registries = RegistryWatcher(
        config.auth.devices_file,
        config.auth.users_file,
        clock=time.monotonic,
        on_error=lambda message: log.error("registry_unreadable", reason=message),
    )
    auth = StaffAuthenticator(
        lambda: registries.users,
        max_failures=config.auth.max_failures,
        lockout_seconds=config.auth.lockout_seconds,
        cache_seconds=config.auth.credential_cache_seconds,
        clock=time.monotonic,
        on_failure=lambda reason: metrics.auth_failures.labels(reason=reason).inc(),
    )
    relay = Relay(config, spool, metrics, sleep=sleep, clock=clock)
    ledger = HashChainLog(
        config.spool.directory / "erasure-ledger.jsonl",
        clock=clock,
        anchor=config.spool.directory / "erasure-ledger.anchor",
    )
    sweeper = Sweeper(spool, ledger, metrics, clock=clock, channels=tuple(config.channels))
    erase_on_delivery = {n for n, c in config.channels.items() if c.erase_on_delivery}

    async def on_delivered(record: Record) -> None:
        if record.channel in erase_on_delivery:
            await sweeper.erase_delivered(record.id)

    relay.on_delivered = on_delivered
    erased = await sweeper.sweep()  # copies whose deadline passed while we were down
    if erased:
        log.info("erased_at_start", count=erased)
    photos = PhotoChecker(inline=inline_photo_checks)
    photos.start()
    runtime = Runtime(
        config=config,
        policies={n: ChannelPolicy.from_config(n, c) for n, c in config.channels.items()},
        registries=registries,
        auth=auth,
        spool=spool,
        metrics=metrics,
        clock=clock,
        on_accepted=relay.enqueue,
        photos=photos,
    )
    ingress = web.AppRunner(
        build_app(runtime),
        handle_signals=False,
        access_log=None,
        keepalive_timeout=config.ingress.keepalive_timeout,
        shutdown_timeout=config.ingress.shutdown_timeout,
    )
    admin = web.AppRunner(_admin_app(runtime, metrics), handle_signals=False, access_log=None)
    tls = server_context(
        config.ingress.certificate,
        resolve_secret_path(config.ingress.private_key, ROOT),
        client_ca=config.ingress.client_ca,
        profile=config.ingress.tls_profile,
    )
    await relay.start()
    sweeping = asyncio.create_task(sweeper.run(), name="retention-sweeper")
    try:
        await ingress.setup()
        await web.TCPSite(
            ingress, config.ingress.host, config.ingress.port, ssl_context=tls, reuse_address=True
        ).start()
        admin_port = None
        if config.admin.enabled:
            await admin.setup()
            await web.TCPSite(
                admin, config.admin.host, config.admin.port, reuse_address=True
            ).start()
            admin_port = _port(admin)
        bound = Bound(_port(ingress), admin_port)
        log.info("ready", port=bound.ingress_port, version=__version__)
        if on_ready:
            on_ready(bound)
        await shutdown_trigger()
        log.info("draining")
        runtime.accepting = False
        await ingress.cleanup()
    finally:
        runtime.accepting = False
        sweeping.cancel()
        await asyncio.gather(sweeping, return_exceptions=True)
        await relay.stop(drain_timeout=config.ingress.shutdown_timeout)
        await admin.cleanup()
        await ingress.cleanup()
        photos.close()
        await spool.close()
        log.info("stopped")


def _export_certificate_expiry(config: GatewayConfig, metrics: Metrics) -> None:
    certs = {"ingress": config.ingress.certificate, "device-ca": config.ingress.client_ca}
    for name, dest in config.destinations.items():
        certs[f"client:{name}"] = dest.client_certificate
        certs[f"upstream-ca:{name}"] = dest.ca
    for label, path in certs.items():
        try:
            expiry = cert_not_after(path).timestamp()
        except Exception:  # noqa: S112 - a bad file is reported by check-config
            continue
        metrics.certificate_expiry.labels(certificate=label).set(expiry)


def run_until_signalled(config_path: Path, log_level: str = "info") -> int:
    """The ``gatewayd`` program: load, check, serve until SIGTERM or SIGINT; exit status."""
    logs.configure(level=getattr(logging, log_level.upper()))
    try:
        config = load_config(config_path)
        problems = secret_problems(config, str(config_path))
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"gatewayd: {problem}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve_with_signals(config))
    except GatewayError as exc:
        log.error("startup_failed", error=type(exc).__name__, reason=str(exc))
        print(f"gatewayd: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve_with_signals(config: GatewayConfig) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: signal.Signals) -> None:
        log.info("signal", signal=signum.name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(
        signal.SIGHUP,
        lambda: log.warning("signal", signal="SIGHUP", reason="reload is not implemented yet"),
    )
    await serve(config, shutdown_trigger=stop.wait)
