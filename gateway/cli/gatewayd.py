"""``gatewayd [--config FILE]``: run the gateway until SIGTERM (drain) or SIGINT.

The configuration is ``--config FILE``, else ``$GATEWAY_CONFIG``, else
/etc/gateway/gateway.toml. Exit status: 0 after a drain, 1 when the start failed or a
supervised task kept failing, 2 for a usage error, 78 (EX_CONFIG) for a configuration
that cannot be used (systemd: ``RestartPreventExitStatus=78``).

This module imports little at the top: ``--help`` and ``--version`` answer without
loading the daemon.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway import __version__
from gateway.errors import EXIT_CONFIG

EPILOG = """\
exit status:
   0  stopped after a drain (SIGTERM or SIGINT)
   1  the start failed, or a supervised task kept failing (systemd restarts it)
   2  usage error
  78  the configuration is unusable: its file is missing or invalid, or a secret or
      file it names is (EX_CONFIG; restarting does not help)"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gatewayd",
        description="Secure transmission gateway daemon: accepts submissions from ward "
        "devices over mutual TLS, spools them encrypted, relays them upstream.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="the gateway's TOML configuration (see conf/gateway.toml); default "
        "$GATEWAY_CONFIG, else /etc/gateway/gateway.toml",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="lowest level of JSON log lines written to stderr",
    )
    parser.add_argument(
        "--event-loop",
        default="asyncio",
        choices=["asyncio", "uvloop"],
        help="asyncio's own loop (default), or uvloop: about the same CPU here, more memory "
        "with many large uploads at once; needs the uvloop extra (exit 78 without it)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Imported here, not above: see the module's docstring.
    from gateway.cli.common import config_path, plain_os_error
    from gateway.ops.loops import LoopUnavailable, loop_factory
    from gateway.signals import run_until_signalled

    try:
        factory = loop_factory(args.event_loop)
    except LoopUnavailable as exc:  # as unusable as a bad configuration: no restart loop
        print(f"gatewayd: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    path = config_path(args.config)
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        pass  # said by the configuration check, as every other problem of the file
    except OSError as exc:
        print(f"gatewayd: {plain_os_error(exc, path)}", file=sys.stderr)
        return EXIT_CONFIG
    # Called without arguments it is the program itself (the console script, python -m);
    # with them, a caller in the same process (a test) that may configure logging again.
    status = run_until_signalled(path, args.log_level, factory, whole_process=argv is None)
    return status


if __name__ == "__main__":
    sys.exit(main())
