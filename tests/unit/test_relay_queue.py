"""The relay's queue takes each id once while it waits, and a rescan offers the shared
spool's queued records without doubling those already waiting."""

from __future__ import annotations

import asyncio
import contextlib

from gateway.relay.queue import UniqueQueue, rescan, rescan_loop


class Listing:
    def __init__(self, ids: dict[str, list[str]]) -> None:
        self.ids = ids
        self.asked = 0

    async def queued_ids(self, destination: str) -> list[str]:
        self.asked += 1
        return list(self.ids.get(destination, []))


async def test_an_id_waits_once_and_may_come_back_after_it_was_taken() -> None:
    queue = UniqueQueue()
    assert queue.offer("a")
    assert not queue.offer("a")
    assert queue.qsize() == 1
    assert await queue.get() == "a"
    assert queue.offer("a")  # taken, so it may be offered again (the claim decides)


async def test_a_rescan_adds_only_what_is_not_waiting() -> None:
    jlis, contractor = UniqueQueue(), UniqueQueue()
    jlis.offer("r1")
    spool = Listing({"jlis": ["r1", "r2", "r3"], "contractor": ["r4"]})
    assert await rescan(spool, {"jlis": jlis, "contractor": contractor}) == 3
    assert [jlis.get_nowait() for _ in range(jlis.qsize())] == ["r1", "r2", "r3"]
    assert contractor.get_nowait() == "r4"
    assert await rescan(spool, {"jlis": jlis, "contractor": contractor}) == 4


async def test_the_loop_rescans_after_each_sleep_and_reports_what_it_found() -> None:
    queue = UniqueQueue()
    spool = Listing({"jlis": ["r1"]})
    slept: list[float] = []
    found: list[int] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) > 2:
            raise asyncio.CancelledError

    with contextlib.suppress(asyncio.CancelledError):
        await rescan_loop(
            spool, lambda: {"jlis": queue}, interval=7.0, sleep=sleep, on_found=found.append
        )
    assert slept == [7.0, 7.0, 7.0]
    assert spool.asked == 2
    assert found == [1]  # the second rescan found r1 still waiting
