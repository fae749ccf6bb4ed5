"""Shared fixtures: a real gateway on loopback with real mutual TLS on both legs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.daemon import Bound, serve
from gateway.metrics import Metrics
from gateway.testing import DeviceClient, Sandbox, build_sandbox


@dataclass
class FakeSleep:
    """Records every requested delay and returns at once: retries without waiting."""

    calls: list[float] = field(default_factory=list)

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        await asyncio.sleep(0)


@dataclass
class Running:
    sandbox: Sandbox
    bound: Bound
    metrics: Metrics
    sleep: FakeSleep
    stop: asyncio.Event
    task: asyncio.Task[None]

    def client(self, device_id: str = "tablet-01", **kwargs: str) -> DeviceClient:
        return DeviceClient(self.sandbox, device_id, port=self.bound.ingress_port, **kwargs)

    async def shutdown(self) -> None:
        self.stop.set()
        await self.task


async def start_gateway(sandbox: Sandbox, sleep: FakeSleep | None = None) -> Running:
    assert sandbox.config is not None
    stop = asyncio.Event()
    ready: asyncio.Future[Bound] = asyncio.get_running_loop().create_future()
    metrics = Metrics()
    fake = sleep or FakeSleep()
    task = asyncio.create_task(serve(sandbox.config, shutdown_trigger=stop.wait, sleep=fake,
                                     metrics=metrics, on_ready=ready.set_result))
    done, _ = await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    return Running(sandbox, ready.result(), metrics, fake, stop, task)


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    box = await build_sandbox(tmp_path)
    yield box
    await box.stop_simulators()


@pytest.fixture
async def gateway(sandbox: Sandbox) -> AsyncIterator[Running]:
    running = await start_gateway(sandbox)
    yield running
    if not running.task.done():
        await running.shutdown()
