"""gatewayd on either event loop: asyncio's (the default) and uvloop (``--event-loop``).

Each runs as a real process: a device posts over mutual TLS, the submission is delivered
upstream, a SIGHUP reload is applied and SIGTERM drains to exit status 0; the start line
names the loop that ran.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from conftest import until

from gateway.testing.client import DeviceClient
from gateway.testing.process import DaemonProcess
from gateway.testing.samples import sample_submission
from gateway.testing.sandbox import build_sandbox

CHANNEL = "online-application"


def _events(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text("utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize("loop", [None, "asyncio", "uvloop"])
async def test_gatewayd_serves_relays_reloads_and_drains_on_each_loop(
    tmp_path: Path, loop: str | None
) -> None:
    sandbox = await build_sandbox(tmp_path)
    log = tmp_path / "gatewayd.log"
    args = () if loop is None else ("--event-loop", loop)
    try:
        daemon = DaemonProcess(sandbox.config_path, log, args=args)
        async with daemon:
            fields, files = sample_submission(CHANNEL)
            port = daemon.port_of("tablet-01")
            async with DeviceClient(sandbox, "tablet-01", port=port) as device:
                reply = await device.submit(CHANNEL, fields, files)
            assert reply.status == 202
            await sandbox.simulators["dnp-relay"].wait_for(1, timeout=30)
            daemon.signal(signal.SIGHUP)
            await until(lambda: any(e.get("event") == "reloaded" for e in _events(log)))
            assert await daemon.terminate() == 0
    finally:
        await sandbox.stop_simulators()
    events = _events(log)
    started = [e for e in events if e.get("event") == "starting"]
    assert [e["event_loop"] for e in started] == [loop or "asyncio"]
