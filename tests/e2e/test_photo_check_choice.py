"""A channel set to ``photo_check = "structure"`` checks its photos by their JPEG
structure through the whole ingress: a good photo is accepted, a PNG named .jpg and a
truncated photo are refused with the same problem the decode check gives."""

from __future__ import annotations

import io
import os
from pathlib import Path

from conftest import start_gateway
from PIL import Image

from gateway.testing.samples import sample_submission
from gateway.testing.sandbox import build_sandbox

CHANNEL = "online-application"


def png() -> bytes:
    out = io.BytesIO()
    Image.frombytes("RGB", (150, 150), os.urandom(150 * 150 * 3)).save(out, format="PNG")
    return out.getvalue()


async def test_a_structure_checked_channel_accepts_good_photos_and_refuses_bad_ones(
    tmp_path: Path,
) -> None:
    box = await build_sandbox(tmp_path, overrides={f"channels.{CHANNEL}.photo_check": "structure"})
    assert box.config is not None and box.config.channels[CHANNEL].photo_check == "structure"
    fields, files = sample_submission(CHANNEL)
    running = await start_gateway(box)
    try:
        async with running.client("tablet-01") as client:
            assert (await client.submit(CHANNEL, fields, files)).status == 202
            for bad, rule in ((png(), "format"), (files["face_photo"][:-5000], "decode")):
                reply = await client.submit(CHANNEL, fields, {"face_photo": bad})
                assert reply.status == 422, reply.body
                rules = {(v["field"], v["rule"]) for v in reply.body["violations"]}
                assert ("face_photo", rule) in rules, reply.body
            # What tells the two checks apart: 5 KB after the end of the image, which a
            # decode ignores and the structure check refuses (more than 4 KiB trailing).
            trailing = {"face_photo": files["face_photo"] + b"\0" * 5000}
            assert (await client.submit(CHANNEL, fields, trailing)).status == 422
            other_fields, other_files = sample_submission("express-issuance")
            padded = {"face_photo": other_files["face_photo"] + b"\0" * 5000}
            decoded = await client.submit("express-issuance", other_fields, padded)
            assert decoded.status == 202  # a channel left on decode ignores what trails
    finally:
        await running.shutdown()
        await box.stop_simulators()
