"""What the bench's phases share: the closed-loop load of 16 keep-alive devices, and
percentiles."""

from __future__ import annotations

import asyncio
import sys
import time

from gateway.testing.client import DeviceClient

CHANNEL = "online-application"


def progress(text: str) -> None:
    """A progress line on stderr (the figures go to stdout and bench-results.json)."""
    print(f"  … {text}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def latency_ms(values: list[float], digits: int = 2) -> dict[str, float]:
    """p50 and p99 of durations in seconds, in milliseconds, the same way in every phase."""
    return {
        "p50_ms": round(percentile(values, 50) * 1000, digits),
        "p99_ms": round(percentile(values, 99) * 1000, digits),
    }


async def closed_loop(
    poster: DeviceClient, body: bytes, ctype: str, *, total: int, concurrency: int
) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    failures = 0
    counter = iter(range(total))

    async def device() -> None:
        nonlocal failures
        for _ in counter:
            started = time.perf_counter()
            status = await poster.post_raw(CHANNEL, body, ctype)
            latencies.append(time.perf_counter() - started)
            failures += status not in (200, 201, 202)

    started = time.perf_counter()
    await asyncio.gather(*(device() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies, failures
