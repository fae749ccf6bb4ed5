"""The daemon's memory tuning: malloc gives large buffers back, TLS reads stay small."""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import platform

import pytest

from gateway.ops.memory import TLS_READ_SIZE, tune_malloc, tune_tls_reads
from gateway.relay.budget import MemoryBudget


def test_tls_reads_are_bounded_per_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncio's TLS transport reads (and hands over) at most 64 KiB at once, not 256."""
    monkeypatch.setattr(asyncio.sslproto.SSLProtocol, "max_size", 256 * 1024)
    assert tune_tls_reads()
    assert asyncio.sslproto.SSLProtocol.max_size == TLS_READ_SIZE == 64 * 1024


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_malloc_is_tuned_on_glibc() -> None:
    """Both mallopt settings are accepted by glibc (the daemon warns when they are not)."""
    assert tune_malloc()


async def test_sealed_bodies_wait_for_room_in_the_relays_memory_budget() -> None:
    """A body is built only once its bytes fit under the budget; one larger than the
    whole budget waits until it has the budget to itself; a streamed body needs none."""
    budget = MemoryBudget(limit=10)
    order: list[str] = []
    first = budget.hold(6)
    await first.__aenter__()

    async def take(name: str, nbytes: int) -> None:
        async with budget.hold(nbytes):
            order.append(name)

    second = asyncio.create_task(take("second", 6))
    huge = asyncio.create_task(take("huge", 1_000))
    async with budget.hold(0):
        order.append("streamed")
    for _ in range(5):
        await asyncio.sleep(0)
    assert order == ["streamed"] and budget.used == 6
    await first.__aexit__(None, None, None)
    await asyncio.gather(second, huge)
    assert order == ["streamed", "second", "huge"]
    assert budget.used == 0
