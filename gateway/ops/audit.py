"""The operations audit log (管理業務で実施した作業を記録): who did what, and when.

Every state-changing ``gatewayctl`` action and every start, stop and reload of the
daemon is one entry of a hash-chained, append-only log (:mod:`gateway.chain`), so
``gatewayctl audit verify`` detects an edited, deleted, reordered or truncated entry.
Entries hold identifiers only (device and staff ids, submission ids, file digests):
never a password, a key, or anything a device sent.

An entry's body::

    {"actor": "yamada", "uid": 0, "via": "gatewayctl", "host": "gw01",
     "action": "device.revoke", "target": "tablet-07", "outcome": "ok", "detail": {...}}

``actor`` is the login behind the command (``SUDO_USER`` when run through sudo, else
the login of the process), ``uid`` the effective uid that made the change.
"""

from __future__ import annotations

import getpass
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal, overload

from gateway.config import AuditConfig
from gateway.ops.chain import ChainEntry, HashChainLog
from gateway.ops.pgchain import PgChainLog

Outcome = Literal["ok", "failed", "refused"]
AUDIT_CHAIN = "audit"
"""The audit log's chain in ``gateway.chain_entries`` (the shared backend)."""


def current_actor(environ: Mapping[str, str] = os.environ) -> str:
    """The person behind this process: the sudo caller if any, else the login name."""
    sudo_user = environ.get("SUDO_USER")
    if sudo_user:
        return sudo_user
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, no LOGNAME: still say which uid
        return f"uid:{os.geteuid()}"


@overload
def audit_chain(
    config: AuditConfig, *, clock: Callable[[], float] = ..., dsn: None = None
) -> HashChainLog: ...


@overload
def audit_chain(
    config: AuditConfig, *, clock: Callable[[], float] = ..., dsn: str
) -> PgChainLog: ...


@overload
def audit_chain(
    config: AuditConfig, *, clock: Callable[[], float] = ..., dsn: str | None
) -> HashChainLog | PgChainLog: ...


def audit_chain(
    config: AuditConfig, *, clock: Callable[[], float] = time.time, dsn: str | None = None
) -> HashChainLog | PgChainLog:
    """The audit log's hash chain, anchored where the configuration says; or (``dsn``
    given) the chain ``audit`` in PostgreSQL, shared by every node."""
    if dsn is not None:
        return PgChainLog(dsn, AUDIT_CHAIN, clock=clock)
    return HashChainLog(config.log, clock=clock, anchor=config.anchor, kind="audit")


class AuditLog:
    """Appends audit entries for one program (``via``); thread-safe, multi-process safe
    (and multi-node, in PostgreSQL when ``dsn`` is given)."""

    def __init__(
        self,
        config: AuditConfig,
        *,
        via: str,
        actor: str | None = None,
        clock: Callable[[], float] | None = None,
        dsn: str | None = None,
    ) -> None:
        self.chain = audit_chain(config, clock=clock or time.time, dsn=dsn)
        self.via = via
        self.actor = actor or current_actor()
        self.host = socket.gethostname()

    def check(self) -> None:
        """Raise ChainBroken now if the log is not intact (before changing anything).

        The whole chain is verified, not only its tail: an entry appended to a chain
        already broken in the middle would be recorded in a log that proves nothing.
        The audit log holds administrative actions only, so this stays cheap.
        """
        self.chain.verify()

    def record(
        self,
        action: str,
        *,
        target: str | None = None,
        outcome: Outcome = "ok",
        detail: Mapping[str, Any] | None = None,
        actor: str | None = None,
    ) -> ChainEntry:
        body: dict[str, Any] = {
            "actor": actor or self.actor,
            "uid": os.geteuid(),
            "via": self.via,
            "host": self.host,
            "action": action,
            "target": target,
            "outcome": outcome,
        }
        if detail:
            body["detail"] = dict(detail)
        return self.chain.append(body)
