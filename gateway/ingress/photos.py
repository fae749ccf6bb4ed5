"""Runs the JPEG decode check on threads of its own, bounded by cores and by memory.

Pillow releases the GIL while libjpeg decodes, so checks on threads run in parallel
with each other and with the event loop; no worker processes (nor the pickling, pipes
and fork server they cost) are needed. A check thread opens the photo's window of the
record itself (:func:`gateway.spool.pending.open_window`), so the photo never sits in
memory whole.

Two bounds:

- cores: at most ``workers`` checks decode at once (default one per core, at most
  :data:`MAX_WORKERS`); more wait in the pool's queue, as they waited for a worker
  process before.
- memory: before decoding, a check reads the photo's frame header
  (:func:`gateway.channels.photo.read_frame`) and reserves :func:`decode_estimate`
  bytes from a :class:`MemoryBudget` shared by every check (:data:`MEMORY_BUDGET`,
  512 MiB, unless ``memory_budget`` says otherwise), first come, first served. A photo
  whose estimate exceeds the whole budget waits until nothing else is reserved, then
  runs alone. A progressive 6000×6000 px photo holds 100–220 MB while it decodes (all
  its DCT coefficients), a baseline one a few MB whatever its size.

A channel with ``photo_check = "structure"`` has its photos checked by
:func:`gateway.channels.jpeg_structure.check_structure` instead: the same threads, no
frame read and no memory reserved (it holds a 64 KiB block or two, not an image).

A check that cannot run is answered 503 with Retry-After (PhotoCheckUnavailable), never
blamed on the photo: the checker is closed (the daemon is stopping), or the check ran
out of memory (MemoryError) despite the budget.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import BinaryIO, Literal

from gateway.channels.jpeg_structure import check_structure
from gateway.channels.photo import JpegFrame, PhotoRules, check_jpeg, read_frame
from gateway.errors import PhotoCheckUnavailable, Violation
from gateway.spool.pending import RecordWindow, open_window

MAX_WORKERS = 4
"""Checks decoding at once, at most (default: one per core up to this)."""
MEMORY_BUDGET = 512 * 2**20
"""Bytes that the decodes in flight may hold together, by :func:`decode_estimate`."""
DECODE_FLOOR = 8 * 2**20
"""What any decode holds beyond its pixels: libjpeg's tables and MCU-row buffers, Pillow's
64 KiB read blocks, the decrypting reader's segment buffers (measured: about 4 MB for a
6000×6000 px baseline photo, its pixels included)."""
RETRY_AFTER = 5

Check = Callable[[str, BinaryIO, int, PhotoRules], Violation | None]
"""check_jpeg's shape: field, photo, its size, the rules; a Violation or None."""
Method = Literal["decode", "structure"]
"""A channel's ``photo_check``: which check its photos get."""


def decode_estimate(frame: JpegFrame | None, size: int, rules: PhotoRules) -> int:
    """Bytes a check of a photo of ``size`` bytes with ``frame`` may hold while it runs.

    :data:`DECODE_FLOOR`, plus twice the photo's size (Pillow keeps every APPn and COM
    segment's bytes, and joins the ICC profile's chunks once more), plus the output at
    1/8 scale (4 bytes a pixel, as Pillow stores RGB; every pixel for a lossless frame,
    which cannot be scaled), plus, when the decoder buffers the whole image (progressive
    and the like), 128 bytes for each 8×8 block of coefficients: 2 bytes a sample, 216 MB
    for a 6000×6000 px 4:4:4 photo, 108 MB at 4:2:0 (the decode was measured at 107 MB).

    A size or a side beyond the rules: the floor (and the metadata), since the check
    refuses such a photo before reading it or from its header, before decoding. No
    frame found (the check will refuse the photo, or Pillow reads it differently): the
    largest photo the rules let through to the decode, progressive, 4 components.
    """
    if not rules.min_bytes <= size <= rules.max_bytes:
        return DECODE_FLOOR
    fixed = DECODE_FLOOR + 2 * size
    if frame is None:
        side = rules.max_side
        blocks = 4 * (-(-side // 8)) ** 2
        return fixed + blocks * 128 + (side // 8 + 1) ** 2 * 4
    if max(frame.width, frame.height) > rules.max_side:
        return fixed
    if frame.lossless:
        output = frame.width * frame.height * 4
    else:
        output = (frame.width // 8 + 1) * (frame.height // 8 + 1) * 4
    return fixed + output + (frame.blocks * 128 if frame.whole_image else 0)


class MemoryBudget:
    """Bytes reserved by the decodes in flight, granted first come, first served.

    Thread-safe: a check thread blocks in :meth:`reserve` until its share is free and
    everyone before it is served. A reservation larger than the whole budget is cut to
    the budget: it waits until nothing else is reserved, then runs alone.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.reserved = 0
        self._line: deque[object] = deque()
        self._changed = threading.Condition()

    @property
    def waiting(self) -> int:
        """Reservations waiting for their turn or their room."""
        return len(self._line)

    @contextmanager
    def reserve(self, amount: int) -> Iterator[None]:
        amount = min(amount, self.total)
        turn = object()
        with self._changed:
            self._line.append(turn)
            self._changed.notify_all()
            try:
                self._changed.wait_for(
                    lambda: self._line[0] is turn and self.reserved + amount <= self.total
                )
                self.reserved += amount
            finally:
                self._line.remove(turn)
                self._changed.notify_all()  # the next in line may fit as well
        try:
            yield
        finally:
            with self._changed:
                self.reserved -= amount
                self._changed.notify_all()

    def wait_until(self, predicate: Callable[[MemoryBudget], bool], timeout: float) -> bool:
        """Block until ``predicate(self)`` holds (tested at every change), or time out."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self), timeout)


class PhotoChecker:
    """Photo checks on ``workers`` threads within a shared ``memory_budget``.

    ``check`` is the decode check itself (:func:`check_jpeg`; tests put an instrumented
    one in its place), ``structure`` the structure check (:func:`check_structure`).
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        memory_budget: int = MEMORY_BUDGET,
        check: Check = check_jpeg,
        structure: Check = check_structure,
    ) -> None:
        self.workers = workers or max(1, min(MAX_WORKERS, os.cpu_count() or 1))
        self.budget = MemoryBudget(memory_budget)
        self._check = check
        self._structure = structure
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="photo-check")

    def check_located(
        self, field: str, where: RecordWindow, rules: PhotoRules, method: Method = "decode"
    ) -> Violation | None:
        """Decrypt the photo's window, reserve its decode's memory, check it (a pool thread)."""
        with open_window(where) as photo:
            if method == "structure":
                return self._structure(field, photo, where.length, rules)
            need = decode_estimate(read_frame(photo, where.length), where.length, rules)
            with self.budget.reserve(need):
                return self._check(field, photo, where.length, rules)

    async def check(
        self, field: str, where: RecordWindow, rules: PhotoRules, method: Method = "decode"
    ) -> Violation | None:
        loop = asyncio.get_running_loop()
        try:
            checked = loop.run_in_executor(
                self._pool, self.check_located, field, where, rules, method
            )
        except RuntimeError:  # closed: the daemon is stopping
            raise PhotoCheckUnavailable(retry_after=RETRY_AFTER) from None
        try:
            return await checked
        except MemoryError:
            # The gateway's fault, not the photo's: 503, and the device retries.
            raise PhotoCheckUnavailable(retry_after=RETRY_AFTER) from None

    def close(self) -> None:
        """Stop taking checks; wait for those under way (none reads a record afterwards)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
