"""``gatewayctl access-log`` and ``access-report``: the access log (アクセスログ), verified
and reviewed.

``access-log verify [--from DATE] [--to DATE]`` re-reads the day files (all, or those of
the days given, JST) and their hash chain: any edit, deletion, reordering or cut-off tail
is reported with the file and the line (exit 1). ``access-report --from --to`` is the
periodic review (:mod:`gateway.ops.access_report`), from verified entries only.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from datetime import timedelta
from typing import Any

from gateway.cli.common import (
    CommandFailed,
    Commands,
    SubParsers,
    UsageError,
    add_format,
    config_of,
    iso_date,
    positive,
    print_json,
)
from gateway.identity.registry import load_devices, load_users
from gateway.ops.access_log import AccessLog
from gateway.ops.chain import ChainBroken


def cmd_access_log_verify(args: argparse.Namespace) -> int:
    if args.from_ and args.to and args.to < args.from_:
        raise UsageError("--to is before --from")
    access = AccessLog(config_of(args).access_log_directory)
    if not access.directory.is_dir():
        raise CommandFailed(
            f"the access log directory {access.directory} does not exist: nothing was ever "
            "logged there (is access_log.directory right?)"
        )
    period = {"from": args.from_ and str(args.from_), "to": args.to and str(args.to)}
    document: dict[str, Any] = {"directory": str(access.directory), **period}
    try:
        verified = access.verify(args.from_, args.to)
    except ChainBroken as exc:
        line = "" if exc.line is None else f" line {exc.line}"
        print(
            f"gatewayctl: access log BROKEN in {exc.path.name}{line} ({exc.reason}): {exc.detail}",
            file=sys.stderr,
        )
        if args.format == "json":
            document.update(intact=False, file=exc.path.name, line=exc.line, reason=exc.reason)
            print_json({**document, "detail": exc.detail})
        return 1
    seq, digest = verified.head
    if args.format == "json":
        document.update(intact=True, entries=verified.entries, files=verified.files)
        print_json({**document, "head": {"seq": seq, "hash": digest}})
        return 0
    days = (
        "every day" if not (args.from_ or args.to) else f"{args.from_ or '…'} to {args.to or '…'}"
    )
    print(
        f"access log intact ({days}): {verified.entries} entries in {verified.files} files, "
        f"last seq {seq} {digest} ({access.directory})"
    )
    return 0


def cmd_access_report(args: argparse.Namespace) -> int:
    # Imported here: the holiday calendar costs every other gatewayctl command ~40 ms.
    from gateway.ops.access_report import OfficeHours, as_document, review

    if args.to < args.from_:
        raise UsageError("--to is before --from")
    config = config_of(args)
    settings = config.access_log
    idle_days = args.idle_days or settings.idle_days
    office = OfficeHours(
        settings.office_opens, settings.office_closes, frozenset(settings.office_closed_days)
    )
    access = AccessLog(config.access_log_directory)
    since = min(args.from_, args.to - timedelta(days=idle_days))  # for "last seen"
    try:
        result = review(
            ((e.seq, e.hash, e.body) for _, e in access.entries(since, args.to)),
            first=args.from_,
            last=args.to,
            office=office,
        )
    except ChainBroken as exc:
        line = "" if exc.line is None else f" line {exc.line}"
        print(
            f"gatewayctl: access log BROKEN in {exc.path.name}{line} ({exc.reason}): "
            f"{exc.detail}; no report from a log that does not verify",
            file=sys.stderr,
        )
        return 1
    devices = [d.id for d in load_devices(config.auth.devices_file).devices if not d.revoked]
    users = [u.id for u in load_users(config.auth.users_file).users if u.enabled]
    document = as_document(
        result, devices=devices, users=users, today=args.to, idle_days=idle_days, office=office
    )
    if args.format == "json":
        print_json(document)
    elif args.format == "csv":
        sys.stdout.write(as_csv(document))
    else:
        sys.stdout.write(as_text(document))
    return 0


def as_csv(document: dict[str, Any]) -> str:
    """One row per figure: section, key, attempts, accepted, refused, count, detail."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["section", "key", "attempts", "accepted", "refused", "count", "detail"])
    for section in ("per_device", "per_user", "per_channel", "per_listener"):
        for key, tally in document[section].items():
            row = [tally["attempts"], tally["accepted"], tally["refused"], "", ""]
            writer.writerow([section, key, *row])
    for reason, count in document["refusals_by_reason"].items():
        writer.writerow(["refusal", reason, "", "", "", count, ""])
    for cert in document["refused_certificates"]:
        detail = f"{cert['fingerprint']} from {' '.join(cert['addresses'])}"
        writer.writerow([cert["outcome"], cert["device_id"], cert["attempts"], "", "", "", detail])
    for user, count in document["lockouts"].items():
        writer.writerow(["lockout", user, "", "", "", count, ""])
    for group in document["outside_office_hours"]["groups"]:
        detail = f"{group['why']}: {_who(group)} {group['first']} to {group['last']}"
        detail += f" ({_outcomes(group)})"
        writer.writerow(["outside_hours", group["day"], "", "", "", group["count"], detail])
    for kind in ("devices", "users"):
        for item in document["idle"][kind]:
            last = item["last_seen"] or "never"
            writer.writerow([f"idle_{kind}", item["id"], "", "", "", "", f"last seen {last}"])
    head = document["chain_head"]
    if head:
        writer.writerow(["chain_head", head["seq"], "", "", "", "", head["hash"]])
    return out.getvalue()


def _who(group: dict[str, Any]) -> str:
    return f"{group['device_id'] or '-'} {group['user_id'] or '-'} {group['channel'] or '-'}"


def _outcomes(group: dict[str, Any]) -> str:
    return ", ".join(f"{outcome} {n}" for outcome, n in group["outcomes"].items())


def as_text(document: dict[str, Any]) -> str:
    period = document["period"]
    lines = [f"Access log review {period['from']} to {period['to']}: {document['entries']} entries"]
    for section, title in (
        ("per_device", "Devices"),
        ("per_user", "Staff users"),
        ("per_channel", "Channels"),
        ("per_listener", "Listeners"),
    ):
        lines.append(f"\n{title} (attempts / accepted / refused):")
        for key, tally in document[section].items():
            counts = f"{tally['attempts']} / {tally['accepted']} / {tally['refused']}"
            lines.append(f"  {key:<28} {counts}")
    lines.append("\nRefusals by reason:")
    lines += [f"  {r:<28} {n}" for r, n in document["refusals_by_reason"].items()]
    lines.append("\nRevoked or unregistered certificates that tried:")
    for cert in document["refused_certificates"]:
        lines.append(
            f"  {cert['outcome']} {cert['device_id']} {cert['fingerprint']}: "
            f"{cert['attempts']} from {', '.join(cert['addresses'])} "
            f"({cert['first']} to {cert['last']})"
        )
    lines.append("\nLockouts:")
    lines += [f"  {user:<28} {n}" for user, n in document["lockouts"].items()]
    outside = document["outside_office_hours"]
    lines.append(f"\nOutside office hours ({outside['hours']}): {outside['count']}")
    lines += [
        f"  {g['day']} {g['why']}: {_who(g)} {g['count']} between {g['first'][11:19]} and "
        f"{g['last'][11:19]} ({_outcomes(g)})"
        for g in outside["groups"]
    ]
    lines.append(f"  holidays: {outside['holidays']}")
    idle = document["idle"]
    lines.append(f"\nNot seen for {idle['days']} days (candidates for revocation):")
    for kind in ("devices", "users"):
        for item in idle[kind]:
            lines.append(f"  {kind[:-1]} {item['id']}: last seen {item['last_seen'] or 'never'}")
    head = document["chain_head"]
    lines.append(f"\nChain head: {head['seq']} {head['hash']}" if head else "\nChain head: none")
    return "\n".join(lines) + "\n"


def register(commands: SubParsers[argparse.ArgumentParser], command: Commands) -> None:
    access = commands.add_parser(
        "access-log", help="the access log (every request attempt)"
    ).add_subparsers(dest="access_command", required=True, metavar="ACTION")
    verify = command(
        "verify",
        cmd_access_log_verify,
        "check the access log's hash chain across its day files: any edit, deletion, "
        "reordering or cut-off tail is reported with its file and line",
        parent=access,
    )
    verify.add_argument(
        "--from", dest="from_", type=iso_date, metavar="DATE", help="first day, YYYY-MM-DD (JST)"
    )
    verify.add_argument(
        "--to", type=iso_date, metavar="DATE", help="last day, YYYY-MM-DD (JST), included"
    )
    add_format(verify)

    report = command(
        "access-report",
        cmd_access_report,
        "the periodic review of the access log (定期的な分析): counts per device, user, "
        "channel and listener, refusals by reason, refused certificates, lockouts, "
        "activity outside office hours, idle devices and users, the chain's head",
    )
    report.add_argument(
        "--from", dest="from_", type=iso_date, required=True, metavar="DATE", help="YYYY-MM-DD"
    )
    report.add_argument(
        "--to", type=iso_date, required=True, metavar="DATE", help="YYYY-MM-DD, included"
    )
    report.add_argument("--format", choices=["json", "csv", "text"], default="text")
    report.add_argument(
        "--idle-days",
        type=positive,
        metavar="N",
        help="devices and users not seen for N days (default: access_log.idle_days, 90)",
    )
