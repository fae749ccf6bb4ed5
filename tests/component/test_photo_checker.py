"""The photo check on threads: checks decode at once, within a memory budget that holds a
big photo back until there is room; a check that cannot run is a 503, not a bad photo.
A small photo kept in memory gets the same answer as one read back from its record, and
its room in the budget goes back once its check is done.

Photos are stored as real encrypted records; the decode itself is replaced where the
test needs to see when it runs (threading events and barriers, no sleeps).
"""

from __future__ import annotations

import asyncio
import io
import random
import struct
import threading
from pathlib import Path
from typing import BinaryIO

import pytest
from PIL import Image

from gateway.channels.photo import PhotoRules, check_jpeg, read_frame
from gateway.crypto.envelope import KEY_SIZE
from gateway.errors import Refusal, Violation
from gateway.ingress import photos
from gateway.ingress.photos import (
    DECODE_FLOOR,
    IN_MEMORY_MAX,
    MemoryBudget,
    Method,
    PhotoChecker,
    decode_estimate,
)
from gateway.ingress.problems import answered
from gateway.spool.pending import PendingRecord, RecordWindow
from gateway.testing.samples import make_jpeg

RULES = PhotoRules()
WAIT = 10.0
"""Seconds before a test gives up on an event that should come at once."""


def jpeg(side: int, *, progressive: bool, subsampling: int = 2) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), (90, 120, 150)).save(
        out, "JPEG", progressive=progressive, subsampling=subsampling, quality=75
    )
    return out.getvalue()


def stored(tmp_path: Path, name: str, photo: bytes) -> RecordWindow:
    """``photo`` as the whole plaintext of an encrypted record; where it is."""
    pending = PendingRecord(name, tmp_path / name, bytes(range(KEY_SIZE)))
    pending.write(photo)
    pending.finish()
    pending.sync_and_close()
    return pending.location(0, len(photo))


def estimate(photo: bytes) -> int:
    return decode_estimate(read_frame(io.BytesIO(photo), len(photo)), len(photo), RULES)


async def in_thread(wait: threading.Event) -> None:
    assert await asyncio.to_thread(wait.wait, WAIT)


def test_the_estimate_counts_the_coefficients_only_when_the_whole_image_is_buffered() -> None:
    progressive = jpeg(2000, progressive=True)  # 4:2:0: 1.5 samples a pixel, 2 bytes each
    baseline = jpeg(2000, progressive=False)
    assert estimate(progressive) - estimate(baseline) == pytest.approx(2000 * 2000 * 3, rel=0.01)
    assert DECODE_FLOOR < estimate(baseline) < DECODE_FLOOR + 2**20
    full = jpeg(2000, progressive=True, subsampling=0)  # 4:4:4: 3 samples a pixel
    assert estimate(full) - estimate(baseline) == pytest.approx(2000 * 2000 * 6, rel=0.01)


def test_the_estimate_without_a_frame_or_of_a_photo_refused_before_decoding() -> None:
    worst = decode_estimate(None, 30_000, RULES)
    assert worst > 6000 * 6000 * 3 * 2
    for size in (RULES.min_bytes - 1, RULES.max_bytes + 1):  # refused before reading
        assert decode_estimate(None, size, RULES) == DECODE_FLOOR
    big = jpeg(800, progressive=True)
    frame = read_frame(io.BytesIO(big), len(big))
    assert frame is not None
    narrow = PhotoRules(min_bytes=100, max_side=640)  # refused from its header: no decode
    assert decode_estimate(frame, len(big), narrow) == DECODE_FLOOR + 2 * len(big)


async def test_a_photo_is_checked_on_a_photo_check_thread(tmp_path: Path) -> None:
    good = jpeg(640, progressive=False)
    names: list[str] = []

    def named(field: str, fp: BinaryIO, size: int, rules: PhotoRules) -> Violation | None:
        names.append(threading.current_thread().name)
        return check_jpeg(field, fp, size, rules)

    checker = PhotoChecker(workers=1, check=named)
    rules = PhotoRules(min_bytes=100)
    try:
        assert await checker.check("face_photo", stored(tmp_path, "a", good), rules) is None
        truncated = stored(tmp_path, "b", good[: len(good) // 2])
        violation = await checker.check("face_photo", truncated, rules)
        assert violation is not None and violation.rule == "decode"
        assert checker.budget.reserved == 0
    finally:
        checker.close()
    assert len(names) == 2 and all(name.startswith("photo-check") for name in names)


async def test_two_decodes_run_at_the_same_time(tmp_path: Path) -> None:
    """Neither check can finish unless the other is inside its decode at the same time."""
    both = threading.Barrier(2, timeout=WAIT)

    def meeting(field: str, fp: BinaryIO, size: int, rules: PhotoRules) -> Violation | None:
        both.wait()  # BrokenBarrierError, failing the test, if the checks ran in turn
        return check_jpeg(field, fp, size, rules)

    photo = jpeg(640, progressive=False)
    checker = PhotoChecker(workers=2, check=meeting)
    rules = PhotoRules(min_bytes=100)
    try:
        found = await asyncio.gather(
            checker.check("face_photo", stored(tmp_path, "a", photo), rules),
            checker.check("face_photo", stored(tmp_path, "b", photo), rules),
        )
    finally:
        checker.close()
    assert list(found) == [None, None]


async def test_the_memory_budget_holds_a_second_big_photo_back(tmp_path: Path) -> None:
    """Two threads are free, but the budget has room for one progressive decode only: the
    second photo waits, having read its header, until the first is done."""
    big = jpeg(2000, progressive=True)
    need = estimate(big)
    events: list[str] = []
    started, finish = threading.Event(), threading.Event()

    def held(field: str, fp: BinaryIO, size: int, rules: PhotoRules) -> Violation | None:
        events.append(f"start {field}")
        started.set()
        assert finish.wait(WAIT)
        events.append(f"end {field}")
        return None

    checker = PhotoChecker(workers=2, memory_budget=need * 3 // 2, check=held)
    try:
        checks = [
            asyncio.create_task(checker.check(name, stored(tmp_path, name, big), RULES))
            for name in ("a", "b")
        ]
        await in_thread(started)
        waiting = await asyncio.to_thread(
            checker.budget.wait_until, lambda budget: budget.waiting == 1, WAIT
        )
        assert waiting
        assert len(events) == 1
        assert checker.budget.reserved == need
        finish.set()
        assert await asyncio.gather(*checks) == [None, None]
    finally:
        checker.close()
    first = events[0].removeprefix("start ")
    second = "b" if first == "a" else "a"
    assert events == [f"start {first}", f"end {first}", f"start {second}", f"end {second}"]
    assert checker.budget.reserved == 0


async def test_small_photos_share_the_budget_that_holds_big_ones_back(tmp_path: Path) -> None:
    """The same budget as above lets two baseline decodes of the same size run at once."""
    budget = estimate(jpeg(2000, progressive=True)) * 3 // 2
    both = threading.Barrier(2, timeout=WAIT)

    def meeting(field: str, fp: BinaryIO, size: int, rules: PhotoRules) -> Violation | None:
        both.wait()
        return None

    photo = jpeg(2000, progressive=False)
    checker = PhotoChecker(workers=2, memory_budget=budget, check=meeting)
    try:
        found = await asyncio.gather(
            *(checker.check(n, stored(tmp_path, n, photo), RULES) for n in ("a", "b"))
        )
    finally:
        checker.close()
    assert found == [None, None]


async def test_a_photo_larger_than_the_whole_budget_runs_alone(tmp_path: Path) -> None:
    seen: list[int] = []

    def watched(field: str, fp: BinaryIO, size: int, rules: PhotoRules) -> Violation | None:
        seen.append(checker.budget.reserved)
        return check_jpeg(field, fp, size, rules)

    checker = PhotoChecker(workers=2, memory_budget=2**20, check=watched)
    photo = jpeg(1000, progressive=True)
    assert estimate(photo) > 2**20
    try:
        where = stored(tmp_path, "a", photo)
        found = await checker.check("face_photo", where, PhotoRules(min_bytes=100))
    finally:
        checker.close()
    assert found is None
    assert seen == [2**20]  # the whole budget, no more


async def test_a_check_out_of_memory_is_503_not_a_bad_photo(tmp_path: Path) -> None:
    """The gateway's fault, not the photo's: the device gets 503 to retry, not a 422."""

    def exhausted(field: str, fp: BinaryIO, size: int, rules: PhotoRules) -> Violation | None:
        raise MemoryError

    checker = PhotoChecker(workers=1, check=exhausted)
    try:
        where = stored(tmp_path, "a", jpeg(640, progressive=False))
        with pytest.raises(Refusal) as caught:
            await checker.check("face_photo", where, RULES)
        assert checker.budget.reserved == 0
    finally:
        checker.close()
    assert answered(caught.value).status == 503
    assert answered(caught.value).retry_after


async def test_a_closed_checker_answers_503(tmp_path: Path) -> None:
    checker = PhotoChecker(workers=1)
    checker.close()
    where = stored(tmp_path, "a", jpeg(640, progressive=False))
    with pytest.raises(Refusal) as caught:
        await checker.check("face_photo", where, RULES)
    assert answered(caught.value).status == 503


# ------------------------------------------------------- photos kept in memory


def claims(photo: bytes, width: int, height: int) -> bytes:
    """``photo`` with its frame header (SOF0/1/2) rewritten to claim ``width`` x ``height``."""
    i = 2
    while photo[i + 1] not in (0xC0, 0xC1, 0xC2):
        i += 2 + int.from_bytes(photo[i + 2 : i + 4], "big")
    return photo[: i + 5] + struct.pack(">HH", height, width) + photo[i + 9 :]


HOSTILE = {
    "good": lambda: make_jpeg(),
    "truncated": lambda: make_jpeg()[:60_000],
    "png-named-jpg": lambda: png_photo(),
    "cmyk": lambda: make_jpeg(600, 800, mode="CMYK"),
    "claims-60000-px": lambda: claims(make_jpeg(), 60_000, 60_000),
    "too-few-pixels": lambda: make_jpeg(400, 300, quality=100),
    "trailing-junk": lambda: make_jpeg() + b"\0" * 5000,
}


def png_photo() -> bytes:
    out = io.BytesIO()
    Image.frombytes("RGB", (600, 800), random.Random(3).randbytes(600 * 800 * 3)).save(
        out, format="PNG"
    )
    return out.getvalue()


@pytest.mark.parametrize("method", ["decode", "structure"])
@pytest.mark.parametrize("name", sorted(HOSTILE))
async def test_a_photo_checked_in_memory_gets_the_answer_read_back_gets(
    tmp_path: Path, name: str, method: Method
) -> None:
    """Each hostile fixture, in both modes: the same answer from memory as from the record."""
    photo = HOSTILE[name]()
    checker = PhotoChecker(workers=1)
    try:
        hold = checker.hold(len(photo))
        assert hold is not None
        in_memory = await checker.check("face_photo", bytearray(photo), RULES, method, hold=hold)
        read_back = await checker.check("face_photo", stored(tmp_path, name, photo), RULES, method)
    finally:
        checker.close()
    assert in_memory == read_back
    assert (in_memory is None) is (
        name == "good" or (name == "trailing-junk" and method == "decode")
    )
    assert checker.budget.reserved == checker.budget.held == 0


async def test_a_photo_checked_in_memory_is_never_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check reads the bytes it is given: no record file is opened."""

    def no_read_back(where: RecordWindow) -> None:
        raise AssertionError("read back")

    monkeypatch.setattr(photos, "open_window", no_read_back)
    checker = PhotoChecker(workers=1)
    try:
        assert await checker.check("face_photo", make_jpeg(), RULES) is None
    finally:
        checker.close()


def test_only_a_small_body_keeps_its_photo_in_memory() -> None:
    checker = PhotoChecker(workers=1)
    try:
        assert checker.hold(IN_MEMORY_MAX + 1) is None
        hold = checker.hold(IN_MEMORY_MAX)
        assert hold is not None and checker.budget.held == IN_MEMORY_MAX
        hold.release()
        hold.release()  # idempotent
        assert checker.budget.reserved == checker.budget.held == 0
    finally:
        checker.close()


def test_photos_in_memory_keep_to_half_the_budget() -> None:
    budget = MemoryBudget(100)
    first = budget.try_hold(30)
    assert first is not None
    assert budget.try_hold(21) is None  # 51 of 100: over half
    second = budget.try_hold(20)
    assert second is not None and budget.reserved == budget.held == 50
    first.release()
    second.release()
    assert budget.reserved == budget.held == 0


async def test_photos_in_memory_never_take_room_a_waiting_decode_needs() -> None:
    """While a decode waits in line, a new photo finds no room (it is read back instead)."""
    budget = MemoryBudget(100)
    started, finish = threading.Event(), threading.Event()

    def decode(amount: int, event: threading.Event | None) -> None:
        with budget.reserve(amount):
            if event is not None:
                event.set()
                assert finish.wait(WAIT)

    running = asyncio.create_task(asyncio.to_thread(decode, 60, started))
    await in_thread(started)
    waiting = asyncio.create_task(asyncio.to_thread(decode, 50, None))  # 110 > 100
    assert await asyncio.to_thread(budget.wait_until, lambda b: b.waiting == 1, WAIT)
    assert budget.try_hold(1) is None
    finish.set()
    await asyncio.gather(running, waiting)
    hold = budget.try_hold(1)
    assert hold is not None
    hold.release()


async def test_a_decode_larger_than_what_held_photos_leave_runs_alone_beside_them() -> None:
    """Photos held stay until their own checks are done: a decode never waits for them;
    one that needs more than they leave is cut to what they leave and runs alone."""
    budget = MemoryBudget(100)
    hold = budget.try_hold(40)
    assert hold is not None
    seen: list[int] = []

    def decode() -> None:
        with budget.reserve(1_000):
            seen.append(budget.reserved)

    await asyncio.wait_for(asyncio.to_thread(decode), WAIT)
    assert seen == [100]  # 40 held + the 60 they leave
    hold.release()
    assert budget.reserved == budget.held == 0


async def test_the_room_of_a_photo_in_memory_goes_back_when_its_check_is_done() -> None:
    """Released by the check once it no longer reads the bytes, even when its caller went
    away while it ran."""
    inside, finish = threading.Event(), threading.Event()

    def slow(field: str, fp: BinaryIO, size: int, rules: PhotoRules) -> Violation | None:
        inside.set()
        assert finish.wait(WAIT)
        return None

    checker = PhotoChecker(workers=1, check=slow)
    photo = make_jpeg()
    hold = checker.hold(len(photo))
    assert hold is not None
    try:
        task = asyncio.create_task(checker.check("face_photo", photo, RULES, hold=hold))
        await in_thread(inside)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert hold.handed and checker.budget.held == len(photo)  # the bytes are in use
        finish.set()
        assert await asyncio.to_thread(checker.budget.wait_until, lambda b: b.reserved == 0, WAIT)
    finally:
        finish.set()
        checker.close()
    assert checker.budget.held == 0
