"""The daemon's lifecycle: ``serve(config, shutdown_trigger=...)``.

Only the entry point knows about signals; tests and the demo stop the daemon by
resolving ``shutdown_trigger`` and reload it through ``Bound.reload``. Start-up: check
the audit log, the secrets and the staff registry, open the spool (recovering from any
crash), bring up the admin listener, erase the copies whose retention ended while the
daemon was down, start the relay, then open one listener per network (and tell systemd
READY=1). Reload (:meth:`Daemon.reload`):
build everything the configuration file names, then swap it in at once, or refuse and
keep the old. Shutdown: stop accepting, let in-flight requests finish within
``ingress.shutdown_timeout``, let deliveries under way record their outcome, stop the
relay, close the spool.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import resource
import signal
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import __version__
from gateway.channels.policy import ChannelPolicy
from gateway.config import GatewayConfig, ListenerConfig, load_config
from gateway.crypto.keys import (
    load_master_key,
    load_upstream_credential,
    read_secret_file,
    resolve_secret_path,
)
from gateway.crypto.tls import cert_not_after, server_context
from gateway.errors import ConfigError, ConfigProblem, GatewayError
from gateway.identity.auth import StaffAuthenticator
from gateway.identity.registry import RegistryError, RegistryWatcher, load_users, staff_problems
from gateway.ingress.app import Gate, Runtime, RuntimeRef, build_app
from gateway.ingress.listener import TlsSite
from gateway.ingress.photos import PhotoChecker
from gateway.ops import logs
from gateway.ops.audit import AuditLog
from gateway.ops.control import build_control_app, start_control_site
from gateway.ops.logs import get_logger
from gateway.ops.metrics import Metrics
from gateway.ops.sdnotify import Notifier, watchdog_loop
from gateway.relay.workers import Relay, Sleep, payload_recipient, payload_signing_key
from gateway.retention.sweeper import ERASURE_REASONS, Sweeper, erasure_ledger
from gateway.spool.store import Record, Spool

ROOT = Path("/")
log = get_logger("gateway.daemon")


class ListenerError(GatewayError):
    """A device listener cannot take its address; the message names its key."""


@dataclass(frozen=True)
class Bound:
    """Where the daemon listens once it is ready (ports resolved when 0 was asked), and
    how to ask it to reload its configuration (what SIGHUP does)."""

    ports: Mapping[str, int]
    """Each device listener's port, by listener name."""
    admin_port: int | None
    reload: Callable[..., Coroutine[Any, Any, tuple[bool, str]]]


def secret_problems(config: GatewayConfig, file: str = "<config>") -> list[ConfigProblem]:
    """Every secret the configuration names must exist and be readable by us alone."""
    problems = []

    def secret(what: str) -> Callable[[Path], object]:
        return lambda path: read_secret_file(path, what=what)

    secrets_: list[tuple[str, str, Callable[[Path], object]]] = [
        (f"listeners.{name}.private_key", listener.private_key, secret("listener private key"))
        for name, listener in config.listeners.items()
    ]
    secrets_.append(("spool.master_key", config.spool.master_key, load_master_key))
    for name, dest in config.destinations.items():
        secrets_.append((f"destinations.{name}.client_key", dest.client_key, secret("client key")))
        if dest.credential:
            secrets_.append(
                (f"destinations.{name}.credential", dest.credential, load_upstream_credential)
            )
    for key, spec, load in secrets_:
        try:
            load(resolve_secret_path(spec, ROOT))
        except Exception as exc:
            problems.append(ConfigProblem(file, key, str(exc)))
    files = []
    for name, listener in config.listeners.items():
        files += [
            (f"listeners.{name}.certificate", listener.certificate),
            (f"listeners.{name}.client_ca", listener.client_ca),
        ]
    for name, dest in config.destinations.items():
        files += [
            (f"destinations.{name}.ca", dest.ca),
            (f"destinations.{name}.client_certificate", dest.client_certificate),
        ]
    for key, path in files:
        if not path.is_file():
            problems.append(ConfigProblem(file, key, f"{path}: file not found"))
    return problems + _payload_key_problems(config, file)


def registry_problems(config: GatewayConfig, file: str = "<config>") -> list[ConfigProblem]:
    """The staff registry must name every user's channels, and only channels (or channel
    groups) this configuration has. Problems name the registry file and the entry."""
    path = config.auth.users_file
    try:
        users = load_users(path)
    except RegistryError as exc:
        return [ConfigProblem(file, "auth.users_file", str(exc))]
    return [
        ConfigProblem(str(path), key, message)
        for key, message in staff_problems(users, config.staff_scopes())
    ]


def _payload_key_problems(config: GatewayConfig, file: str) -> list[ConfigProblem]:
    """Every payload encryption key loads: algorithm, size, expiry, file permissions."""
    problems = []
    for name, dest in config.destinations.items():
        if dest.payload_encryption == "none":
            continue
        for key, load in (
            ("recipient_key", payload_recipient),
            ("signing_key", payload_signing_key),
        ):
            try:
                load(dest)
            except (GatewayError, OSError) as exc:
                problems.append(ConfigProblem(file, f"destinations.{name}.{key}", str(exc)))
    return problems


def _admin_app(gate: Gate, metrics: Metrics, readiness: dict[str, str]) -> web.Application:
    async def metrics_handler(_request: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "version": __version__})

    async def readyz(_request: web.Request) -> web.Response:
        ready = gate.accepting and readiness.get("state") == "ready"
        return web.json_response(
            {"ready": ready, "state": readiness.get("state", "starting")},
            status=200 if ready else 503,
        )

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


RESTART_ONLY: tuple[tuple[str, Callable[[GatewayConfig], object]], ...] = (
    ("ingress.keepalive_timeout", lambda c: c.ingress.keepalive_timeout),
    ("admin", lambda c: c.admin),
    ("spool.directory", lambda c: c.spool.directory),
    ("spool.master_key", lambda c: c.spool.master_key),
)
"""Settings a running daemon cannot change in place: a reload that changes one is refused."""


def restart_problems(old: GatewayConfig, new: GatewayConfig, file: str) -> list[ConfigProblem]:
    """What a reload from ``old`` to ``new`` cannot change in place, by dotted key: the
    settings of :data:`RESTART_ONLY`, and each listener's address. A listener's
    certificate, key, device CA and TLS profile do change on reload."""
    problems = [
        ConfigProblem(file, key, "changing it needs a restart")
        for key, read in RESTART_ONLY
        if read(new) != read(old)
    ]
    for name in dict.fromkeys([*old.listeners, *new.listeners]):
        before, after = old.listeners.get(name), new.listeners.get(name)
        if before is None or after is None:
            change = "adding" if before is None else "removing"
            problems.append(
                ConfigProblem(file, f"listeners.{name}", f"{change} a listener needs a restart")
            )
            continue
        for key in ("host", "port"):
            if getattr(before, key) != getattr(after, key):
                problems.append(
                    ConfigProblem(file, f"listeners.{name}.{key}", "changing it needs a restart")
                )
    return problems


def _config_digest(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class Daemon:
    """The running gateway's parts, and the one place that swaps them on reload."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        config_path: Path | None,
        clock: Callable[[], float],
        metrics: Metrics,
        notifier: Notifier | None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.clock = clock
        self.metrics = metrics
        self.notifier = notifier
        self.readiness = {"state": "starting"}
        self._reload_lock = asyncio.Lock()
        self.audit = AuditLog(config.audit_log, via="gatewayd", actor="gatewayd", clock=clock)

    # The parts, built by start().
    spool: Spool
    relay: Relay
    sweeper: Sweeper
    ref: RuntimeRef
    sites: dict[str, TlsSite]

    def _audit(self, action: str, **kwargs: Any) -> None:
        """An audit entry; a log that cannot take it is logged, never fatal to serving."""
        try:
            self.audit.record(action, **kwargs)
            self.metrics.audit_entries.labels(action=action).inc()
        except (GatewayError, OSError) as exc:
            log.error("audit_unwritable", action=action, error=type(exc).__name__, reason=str(exc))

    def _registries(self, config: GatewayConfig) -> RegistryWatcher:
        scopes = config.staff_scopes()
        return RegistryWatcher(
            config.auth.devices_file,
            config.auth.users_file,
            clock=self.clock,
            on_error=lambda message: log.error("registry_unreadable", reason=message),
            validate_users=lambda users: [
                f"{config.auth.users_file}: {key}: {message}"
                for key, message in staff_problems(users, scopes)
            ],
        )

    def _authenticator(self, config: GatewayConfig) -> StaffAuthenticator:
        return StaffAuthenticator(
            lambda: self.ref.current.registries.users,
            max_failures=config.auth.max_failures,
            lockout_seconds=config.auth.lockout_seconds,
            cache_seconds=config.auth.credential_cache_seconds,
            clock=time.monotonic,
        )

    @staticmethod
    def _tls(config: GatewayConfig) -> dict[str, ssl.SSLContext]:
        """Each listener's TLS context: its certificate, key, device CA and profile."""
        return {
            name: server_context(
                listener.certificate,
                resolve_secret_path(listener.private_key, ROOT),
                client_ca=listener.client_ca,
                profile=listener.tls_profile,
            )
            for name, listener in config.listeners.items()
        }

    def _export(self, config: GatewayConfig) -> None:
        for channel in config.channels:  # rare events start at 0, so alerts see the first
            for reason in ERASURE_REASONS:
                self.metrics.erasures.labels(channel=channel, reason=reason)
        self.metrics.spool_quota_bytes.set(config.spool.quota_bytes)
        _export_certificate_expiry(config, self.metrics)
        self.metrics.last_reload.set(self.clock())

    # ------------------------------------------------------------------ reload

    async def reload(self, *, actor: str = "signal:SIGHUP") -> tuple[bool, str]:
        """Load the configuration file again and swap everything it builds in at once.

        All or nothing: configuration, device CA and server certificate, registries,
        channel policies and destinations (with their certificates and credentials) are
        all built first; any failure leaves the running gateway exactly as it was. The
        listener stays open; connections accepted after the swap get the new
        certificate. Returns (applied, reason) and writes an audit entry either way.
        """
        async with self._reload_lock:
            if self.notifier:
                self.notifier.reloading()
            try:
                applied, reason = await self._reload()
            finally:
                if self.notifier:
                    self.notifier.ready(status="serving")
            digest = _config_digest(self.config_path)
            self.metrics.reloads.labels(outcome="applied" if applied else "failed").inc()
            self._audit(
                "gatewayd.reload",
                target=str(self.config_path),
                outcome="ok" if applied else "refused",
                actor=actor,
                detail={"config_sha256": digest, "reason": reason},
            )
            if applied:
                log.info("reloaded", reason=reason)
            else:
                log.error("reload_refused", reason=reason)
            return applied, reason

    async def _reload(self) -> tuple[bool, str]:
        if self.config_path is None:
            return False, "no configuration file to reload from"
        try:
            new = load_config(self.config_path)
            problems = secret_problems(new, str(self.config_path))
            problems += registry_problems(new, str(self.config_path))
            problems += restart_problems(self.config, new, str(self.config_path))
            if problems:
                raise ConfigError(problems)
            tls = self._tls(new)
            registries = self._registries(new)
            policies = {n: ChannelPolicy.from_config(n, c) for n, c in new.channels.items()}
            plan = await self.relay.prepare(new)
        except ConfigError as exc:
            return False, "; ".join(str(p) for p in exc.problems)
        except (GatewayError, OSError, ssl.SSLError, ValueError) as exc:
            return False, f"{type(exc).__name__}: {exc}"
        # From here to the end of apply() nothing yields to the event loop before the
        # new runtime is in place: no request sees half of each configuration.
        old = self.ref.current
        auth = old.auth if new.auth == self.config.auth else self._authenticator(new)
        self.ref.current = replace(
            old, config=new, policies=policies, registries=registries, auth=auth
        )
        for name, context in tls.items():
            self.sites[name].context = context
        self.config = new
        self.sweeper.channels = tuple(new.channels)
        self.audit = AuditLog(new.audit_log, via="gatewayd", actor="gatewayd", clock=self.clock)
        await self.relay.apply(plan)
        self._export(new)
        return True, f"{len(new.channels)} channels, {len(new.destinations)} destinations"


async def serve(
    config: GatewayConfig,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]],
    clock: Callable[[], float] = time.time,
    sleep: Sleep = asyncio.sleep,
    on_ready: Callable[[Bound], None] | None = None,
    metrics: Metrics | None = None,
    inline_photo_checks: bool = False,
    config_path: Path | None = None,
    notifier: Notifier | None = None,
) -> None:
    """Run the gateway until ``shutdown_trigger`` returns, then drain and stop.

    ``on_ready`` gets the bound ports and a ``reload`` coroutine function (what SIGHUP
    calls); ``config_path`` is the file a reload reads again.
    """
    metrics = metrics or Metrics()
    daemon = Daemon(
        config,
        config_path=config_path,
        clock=clock,
        metrics=metrics,
        notifier=notifier,
    )
    daemon.audit.check()  # a broken audit log is found now, not at the first reload
    staff = registry_problems(config, str(config_path or "<config>"))
    if staff:
        raise ConfigError(staff)
    master = load_master_key(resolve_secret_path(config.spool.master_key, ROOT))
    spool = daemon.spool = Spool(config.spool.directory, master, clock=clock)
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
    metrics.spool_free_bytes.set_function(spool.free_bytes)
    daemon._export(config)
    relay = daemon.relay = Relay(config, spool, metrics, sleep=sleep, clock=clock)
    ledger = erasure_ledger(config.spool.directory, clock=clock)
    sweeper = daemon.sweeper = Sweeper(
        spool, ledger, metrics, clock=clock, channels=tuple(config.channels)
    )

    async def on_delivered(record: Record) -> None:
        # No delivered copy is kept, on any channel (送信後に自動消去).
        await sweeper.erase_delivered(record.id)

    relay.on_delivered = on_delivered
    gate = Gate()
    metrics.in_flight.set_function(lambda: gate.in_flight)
    admin = web.AppRunner(
        _admin_app(gate, metrics, daemon.readiness), handle_signals=False, access_log=None
    )
    photos = PhotoChecker(inline=inline_photo_checks)
    listeners: dict[str, web.AppRunner] = {}
    daemon.sites = {}
    control: web.AppRunner | None = None
    sweeping: asyncio.Task[None] | None = None
    watchdog: asyncio.Task[None] | None = None
    try:
        admin_port = None
        if config.admin.enabled:  # up first: /readyz says what the start-up is doing
            await admin.setup()
            await web.TCPSite(
                admin, config.admin.host, config.admin.port, reuse_address=True
            ).start()
            admin_port = _port(admin)
        daemon.readiness["state"] = "erasing_overdue_copies"
        if notifier:
            notifier.status("erasing copies whose retention ended while stopped")
        erased = await sweeper.sweep()  # nothing is served that should already be gone
        if erased:
            log.info("erased_at_start", count=erased)
        photos.start()
        ref = daemon.ref = RuntimeRef(
            Runtime(
                config=config,
                policies={n: ChannelPolicy.from_config(n, c) for n, c in config.channels.items()},
                registries=daemon._registries(config),
                auth=daemon._authenticator(config),
                spool=spool,
                metrics=metrics,
                clock=clock,
                on_accepted=relay.enqueue,
                photos=photos,
                gate=gate,
            )
        )
        control = web.AppRunner(
            build_control_app(
                spool, sweeper, relay.enqueue, daemon.reload, lambda: ref.current.registries
            ),
            handle_signals=False,
            access_log=None,
        )
        tls = daemon._tls(config)
        await relay.start()
        sweeping = asyncio.create_task(sweeper.run(), name="retention-sweeper")
        for name, listener in config.listeners.items():
            runner = listeners[name] = web.AppRunner(
                build_app(ref, name),
                handle_signals=False,
                access_log=None,
                keepalive_timeout=config.ingress.keepalive_timeout,
                shutdown_timeout=config.ingress.shutdown_timeout,
            )
            await runner.setup()
            daemon.sites[name] = await _listen(runner, name, listener, tls[name], metrics)
        if config.admin.control_socket is not None:
            await start_control_site(control, config.admin.control_socket)
        bound = Bound({n: _port(r) for n, r in listeners.items()}, admin_port, daemon.reload)
        daemon.readiness["state"] = "ready"
        log.info("ready", ports=dict(bound.ports), version=__version__)
        daemon._audit(
            "gatewayd.start",
            target=str(config_path) if config_path else None,
            detail={"version": __version__, "config_sha256": _config_digest(config_path)},
        )
        if notifier:
            where = ", ".join(f"{n} :{p}" for n, p in bound.ports.items())
            notifier.ready(status=f"serving on {where}")
            interval = notifier.watchdog_interval()
            if interval:
                watchdog = asyncio.create_task(watchdog_loop(notifier, interval=interval))
        if on_ready:
            on_ready(bound)
        await shutdown_trigger()
        log.info("draining")
        daemon.readiness["state"] = "draining"
        if notifier:
            notifier.stopping()
        gate.accepting = False  # a request on an open connection now gets 503
        for site in daemon.sites.values():
            await site.stop()  # and nothing new connects
        if not await gate.drained(daemon.config.ingress.shutdown_timeout):
            log.warning("drain_timeout", in_flight=gate.in_flight)
        for runner in listeners.values():
            await runner.cleanup()
    finally:
        gate.accepting = False
        if watchdog is not None:
            watchdog.cancel()
        if sweeping is not None:
            sweeping.cancel()
            await asyncio.gather(sweeping, return_exceptions=True)
        await relay.stop(drain_timeout=daemon.config.ingress.shutdown_timeout)
        await sweeper.close()
        if control is not None:
            await control.cleanup()
        await admin.cleanup()
        for runner in listeners.values():
            await runner.cleanup()
        photos.close()
        await spool.close()
        daemon._audit("gatewayd.stop", detail={"version": __version__})
        log.info("stopped")


async def _listen(
    runner: web.AppRunner,
    name: str,
    listener: ListenerConfig,
    context: ssl.SSLContext,
    metrics: Metrics,
) -> TlsSite:
    """Open one device listener; an address it cannot take is an error naming its key."""
    site = TlsSite(
        runner,
        listener.host,
        listener.port,
        context,
        on_handshake_failure=lambda reason: metrics.tls_handshake_failures.labels(
            listener=name, reason=reason
        ).inc(),
    )
    try:
        await site.start()
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise ListenerError(
            f"listeners.{name}: cannot listen on {listener.address}: {why}"
        ) from None
    log.info("listening", listener=name, address=listener.host, port=_port(runner))
    return site


def _export_certificate_expiry(config: GatewayConfig, metrics: Metrics) -> None:
    certs: dict[str, Path] = {}
    for name, listener in config.listeners.items():
        certs[f"listener:{name}"] = listener.certificate
        certs[f"device-ca:{name}"] = listener.client_ca
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
    # No core file, whoever starts us: memory holds decrypted submissions and keys (the
    # photo-check workers inherit the limit).
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        config = load_config(config_path)
        problems = secret_problems(config, str(config_path))
        problems += registry_problems(config, str(config_path))
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"gatewayd: {problem}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve_with_signals(config, config_path))
    except ConfigError as exc:  # the registries changed between the check and the start
        for problem in exc.problems:
            print(f"gatewayd: {problem}", file=sys.stderr)
        return 2
    except GatewayError as exc:
        log.error("startup_failed", error=type(exc).__name__, reason=str(exc))
        print(f"gatewayd: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve_with_signals(config: GatewayConfig, config_path: Path) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads: set[asyncio.Task[tuple[bool, str]]] = set()
    handle: list[Bound] = []

    def on_signal(signum: signal.Signals) -> None:
        log.info("signal", signal=signum.name)
        stop.set()

    def on_hangup() -> None:
        log.info("signal", signal="SIGHUP")
        if not handle:
            log.warning("reload_ignored", reason="not ready yet")
            return
        task = loop.create_task(handle[0].reload(actor="signal:SIGHUP"))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    await serve(
        config,
        shutdown_trigger=stop.wait,
        config_path=config_path,
        notifier=Notifier.from_environ(),
        on_ready=handle.append,
    )
