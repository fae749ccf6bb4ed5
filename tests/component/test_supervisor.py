"""Supervised tasks: restarted with backoff when they fail, given up on when they keep
failing (the daemon then stops, non-zero: ``tests/e2e/test_supervisor_daemon.py``), and
never left running at shutdown."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.backends import NodeNameTaken
from gateway.ops.chain import HashChainLog
from gateway.ops.metrics import Metrics
from gateway.ops.supervisor import Supervisor
from gateway.retention.sweeper import Sweeper
from gateway.spool.records import NewRecord, new_submission_id
from gateway.spool.store import Spool
from gateway.testing.fakes import FakeClock, FakeSleep

T0 = 1_800_000_000.0
WEEK = 7 * 86400


@dataclass
class Failures:
    names: list[str] = field(default_factory=list)

    def __call__(self, name: str) -> None:
        self.names.append(name)


def supervisor(sleep: FakeSleep, failures: Failures, **kwargs: float) -> Supervisor:
    return Supervisor(on_failure=failures, sleep=sleep, clock=sleep.clock, **kwargs)  # type: ignore[arg-type]


async def test_a_task_that_raises_is_restarted_with_doubling_backoff() -> None:
    """Three failures, then it runs: restarted after 1, 2 and 4 seconds, each counted."""
    sleep, failures = FakeSleep(clock=FakeClock(T0)), Failures()
    runs: list[int] = []
    finished = asyncio.Event()

    async def flaky() -> None:
        runs.append(1)
        if len(runs) <= 3:
            raise OSError(28, "No space left on device")
        finished.set()
        await asyncio.Event().wait()  # a long-lived task runs until stopped

    boss = supervisor(sleep, failures)
    boss.start("flaky", flaky)
    await asyncio.wait_for(finished.wait(), 5)
    assert sleep.calls == [1.0, 2.0, 4.0]
    assert failures.names == ["flaky"] * 3
    assert boss.failed is None
    await boss.stop()


async def test_a_task_that_keeps_failing_is_given_up_on() -> None:
    """Five failures within the window: no sixth start, and gave_up() names the task."""
    sleep, failures = FakeSleep(clock=FakeClock(T0)), Failures()
    starts: list[int] = []

    async def broken() -> None:
        starts.append(1)
        raise RuntimeError("a bug")

    boss = supervisor(sleep, failures)
    boss.start("broken", broken)
    assert await asyncio.wait_for(boss.gave_up(), 5) == "broken"
    assert len(starts) == 5 and failures.names == ["broken"] * 5
    assert boss.failed == "broken"
    await boss.stop()


async def test_an_unrecoverable_failure_is_given_up_on_at_once() -> None:
    """A task that says restarting cannot help (another process took the node's name)
    is not restarted: the supervisor gives up on the first failure, without a backoff."""
    sleep, failures = FakeSleep(clock=FakeClock(T0)), Failures()
    starts: list[int] = []

    async def taken() -> None:
        starts.append(1)
        raise NodeNameTaken("another gateway node runs with node_id 'gw01'")

    boss = supervisor(sleep, failures)
    boss.start("database-watch", taken)
    assert await asyncio.wait_for(boss.gave_up(), 5) == "database-watch"
    assert len(starts) == 1 and sleep.calls == []
    await boss.stop()


async def test_failures_spread_beyond_the_window_are_forgiven() -> None:
    """A task that fails once an hour is restarted for ever: only failures within the
    window count towards giving up."""
    sleep, failures = FakeSleep(clock=FakeClock(T0)), Failures()
    starts: list[int] = []
    done = asyncio.Event()

    async def hourly() -> None:
        starts.append(1)
        sleep.now += 3600  # an hour of work before each failure
        if len(starts) == 8:
            done.set()
            await asyncio.Event().wait()
        raise OSError(5, "Input/output error")

    boss = supervisor(sleep, failures, window=600.0)
    boss.start("hourly", hourly)
    await asyncio.wait_for(done.wait(), 5)
    assert boss.failed is None and len(failures.names) == 7
    await boss.stop()


async def test_stop_cancels_and_awaits_every_task() -> None:
    """Long-lived and one-shot tasks alike are cancelled and awaited: none outlives stop."""
    sleep, failures = FakeSleep(clock=FakeClock(T0)), Failures()
    boss = supervisor(sleep, failures)
    ended: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            ended.append(name)

    boss.start("long", lambda: forever("long"))
    once = boss.spawn("once", forever("once"))
    await asyncio.sleep(0)
    await boss.stop()
    assert sorted(ended) == ["long", "once"]
    assert once.done()
    assert {t.get_name() for t in asyncio.all_tasks()} & {"long", "once"} == set()


async def test_a_one_shot_task_that_raises_is_logged_and_counted() -> None:
    sleep, failures = FakeSleep(clock=FakeClock(T0)), Failures()
    boss = supervisor(sleep, failures)

    async def bad_reload() -> None:
        raise ValueError("a bug in a reload")

    task = boss.spawn("reload", bad_reload())
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0)
    assert failures.names == ["reload"]
    await boss.stop()


# --------------------------------------------------------------- retention carries on


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    spool = Spool(tmp_path / "spool", os.urandom(32), clock=lambda: T0)
    await spool.open()
    yield spool
    await spool.close()


async def due_record(spool: Spool) -> str:
    pending = spool.begin(new_submission_id(lambda: T0))
    pending.write(b"payload " * 100)
    record = await spool.commit(
        pending,
        NewRecord(
            channel="online-application",
            destination="dnp-relay",
            device_id="tablet-01",
            user_id="staff-001",
            received_at=T0,
            expires_at=T0 + WEEK,
            content_type="multipart/form-data; boundary=x",
            body_sha256="0" * 64,
            content_sha256="1" * 64,
            field_names=("application_id",),
            idempotency_key=None,
        ),
    )
    return record.id


async def test_retention_carries_on_after_the_ledger_write_fails_twice(
    spool: Spool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweeper's ledger append raises twice (a full disk): each failure is counted
    in gateway_task_failures_total, the sweeper is started again after a backoff, and
    the third sweep erases the overdue copy. The metrics say overdue, then caught up."""
    record_id = await due_record(spool)
    clock = FakeSleep(clock=FakeClock(T0 + WEEK + 1))
    metrics = Metrics()
    ledger = HashChainLog(tmp_path / "ledger.jsonl", clock=clock.clock)
    interval_waits = asyncio.Event()

    async def interval(_seconds: float) -> None:
        interval_waits.set()
        await asyncio.Event().wait()  # the next sweep is a minute away: never, here

    sweeper = Sweeper(spool, ledger, metrics, clock=clock.clock, sleep=interval)
    real_append = ledger.append_many
    failures_left = [2]

    def append_many(bodies: list[dict[str, object]]) -> object:
        if failures_left[0]:
            failures_left[0] -= 1
            raise OSError(28, "No space left on device")
        return real_append(bodies)

    monkeypatch.setattr(ledger, "append_many", append_many)
    boss = Supervisor(
        on_failure=lambda task: metrics.task_failures.labels(task=task).inc(),
        sleep=clock,
        clock=clock.clock,
    )
    boss.start("retention-sweeper", sweeper.run)
    await asyncio.wait_for(interval_waits.wait(), 5)
    record = await spool.get(record_id)
    assert record is not None and record.state == "erased"
    sample = metrics.registry.get_sample_value
    assert sample("gateway_task_failures_total", {"task": "retention-sweeper"}) == 2
    assert sample("gateway_spool_overdue_records") == 0
    assert sample("gateway_retention_last_sweep_timestamp_seconds") == clock.now
    assert clock.calls == [1.0, 2.0]  # the supervisor's backoff, then the sweep worked
    assert boss.failed is None
    await boss.stop()


async def test_a_failing_sweep_leaves_the_overdue_count_for_the_alert(
    spool: Spool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While sweeps fail, gateway_spool_overdue_records says how many copies wait."""
    await due_record(spool)
    await due_record(spool)
    clock = FakeSleep(clock=FakeClock(T0 + WEEK + 1))
    metrics = Metrics()
    ledger = HashChainLog(tmp_path / "ledger.jsonl", clock=clock.clock)

    def full(_bodies: list[dict[str, object]]) -> object:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ledger, "append_many", full)
    sweeper = Sweeper(spool, ledger, metrics, clock=clock.clock)
    with pytest.raises(OSError, match="No space"):
        await sweeper.sweep()
    assert metrics.registry.get_sample_value("gateway_spool_overdue_records") == 2
    assert metrics.registry.get_sample_value("gateway_retention_last_sweep_timestamp_seconds") == 0


@pytest.mark.usefixtures("hermetic_cli")  # restores the structlog configuration after
async def test_the_failure_log_line_names_the_task_and_the_error_type_only() -> None:
    """The JSON line operators read says which task and which exception type: never the
    exception's text (which may quote anything), and the task's name is not redacted."""
    import io
    import json

    from gateway.ops import logs

    stream = io.StringIO()
    logs.configure(stream)
    sleep, failures = FakeSleep(clock=FakeClock(T0)), Failures()
    boss = supervisor(sleep, failures)
    ran = asyncio.Event()

    async def leaky() -> None:
        if not ran.is_set():
            ran.set()
            raise OSError(2, "No such file: /var/lib/gateway/新宿 花子.json")
        await asyncio.Event().wait()

    boss.start("sweeper", leaky)
    await asyncio.wait_for(ran.wait(), 5)
    await asyncio.sleep(0)
    await boss.stop()
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    failed = next(e for e in events if e["event"] == "task_failed")
    assert (failed["task"], failed["error"]) == ("sweeper", "FileNotFoundError")
    assert "新宿" not in stream.getvalue() and "No such file" not in stream.getvalue()
