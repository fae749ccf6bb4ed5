"""Shared fixtures: a real gateway on loopback with real mutual TLS on both legs."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog

from gateway.daemon import Bound
from gateway.ops.metrics import Metrics
from gateway.spool.store import Spool
from gateway.testing.clamd import Clamd
from gateway.testing.client import DeviceClient
from gateway.testing.fakes import FakeSleep
from gateway.testing.postgres import Postgres
from gateway.testing.sandbox import RunningGateway, Sandbox, build_sandbox
from gateway.testing.sandbox import start_gateway as start_in_loop
from gateway.testing.upstream import UpstreamSimulator


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

    def port_of(self, device_id: str = "tablet-01") -> int:
        """The port of the listener (network) this sandbox device reaches the gateway on."""
        return self.gateway.port_of(device_id)

    def client(self, device_id: str = "tablet-01", **kwargs: str) -> DeviceClient:
        return DeviceClient(self.sandbox, device_id, port=self.port_of(device_id), **kwargs)

    async def shutdown(self) -> None:
        await self.gateway.shutdown()


@pytest.fixture(autouse=True)
def restored_umask() -> Iterator[None]:
    """``gatewayd.main`` run in this process sets umask 0077, as a daemon should; the
    tests after it must not inherit that (one of them checks modes under umask 022)."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


async def start_gateway(sandbox: Sandbox, sleep: FakeSleep | None = None) -> Running:
    """Start the daemon on ``sandbox`` with a fake relay sleep."""
    assert sandbox.config is not None
    fake = sleep or FakeSleep()
    running = await start_in_loop(
        sandbox.config, sleep=fake, clock=fake.clock, config_path=sandbox.config_path
    )
    return Running(sandbox, running, fake)


class Gate:
    """A simulator sleep that holds each request until opened; tracks the peak held."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.inside = 0
        self.peak = 0
        self._changed = asyncio.Condition()

    async def __call__(self, _seconds: float) -> None:
        async with self._changed:
            self.inside += 1
            self.peak = max(self.peak, self.inside)
            self._changed.notify_all()
        try:
            await self.opened.wait()
        finally:
            self.inside -= 1

    async def wait_inside(self, count: int) -> None:
        async with asyncio.timeout(10), self._changed:
            await self._changed.wait_for(lambda: self.inside >= count)


def hold(sim: UpstreamSimulator) -> Gate:
    """Make every request to ``sim`` wait at a gate before it is answered."""
    gate = Gate()
    sim._sleep = gate
    sim.set_delay(1.0)
    return gate


@pytest.fixture(scope="session")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clamd]:
    """One real clamd for the whole test session, with the tests' own signatures."""
    with Clamd(tmp_path_factory.mktemp("clamd")) as running:
        yield running


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One real PostgreSQL server for the whole test session (initdb in a temporary
    directory, loopback port, password authentication)."""
    with Postgres() as running:
        yield running


@pytest.fixture
def pg_dsn(postgres: Postgres) -> str:
    """The DSN of a new, empty database of that server, for this test alone."""
    return postgres.new_database()


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    """An open spool in a temporary directory, with a fresh master key."""
    store = Spool(tmp_path / "spool", os.urandom(32))
    await store.open()
    yield store
    await store.close()


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


def ctl(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    """Run ``gatewayctl`` in this thread; returns exit code, stdout, stderr."""
    from gateway.cli import gatewayctl

    capsys.readouterr()
    code = gatewayctl.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


async def actl(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    """Run ``gatewayctl`` in a thread: the commands that talk to the daemon call
    ``asyncio.run``, and the daemon runs in the test's own loop."""
    from gateway.cli import gatewayctl

    capsys.readouterr()
    code = await asyncio.to_thread(gatewayctl.main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


async def until(predicate: Callable[[], bool], *, within: float = 15.0) -> None:
    """Wait for what another task or process does (a metric, a log line, a refusal)."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - nothing to await but its effect
            await asyncio.sleep(0.01)


@pytest.fixture
def hermetic_cli(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """For gatewayctl in this process: no systemd credentials directory, and the
    structlog configuration it changes restored afterwards."""
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
