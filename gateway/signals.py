"""The ``gatewayd`` program: load and check, then serve until SIGTERM or SIGINT.

The only module that knows about signals: SIGTERM and SIGINT drain and stop, SIGHUP
reloads (a supervised one-shot task). Exit status: 0 after a drain, 1 when the start
failed or a supervised task kept failing, 78 (EX_CONFIG) for a configuration that cannot
be used.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import sys
from pathlib import Path

from gateway.config import GatewayConfig, load_config
from gateway.daemon import Daemon
from gateway.errors import EXIT_CONFIG, ConfigError, GatewayError
from gateway.ops import logs
from gateway.ops.logs import get_logger
from gateway.ops.loops import LoopFactory, loop_name
from gateway.ops.memory import tune_malloc, tune_tls_reads
from gateway.ops.sdnotify import Notifier
from gateway.ops.supervisor import TaskGaveUp
from gateway.preflight import registry_problems, secret_problems

log = get_logger("gateway.daemon")


def run_until_signalled(
    config_path: Path,
    log_level: str = "info",
    loop_factory: LoopFactory = asyncio.new_event_loop,
    *,
    whole_process: bool = False,
) -> int:
    """The ``gatewayd`` program on the event loops ``loop_factory`` makes; returns its
    exit status. ``whole_process``: the process is gatewayd and nothing else, so its
    logging is configured once for good (each logger bound on first use)."""
    logs.configure(level=getattr(logging, log_level.upper()), once=whole_process)
    # No core file, whoever starts us: memory holds decrypted submissions and keys (the
    # photo-check workers inherit the limit).
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # Large buffers go back to the system once freed; TLS reads stay small.
    if not (tune_malloc() and tune_tls_reads()):
        log.warning("memory_untuned", reason="no glibc mallopt or TLS read size: RSS may grow")
    # Whatever starts us: nothing the daemon creates is for others (the unit says the
    # same with UMask=0077; each file of personal data or keys also sets 0600 itself).
    os.umask(0o077)
    try:
        config = load_config(config_path)
        problems = secret_problems(config, str(config_path))
        problems += registry_problems(config, str(config_path))
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"gatewayd: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_serve_with_signals(config, config_path))
    except ConfigError as exc:  # the registries changed between the check and the start
        for problem in exc.problems:
            print(f"gatewayd: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    except TaskGaveUp as exc:  # drained already; systemd restarts us
        print(f"gatewayd: {exc}", file=sys.stderr)
        return 1
    except GatewayError as exc:
        log.error("startup_failed", error=type(exc).__name__, reason=str(exc))
        print(f"gatewayd: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve_with_signals(config: GatewayConfig, config_path: Path) -> None:
    loop = asyncio.get_running_loop()
    log.info("starting", event_loop=loop_name(loop), pid=os.getpid())
    stop = asyncio.Event()

    def on_signal(signum: signal.Signals) -> None:
        log.info("signal", signal=signum.name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(
        signal.SIGHUP, lambda: log.warning("reload_ignored", reason="not ready yet")
    )
    async with Daemon.start(
        config, config_path=config_path, notifier=Notifier.from_environ()
    ) as daemon:

        def on_hangup() -> None:
            log.info("signal", signal="SIGHUP")
            daemon.supervisor.spawn("reload", daemon.reload(actor="signal:SIGHUP"))

        loop.add_signal_handler(signal.SIGHUP, on_hangup)
        await daemon.run_until(stop.wait)
