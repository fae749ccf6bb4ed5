"""Runs the JPEG decode check on threads of its own, bounded by cores and by memory.

Pillow releases the GIL while libjpeg decodes, so checks on threads run in parallel
with each other and with the event loop; no worker processes (nor the pickling, pipes
and fork server they cost) are needed.

Where the photo comes from: the photo of a body of at most :data:`IN_MEMORY_MAX` bytes
(a typical photo is 300 KB) is kept in memory as it streams into the record, in room
held from the memory budget (:meth:`PhotoChecker.hold`, taken only when free at once),
and checked from there: nothing is read back. A larger one, or one that found no room,
is read back: the check thread opens the photo's window of the record itself
(:func:`gateway.spool.pending.open_window`) and decrypts it block by block, so a 7 MB
photo never sits in memory whole.

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
  its DCT coefficients), a baseline one a few MB whatever its size. Photos held in
  memory count in the same budget; a decode never waits for them to go (they go only
  once their own check is done): one larger than what they leave runs alone beside them.

A channel with ``photo_check = "structure"`` has its photos checked by
:func:`gateway.channels.jpeg_structure.check_structure` instead: the same threads, no
frame read and no memory reserved (it holds a 64 KiB block or two, not an image).

A check that cannot run is answered 503 with Retry-After (PhotoCheckUnavailable), never
blamed on the photo: the checker is closed (the daemon is stopping), or the check ran
out of memory (MemoryError) despite the budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
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
IN_MEMORY_MAX = 2 * 2**20
"""The largest body whose photo is kept in memory and checked from there (no read-back)."""

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
    """Bytes reserved by the decodes in flight and the photos held in memory; decodes
    are granted first come, first served.

    Thread-safe: a check thread blocks in :meth:`reserve` until its share is free and
    everyone before it is served. Photos held in memory (:meth:`try_hold`) never wait:
    they get room only when it is free at once and no decode waits for it, up to half
    the budget. A decode larger than what they leave of the budget is cut to that: it
    waits until no other decode holds anything, then runs alone (beside the photos held,
    which go once their own checks are done, so it never waits for them).
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.reserved = 0
        """Bytes reserved, the photos held included."""
        self.held = 0
        """Bytes of :attr:`reserved` held by photos kept in memory."""
        self._line: deque[object] = deque()
        self._changed = threading.Condition()

    @property
    def waiting(self) -> int:
        """Reservations waiting for their turn or their room."""
        return len(self._line)

    @contextmanager
    def reserve(self, amount: int) -> Iterator[None]:
        turn = object()
        with self._changed:
            self._line.append(turn)
            self._changed.notify_all()
            try:
                self._changed.wait_for(lambda: self._line[0] is turn and self._fits(amount))
                amount = min(amount, self.total - self.held)
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

    def _fits(self, amount: int) -> bool:
        if amount >= self.total - self.held:  # cut to what is left: no other decode
            return self.reserved == self.held
        return self.reserved + amount <= self.total

    def try_hold(self, amount: int) -> PhotoHold | None:
        """Hold ``amount`` bytes for a photo kept in memory if they are free now, no
        decode waits, and the photos held keep to half the budget; never blocks."""
        with self._changed:
            full = self.reserved + amount > self.total or 2 * (self.held + amount) > self.total
            if self._line or full:
                return None
            self.reserved += amount
            self.held += amount
        return PhotoHold(self, amount)

    def _unhold(self, hold: PhotoHold) -> None:
        with self._changed:
            amount, hold.amount = hold.amount, 0
            self.reserved -= amount
            self.held -= amount
            self._changed.notify_all()

    def wait_until(self, predicate: Callable[[MemoryBudget], bool], timeout: float) -> bool:
        """Block until ``predicate(self)`` holds (tested at every change), or time out."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self), timeout)


class PhotoHold:
    """Room in the budget for one photo kept in memory (see :meth:`PhotoChecker.hold`)."""

    def __init__(self, budget: MemoryBudget, amount: int) -> None:
        self._budget = budget
        self.amount = amount
        """Bytes held (0 once released)."""
        self.handed = False
        """True once a check took the photo: the check releases the room when done."""

    def release(self) -> None:
        """Give the room back; idempotent, from any thread."""
        self._budget._unhold(self)


Photo = RecordWindow | io.BytesIO | bytes | bytearray
"""Where a check reads the photo: its window of the record, or its bytes in memory."""


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

    def hold(self, body_bytes: int) -> PhotoHold | None:
        """Room to keep the photo of a body of at most ``body_bytes`` in memory as it
        streams in; None (the photo is read back from the record) for a body over
        :data:`IN_MEMORY_MAX` or when the budget has no room for it now."""
        if body_bytes > IN_MEMORY_MAX:
            return None
        return self.budget.try_hold(body_bytes)

    def check_located(
        self, field: str, where: Photo, rules: PhotoRules, method: Method = "decode"
    ) -> Violation | None:
        """Open the photo (decrypt its window, or read it from memory), reserve its
        decode's memory, check it (on a pool thread)."""
        opened: AbstractContextManager[BinaryIO]
        if isinstance(where, RecordWindow):
            size, opened = where.length, open_window(where)
        else:
            kept = where if isinstance(where, io.BytesIO) else io.BytesIO(where)
            size = kept.seek(0, io.SEEK_END)
            kept.seek(0)
            opened = contextlib.nullcontext(kept)
        with opened as photo:
            if method == "structure":
                return self._structure(field, photo, size, rules)
            need = decode_estimate(read_frame(photo, size), size, rules)
            with self.budget.reserve(need):
                return self._check(field, photo, size, rules)

    async def check(
        self,
        field: str,
        where: Photo,
        rules: PhotoRules,
        method: Method = "decode",
        *,
        hold: PhotoHold | None = None,
    ) -> Violation | None:
        """Check the photo on a pool thread. ``hold``, the room of a photo in memory, is
        released once the check is done with its bytes (or will never run)."""
        try:
            checked = self._pool.submit(self.check_located, field, where, rules, method)
        except RuntimeError:  # closed: the daemon is stopping
            raise PhotoCheckUnavailable(retry_after=RETRY_AFTER) from None
        if hold is not None:
            hold.handed = True
            checked.add_done_callback(lambda _: hold.release())
        try:
            return await asyncio.wrap_future(checked)
        except MemoryError:
            # The gateway's fault, not the photo's: 503, and the device retries.
            raise PhotoCheckUnavailable(retry_after=RETRY_AFTER) from None

    def close(self) -> None:
        """Stop taking checks; wait for those under way (none reads a record afterwards)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
