"""The photo check in worker processes: a dead worker is a 503 to retry, not a bad photo."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from gateway.channels.photo import PhotoRules
from gateway.errors import Refusal
from gateway.ingress.photos import PhotoChecker
from gateway.ingress.problems import answered
from gateway.spool.pending import RecordWindow


async def test_a_dead_photo_worker_is_503_not_a_bad_photo(tmp_path: Path) -> None:
    """When the decoder process dies mid-check the device gets 503 to retry, not a 422."""
    fifo = tmp_path / "blocks-on-open"
    os.mkfifo(fifo)  # the worker waits in open() until we kill it
    checker = PhotoChecker(workers=1)
    try:
        where = RecordWindow(fifo, b"k" * 32, b"", 0, 0, 0)
        check = asyncio.create_task(checker.check("face_photo", where, PhotoRules()))
        await asyncio.sleep(0)  # let the check reach the pool
        pool = checker._executor()
        assert pool._processes  # spawned by the check's submission
        for pid in list(pool._processes):
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(Refusal) as caught:
            await check
        assert answered(caught.value).status == 503
        assert answered(caught.value).retry_after
    finally:
        checker.close()
