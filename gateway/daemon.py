"""The running gateway: ``async with Daemon.start(config, clock=, sleep=) as daemon``.

The daemon owns its parts and brings them up in named stages: check (audit log, staff
registry), spool (opened, recovered after a crash), admin listener (so ``/readyz`` says
what start-up is doing), sweep (copies whose retention ended while stopped), relay and
supervised tasks, device listeners (one per network) and the control socket; then it
tells systemd READY=1. It stops in one order: stop accepting, let requests under way
finish within ``ingress.shutdown_timeout``, stop the supervised tasks, let deliveries
under way record their outcome, close the spool. Only the entry point
(:mod:`gateway.signals`) knows about signals; tests and the demo stop the daemon by
resolving the trigger they pass to :meth:`Daemon.run_until`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway import __version__
from gateway.backends import NodeName, build_spool, node_name
from gateway.config import GatewayConfig, ListenerConfig
from gateway.crypto.keys import load_master_key, read_secret_file, resolve_secret_path
from gateway.errors import ConfigError, GatewayError
from gateway.identity.pgfollower import PgRegistryFollower, RegistryFeed
from gateway.identity.pgregistry import Seed
from gateway.ingress.access import AccessRecorder
from gateway.ingress.app import Gate, RuntimeRef, build_app
from gateway.ingress.listener import TlsSite
from gateway.ingress.photos import PhotoChecker
from gateway.ops.access_log import AccessLog
from gateway.ops.admin import admin_app
from gateway.ops.chain_repair import trim_torn_tail
from gateway.ops.control import build_control_app, start_control_site
from gateway.ops.logs import get_logger
from gateway.ops.metrics import Metrics
from gateway.ops.sdnotify import Notifier, watchdog_loop
from gateway.ops.supervisor import Supervisor, TaskGaveUp
from gateway.parts import Parts
from gateway.preflight import ROOT, database_dsn, keystore_warnings, registry_problems
from gateway.relay.queue import rescan_loop
from gateway.relay.workers import Sleep
from gateway.reload import config_digest
from gateway.retention.ledger import erasure_ledger

log = get_logger("gateway.daemon")
START_EXTENSION = 30.0
"""Seconds of start-up time (EXTEND_TIMEOUT_USEC) each batch of the start-up sweep earns."""
AUDIT_SETTLE = 10.0
"""Seconds a stop waits for audit entries still being written (a database's)."""


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


class Daemon(Parts):
    """The running gateway: its parts (:class:`gateway.parts.Parts`, which also swaps
    them on reload), its listeners and its supervised tasks."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        config_path: Path | None,
        clock: Callable[[], float],
        sleep: Sleep,
        metrics: Metrics,
        notifier: Notifier | None,
    ) -> None:
        super().__init__(
            config,
            config_path=config_path,
            clock=clock,
            metrics=metrics,
            notifier=notifier,
            sleep=sleep,
        )
        self.gate = Gate()
        self.photos = PhotoChecker()
        self.supervisor = Supervisor(
            on_failure=lambda task: metrics.task_failures.labels(task=task).inc(),
            sleep=sleep,
            clock=clock,
        )
        self.listeners: dict[str, web.AppRunner] = {}
        self.admin: web.AppRunner | None = None
        self.control: web.AppRunner | None = None
        self.bound: Bound | None = None

    # ------------------------------------------------------------------ start

    @classmethod
    @contextlib.asynccontextmanager
    async def start(
        cls,
        config: GatewayConfig,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Sleep = asyncio.sleep,
        metrics: Metrics | None = None,
        config_path: Path | None = None,
        notifier: Notifier | None = None,
    ) -> AsyncIterator[Daemon]:
        """A started daemon, stopped in order when the block ends (however it ends)."""
        daemon = cls(
            config,
            config_path=config_path,
            clock=clock,
            sleep=sleep,
            metrics=metrics or Metrics(),
            notifier=notifier,
        )
        daemon.check()
        await daemon.open_spool()
        try:
            await daemon.serve_admin()
            await daemon.sweep_overdue()
            await daemon.start_work()
            await daemon.open_listeners()
            daemon.announce_ready()
            yield daemon
        finally:
            await daemon.stop()

    def check(self) -> None:
        """Stage 1: the append-only logs (a torn final line cut off), the audit log and the
        staff registry, before anything is opened."""
        repaired = [
            torn
            for path in (
                self.config.audit_log.log,
                erasure_ledger(self.config.spool.directory).path,
                *[f for _, f in AccessLog(self.config.access_log_directory).files()[-1:]],
            )
            if (torn := trim_torn_tail(path, clock=self.clock)) is not None
        ]
        for torn in repaired:
            log.warning(
                "log_repaired",
                reason=f"{torn.log.name}: torn final line ({torn.torn_bytes} bytes) moved "
                f"to {torn.quarantine.name}",
                bytes=torn.torn_bytes,
            )
        self.audit.check()  # a broken audit log is found now, not at the first reload
        for torn in repaired:
            self.record_audit(
                "gatewayd.repair",
                target=str(torn.log),
                detail={
                    "torn_final_line_bytes": torn.torn_bytes,
                    "quarantine": str(torn.quarantine),
                },
            )
        for warning in keystore_warnings(self.config, str(self.config_path or "<config>")):
            log.warning("keystore_in_spool", reason=warning)
        staff = registry_problems(self.config, str(self.config_path or "<config>"))
        if staff:
            raise ConfigError(staff)

    async def open_spool(self) -> None:
        """Stage 2: the spool, recovered after a crash, and the parts that use it."""
        master = load_master_key(resolve_secret_path(self.config.spool.master_key, ROOT))
        spool = build_spool(self.config, master, clock=self.clock)
        dsn = database_dsn(self.config)
        if dsn is not None:  # the registries are the database's, followed by LISTEN
            self.node_name = NodeName(dsn, node_name(self.config))
            for warning in await self.node_name.hold():
                log.warning("database_durability", reason=warning)
            auth = self.config.auth
            self.registry_feed = RegistryFeed()
            self.registry_follower = PgRegistryFollower(
                dsn,
                self.registry_feed,
                seeds=(
                    Seed.from_file("devices", auth.devices_file),
                    Seed.from_file("users", auth.users_file),
                ),
            )
            await self.registry_follower.start()
        report = await spool.open()
        log.info(
            "spool_opened",
            records=report.records,
            requeued=report.requeued,
            orphans_removed=report.orphans_removed,
            missing_files=report.missing_files,
            keys_migrated=report.keys_migrated,
            unreadable=report.unreadable,
        )
        self.assemble(spool, sleep=self.sleep)
        await self.access_exporter.prepare()  # before any request is numbered
        self.metrics.in_flight.set_function(lambda: self.gate.in_flight)

    async def serve_admin(self) -> None:
        """Stage 3: the admin listener, up first so that /readyz says what start-up does."""
        admin = self.config.admin
        if not admin.enabled:
            return
        token = None
        if admin.bearer_token is not None:
            path = resolve_secret_path(admin.bearer_token, ROOT)
            token = read_secret_file(path, what="admin bearer token").strip()
        self.admin = web.AppRunner(
            admin_app(
                lambda: self.gate.accepting, self.metrics, self.readiness, bearer_token=token
            ),
            handle_signals=False,
            access_log=None,
        )
        await self.admin.setup()
        await web.TCPSite(self.admin, admin.host, admin.port, reuse_address=True).start()

    async def sweep_overdue(self) -> None:
        """Stage 4: erase what should already be gone, before anything is served."""
        self.readiness["state"] = "erasing_overdue_copies"
        notifier = self.notifier
        if notifier:
            notifier.status("erasing copies whose retention ended while stopped")
        overdue = await self.spool.overdue(self.clock(), 0)

        def progress(erased: int) -> None:
            # Each batch earns more start-up time: a long list of overdue copies is work
            # under way, not a hung start (systemd's TimeoutStartSec would kill it).
            if notifier:
                notifier.extend_timeout(START_EXTENSION)
                notifier.status(f"erasing overdue copies: {erased} of {overdue} done")

        erased = await self.sweeper.sweep(progress=progress)
        if erased:
            log.info("erased_at_start", count=erased)

    async def start_work(self) -> None:
        """Stage 5: the relay and the supervised tasks (photo checks need no start)."""
        self.ref = RuntimeRef(self.runtime(self.config, self.photos, self.gate))
        await self.relay.start()
        self.supervisor.start("retention-sweeper", self.sweeper.run)
        self.supervisor.start("access-log", self.access_exporter.run)
        if self.spool.shared:  # other nodes' records, and the database's health
            spool, relay = self.spool, self.relay
            every = self.config.spool.lease_seconds / 3
            self.supervisor.start(
                "relay-rescan", lambda: rescan_loop(spool, relay.queues, interval=every)
            )
            self.supervisor.start("database-watch", self.database_watch.run)
        if self.notifier and (interval := self.notifier.watchdog_interval()):
            notifier = self.notifier
            self.supervisor.start("watchdog", lambda: watchdog_loop(notifier, interval=interval))

    async def open_listeners(self) -> None:
        """Stage 6: one device listener per network, then the control socket."""
        tls = self.tls_contexts(self.config)
        ingress = self.config.ingress
        for name, listener in self.config.listeners.items():
            runner = self.listeners[name] = web.AppRunner(
                build_app(self.ref, name),
                handle_signals=False,
                access_log=None,
                keepalive_timeout=ingress.keepalive_timeout,
                shutdown_timeout=ingress.shutdown_timeout,
            )
            await runner.setup()
            self.sites[name] = await _listen(
                runner, name, listener, tls[name], self.metrics, self.access
            )
        socket = self.config.admin.control_socket
        if socket is not None:
            self.control = web.AppRunner(
                build_control_app(
                    self.spool,
                    self.sweeper,
                    self.relay.enqueue,
                    self.reload,
                    lambda: self.ref.current.registries,
                ),
                handle_signals=False,
                access_log=None,
            )
            await start_control_site(self.control, socket)

    def announce_ready(self) -> None:
        """Stage 7: ready, as the log, the audit log, /readyz and systemd hear it."""
        admin_port = _port(self.admin) if self.admin is not None else None
        ports = {n: _port(r) for n, r in self.listeners.items()}
        self.bound = Bound(ports, admin_port, self.reload)
        self.readiness["state"] = "ready"
        log.info("ready", ports=ports, version=__version__)
        self.record_audit(
            "gatewayd.start",
            target=str(self.config_path) if self.config_path else None,
            detail={"version": __version__, "config_sha256": config_digest(self.config_path)},
        )
        if self.notifier:
            where = ", ".join(f"{n} :{p}" for n, p in ports.items())
            self.notifier.ready(status=f"serving on {where}")

    # -------------------------------------------------------------- running

    async def run_until(self, shutdown_trigger: Callable[[], Awaitable[object]]) -> None:
        """Serve until ``shutdown_trigger`` returns (then drain), or until a supervised
        task is given up on (then drain and raise :class:`TaskGaveUp`)."""
        trigger = asyncio.ensure_future(shutdown_trigger())
        gave_up = asyncio.ensure_future(self.supervisor.gave_up())
        try:
            await asyncio.wait({trigger, gave_up}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (trigger, gave_up):
                waiter.cancel()
            await asyncio.gather(trigger, gave_up, return_exceptions=True)
        failed = self.supervisor.failed
        if failed is not None:
            self.readiness.update(state="failing", task=failed)
            log.error("stopping", reason=f"task {failed} kept failing")
        await self.drain()
        if failed is not None:
            raise TaskGaveUp(failed)

    async def drain(self) -> None:
        """Stop accepting and let the requests under way finish (within the bound)."""
        log.info("draining")
        if self.readiness.get("state") != "failing":
            self.readiness["state"] = "draining"
        if self.notifier:
            self.notifier.stopping()
        self.gate.accepting = False  # a request on an open connection now gets 503
        for site in self.sites.values():
            await site.stop()  # and nothing new connects
        if not await self.gate.drained(self.config.ingress.shutdown_timeout):
            log.warning("drain_timeout", in_flight=self.gate.in_flight)
        for runner in self.listeners.values():
            await runner.cleanup()

    async def stop(self) -> None:
        """The one shutdown order (safe after a start that failed part-way)."""
        self.gate.accepting = False
        await self.supervisor.stop()
        if self.assembled:
            await self.relay.stop(drain_timeout=self.config.ingress.shutdown_timeout)
            await self.sweeper.close()
        if self.control is not None:
            await self.control.cleanup()
        if self.admin is not None:
            await self.admin.cleanup()
        for runner in self.listeners.values():
            await runner.cleanup()
        self.photos.close()
        self.password_checks.close()
        if self.assembled:
            with contextlib.suppress(Exception):  # what stays in the index goes out next start
                await self.access_exporter.export()
            self.record_audit("gatewayd.stop", detail={"version": __version__})
            await self.settle_audit(AUDIT_SETTLE)
            await self.spool.close()
        if self.registry_follower is not None:
            await self.registry_follower.close()
        if self.node_name is not None:
            await self.node_name.release()
        log.info("stopped")


async def serve(
    config: GatewayConfig,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]],
    clock: Callable[[], float] = time.time,
    sleep: Sleep = asyncio.sleep,
    on_ready: Callable[[Bound], None] | None = None,
    metrics: Metrics | None = None,
    config_path: Path | None = None,
    notifier: Notifier | None = None,
) -> None:
    """Run the gateway until ``shutdown_trigger`` returns, then drain and stop.

    ``on_ready`` gets the bound ports and a ``reload`` coroutine function (what SIGHUP
    calls); ``config_path`` is the file a reload reads again.
    """
    async with Daemon.start(
        config,
        clock=clock,
        sleep=sleep,
        metrics=metrics,
        config_path=config_path,
        notifier=notifier,
    ) as daemon:
        assert daemon.bound is not None
        if on_ready:
            on_ready(daemon.bound)
        await daemon.run_until(shutdown_trigger)


def _port(runner: web.AppRunner) -> int:
    address = runner.addresses[0]
    return int(address[1])


async def _listen(
    runner: web.AppRunner,
    name: str,
    listener: ListenerConfig,
    context: ssl.SSLContext,
    metrics: Metrics,
    access: AccessRecorder,
) -> TlsSite:
    """Open one device listener; an address it cannot take is an error naming its key."""

    def handshake_failed(reason: str, peername: tuple[Any, ...] | None) -> None:
        metrics.tls_handshake_failures.labels(listener=name, reason=reason).inc()
        access.handshake_failed(name, peername, reason)

    site = TlsSite(
        runner, listener.host, listener.port, context, on_handshake_failure=handshake_failed
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
