"""``gatewayctl access-log``: the access log (アクセスログ), verified.

``access-log verify [--from DATE] [--to DATE]`` re-reads the day files (all, or those of
the days given, JST) and their hash chain: any edit, deletion, reordering or cut-off tail
is reported with the file and the line (exit 1).
"""

from __future__ import annotations

import argparse
import sys
from datetime import date

from gateway.cli.common import Commands, SubParsers, UsageError, config_of
from gateway.ops.access_log import AccessLog
from gateway.ops.chain import ChainBroken


def cmd_access_log_verify(args: argparse.Namespace) -> int:
    if args.from_ and args.to and args.to < args.from_:
        raise UsageError("--to is before --from")
    access = AccessLog(config_of(args).access_log_directory)
    try:
        verified = access.verify(args.from_, args.to)
    except ChainBroken as exc:
        line = "" if exc.line is None else f" line {exc.line}"
        print(
            f"gatewayctl: access log BROKEN in {exc.path.name}{line} ({exc.reason}): {exc.detail}",
            file=sys.stderr,
        )
        return 1
    seq, digest = verified.head
    days = (
        "every day" if not (args.from_ or args.to) else f"{args.from_ or '…'} to {args.to or '…'}"
    )
    print(
        f"access log intact ({days}): {verified.entries} entries in {verified.files} files, "
        f"last seq {seq} {digest} ({access.directory})"
    )
    return 0


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
        "--from", dest="from_", type=date.fromisoformat, metavar="DATE", help="first day (JST)"
    )
    verify.add_argument("--to", type=date.fromisoformat, metavar="DATE", help="last day (JST)")
