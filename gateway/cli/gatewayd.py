"""``gatewayd --config FILE``: run the gateway until SIGTERM (drain) or SIGINT.

This module imports almost nothing at the top on purpose: the photo-check worker
processes re-import the program's main module when they start, and each would
otherwise carry the whole daemon (aiohttp, pydantic, ...) in its memory.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway import __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gatewayd",
        description="Secure transmission gateway daemon: accepts submissions from ward "
        "devices over mutual TLS, spools them encrypted, relays them upstream.",
    )
    parser.add_argument(
        "--config",
        required=True,
        type=Path,
        metavar="FILE",
        help="the gateway's TOML configuration (see conf/gateway.toml)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="lowest level of JSON log lines written to stderr",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from gateway.signals import run_until_signalled

    return run_until_signalled(args.config, args.log_level)


if __name__ == "__main__":
    sys.exit(main())
