"""The structure check (photo_check = "structure") against the decode check: every
hostile photo the decode check refuses is refused by both, with the same rule; good
photos pass both. Then faults only the structure check looks for."""

from __future__ import annotations

import io
import random
import struct
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, cast

import pytest
from PIL import Image

from gateway.channels.jpeg_structure import TRAILING_LIMIT, check_structure
from gateway.channels.photo import PhotoRules, check_jpeg
from gateway.crypto.envelope import KEY_SIZE
from gateway.errors import Violation
from gateway.ingress.photos import PhotoChecker
from gateway.spool.pending import PendingRecord
from gateway.testing.samples import make_jpeg, photo_of_size

Check = Callable[[str, BinaryIO, int, PhotoRules], Violation | None]
CHECKS = pytest.mark.parametrize(
    "check", [check_jpeg, check_structure], ids=["decode", "structure"]
)
_BANDS = {"RGB": 3, "L": 1, "CMYK": 4}


def noise_jpeg(width: int, height: int, mode: str = "RGB", seed: int = 1, **opts: object) -> bytes:
    data = random.Random(seed).randbytes(width * height * _BANDS[mode])
    out = io.BytesIO()
    Image.frombytes(mode, (width, height), data).save(out, "JPEG", quality=95, **opts)
    return out.getvalue()


def flat_jpeg(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("L", (width, height), 128).save(out, "JPEG", quality=95)
    return out.getvalue()


def resaved(data: bytes, **opts: object) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).save(out, "JPEG", quality=90, **opts)
    return out.getvalue()


def other_format(fmt: str) -> bytes:
    out = io.BytesIO()
    Image.frombytes("RGB", (480, 480), random.Random(2).randbytes(480 * 480 * 3)).save(out, fmt)
    return out.getvalue()


def segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each marker segment up to the first scan's header."""
    found, i = [], 2
    while True:
        marker = data[i + 1]
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        found.append((marker, i, i + 2 + length))
        if marker == 0xDA:
            return found
        i += 2 + length


def patch_sof(data: bytes, width: int, height: int) -> bytes:
    _, start, _ = next(s for s in segments(data) if s[0] in (0xC0, 0xC1, 0xC2))
    return data[: start + 5] + struct.pack(">HH", height, width) + data[start + 9 :]


def without(data: bytes, marker: int) -> bytes:
    out = data
    for m, start, end in reversed(segments(data)):
        if m == marker:
            out = out[:start] + out[end:]
    return out


def corrupt_middle(data: bytes, round_: int) -> bytes:
    """As test_photo's: one Random(3), 2000 bytes over the middle, a round at a time."""
    rng = random.Random(3)
    noise = [rng.randbytes(2000) for _ in range(round_ + 1)][round_]
    middle = len(data) // 2
    return data[:middle] + noise + data[middle + 2000 :]


def marker_in_scan(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + b"\xff\xc0" + data[middle + 2 :]


def run(check: Check, data: bytes, rules: PhotoRules | None = None) -> str | None:
    violation = check("face_photo", io.BytesIO(data), len(data), rules or PhotoRules())
    if violation is None:
        return None
    assert violation.field == "face_photo" and violation.message
    return violation.rule


RGB = noise_jpeg(480, 480)
HOSTILE: dict[str, tuple[Callable[[], bytes], str]] = {
    "truncated-70%": (lambda: RGB[: int(len(RGB) * 0.7)], "decode"),
    "truncated-e2e": (lambda: make_jpeg()[:60_000], "decode"),
    "corrupt-middle-0": (lambda: corrupt_middle(RGB, 0), "decode"),
    "corrupt-middle-1": (lambda: corrupt_middle(RGB, 1), "decode"),
    "corrupt-middle-2": (lambda: corrupt_middle(RGB, 2), "decode"),
    "sof-in-scan": (lambda: marker_in_scan(RGB), "decode"),
    "png": (lambda: other_format("PNG"), "format"),
    "gif": (lambda: other_format("GIF"), "format"),
    "bmp": (lambda: other_format("BMP"), "format"),
    "tiff": (lambda: other_format("TIFF"), "format"),
    "webp": (lambda: other_format("WEBP"), "format"),
    "pdf": (lambda: b"%PDF-1.7\n" + bytes(30_000), "format"),
    "cmyk": (lambda: noise_jpeg(480, 480, "CMYK"), "color_mode"),
    "cmyk-e2e": (lambda: make_jpeg(600, 800, mode="CMYK"), "color_mode"),
    "side-479": (lambda: noise_jpeg(479, 480), "dimensions"),
    "side-6001": (lambda: flat_jpeg(6001, 480), "dimensions"),
    "few-pixels-e2e": (lambda: make_jpeg(400, 300, quality=100), "dimensions"),
    "too-small": (lambda: flat_jpeg(480, 480), "size"),
    "text-as-jpeg": (lambda: b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\xff\xd9", "size"),
    **{
        f"claims-{w}x{h}": ((lambda w=w, h=h: patch_sof(RGB, w, h)), "dimensions")
        for w, h in [(60000, 60000), (65535, 65535), (10000, 10000), (7000, 7000), (1, 65535)]
    },
}
GOOD: dict[str, Callable[[], bytes]] = {
    "rgb-480": lambda: RGB,
    "grey": lambda: noise_jpeg(480, 640, "L"),
    "side-6000": lambda: flat_jpeg(6000, 480),
    "progressive": lambda: noise_jpeg(600, 600, progressive=True),
    "optimized": lambda: resaved(make_jpeg(900, 900), optimize=True, subsampling=2),
    "444": lambda: resaved(make_jpeg(900, 900), subsampling=0),
    "progressive-420": lambda: resaved(make_jpeg(900, 900), progressive=True, subsampling=2),
    "sample-300k": lambda: photo_of_size(300_000),
    "e2e-sample": lambda: make_jpeg(),
}


@CHECKS
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_both_checks_refuse_every_hostile_photo_alike(check: Check, name: str) -> None:
    make, rule = HOSTILE[name]
    assert run(check, make()) == rule


@CHECKS
@pytest.mark.parametrize("name", sorted(GOOD))
def test_both_checks_accept_the_good_photos(check: Check, name: str) -> None:
    assert run(check, GOOD[name]()) is None


@CHECKS
def test_rules_for_modes_and_sizes_are_the_same(check: Check) -> None:
    assert run(check, noise_jpeg(480, 480, "L"), PhotoRules(modes=frozenset({"RGB"}))) == (
        "color_mode"
    )
    n = len(RGB)
    assert run(check, RGB, PhotoRules(min_bytes=n, max_bytes=n)) is None
    assert run(check, RGB, PhotoRules(max_bytes=n - 1)) == "size"


@CHECKS
def test_same_violation_objects(check: Check) -> None:
    bad = RGB[:30_000]
    assert check("face_photo", io.BytesIO(bad), len(bad), PhotoRules()) == check_jpeg(
        "face_photo", io.BytesIO(bad), len(bad)
    )


# --- faults only the structure check looks for -------------------------------------


def structure(data: bytes) -> str | None:
    return run(check_structure, data)


def test_missing_eoi_is_refused() -> None:
    assert RGB.endswith(b"\xff\xd9")
    assert structure(RGB[:-2]) == "decode"


def test_trailing_bytes_up_to_the_limit_only() -> None:
    assert structure(RGB + b"\0" * TRAILING_LIMIT) is None
    assert structure(RGB + b"\0" * (TRAILING_LIMIT + 1)) == "decode"
    assert structure(RGB + RGB) == "decode"  # a second image appended


def test_a_scan_without_huffman_tables_is_refused() -> None:
    assert structure(without(RGB, 0xC4)) == "decode"
    assert structure(without(RGB, 0xDB)) == "decode"  # nor quantisation tables


def test_a_truncated_scan_is_refused() -> None:
    cut = RGB[: len(RGB) - 1000]
    assert structure(cut) == "decode"  # the scan runs to the end of the file
    assert structure(cut + b"\xff\x37") == "decode"  # ends in no marker a scan may end in
    scan_start = segments(RGB)[-1][2]
    empty = RGB[:scan_start] + b"\xff\xd9"
    assert run(check_structure, empty, PhotoRules(min_bytes=100)) == "decode"


def test_framing_faults_are_refused() -> None:
    sof = next(s for s in segments(RGB) if s[0] == 0xC0)
    second_frame = RGB[: sof[2]] + RGB[sof[1] : sof[2]] + RGB[sof[2] :]
    assert structure(second_frame) == "decode"
    assert structure(RGB[:2] + b"junk" + RGB[2:]) == "format"
    assert structure(RGB[: sof[1]] + b"junk" + RGB[sof[1] :]) == "decode"
    assert structure(RGB[: sof[1]] + b"\xff\xff\xff" + RGB[sof[1] :]) is None  # fill bytes
    bad_length = bytearray(RGB)
    bad_length[sof[1] + 2 : sof[1] + 4] = b"\x00\x01"
    assert structure(bytes(bad_length)) == "decode"
    sos = segments(RGB)[-1]
    unknown = bytearray(RGB)
    unknown[sos[1] + 5] = 9  # the first scan component's id: not in the frame
    assert structure(bytes(unknown)) == "decode"
    twelve_bit = bytearray(RGB)
    twelve_bit[sof[1] + 4] = 12
    assert structure(bytes(twelve_bit)) == "decode"
    lossless = bytearray(RGB)
    lossless[sof[1] + 1] = 0xC3
    assert structure(bytes(lossless)) == "decode"


class Reads:
    def __init__(self, data: bytes, fail_after: int | None = None) -> None:
        self._buf = io.BytesIO(data)
        self.reads: list[int] = []
        self._fail_after = fail_after

    def read(self, n: int = -1) -> bytes:
        if self._fail_after is not None and self._buf.tell() > self._fail_after:
            raise OSError("disk on fire")
        chunk = self._buf.read(n)
        self.reads.append(len(chunk))
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._buf.seek(offset, whence)

    def tell(self) -> int:
        return self._buf.tell()


def test_reads_in_blocks_and_reader_failures_propagate() -> None:
    fp = Reads(RGB)
    assert check_structure("face_photo", cast(BinaryIO, fp), len(RGB)) is None
    assert sum(fp.reads) == len(RGB) and max(fp.reads) <= 65536
    with pytest.raises(OSError, match="disk on fire"):
        check_structure("face_photo", cast(BinaryIO, Reads(RGB, 100)), len(RGB))


def test_only_size_bytes_are_read() -> None:
    fp = io.BytesIO(RGB + b"\0" * 10_000)
    assert check_structure("face_photo", fp, len(RGB)) is None


async def test_the_checker_runs_the_structure_check_without_a_reservation(
    tmp_path: Path,
) -> None:
    pending = PendingRecord("a", tmp_path / "a", bytes(range(KEY_SIZE)))
    pending.write(RGB[:-2])
    pending.finish()
    pending.sync_and_close()
    where = pending.location(0, len(RGB) - 2)
    decoded: list[int] = []

    def decode(field: str, fp: BinaryIO, size: int, rules: PhotoRules) -> Violation | None:
        decoded.append(size)
        return None

    checker = PhotoChecker(workers=1, memory_budget=1, check=decode)
    try:
        violation = await checker.check("face_photo", where, PhotoRules(), "structure")
        assert violation is not None and violation.rule == "decode"
        assert decoded == []
        assert await checker.check("face_photo", where, PhotoRules()) is None
        assert decoded == [len(RGB) - 2]
    finally:
        checker.close()
