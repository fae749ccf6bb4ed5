"""gatewayctl erasure-report: the certificate of erasure (消去証明書) for a period, from
the verified erasure ledger (the file beside the spool, or the table every node shares
in PostgreSQL), as JSON, as CSV (UTF-8 with a BOM, for Excel) or as a PDF to file
(Japanese, with the name-and-seal box)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway.backends import keystore_location
from gateway.cli.common import Commands, SubParsers, UsageError, config_of, iso_date
from gateway.fsutil import write_atomic
from gateway.preflight import database_dsn
from gateway.retention.certificate_pdf import as_pdf
from gateway.retention.ledger import erasure_ledger
from gateway.retention.report import as_csv, certificate


def cmd_erasure_report(args: argparse.Namespace) -> int:
    if args.to < args.from_:
        raise UsageError("--to is before --from")
    zone = getattr(args, "timezone", None)  # the global --timezone, where there is one
    if zone is not None and datetime.now(zone).utcoffset() != timedelta(hours=9):
        raise UsageError(
            "the certificate of erasure is in Japan time (JST, +09:00), like the days of "
            "its period: leave out --timezone"
        )
    if args.format == "pdf" and args.output is None:
        raise UsageError(
            "--format pdf needs --output FILE (a PDF is not written to the terminal), e.g. "
            "--output erasure-certificate.pdf"
        )
    if args.output is not None and not args.output.parent.is_dir():
        raise UsageError(f"--output {args.output}: {args.output.parent} is not a directory")
    config = config_of(args)
    ledger = erasure_ledger(config.spool.directory, dsn=database_dsn(config))
    cert = certificate(
        ledger,
        args.from_,
        args.to,
        operator=args.operator,
        organization=args.organization,
        now=datetime.now(UTC),
        keystore=keystore_location(config),
        retention_days=max((c.retention_days for c in config.channels.values()), default=None),
    )
    if args.format == "pdf":
        data = as_pdf(cert)
    elif args.format == "csv":
        data = as_csv(cert)
    else:
        data = (json.dumps(cert, ensure_ascii=False, indent=2) + "\n").encode()
    if args.output is None:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        write_atomic(args.output, data, mode=0o644)  # no personal data: ids, times, hashes
    where = "" if args.output is None else f"; written to {args.output}"
    print(
        f"{cert['total']} erasures from {args.from_} to {args.to}; ledger verified "
        f"({cert['ledger']['entries']} entries){where}",
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
        type=iso_date,
        required=True,
        metavar="DATE",
        help="first day, YYYY-MM-DD (JST)",
    )
    report.add_argument(
        "--to",
        type=iso_date,
        required=True,
        metavar="DATE",
        help="last day, YYYY-MM-DD (JST), included",
    )
    report.add_argument(
        "--format",
        choices=["json", "csv", "pdf"],
        default="json",
        help="json (default); csv: one table, UTF-8 with a BOM for Excel; pdf: the "
        "certificate to file and seal, Japanese (needs --output)",
    )
    report.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help="write the certificate to FILE instead of standard output (required for pdf)",
    )
    report.add_argument(
        "--operator",
        default="(not given)",
        help="who reviews this certificate, for the sanitization record (確認者)",
    )
    report.add_argument(
        "--organization",
        default="(not given)",
        help="the organization the certificate is issued by (発行者)",
    )
