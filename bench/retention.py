"""Retention at scale: sweeping 100,000 due records, and accepting with a full spool.

Drives the real Spool, erasure ledger and sweeper (the daemon's own code) without HTTP,
so the figures are the spool's: the time to commit a record (encrypt, fsync, group
commit) with 1,000 and with 100,000 records already in the spool, and the time for one
sweep to erase 100,000 due records, each written to the ledger first, and destroy
their key epochs (the sweep runs once every deadline's Japan day is over).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.load import latency_ms
from gateway.crypto.keystore import epoch_end
from gateway.ops import logs
from gateway.ops.chain import HashChainLog
from gateway.ops.metrics import Metrics
from gateway.retention.sweeper import Sweeper
from gateway.spool.records import NewRecord, new_submission_id
from gateway.spool.store import Spool

WEEK = 7 * 86400
PAYLOAD = os.urandom(2048)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _meta(received: float) -> NewRecord:
    return NewRecord(
        channel="online-application", destination="dnp-relay", device_id="tablet-01",
        user_id="staff-001", received_at=received, expires_at=received + WEEK,
        content_type="multipart/form-data; boundary=bench", body_sha256="0" * 64,
        content_sha256="1" * 64, field_names=("application_id", "face_photo"),
        idempotency_key=None,
    )  # fmt: skip


async def _accept(spool: Spool, clock: Clock) -> float:
    started = time.perf_counter()
    pending = await spool.create(new_submission_id(clock))
    pending.write(PAYLOAD)
    await spool.commit(pending, _meta(clock()))
    return time.perf_counter() - started


async def _fill(spool: Spool, clock: Clock, count: int, concurrency: int = 64) -> None:
    remaining = iter(range(count))

    async def worker() -> None:
        for n in remaining:
            clock.now += 0.0001
            await _accept(spool, clock)
            if n and n % 20_000 == 0:
                print(f"  … {n} records in the spool", file=sys.stderr, flush=True)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _accept_cost(spool: Spool, clock: Clock, samples: int = 500) -> dict[str, float]:
    times = [await _accept(spool, clock) for _ in range(samples)]
    return {
        **latency_ms(times, 3),
    }


async def run(directory: Path, records: int) -> dict[str, Any]:
    logs.configure(sys.stderr, level=logging.WARNING)  # one line per erased batch otherwise
    clock = Clock()
    spool = Spool(directory / "spool", os.urandom(32), clock=clock)
    await spool.open()
    ledger = HashChainLog(
        directory / "ledger.jsonl", clock=clock, anchor=directory / "ledger.anchor"
    )
    sweeper = Sweeper(spool, ledger, Metrics(), clock=clock)
    try:
        small = 1_000
        await _fill(spool, clock, small)
        at_small = await _accept_cost(spool, clock)
        started = time.perf_counter()
        await _fill(spool, clock, records - spool.counts["queued"])
        fill_seconds = time.perf_counter() - started
        at_large = await _accept_cost(spool, clock)
        due = spool.counts["queued"]
        epochs = spool.keys.live()
        clock.now = max(epoch_end(e) for e in epochs)  # every deadline's day is over
        started = time.perf_counter()
        erased = await sweeper.sweep()
        sweep_seconds = time.perf_counter() - started
        destroyed = [e for e in epochs if spool.keys.is_destroyed(e)]
        verify_started = time.perf_counter()
        entries = ledger.verify()
        verify_seconds = time.perf_counter() - verify_started
    finally:
        await spool.close()
    return {
        "accept_with_1000_in_spool": at_small,
        f"accept_with_{records}_in_spool": at_large,
        "fill_records_per_second": round((records - small) / fill_seconds, 1),
        "sweep": {
            "due_records": due,
            "erased": erased,
            "seconds": round(sweep_seconds, 2),
            "records_per_second": round(erased / sweep_seconds, 1),
            "key_epochs_destroyed": len(destroyed),
            "ledger_entries_verified": entries,
            "ledger_verify_seconds": round(verify_seconds, 2),
        },
    }
