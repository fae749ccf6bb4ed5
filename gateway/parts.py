"""The daemon's parts, built from one configuration, and the one place that swaps
them on reload.

A reload (:meth:`Parts.reload`) builds everything the configuration file names
(configuration, every listener's TLS context, registries, channel policies,
destinations with their certificates and credentials) before anything is swapped;
any failure leaves the running gateway exactly as it was. The swap itself does not
yield to the event loop, so no request sees half of each configuration. The business
rule that a delivered copy is erased at once lives here too, where the relay and the
sweeper are joined.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from gateway.backends import NodeName, build_audit, build_ledger
from gateway.channels.policy import ChannelPolicy
from gateway.config import GatewayConfig, load_config
from gateway.crypto.keys import resolve_secret_path
from gateway.crypto.tls import cert_not_after, server_context
from gateway.errors import ConfigError, GatewayError
from gateway.identity.auth import PasswordChecks, StaffAuthenticator
from gateway.identity.pgfollower import FollowedRegistries, PgRegistryFollower, RegistryFeed
from gateway.identity.pgregistry import source
from gateway.identity.registry import staff_problems
from gateway.identity.watcher import Registries, RegistryWatcher
from gateway.ingress.access import AccessRecorder
from gateway.ingress.app import Gate, Runtime, RuntimeRef
from gateway.ingress.listener import TlsSite
from gateway.ingress.photos import PhotoChecker
from gateway.ingress.receive import iso
from gateway.ingress.scanner import ClamdScanner
from gateway.ops.access_log import AccessExporter, AccessLog, Expired
from gateway.ops.dbmetrics import DatabaseCollector
from gateway.ops.dbwatch import DatabaseWatch
from gateway.ops.logs import get_logger
from gateway.ops.metrics import Metrics
from gateway.ops.sdnotify import Notifier
from gateway.preflight import ROOT, registry_problems, secret_problems
from gateway.relay.workers import Relay, Sleep
from gateway.reload import config_digest, restart_problems
from gateway.retention.due import ERASURE_REASONS
from gateway.retention.sweeper import Sweeper
from gateway.spool.backend import SpoolBackend
from gateway.spool.records import Record, State

log = get_logger("gateway.daemon")
AUDIT_RETRY = 0.5
"""Seconds before an audit entry the disk refused is written again; doubled each time."""
AUDIT_RETRY_MAX = 10.0


class Parts:
    """What one configuration builds, and :meth:`reload`, which rebuilds and swaps it."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        config_path: Path | None,
        clock: Callable[[], float],
        metrics: Metrics,
        notifier: Notifier | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.config = config
        self.sleep = sleep
        self.notifier = notifier
        self.config_path = config_path
        self.clock = clock
        self.metrics = metrics
        self.readiness: dict[str, str] = {"state": "starting"}
        self.audit = build_audit(config, via="gatewayd", actor="gatewayd", clock=clock)
        self.audit_remote = config.spool.backend == "postgresql"
        """The audit log is a table in PostgreSQL: entries are written on a thread."""
        self.audit_backlog: collections.deque[tuple[str, dict[str, Any], float]] = (
            collections.deque()
        )
        """Audit entries the log could not take yet (a full disk), oldest first."""
        self._audit_retry: asyncio.Task[None] | None = None
        self.password_checks = PasswordChecks()
        self.sites: dict[str, TlsSite] = {}
        self.assembled = False
        self._reload_lock = asyncio.Lock()

    # The parts that need the spool, built by assemble().
    spool: SpoolBackend
    database_watch: DatabaseWatch  # with a shared spool only
    relay: Relay
    sweeper: Sweeper
    access_exporter: AccessExporter
    access: AccessRecorder
    ref: RuntimeRef

    def assemble(self, spool: SpoolBackend, *, sleep: Sleep) -> None:
        """The relay and the sweeper over ``spool``, joined: every delivered copy is
        erased at once (送信後に自動消去), on every channel."""
        config, metrics, clock = self.config, self.metrics, self.clock
        self.spool = spool
        metrics.watch_spool(
            lambda: (
                {
                    **spool.counts,
                    State.QUEUED: spool.counts[State.QUEUED] - spool.delivering,
                    "delivering": spool.delivering,
                },
                spool.bytes,
                None
                if spool.oldest_queued_at is None
                else max(0.0, clock() - spool.oldest_queued_at),
            )
        )
        metrics.spool_free_bytes.set_function(spool.free_bytes)
        if spool.shared:
            follower = self.registry_follower
            self.database_watch = DatabaseWatch(
                spool,
                self.readiness,
                listener_connected=None if follower is None else lambda: follower.connected,
                keep_name=None if self.node_name is None else self.node_name.keep,
            )
            metrics.registry.register(DatabaseCollector(self.database_watch.snapshot))
        self.export(config)
        self.relay = Relay(config, spool, metrics, sleep=sleep, clock=clock)
        self.sweeper = Sweeper(
            spool,
            build_ledger(config, clock=clock),
            metrics,
            clock=clock,
            channels=tuple(config.channels),
        )
        self.relay.on_delivered = self.erase_delivered
        self.access_exporter = AccessExporter(
            spool,
            AccessLog(config.access_log_directory),
            metrics,
            retention_days=config.access_log.retention_days,
            on_expired=self.audit_access_expiry,
            clock=clock,
            sleep=asyncio.sleep,  # a batching delay on the wall clock, not the relay's time
        )
        self.access = AccessRecorder(spool, metrics, clock=clock, wake=self.access_exporter.wake)
        self.assembled = True

    def audit_access_expiry(self, gone: Expired) -> None:
        """Each day file removed by retention, in the audit log (with the head it ended
        on, which the oldest file left must continue from)."""
        self.record_audit(
            "gatewayd.access_log_expired",
            target=str(gone.path),
            detail={
                "first_seq": gone.first_seq,
                "last_seq": gone.last_seq,
                "last_hash": gone.last_hash,
            },
        )

    async def erase_delivered(self, record: Record) -> None:
        """No delivered copy is kept, on any channel: the relay calls this once the
        destination has a record, and it returns once the copy is erased."""
        await self.sweeper.erase_delivered(record.id)

    def runtime(self, config: GatewayConfig, photos: PhotoChecker, gate: Gate) -> Runtime:
        """What the device listeners' handlers use, for ``config``."""
        return Runtime(
            config=config,
            policies={n: ChannelPolicy.from_config(n, c) for n, c in config.channels.items()},
            registries=self.registries(config),
            auth=self.authenticator(config),
            spool=self.spool,
            metrics=self.metrics,
            clock=self.clock,
            on_accepted=self.relay.enqueue,
            photos=photos,
            gate=gate,
            access=self.access,
            scanner=scanner_for(config),
        )

    def record_audit(self, action: str, **kwargs: Any) -> None:
        """An audit entry, never fatal to serving: one the log cannot take now (a full
        disk) is kept, in order, and written with backoff once the disk takes it, saying
        when it happened (``detail.occurred_at``)."""
        self.audit_backlog.append((action, kwargs, self.clock()))
        if self.audit_remote and self._retry_audit():
            return  # a database round trip: written on a thread, never on the event loop
        if not self.flush_audit():
            self._retry_audit()

    def flush_audit(self) -> bool:
        """Write the entries kept back; True once none is left."""
        while self.audit_backlog:
            action, kwargs, at = self.audit_backlog[0]
            if len(self.audit_backlog) > 1 or self.clock() - at >= 1.0:
                detail = dict(kwargs.get("detail") or {})
                detail.setdefault("occurred_at", iso(at))
                kwargs = {**kwargs, "detail": detail}
            try:
                self.audit.record(action, **kwargs)
            except (GatewayError, OSError) as exc:
                log.error(
                    "audit_unwritable",
                    action=action,
                    waiting=len(self.audit_backlog),
                    error=type(exc).__name__,
                    reason=str(exc),
                )
                return False
            self.audit_backlog.popleft()
            self.metrics.audit_entries.labels(action=action).inc()
        return True

    def _retry_audit(self) -> bool:
        """Start the task that writes the backlog; False when there is no event loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (stopping): the log line above is what is left
            return False
        if self._audit_retry is None or self._audit_retry.done():
            self._audit_retry = loop.create_task(self._audit_retries(), name="audit-retry")
        return True

    async def _audit_retries(self) -> None:
        wait = AUDIT_RETRY
        while not (
            await asyncio.to_thread(self.flush_audit) if self.audit_remote else self.flush_audit()
        ):
            await self.sleep(wait)
            wait = min(wait * 2, AUDIT_RETRY_MAX)

    async def settle_audit(self, within: float) -> None:
        """Wait (up to ``within`` seconds) for the audit backlog to be written."""
        task = self._audit_retry
        if task is not None and not task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), within)

    registry_follower: PgRegistryFollower | None = None
    node_name: NodeName | None = None  # with a shared spool: this node's name, held
    registry_feed: RegistryFeed | None = None
    """With a shared spool: the registries as the database has them (kept current by
    the daemon's LISTEN gateway_registry follower)."""

    def registries(self, config: GatewayConfig) -> Registries:
        scopes = config.staff_scopes()
        if self.registry_feed is not None:
            return FollowedRegistries(
                self.registry_feed,
                on_error=lambda message: log.error("registry_unreadable", reason=message),
                validate_users=lambda users: [
                    f"{source('users')}: {key}: {message}"
                    for key, message in staff_problems(users, scopes)
                ],
            )
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

    def authenticator(self, config: GatewayConfig) -> StaffAuthenticator:
        return StaffAuthenticator(
            lambda: self.ref.current.registries.users,
            max_failures=config.auth.max_failures,
            lockout_seconds=config.auth.lockout_seconds,
            cache_seconds=config.auth.credential_cache_seconds,
            clock=time.monotonic,
            checks=self.password_checks,  # one bound for every authenticator a reload makes
        )

    @staticmethod
    def tls_contexts(config: GatewayConfig) -> dict[str, ssl.SSLContext]:
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

    def export(self, config: GatewayConfig) -> None:
        """The metrics a configuration sets (certificate expiry, quota, erasure labels)."""
        for channel, settings in config.channels.items():  # rare events start at 0, so
            for reason in ERASURE_REASONS:  # alerts see the first
                self.metrics.erasures.labels(channel=channel, reason=reason)
            for result in ("clean", "infected", "unavailable") if settings.scan else ():
                self.metrics.scans.labels(channel=channel, result=result)
        self.metrics.spool_quota_bytes.set(config.spool.quota_bytes)
        export_certificate_expiry(config, self.metrics)
        self.metrics.last_reload.set(self.clock())

    # ------------------------------------------------------------------ reload

    async def reload(self, *, actor: str = "signal:SIGHUP") -> tuple[bool, str]:
        """Load the configuration file again and swap everything it builds in at once.

        All or nothing; the listeners stay open, and connections accepted after the swap
        get the new certificates. Returns (applied, reason) and writes an audit entry
        either way.
        """
        async with self._reload_lock:
            if self.notifier:
                self.notifier.reloading()
            try:
                applied, reason = await self._reload()
            finally:
                if self.notifier:
                    self.notifier.ready(status="serving")
            self.metrics.reloads.labels(outcome="applied" if applied else "failed").inc()
            self.record_audit(
                "gatewayd.reload",
                target=str(self.config_path),
                outcome="ok" if applied else "refused",
                actor=actor,
                detail={"config_sha256": config_digest(self.config_path), "reason": reason},
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
            # On a thread: with a shared spool it reads the staff registry from the database.
            problems += await asyncio.to_thread(registry_problems, new, str(self.config_path))
            problems += restart_problems(self.config, new, str(self.config_path))
            if problems:
                raise ConfigError(problems)
            tls = self.tls_contexts(new)
            registries = self.registries(new)
            policies = {n: ChannelPolicy.from_config(n, c) for n, c in new.channels.items()}
            plan = await self.relay.prepare(new)
        except ConfigError as exc:
            return False, "; ".join(str(p) for p in exc.problems)
        except (GatewayError, OSError, ssl.SSLError, ValueError) as exc:
            return False, f"{type(exc).__name__}: {exc}"
        # From here to the end of apply() nothing yields to the event loop before the
        # new runtime is in place: no request sees half of each configuration.
        old = self.ref.current
        auth = old.auth if new.auth == self.config.auth else self.authenticator(new)
        self.ref.current = replace(
            old,
            config=new,
            policies=policies,
            registries=registries,
            auth=auth,
            scanner=scanner_for(new),
        )
        for name, context in tls.items():
            self.sites[name].context = context
        self.config = new
        self.sweeper.channels = tuple(new.channels)
        self.access_exporter.retention_days = new.access_log.retention_days
        self.audit = build_audit(new, via="gatewayd", actor="gatewayd", clock=self.clock)
        await self.relay.apply(plan)
        self.export(new)
        return True, f"{len(new.channels)} channels, {len(new.destinations)} destinations"


def scanner_for(config: GatewayConfig) -> ClamdScanner | None:
    """clamd, when the configuration names one."""
    scanner = config.scanner
    return None if scanner is None else ClamdScanner(scanner.clamd_socket, scanner.timeout_seconds)


def export_certificate_expiry(config: GatewayConfig, metrics: Metrics) -> None:
    """``gateway_certificate_expiry_timestamp_seconds`` for every certificate in use."""
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
