"""Shared fixtures: a real gateway on loopback with real mutual TLS on both legs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.daemon import Bound
from gateway.metrics import Metrics
from gateway.testing import DeviceClient, RunningGateway, Sandbox, build_sandbox
from gateway.testing import start_gateway as start_in_loop


@dataclass
class FakeSleep:
    """Records every requested delay and returns at once, moving its clock forward by it.

    The daemon gets :meth:`clock` as its clock, so time passes exactly as the relay
    believes it slept: backoffs, Retry-After and circuit cool-downs without waiting.
    """

    calls: list[float] = field(default_factory=list)
    now: float = field(default_factory=time.time)

    def clock(self) -> float:
        return self.now

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


@dataclass
class Running:
    """A running daemon plus what tests poke at."""

    sandbox: Sandbox
    gateway: RunningGateway
    sleep: FakeSleep

    @property
    def bound(self) -> Bound:
        return self.gateway.bound

    @property
    def metrics(self) -> Metrics:
        return self.gateway.metrics

    @property
    def task(self) -> asyncio.Task[None]:
        return self.gateway.task

    def client(self, device_id: str = "tablet-01", **kwargs: str) -> DeviceClient:
        return DeviceClient(self.sandbox, device_id, port=self.bound.ingress_port, **kwargs)

    async def shutdown(self) -> None:
        await self.gateway.shutdown()


async def start_gateway(sandbox: Sandbox, sleep: FakeSleep | None = None) -> Running:
    """Start the daemon on ``sandbox`` with a fake relay sleep."""
    assert sandbox.config is not None
    fake = sleep or FakeSleep()
    running = await start_in_loop(sandbox.config, sleep=fake, clock=fake.clock)
    return Running(sandbox, running, fake)


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
