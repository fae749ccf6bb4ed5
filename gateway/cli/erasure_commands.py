"""gatewayctl erasure-report: the certificate of erasure (消去証明書) for a period, from
the verified erasure ledger."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, date, datetime

from gateway.cli.common import Commands, SubParsers, UsageError, config_of
from gateway.retention.ledger import erasure_ledger
from gateway.retention.report import as_csv, certificate


def cmd_erasure_report(args: argparse.Namespace) -> int:
    config = config_of(args)
    ledger = erasure_ledger(config.spool.directory)
    if args.to < args.from_:
        raise UsageError("--to is before --from")
    cert = certificate(
        ledger,
        args.from_,
        args.to,
        operator=args.operator,
        organization=args.organization,
        now=datetime.now(UTC),
        keystore=str(config.keystore_directory),
        retention_days=max((c.retention_days for c in config.channels.values()), default=None),
    )
    if args.format == "csv":
        sys.stdout.write(as_csv(cert))
    else:
        json.dump(cert, sys.stdout, ensure_ascii=False, indent=2)
        sys.stdout.write("\n")
    print(
        f"{cert['total']} erasures from {args.from_} to {args.to}; ledger verified "
        f"({cert['ledger']['entries']} entries)",
        file=sys.stderr,
    )
    return 0


def register(commands: SubParsers[argparse.ArgumentParser], command: Commands) -> None:
    report = command(
        "erasure-report",
        cmd_erasure_report,
        "certificate of erasure for a period, from the verified erasure ledger",
    )
    report.add_argument(
        "--from",
        dest="from_",
        type=date.fromisoformat,
        required=True,
        metavar="DATE",
        help="first day, YYYY-MM-DD (JST)",
    )
    report.add_argument(
        "--to",
        type=date.fromisoformat,
        required=True,
        metavar="DATE",
        help="last day, YYYY-MM-DD (JST), included",
    )
    report.add_argument("--format", choices=["json", "csv"], default="json")
    report.add_argument(
        "--operator",
        default="(not given)",
        help="who reviews this certificate, for the sanitization record",
    )
    report.add_argument(
        "--organization",
        default="(not given)",
        help="the organization the certificate is issued by",
    )
