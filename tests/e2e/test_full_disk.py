"""A real full filesystem, end to end: the reproduction that once lost the promise.

The spool sits on a 20 MB tmpfs with ``min_free_bytes`` = 2 MB and the upstream answers
503. Devices post 357 KB submissions until the gateway answers 507; the rest of the
filesystem is filled with another file; the upstream recovers and receives records,
but the disk will not take "delivered". Each worker then holds its record and writes
the outcome again with backoff instead of sending more: the records at risk of a second
delivery (should the daemon stop before the disk recovers) are at most the
destination's ``concurrency``. Then the filler goes. With no restart, every accepted
record must be delivered exactly once and erased, and intake must take new
submissions again.

The relay's sleep is injected: every backoff waits for the test's next tick, so time
passes only when the test lets it (a tick every poll while it waits for an effect).
"""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import Running, start_gateway

from gateway.ops.chain import HashChainLog
from gateway.testing.fakes import FakeSleep
from gateway.testing.samples import photo_of_size, sample_submission
from gateway.testing.sandbox import Sandbox, build_sandbox

CHANNEL = "online-application"
DESTINATION = "dnp-relay"
SIZE = "20m"
MIN_FREE = 2 * 1024**2
BODY = 357_000


@dataclass
class TickingSleep(FakeSleep):
    """Every sleep waits for the next :meth:`tick` (and moves the fake clock on)."""

    tick_event: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        self.clock.advance(seconds)
        await self.tick_event.wait()

    def tick(self) -> None:
        self.tick_event.set()
        self.tick_event = asyncio.Event()


async def ticking(sleep: TickingSleep, predicate: Callable[[], bool], within: float = 60) -> None:
    """Let time pass, one tick per poll, until ``predicate`` holds."""
    async with asyncio.timeout(within):
        while not predicate():
            sleep.tick()
            await asyncio.sleep(0.01)


def mount_tmpfs(where: Path) -> None:
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SIZE},mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


def unmount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], check=False)


@dataclass
class Disk:
    sandbox: Sandbox
    running: Running
    sleep: TickingSleep
    mount: Path

    @property
    def spool(self) -> Path:
        return self.mount / "spool"

    def states(self) -> dict[str, str]:
        uri = f"file:{self.spool / 'index.sqlite3'}?mode=ro"
        with sqlite3.connect(uri, uri=True) as conn:
            rows = conn.execute("SELECT id, state FROM records").fetchall()
        conn.close()
        return dict(rows)

    def fill(self) -> Path:
        """Fill what is left of the filesystem with another file."""
        filler = self.mount / "filler"
        chunk = b"\0" * (64 * 1024)
        with open(filler, "wb", buffering=0) as out:
            for size in (len(chunk), 4096, 512, 1):
                while True:
                    try:
                        out.write(chunk[:size])
                    except OSError as exc:
                        assert exc.errno == errno.ENOSPC
                        break
        return filler


@pytest.fixture
async def disk(tmp_path: Path) -> AsyncIterator[Disk]:
    mount = tmp_path / "disk"
    mount_tmpfs(mount)
    try:
        sandbox = await build_sandbox(
            tmp_path,
            overrides={"spool.directory": str(mount / "spool"), "spool.min_free_bytes": MIN_FREE},
        )
        sleep = TickingSleep()
        running = await start_gateway(sandbox, sleep)
        try:
            yield Disk(sandbox, running, sleep, mount)
        finally:
            await running.shutdown()
            await sandbox.stop_simulators()
    finally:
        unmount(mount)


async def test_a_full_disk_delays_outcomes_and_intake_and_loses_nothing(disk: Disk) -> None:
    simulator = disk.sandbox.simulators[DESTINATION]
    simulator.fail_next(10**6, 503)
    fields, files = sample_submission(CHANNEL)
    files = {**files, "face_photo": photo_of_size(BODY)}
    accepted: list[str] = []
    async with disk.running.client("tablet-01") as client:
        # 1-2. Post until the gateway says the disk is low.
        while True:
            reply = await client.submit(CHANNEL, fields, files)
            if reply.status != 202:
                break
            accepted.append(str(reply.body["submission_id"]))
            assert len(accepted) < 200, "the 20 MB filesystem never filled"
        assert reply.status == 507, reply.body
        assert reply.headers["Retry-After"]
        assert reply.body["type"].endswith("disk-low")
        assert 40 <= len(accepted) <= 55, len(accepted)

        # 3. Fill the rest of the filesystem.
        filler = disk.fill()

        # 4. The upstream recovers and receives records; "delivered" cannot be written.
        simulator.clear_failures()
        metrics = disk.running.metrics.registry

        def refused_outcomes() -> float:
            """Refused writes of "delivered" or of the erasure after it (which one the
            disk refuses first depends on what room the WAL and the ledger still had)."""
            name = "gateway_relay_outcome_write_failures_total"
            return sum(
                metrics.get_sample_value(name, {"destination": DESTINATION, "outcome": o}) or 0.0
                for o in ("delivered", "erased")
            )

        concurrency = disk.running.sandbox.config.destinations[DESTINATION].concurrency
        await ticking(
            disk.sleep,
            lambda: (
                metrics.get_sample_value("gateway_relay_outcomes_unrecorded")
                == min(concurrency, len(accepted))
            ),
        )
        assert refused_outcomes() > 0
        assert 1 <= len(simulator.deliveries) <= concurrency  # no more sent than are held
        full = await client.submit(CHANNEL, fields, files)
        assert full.status == 507 and full.headers["Retry-After"]

        # 5. The filler goes: everything is marked delivered and erased, no restart.
        filler.unlink()
        # (A record is erased in the index, its key destroyed, just before its file is
        # unlinked: the files are waited for too.)
        await ticking(
            disk.sleep,
            lambda: (
                all(disk.states().get(rid) == "erased" for rid in accepted)
                and not any((disk.spool / "records").iterdir())
            ),
        )
        assert simulator.duplicates == 0
        assert sorted(simulator.deliveries) == sorted(accepted)
        ledger = HashChainLog(disk.spool / "erasure-ledger.jsonl")
        erased = {e.body["submission_id"]: e.body["reason"] for e in ledger.entries()}
        assert {rid: erased.get(rid) for rid in accepted} == dict.fromkeys(accepted, "delivered")
        assert metrics.get_sample_value("gateway_relay_outcomes_unrecorded") == 0
        failures = refused_outcomes()

        # 6. Intake takes new submissions again, by itself, and they go through.
        again = await client.submit(CHANNEL, fields, files)
        assert again.status == 202, again.body
        fresh = str(again.body["submission_id"])
        await ticking(disk.sleep, lambda: disk.states().get(fresh) == "erased")
    assert not disk.running.task.done(), "the gateway stopped"
    assert simulator.duplicates == 0
    print(
        f"\n  full disk: {len(accepted)} accepted before 507, all delivered once and erased "
        f"after the filler went ({int(failures)} refused outcome writes), intake resumed"
    )
