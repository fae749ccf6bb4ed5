"""What a reload may change in place, and what needs a restart.

A reload builds everything the new configuration names before anything is swapped
(see :meth:`gateway.daemon.Daemon.reload`); these rules say which differences refuse it
up front: a listener added, removed or moved to another address, and the settings of
:data:`RESTART_ONLY`. A listener's certificate, key, device CA and TLS profile, the
channels, destinations and registries all change in place.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from gateway.config import GatewayConfig
from gateway.errors import ConfigProblem

RESTART_ONLY: tuple[tuple[str, Callable[[GatewayConfig], object]], ...] = (
    ("ingress.keepalive_timeout", lambda c: c.ingress.keepalive_timeout),
    ("admin", lambda c: c.admin),
    ("spool.directory", lambda c: c.spool.directory),
    ("spool.master_key", lambda c: c.spool.master_key),
    ("spool.keystore", lambda c: c.keystore_directory),
    ("spool.backend", lambda c: c.spool.backend),
    ("spool.dsn", lambda c: c.spool.dsn),
    ("spool.node_id", lambda c: c.spool.node_id),
    ("spool.lease_seconds", lambda c: c.spool.lease_seconds),
    ("spool.pool_size", lambda c: c.spool.pool_size),
    ("access_log.directory", lambda c: c.access_log_directory),
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


def config_digest(path: Path | None) -> str | None:
    """The SHA-256 of the configuration file, for the audit log (None if unreadable)."""
    if path is None:
        return None
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None
