"""Revocation takes effect before the command returns (端末無効化, 利用者の無効化).

``gatewayctl device revoke`` and ``user disable`` write the registry and then tell the
running daemon over its control socket; they exit 0 only once the daemon says it holds
the change. The daemon runs here on the real clock, so that the receipts it dates can be
held against the moment the command returned.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import aiohttp
import pytest
from conftest import until

from gateway.cli import gatewayctl
from gateway.identity.registry import load_devices
from gateway.ops.chain import HashChainLog
from gateway.testing.client import DeviceClient
from gateway.testing.samples import multipart_body, sample_submission
from gateway.testing.sandbox import RunningGateway, Sandbox, build_sandbox, start_gateway

pytestmark = pytest.mark.usefixtures("hermetic_cli")
CHANNEL = "online-application"


@dataclass
class Live:
    sandbox: Sandbox
    gateway: RunningGateway


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Live]:
    box = await build_sandbox(tmp_path)
    assert box.config is not None
    running = await start_gateway(box.config, config_path=box.config_path)  # real clock
    try:
        yield Live(box, running)
    finally:
        await running.shutdown()
        await box.stop_simulators()


@dataclass
class Loop:
    """Posts one submission after another on one keep-alive connection."""

    client: DeviceClient
    answers: list[tuple[float, int, dict[str, object]]] = field(default_factory=list)
    connections: int = 0
    connection_of: list[int] = field(default_factory=list)
    """Which connection (1 = the first) each answer came on."""
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        fields, files = sample_submission(CHANNEL)
        body, content_type = multipart_body(fields, files)
        url = f"{self.client.base}/v1/channels/{CHANNEL}/submissions"
        headers = {"Authorization": self.client.authorization, "Content-Type": content_type}
        while not self.stop.is_set():
            started = time.time()
            async with self.client.session.post(url, data=body, headers=headers) as response:
                doc = await response.json(content_type=None)
                self.answers.append((started, response.status, doc))
                self.connection_of.append(self.connections)

    def accepted(self) -> list[float]:
        """When each 202 says its submission was received (the gateway's own date)."""
        return [
            datetime.fromisoformat(str(doc["received_at"]).replace("Z", "+00:00")).timestamp()
            for _started, status, doc in self.answers
            if status == 202
        ]


async def tight_loop(live: Live) -> tuple[Loop, asyncio.Task[None]]:
    trace = aiohttp.TraceConfig()
    loop_state: list[Loop] = []

    async def opened(*_args: object) -> None:
        loop_state[0].connections += 1

    trace.on_connection_create_end.append(opened)
    client = DeviceClient(
        live.sandbox,
        "tablet-01",
        port=live.gateway.port_of("tablet-01"),
        limit=1,
        trace_configs=[trace],
    )
    poster = Loop(client)
    loop_state.append(poster)
    task = asyncio.create_task(poster.run())
    await until(lambda: len(poster.accepted()) >= 3)
    return poster, task


@pytest.mark.parametrize(
    ("argv", "refused"),
    [
        (["device", "revoke", "--id", "tablet-01"], {403}),
        (["user", "disable", "--id", "staff-001"], {401, 429}),  # 429: locked out, after 5
    ],
    ids=["device-revoke", "user-disable"],
)
async def test_no_receipt_is_dated_after_the_command_returned(
    live: Live, argv: list[str], refused: set[int]
) -> None:
    """A device posts in a tight loop on one keep-alive connection while the operator
    revokes it (or disables its staff user): every 202 is dated before the command
    returned, and every post begun after it is refused, the first on the connection
    that was open all along."""
    poster, task = await tight_loop(live)
    try:
        config = ["--config", str(live.sandbox.config_path)]
        code = await asyncio.to_thread(gatewayctl.main, [*argv, *config])
        returned = time.time()
        await until(lambda: sum(a[0] > returned for a in poster.answers) >= 5)
    finally:
        poster.stop.set()
        await task
        await poster.client.close()
    assert code == 0
    accepted = poster.accepted()
    assert len(accepted) >= 3
    assert max(accepted) <= returned, "a 202 dated after the command returned"
    after = {status for started, status, _doc in poster.answers if started > returned}
    assert after and after <= refused
    statuses = [status for _started, status, _doc in poster.answers]
    first = next(i for i, status in enumerate(statuses) if status != 202)
    assert statuses[first] == min(refused)
    # Everything up to the first refusal, that one included, on the one keep-alive
    # connection opened at the start (a refusal closes it; the device then reconnects).
    assert set(poster.connection_of[: first + 1]) == {1}


async def test_a_running_daemon_that_cannot_be_told_is_an_error(
    live: Live, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the control socket gone, revoke still changes the registry (the file watch
    applies it within a second) but exits 69 (EX_UNAVAILABLE) saying the daemon cannot
    be asked; the audit entry records the change and the daemon's silence."""
    config = live.sandbox.config
    assert config is not None and config.admin.control_socket is not None
    config.admin.control_socket.unlink()
    capsys.readouterr()
    code = await asyncio.to_thread(
        gatewayctl.main,
        ["device", "revoke", "--config", str(live.sandbox.config_path), "--id", "tablet-01"],
    )
    _out, err = capsys.readouterr()
    assert code == 69
    assert "gatewayctl: device tablet-01 revoked in the registry file, but" in err
    assert "the running gatewayd cannot be asked to confirm it" in err
    assert "there is no such socket" in err
    assert "Error" not in err
    device = load_devices(config.auth.devices_file).by_id("tablet-01")
    assert device is not None and device.revoked
    where = config.audit_log
    last = list(HashChainLog(where.log, anchor=where.anchor).entries())[-1].body
    assert (last["action"], last["outcome"]) == ("device.revoke", "ok")
    assert "cannot be asked" in last["detail"]["daemon"]
