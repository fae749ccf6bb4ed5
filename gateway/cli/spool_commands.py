"""gatewayctl's spool, reload and audit commands (metadata only)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any

from gateway.cli import migrate_command
from gateway.cli.common import (
    EXIT_FAILED,
    EXIT_UNAVAILABLE,
    CommandFailed,
    Commands,
    SubParsers,
    UsageError,
    add_format,
    config_of,
    confirm,
    local_time,
    positive,
    print_json,
    zone_of,
)
from gateway.config import GatewayConfig
from gateway.errors import GatewayError
from gateway.ops.audit import AuditLog, audit_chain, current_actor
from gateway.ops.chain import ChainBroken, HashChainLog
from gateway.ops.control import DaemonUnavailable, control_request
from gateway.ops.pgchain import PgChainLog
from gateway.preflight import database_dsn
from gateway.spool.pgreader import read_pg_records
from gateway.spool.reader import read_records
from gateway.spool.records import Record, State, is_submission_id

_TIMES = ("received_at", "expires_at", "delivered_at", "held_at", "erased_at")


def _spool_rows(records: Sequence[Record], zone: tzinfo) -> list[dict[str, Any]]:
    return [
        {
            "submission_id": r.id,
            "channel": r.channel,
            "destination": r.destination,
            "state": r.state,
            "device_id": r.device_id,
            "user_id": r.user_id,
            **{name: local_time(getattr(r, name), zone) for name in _TIMES},
            "attempts": r.attempts,
            "last_error": r.last_error,
            "upstream_receipt": r.upstream_receipt,
            "size": r.plaintext_size,
            "fields": list(r.field_names),
        }
        for r in records
    ]


def _short(value: str | None) -> str:
    """A row's time (ISO 8601 with its offset) to the second, for text."""
    return "-" if value is None else datetime.fromisoformat(value).isoformat(timespec="seconds")


def _read(config: GatewayConfig, **query: Any) -> list[Record]:
    """Records' metadata from the configured spool: the local index, or PostgreSQL."""
    dsn = database_dsn(config)
    if dsn is None:
        return read_records(config.spool.directory, **query)
    return read_pg_records(dsn, **query)


def cmd_spool_list(args: argparse.Namespace) -> int:
    config = config_of(args)
    states = () if args.state == "all" else (args.state,)
    records = _read(config, states=states, channel=args.channel, limit=args.limit)
    rows = _spool_rows(records, zone_of(args))
    if args.format == "json":
        print_json(rows)
        return 0
    for row in rows:
        print(
            f"{row['submission_id']}  {row['state']:<9} {row['channel']:<22} "
            f"{_short(row['received_at'])}  attempts={row['attempts']}  "
            f"{row['last_error'] or ''}".rstrip()
        )
    print(f"{len(rows)} record(s)", file=sys.stderr)
    return 0


def cmd_spool_show(args: argparse.Namespace) -> int:
    config = config_of(args)
    _check_submission_ids([args.id])
    records = _read(config, record_id=args.id, limit=1)
    if not records:
        where = "the shared spool" if config.spool.backend == "postgresql" else None
        raise CommandFailed(f"no record {args.id} in {where or config.spool.directory}")
    row = _spool_rows(records, zone_of(args))[0]
    if args.format == "json":
        print_json(row)
        return 0
    for key, value in row.items():
        if key in _TIMES:
            value = _short(value)
        elif key == "fields":
            value = ", ".join(value) or "-"
        print(f"{key + ':':<17} {'-' if value is None else value}")
    return 0


def _check_submission_ids(ids: Sequence[str]) -> None:
    for value in ids:
        if not is_submission_id(value):
            raise UsageError(f"{value!r} is not a submission id")


def _control_socket(config: GatewayConfig, instead: str) -> Path:
    if config.admin.control_socket is None:
        raise DaemonUnavailable(
            f"admin.control_socket is not configured, so the running gatewayd cannot be "
            f"asked{instead}"
        )
    return config.admin.control_socket


def _spool_action(args: argparse.Namespace, action: str) -> int:
    """Ask the running daemon to requeue or erase each record; one audit entry per record.
    Exit 1 if any was refused, 69 if the daemon could not be reached."""
    config = config_of(args)
    _check_submission_ids(args.ids)
    audit: AuditLog = args.audit
    try:
        socket = _control_socket(config, "")
    except DaemonUnavailable as exc:
        for submission_id in args.ids:
            audit.record(f"spool.{action}", target=submission_id, outcome="failed",
                         detail={"reason": str(exc)})  # fmt: skip
        raise
    status = 0
    for submission_id in args.ids:
        try:
            asyncio.run(control_request(socket, "POST", f"/v1/spool/{submission_id}/{action}"))
        except GatewayError as exc:
            unavailable = isinstance(exc, DaemonUnavailable)
            status = EXIT_UNAVAILABLE if unavailable or status == EXIT_UNAVAILABLE else EXIT_FAILED
            audit.record(
                f"spool.{action}",
                target=submission_id,
                outcome="failed",
                detail={"reason": str(exc)},
            )
            print(f"gatewayctl: {submission_id}: {exc}", file=sys.stderr)
            continue
        audit.record(f"spool.{action}", target=submission_id)
        done = "queued again" if action == "requeue" else "erased (ledger reason: operator)"
        print(f"{submission_id} {done}")
    return status


def cmd_spool_requeue(args: argparse.Namespace) -> int:
    return _spool_action(args, "requeue")


def cmd_spool_erase(args: argparse.Namespace) -> int:
    return _spool_action(args, "erase")


def _confirm_erase(args: argparse.Namespace) -> None:
    _check_submission_ids(args.ids)
    count = len(dict.fromkeys(args.ids))
    confirm(args, f"crypto-erase {count} spooled record(s) for good")


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask the running daemon to reload; it writes the audit entry (with the outcome)."""
    config = config_of(args)
    socket = _control_socket(config, ": send SIGHUP to gatewayd instead")
    try:
        answer = asyncio.run(control_request(socket, "POST", "/v1/reload", actor=current_actor()))
    except DaemonUnavailable:
        raise
    except GatewayError as exc:
        print(f"gatewayctl: reload refused, the old configuration stays: {exc}", file=sys.stderr)
        return 1
    print(f"reloaded: {answer['reason']}")
    return 0


def _audit_chain(args: argparse.Namespace) -> tuple[HashChainLog | PgChainLog, str]:
    """The audit log's chain (its file, or its table in PostgreSQL) and where it is (for
    messages: a path, or ``postgresql:...``, never the DSN)."""
    config = config_of(args)
    chain = audit_chain(config.audit_log, dsn=database_dsn(config))
    return chain, str(chain.path) if isinstance(chain, HashChainLog) else chain.location


def cmd_audit_verify(args: argparse.Namespace) -> int:
    chain, where = _audit_chain(args)
    document: dict[str, Any] = {"log": where, "intact": False}
    try:
        if isinstance(chain, HashChainLog) and not chain.path.exists():
            document.update(reason="missing")
            raise CommandFailed(
                f"the audit log {chain.path} does not exist: nothing was ever recorded "
                "there (is audit.log the right file?)"
            )
        count = chain.verify()  # a table with no entries yet is intact, with 0 entries
    except ChainBroken as exc:
        at = f" at line {exc.line}" if exc.line is not None else ""
        at = f" at seq {exc.seq}" if exc.seq is not None else at  # a table's entry
        document.update(line=exc.line, reason=exc.reason, detail=exc.detail)
        if exc.seq is not None:
            document.update(seq=exc.seq)
        print(f"gatewayctl: audit log BROKEN{at} ({exc.reason}): {exc}", file=sys.stderr)
        if args.format == "json":
            print_json(document)
        return 1
    except CommandFailed:
        if args.format == "json":
            print_json(document)
        raise
    seq, digest = chain.head
    if args.format == "json":
        document.update(intact=True, entries=count, head={"seq": seq, "hash": digest})
        print_json(document)
        return 0
    print(f"audit log intact: {count} entries, head {seq} {digest} ({where})")
    return 0


def cmd_audit_list(args: argparse.Namespace) -> int:
    chain, where = _audit_chain(args)
    if isinstance(chain, HashChainLog) and not chain.path.exists():
        raise CommandFailed(f"the audit log {where} does not exist: nothing recorded yet")
    entries = list(chain.entries())  # verified as read: a broken chain raises ChainBroken
    zone = zone_of(args)
    shown = entries[-args.last :] if args.last else entries
    if args.format == "json":
        print_json(
            [{"seq": e.seq, **e.body, "at": local_time(e.at, zone), "hash": e.hash} for e in shown]
        )
        return 0
    for entry in shown:
        body = entry.body
        print(
            f"{entry.seq:>6} {local_time(entry.at, zone, text=True)} "
            f"{body.get('actor')}@{body.get('host')} "
            f"{body.get('via')} {body.get('action')} {body.get('target') or '-'} "
            f"{body.get('outcome')}"
            + (f" {json.dumps(body['detail'], ensure_ascii=False)}" if body.get("detail") else "")
        )
    return 0


def register(commands: SubParsers[argparse.ArgumentParser], command: Commands) -> None:
    spool = commands.add_parser("spool", help="spooled records (metadata only)").add_subparsers(
        dest="spool_command", required=True, metavar="ACTION"
    )
    listing = command(
        "list", cmd_spool_list, "list spooled records, newest first (no field values)", parent=spool
    )
    listing.add_argument(
        "--state",
        choices=[*(s.value for s in State), "all"],
        default=State.HELD.value,
        help="which records (default: held, the ones waiting for an operator)",
    )
    listing.add_argument("--channel", help="only this channel")
    listing.add_argument(
        "--limit", type=positive, default=100, help="at most this many (default 100)"
    )
    add_format(listing)
    show = command("show", cmd_spool_show, "one record's metadata (no field values)", parent=spool)
    show.add_argument("id", metavar="SUBMISSION_ID")
    add_format(show)
    for name, handler, text in (
        ("requeue", cmd_spool_requeue, "send held records again (through the running daemon)"),
        (
            "erase",
            cmd_spool_erase,
            "crypto-erase records now, recorded in the erasure ledger with reason 'operator' "
            "(asks first; --yes does not)",
        ),
    ):
        destructive = name == "erase"
        sub = command(
            name, handler, text, parent=spool, audited=f"spool.{name}", destructive=destructive
        )
        sub.set_defaults(audit_self=True, confirm=_confirm_erase if destructive else None)
        sub.add_argument("ids", nargs="+", metavar="SUBMISSION_ID")
    migrate_command.register(spool, command)

    command(
        "reload",
        cmd_reload,
        "make the running daemon read its configuration, certificates and registries again "
        "(as SIGHUP does, but answered: a refused configuration is reported here)",
    )

    audit = commands.add_parser("audit", help="operations audit log").add_subparsers(
        dest="audit_command", required=True, metavar="ACTION"
    )
    verify = command(
        "verify",
        cmd_audit_verify,
        "check the audit log's hash chain and anchor: any edit, deletion, reordering or "
        "truncation is reported with its line (a missing log is an error)",
        parent=audit,
    )
    add_format(verify)
    audit_list = command(
        "list", cmd_audit_list, "print the (verified) audit log, one entry a line", parent=audit
    )
    audit_list.add_argument(
        "--last", type=positive, metavar="N", help="only the last N entries (N ≥ 1)"
    )
    add_format(audit_list)
