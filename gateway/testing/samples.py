"""Sample data for the sandbox: photos, a realistic submission per channel (fictional
people), and the multipart bodies that carry them.

Shared by the tests, the demo and the bench; nothing here opens a socket or a file.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Mapping
from functools import lru_cache

import aiohttp
from PIL import Image


@lru_cache(maxsize=16)
def make_jpeg(
    width: int = 600,
    height: int = 800,
    *,
    mode: str = "RGB",
    quality: int = 85,
    seed: int = 1,
    noise: float = 1.0,
) -> bytes:
    """A JPEG of the given size: noise blended into a gradient so it compresses like a photo."""
    rng = random.Random(seed)  # noqa: S311 - test data, not secrets
    bands = len(mode)
    base = Image.linear_gradient("L").resize((width, height))
    if mode != "L":
        base = Image.merge(mode, [base] * bands)
    noisy = Image.frombytes(mode, (width, height), rng.randbytes(width * height * bands))
    image = Image.blend(base, noisy, noise) if noise < 1.0 else noisy
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def photo_of_size(target_bytes: int) -> bytes:
    """A valid face photo of roughly ``target_bytes`` (for the bench)."""
    side = 480
    while True:
        data = make_jpeg(side, side * 4 // 3, quality=85)
        if len(data) >= target_bytes * 0.9 or side >= 6000:
            return data
        side = int(side * (target_bytes / len(data)) ** 0.5) + 16


APPLICATION_ID = "12345678901234567890123"
INDIVIDUAL_NUMBER = "983205673214"


def sample_submission(channel: str) -> tuple[dict[str, str], dict[str, bytes]]:
    """Realistic valid fields and files for each of the six channels (fictional people)."""
    photo = make_jpeg()
    common = {
        "application_id": APPLICATION_ID,
        "wants_e_certificate": "true",
        "wants_braille": "false",
    }
    pins = {
        "pin_signature_cert": "ABC12345",
        "pin_user_cert": "1234",
        "pin_resident_registry": "5678",
        "pin_card_info_input": "9012",
    }
    window = {  # items of 交付窓口受付業務 (fictional person and address)
        "name": "新宿 花子",
        "birth_date": "1985-04-01",
        "address": "東京都新宿区架空町1-2-3",
        "manufacture_control_number": "M-0000123456",
        "shipment_number": "S-2026-004567",
        "reservation_number": "R-2026-000123",
        "recipient_type": "self",
        "reservation_datetime": "2026-12-01T10:30:00+09:00",
        "issuance_window": "本庁舎1階 3番窓口",
        "reception_number": "U-0042",
    }
    reservation = {  # items of 予約電話受付業務
        **window,
        "application_id": APPLICATION_ID,
        "processing_status": "reserved",
        "card_expiry_date": "2036-04-01",
        "phone": "03-5555-0123",
        "email": "hanako@example.jp",
    }
    if channel == "online-application":
        return common, {"face_photo": photo}
    if channel == "express-issuance":
        return {**common, **pins}, {"face_photo": photo}
    if channel == "overseas-application":
        return (
            {
                **common,
                **pins,
                "name": "新宿 太郎",
                "name_kana": "シンジュク タロウ",
                "birth_date": "1990-01-31",
                "sex": "1",
                "registered_domicile": "東京都新宿区",
            },
            {"face_photo": photo},
        )
    if channel == "card-delegation-batch":
        batch = random.Random(7).randbytes(50_000)  # noqa: S311 - an opaque test file
        return (
            {
                "batch_id": "B-20261122-01",
                "record_count": "42",
                "sha256": hashlib.sha256(batch).hexdigest(),
            },
            {"batch_file": batch},
        )
    if channel == "issuance-reservation":
        return reservation, {}
    if channel == "window-reception":
        return {**window, "individual_number": INDIVIDUAL_NUMBER}, {}
    raise KeyError(channel)


def multipart_body(fields: Mapping[str, str], files: Mapping[str, bytes]) -> tuple[bytes, str]:
    """A finished multipart/form-data body and its Content-Type, built once for reuse."""
    boundary = "bench" + hashlib.sha256(repr(sorted(fields.items())).encode()).hexdigest()[:24]
    parts = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value.encode()
            + b"\r\n"
        )
    for name, data in files.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{name}.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'.encode()
            + data
            + b"\r\n"
        )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def encode_form(fields: Mapping[str, str], files: Mapping[str, bytes]) -> aiohttp.FormData:
    form = aiohttp.FormData(quote_fields=False, default_to_multipart=True)
    for name, value in fields.items():
        form.add_field(name, value)
    for name, data in files.items():
        media = "image/jpeg" if name == "face_photo" else "application/octet-stream"
        form.add_field(name, data, filename=f"{name}.bin", content_type=media)
    return form
