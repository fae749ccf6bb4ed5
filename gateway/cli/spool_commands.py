"""gatewayctl's spool, reload and audit commands (metadata only)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from gateway.cli.common import Commands, SubParsers, UsageError, config_of, positive
from gateway.errors import GatewayError
from gateway.ops.audit import AuditLog, audit_chain, current_actor
from gateway.ops.chain import ChainBroken
from gateway.ops.control import control_request
from gateway.spool.reader import read_records
from gateway.spool.records import Record, State, is_submission_id


def _spool_rows(records: Sequence[Record]) -> list[dict[str, object]]:
    def iso(ts: float | None) -> str | None:
        return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()

    return [
        {
            "submission_id": r.id,
            "channel": r.channel,
            "destination": r.destination,
            "state": r.state,
            "device_id": r.device_id,
            "user_id": r.user_id,
            "received_at": iso(r.received_at),
            "expires_at": iso(r.expires_at),
            "delivered_at": iso(r.delivered_at),
            "held_at": iso(r.held_at),
            "erased_at": iso(r.erased_at),
            "attempts": r.attempts,
            "last_error": r.last_error,
            "upstream_receipt": r.upstream_receipt,
            "size": r.plaintext_size,
            "fields": list(r.field_names),
        }
        for r in records
    ]


def cmd_spool_list(args: argparse.Namespace) -> int:
    config = config_of(args)
    states = () if args.state == "all" else (args.state,)
    records = read_records(
        config.spool.directory, states=states, channel=args.channel, limit=args.limit
    )
    rows = _spool_rows(records)
    if args.format == "json":
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    for row in rows:
        print(
            f"{row['submission_id']}  {row['state']:<9} {row['channel']:<22} "
            f"{row['received_at']}  attempts={row['attempts']}  {row['last_error'] or ''}"
        )
    print(f"{len(rows)} record(s)", file=sys.stderr)
    return 0


def cmd_spool_show(args: argparse.Namespace) -> int:
    config = config_of(args)
    _check_submission_ids([args.id])
    records = read_records(config.spool.directory, record_id=args.id, limit=1)
    if not records:
        raise UsageError(f"no record {args.id} in {config.spool.directory}")
    json.dump(_spool_rows(records)[0], sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _check_submission_ids(ids: Sequence[str]) -> None:
    for value in ids:
        if not is_submission_id(value):
            raise UsageError(f"{value!r} is not a submission id")


def _spool_action(args: argparse.Namespace, action: str) -> int:
    """Ask the running daemon to requeue or erase each record; one audit entry per record."""
    config = config_of(args)
    _check_submission_ids(args.ids)
    if config.admin.control_socket is None:
        raise UsageError("admin.control_socket is not configured: the daemon cannot be asked")
    audit: AuditLog = args.audit
    failures = 0
    for submission_id in args.ids:
        try:
            asyncio.run(
                control_request(
                    config.admin.control_socket, "POST", f"/v1/spool/{submission_id}/{action}"
                )
            )
        except GatewayError as exc:
            failures += 1
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
    return 1 if failures else 0


def cmd_spool_requeue(args: argparse.Namespace) -> int:
    return _spool_action(args, "requeue")


def cmd_spool_erase(args: argparse.Namespace) -> int:
    return _spool_action(args, "erase")


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask the running daemon to reload; it writes the audit entry (with the outcome)."""
    config = config_of(args)
    if config.admin.control_socket is None:
        raise UsageError("admin.control_socket is not configured: send SIGHUP to gatewayd")
    try:
        answer = asyncio.run(
            control_request(
                config.admin.control_socket, "POST", "/v1/reload", actor=current_actor()
            )
        )
    except GatewayError as exc:
        print(f"gatewayctl: reload refused, the old configuration stays: {exc}", file=sys.stderr)
        return 1
    print(f"reloaded: {answer['reason']}")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    chain = audit_chain(config_of(args).audit_log)
    try:
        count = chain.verify()
    except ChainBroken as exc:
        line = "" if exc.line is None else f" at line {exc.line}"
        print(f"gatewayctl: audit log BROKEN{line} ({exc.reason}): {exc}", file=sys.stderr)
        return 1
    seq, digest = chain.head
    print(f"audit log intact: {count} entries, head {seq} {digest} ({chain.path})")
    return 0


def cmd_audit_list(args: argparse.Namespace) -> int:
    chain = audit_chain(config_of(args).audit_log)
    entries = list(chain.entries())  # verified as read: a broken chain raises ChainBroken
    for entry in entries[-args.last :] if args.last else entries:
        body = entry.body
        print(
            f"{entry.seq:>6} {entry.at} {body.get('actor')}@{body.get('host')} "
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
    listing.add_argument("--format", choices=["text", "json"], default="text")
    show = command("show", cmd_spool_show, "one record's metadata, as JSON", parent=spool)
    show.add_argument("id", metavar="SUBMISSION_ID")
    for name, handler, text in (
        ("requeue", cmd_spool_requeue, "send held records again (through the running daemon)"),
        (
            "erase",
            cmd_spool_erase,
            "crypto-erase records now, recorded in the erasure ledger with reason 'operator'",
        ),
    ):
        sub = command(name, handler, text, parent=spool, audited=f"spool.{name}")
        sub.set_defaults(audit_self=True)
        sub.add_argument("ids", nargs="+", metavar="SUBMISSION_ID")

    command(
        "reload",
        cmd_reload,
        "make the running daemon read its configuration, certificates and registries again "
        "(as SIGHUP does, but answered: a refused configuration is reported here)",
    )

    audit = commands.add_parser("audit", help="operations audit log").add_subparsers(
        dest="audit_command", required=True, metavar="ACTION"
    )
    command(
        "verify",
        cmd_audit_verify,
        "check the audit log's hash chain and anchor: any edit, deletion, reordering or "
        "truncation is reported with its line",
        parent=audit,
    )
    audit_list = command(
        "list", cmd_audit_list, "print the (verified) audit log, one entry a line", parent=audit
    )
    audit_list.add_argument(
        "--last", type=positive, metavar="N", help="only the last N entries (N ≥ 1)"
    )
