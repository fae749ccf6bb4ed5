"""``gatewayd --config FILE``: run the gateway until SIGTERM (drain) or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway import __version__, logs
from gateway.config import GatewayConfig, load_config
from gateway.daemon import secret_problems, serve
from gateway.errors import ConfigError, GatewayError

log = logs.get_logger("gateway.main")


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


async def _run(config: GatewayConfig) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: signal.Signals) -> None:
        log.info("signal", signal=signum.name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(
        signal.SIGHUP,
        lambda: log.warning("signal", signal="SIGHUP", reason="reload is not implemented yet"),
    )
    await serve(config, shutdown_trigger=stop.wait)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.configure(level=getattr(logging, args.log_level.upper()))
    try:
        config = load_config(args.config)
        problems = secret_problems(config, str(args.config))
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"gatewayd: {problem}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_run(config))
    except GatewayError as exc:
        log.error("startup_failed", error=type(exc).__name__, reason=str(exc))
        print(f"gatewayd: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
