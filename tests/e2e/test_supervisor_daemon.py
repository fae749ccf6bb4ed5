"""Supervised tasks in the real daemon: one that keeps failing stops it non-zero, and
/readyz names the task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from gateway.ops.admin import admin_app
from gateway.ops.metrics import Metrics
from gateway.ops.supervisor import TaskGaveUp
from gateway.retention.sweeper import Sweeper
from gateway.testing.fakes import FakeSleep
from gateway.testing.sandbox import build_sandbox, start_gateway


async def test_the_daemon_stops_non_zero_when_a_task_keeps_failing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every sweep after the start-up one fails: five failures, then the daemon drains
    and serve() raises TaskGaveUp (gatewayd exits 1 and systemd restarts it)."""
    box = await build_sandbox(tmp_path)
    assert box.config is not None
    real_sweep = Sweeper.sweep
    calls: list[int] = []

    async def sweep(self: Sweeper, progress: Callable[[int], None] | None = None) -> int:
        calls.append(1)
        if len(calls) == 1:
            return await real_sweep(self, progress)  # the start-up sweep
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(Sweeper, "sweep", sweep)
    fake = FakeSleep()
    try:
        running = await start_gateway(box.config, sleep=fake, clock=fake.clock)
        with pytest.raises(TaskGaveUp, match="retention-sweeper"):
            await asyncio.wait_for(running.task, 15)
    finally:
        await box.stop_simulators()
    labels = {"task": "retention-sweeper"}
    assert running.metrics.registry.get_sample_value("gateway_task_failures_total", labels) == 5
    assert len(calls) == 1 + 5


async def test_readyz_names_the_task_that_kept_failing() -> None:
    """/readyz answers 503 with state failing and the task's name."""
    readiness = {"state": "failing", "task": "retention-sweeper"}
    app = admin_app(lambda: True, Metrics(), readiness)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/readyz") as response,
        ):
            assert response.status == 503
            assert await response.json() == {
                "ready": False,
                "state": "failing",
                "task": "retention-sweeper",
            }
    finally:
        await runner.cleanup()
