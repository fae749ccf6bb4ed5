"""Runs the JPEG decode check in worker processes, off the event loop's GIL.

Pillow holds the GIL while it decodes, so a decode in a thread stalls every request the
event loop is serving. A small process pool (one worker per core by default) decodes
instead. A worker receives only where the photo is (the record's file, its data key and
the photo's byte range) and opens, decrypts and checks it itself: the photo never
crosses a pipe, and at most ``workers`` photos are being decoded at once, which bounds
memory as well as CPU.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import select
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from gateway.channels.photo import PhotoRules, check_jpeg
from gateway.errors import PhotoCheckUnavailable, Violation
from gateway.spool.pending import RecordWindow, open_window


def check_located_photo(field: str, where: RecordWindow, rules: PhotoRules) -> Violation | None:
    """Decrypt the photo's window and decode-check it (runs in a worker process)."""
    with open_window(where) as photo:
        return check_jpeg(field, photo, where.length, rules)


def _exit_with(daemon_pid: int) -> None:
    """Worker initializer: exit as soon as the daemon that owns the pool is gone.

    Workers are children of multiprocessing's fork server, and every worker holds the
    pipes that would otherwise tell them (and the fork server) that the daemon died, so
    a SIGKILLed daemon would leave its decoders behind. A pidfd becomes readable when
    the daemon exits, whatever killed it; a thread waits on it, no polling.
    """
    try:
        pidfd = os.pidfd_open(daemon_pid)
    except ProcessLookupError:
        os._exit(0)
    except (OSError, AttributeError):
        return  # no pidfd on this kernel: rely on the pool's own shutdown

    def wait() -> None:
        select.select([pidfd], [], [])
        os._exit(0)

    threading.Thread(target=wait, name="daemon-watch", daemon=True).start()


class PhotoChecker:
    """A process pool for photo checks; ``inline=True`` checks in this process (tests)."""

    def __init__(self, workers: int | None = None, *, inline: bool = False) -> None:
        self._workers = workers or max(1, min(4, os.cpu_count() or 1))
        self._inline = inline
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["gateway.ingress.photos"])
            self._pool = ProcessPoolExecutor(
                self._workers,
                mp_context=context,
                initializer=_exit_with,
                initargs=(os.getpid(),),
            )
        return self._pool

    def start(self) -> None:
        """Start the workers now rather than on the first photo."""
        if not self._inline:
            self._executor()

    async def check(self, field: str, where: RecordWindow, rules: PhotoRules) -> Violation | None:
        if self._inline:
            return await asyncio.to_thread(check_located_photo, field, where, rules)
        loop = asyncio.get_running_loop()
        pool = self._executor()
        try:
            return await loop.run_in_executor(pool, check_located_photo, field, where, rules)
        except BrokenProcessPool:
            # A worker died (the OOM killer, a decoder crash): the gateway's fault as much
            # as the photo's, so answer 503 and let the device retry on a fresh pool.
            if self._pool is pool:
                self._pool = None
                await asyncio.to_thread(pool.shutdown, wait=False)
            raise PhotoCheckUnavailable(retry_after=5) from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
