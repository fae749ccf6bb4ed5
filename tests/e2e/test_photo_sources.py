"""Where the ingress's photo check reads the photo: a body of at most 2 MiB keeps its photo
in memory as it streams into the record and is checked from there (nothing read back);
a larger one is read back from the record, so a 7 MB upload never sits in memory whole.
Either way a bad photo gets the same refusal, and the room held in the photo budget goes
back."""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from conftest import start_gateway

from gateway.channels.photo import PhotoRules
from gateway.errors import Violation
from gateway.ingress import photos
from gateway.ingress.photos import IN_MEMORY_MAX, Photo, PhotoChecker, PhotoHold
from gateway.spool.pending import RecordWindow
from gateway.testing.client import DeviceClient, Reply
from gateway.testing.samples import encode_form, photo_of_size, sample_submission
from gateway.testing.sandbox import build_sandbox

CHANNEL = "online-application"


class Seen:
    """What the checks read from, and the checker the daemon uses."""

    def __init__(self) -> None:
        self.sources: Counter[str] = Counter()
        self.checkers: set[PhotoChecker] = set()

    def held(self) -> int:
        return sum(checker.budget.reserved for checker in self.checkers)


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> Iterator[Seen]:
    seen = Seen()
    real_hold, real_check = PhotoChecker.hold, PhotoChecker.check_located
    real_open = photos.open_window

    def hold(self: PhotoChecker, body_bytes: int) -> PhotoHold | None:
        seen.checkers.add(self)
        return real_hold(self, body_bytes)

    def check_located(
        self: PhotoChecker, field: str, where: Photo, rules: PhotoRules, method: Any = "decode"
    ) -> Violation | None:
        seen.sources["record" if isinstance(where, RecordWindow) else "memory"] += 1
        return real_check(self, field, where, rules, method)

    def open_window(where: RecordWindow) -> AbstractContextManager[BinaryIO]:
        seen.sources["read back"] += 1
        return real_open(where)

    monkeypatch.setattr(PhotoChecker, "hold", hold)
    monkeypatch.setattr(PhotoChecker, "check_located", check_located)
    monkeypatch.setattr(photos, "open_window", open_window)
    yield seen


async def submit(client: DeviceClient, fields: dict[str, str], photo: bytes) -> Reply:
    """A submission with ``photo``, streamed from a file object (aiohttp warns about
    bodies of over 1 MiB given as bytes)."""
    form = encode_form(fields, {})
    form.add_field("face_photo", io.BytesIO(photo), filename="p.jpg", content_type="image/jpeg")
    return await client.submit(CHANNEL, fields, data=form)


async def test_small_photos_are_checked_from_memory_and_big_ones_read_back(
    tmp_path: Path, seen: Seen
) -> None:
    box = await build_sandbox(tmp_path)
    fields, files = sample_submission(CHANNEL)
    big = photo_of_size(2_600_000)
    assert len(big) > IN_MEMORY_MAX
    running = await start_gateway(box)
    try:
        async with running.client("tablet-01") as client:
            assert (await submit(client, fields, files["face_photo"])).status == 202
            assert seen.sources == {"memory": 1}
            assert (await submit(client, fields, big)).status == 202
            assert seen.sources == {"memory": 1, "record": 1, "read back": 1}
            for photo in (files["face_photo"], big):
                reply = await submit(client, fields, photo[:-5000])  # truncated
                assert reply.status == 422, reply.body
                rules = {(v["field"], v["rule"]) for v in reply.body["violations"]}
                assert ("face_photo", "decode") in rules, reply.body
            assert seen.sources == {"memory": 2, "record": 2, "read back": 2}
            assert seen.checkers and seen.held() == 0  # every hold went back
    finally:
        await running.shutdown()
        await box.stop_simulators()
