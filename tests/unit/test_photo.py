"""Face photo check: size, JPEG only, dimensions, colour mode, full decode, bombs refused."""

from __future__ import annotations

import io
import random
import struct
import warnings
from typing import BinaryIO, cast

import pytest
from PIL import Image, ImageFile

from gateway.channels.photo import JpegFrame, PhotoRules, check_jpeg, read_frame

_BANDS = {"RGB": 3, "L": 1, "CMYK": 4}


def noise_jpeg(width: int, height: int, mode: str = "RGB", seed: int = 1) -> bytes:
    """Random noise at quality 95: large files from small images."""
    data = random.Random(seed).randbytes(width * height * _BANDS[mode])
    out = io.BytesIO()
    Image.frombytes(mode, (width, height), data).save(out, "JPEG", quality=95)
    return out.getvalue()


def flat_jpeg(width: int, height: int, mode: str = "L") -> bytes:
    """A flat image: cheap to encode and decode even at 6000 px."""
    out = io.BytesIO()
    Image.new(mode, (width, height), 128).save(out, "JPEG", quality=95)
    return out.getvalue()


def patch_sof(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the frame header (SOFn) so it claims ``width`` x ``height``."""
    assert data[:2] == b"\xff\xd8"
    i = 2
    while True:
        assert data[i] == 0xFF
        marker = data[i + 1]
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in (0xC0, 0xC1, 0xC2):
            patched = bytearray(data)
            patched[i + 5 : i + 9] = struct.pack(">HH", height, width)
            return bytes(patched)
        i += 2 + length


def run(data: bytes, rules: PhotoRules | None = None, size: int | None = None) -> str | None:
    """check_jpeg over a BytesIO; the rule id of the violation, or None."""
    size = len(data) if size is None else size
    if rules is None:
        violation = check_jpeg("face_photo", io.BytesIO(data), size)
    else:
        violation = check_jpeg("face_photo", io.BytesIO(data), size, rules)
    if violation is None:
        return None
    assert violation.field == "face_photo"
    assert violation.message
    return violation.rule


@pytest.fixture(scope="module")
def rgb480() -> bytes:
    data = noise_jpeg(480, 480, "RGB")
    assert 20_000 < len(data) < 7_000_000
    return data


class ReadSeekTell:
    """A file object with read, seek and tell only (no fileno, no getbuffer)."""

    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)
        self.reads: list[int] = []

    def read(self, n: int = -1) -> bytes:
        chunk = self._buf.read(n)
        self.reads.append(len(chunk))
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._buf.seek(offset, whence)

    def tell(self) -> int:
        return self._buf.tell()


class FailingReader(ReadSeekTell):
    """Reads fail with an I/O error after the first few bytes."""

    def read(self, n: int = -1) -> bytes:
        if self.tell() > 100:
            raise OSError("disk on fire")
        return super().read(n)


class MustNotRead:
    """Any access fails the test: proves a check happened before reading."""

    def read(self, n: int = -1) -> bytes:
        raise AssertionError("fp must not be read")

    def seek(self, offset: int, whence: int = 0) -> int:
        raise AssertionError("fp must not be read")

    def tell(self) -> int:
        raise AssertionError("fp must not be read")


def test_valid_rgb_jpeg_is_accepted(rgb480: bytes) -> None:
    """A 480x480 RGB JPEG of a few hundred KB passes."""
    assert run(rgb480) is None


def test_valid_greyscale_jpeg_is_accepted() -> None:
    """A greyscale (mode L) JPEG passes."""
    assert run(noise_jpeg(480, 640, "L")) is None


@pytest.mark.parametrize(("width", "height"), [(6000, 480), (480, 6000)])
def test_largest_side_is_accepted(width: int, height: int) -> None:
    """A side of exactly 6000 px passes (decoded at 1/8 scale)."""
    data = flat_jpeg(width, height)
    assert len(data) > 20_000
    assert run(data) is None


@pytest.mark.parametrize(("width", "height"), [(479, 480), (480, 479), (479, 479)])
def test_side_below_480_is_refused(width: int, height: int) -> None:
    """A side of 479 px is refused by rule dimensions."""
    assert run(noise_jpeg(width, height)) == "dimensions"


@pytest.mark.parametrize(("width", "height"), [(6001, 480), (480, 6001)])
def test_side_above_6000_is_refused(width: int, height: int) -> None:
    """A side of 6001 px is refused by rule dimensions."""
    data = flat_jpeg(width, height)
    assert len(data) > 20_000
    assert run(data) == "dimensions"


def test_cmyk_is_refused() -> None:
    """A CMYK JPEG is refused by rule color_mode."""
    assert run(noise_jpeg(480, 480, "CMYK")) == "color_mode"


def test_modes_come_from_rules() -> None:
    """A greyscale JPEG is refused when the rules allow RGB only."""
    rules = PhotoRules(modes=frozenset({"RGB"}))
    assert run(noise_jpeg(480, 480, "L"), rules) == "color_mode"


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP", "TIFF", "WEBP"])
def test_other_image_formats_are_refused(fmt: str) -> None:
    """PNG, GIF, BMP, TIFF and WebP images are refused by rule format."""
    out = io.BytesIO()
    data = random.Random(2).randbytes(480 * 480 * 3)
    Image.frombytes("RGB", (480, 480), data).save(out, fmt)
    assert len(out.getvalue()) > 20_000
    assert run(out.getvalue()) == "format"


def test_non_image_bytes_are_refused() -> None:
    """Arbitrary bytes are refused by rule format."""
    assert run(b"%PDF-1.7\n" + bytes(30_000)) == "format"


def test_too_few_bytes_are_refused_before_reading() -> None:
    """Fewer than 20,000 bytes is refused by rule size without reading fp."""
    fp = cast(BinaryIO, MustNotRead())
    violation = check_jpeg("face_photo", fp, 19_999)
    assert violation is not None and violation.rule == "size"
    small = flat_jpeg(480, 480)
    assert len(small) < 20_000
    assert run(small) == "size"


def test_too_many_bytes_are_refused_before_reading() -> None:
    """More than 7,000,000 bytes is refused by rule size without reading fp."""
    fp = cast(BinaryIO, MustNotRead())
    violation = check_jpeg("face_photo", fp, 7_000_001)
    assert violation is not None and violation.rule == "size"
    assert "20000" in violation.message and "7000000" in violation.message


def test_size_bounds_are_inclusive(rgb480: bytes) -> None:
    """Exactly min_bytes and exactly max_bytes are within bounds."""
    n = len(rgb480)
    assert run(rgb480, PhotoRules(min_bytes=n, max_bytes=n)) is None
    assert run(rgb480, PhotoRules(min_bytes=n + 1)) == "size"
    assert run(rgb480, PhotoRules(max_bytes=n - 1)) == "size"


def test_truncated_jpeg_is_refused(rgb480: bytes) -> None:
    """A JPEG missing its last 30% is refused by rule decode."""
    truncated = rgb480[: int(len(rgb480) * 0.7)]
    assert run(truncated) == "decode"


def test_only_size_bytes_are_read(rgb480: bytes) -> None:
    """Bytes of fp past ``size`` are never used: a short ``size`` means a truncated photo."""
    assert run(rgb480, size=int(len(rgb480) * 0.7)) == "decode"


def test_truncated_images_flag_is_not_relied_on(
    rgb480: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With Pillow's LOAD_TRUNCATED_IMAGES switched on, the check refuses to run at all."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError):
        run(rgb480[: int(len(rgb480) * 0.7)])


def test_corrupted_middle_is_refused(rgb480: bytes) -> None:
    """Random bytes written over the middle of the scan are refused by rule decode."""
    rng = random.Random(3)
    for _ in range(3):
        data = bytearray(rgb480)
        middle = len(data) // 2
        data[middle : middle + 2000] = rng.randbytes(2000)
        assert run(bytes(data)) == "decode"


def test_unexpected_marker_in_scan_is_refused(rgb480: bytes) -> None:
    """A second frame header in the middle of the scan is refused by rule decode."""
    data = bytearray(rgb480)
    middle = len(data) // 2
    data[middle : middle + 2] = b"\xff\xc0"
    assert run(bytes(data)) == "decode"


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any image data is decoded."""

    def refuse(self: Image.Image) -> None:
        raise AssertionError("image data must not be decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    monkeypatch.setattr(Image.Image, "load", refuse)


@pytest.mark.usefixtures("no_decoding")
@pytest.mark.parametrize(
    ("width", "height"),
    [(60000, 60000), (65535, 65535), (10000, 10000), (7000, 7000), (6001, 6000), (1, 65535)],
)
def test_decompression_bomb_is_refused_without_decoding(
    rgb480: bytes, width: int, height: int
) -> None:
    """A header claiming huge dimensions is refused by rule dimensions before any decoding."""
    assert run(patch_sof(rgb480, width, height)) == "dimensions"


@pytest.mark.usefixtures("no_decoding")
def test_bomb_refused_whatever_the_warning_filters(rgb480: bytes) -> None:
    """Between Pillow's warn and error limits the answer is dimensions, warnings on or off."""
    bomb = patch_sof(rgb480, 10000, 10000)  # 100 Mpx: Pillow warns, does not raise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert run(bomb) == "dimensions"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run(bomb) == "dimensions"


@pytest.mark.usefixtures("no_decoding")
def test_bomb_refused_without_pillow_limit(rgb480: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """With Pillow's pixel limit disabled, our own side check still refuses a bomb."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert run(patch_sof(rgb480, 60000, 60000)) == "dimensions"


def test_reads_through_read_seek_tell_only_in_blocks(rgb480: bytes) -> None:
    """check_jpeg needs only read/seek/tell and never reads the photo in one piece."""
    fp = ReadSeekTell(rgb480)
    assert len(rgb480) > 4 * 65536
    assert check_jpeg("face_photo", cast(BinaryIO, fp), len(rgb480)) is None
    assert sum(fp.reads) >= len(rgb480)
    assert max(fp.reads) <= 65536


def test_reader_failure_propagates(rgb480: bytes) -> None:
    """An I/O error of the underlying reader is raised, not reported as a bad photo."""
    fp = FailingReader(rgb480)
    with pytest.raises(OSError, match="disk on fire"):
        check_jpeg("face_photo", cast(BinaryIO, fp), len(rgb480))


def test_violation_messages_are_fixed_text(rgb480: bytes) -> None:
    """Messages name the rule only: same message for different bad photos of one kind."""
    a = check_jpeg("face_photo", io.BytesIO(rgb480[:30_000]), 30_000)
    b = check_jpeg("face_photo", io.BytesIO(rgb480[:40_000]), 40_000)
    assert a is not None and b is not None
    assert a == b


# --- read_frame: what the decode will cost, from the markers before the first scan ----


def frame_of(data: bytes) -> JpegFrame | None:
    return read_frame(io.BytesIO(data), len(data))


def saved(mode: str, side: int, **options: object) -> bytes:
    out = io.BytesIO()
    Image.new(mode, (side, side), 128).save(out, "JPEG", **options)
    return out.getvalue()


def segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body


def sof(marker: int, width: int, height: int, sampling: list[int]) -> bytes:
    components = b"".join(bytes([i + 1, hv, 0]) for i, hv in enumerate(sampling))
    return segment(marker, struct.pack(">BHHB", 8, height, width, len(sampling)) + components)


def sos(components: int) -> bytes:
    return segment(0xDA, bytes([components]) + b"\x01\x00" * components + b"\x00\x3f\x00")


@pytest.mark.parametrize(
    ("mode", "options", "blocks", "whole_image"),
    [
        # 4:2:0, luma 76×76 blocks (padded to whole 16-px MCUs), each chroma 38×38
        ("RGB", {"subsampling": 2}, 76 * 76 + 2 * 38 * 38, False),
        ("RGB", {"subsampling": 2, "progressive": True}, 76 * 76 + 2 * 38 * 38, True),
        ("RGB", {"subsampling": 0, "progressive": True}, 3 * 76 * 76, True),
        ("L", {"progressive": True}, 76 * 76, True),
    ],
)
def test_frame_from_pillows_jpegs(
    mode: str, options: dict[str, object], blocks: int, whole_image: bool
) -> None:
    frame = frame_of(saved(mode, 601, **options))
    assert frame == JpegFrame(601, 601, len(mode), blocks, whole_image, lossless=False)


def test_frame_after_large_app_segments_is_found_by_seeking() -> None:
    """APPn bodies (EXIF, ICC: up to 64 KiB each) are skipped, not read."""
    photo = saved("RGB", 600)
    padded = photo[:2] + segment(0xE1, b"\0" * 65_000) * 3 + photo[2:]
    fp = ReadSeekTell(padded)
    frame = read_frame(cast(BinaryIO, fp), len(padded))
    assert frame is not None and (frame.width, frame.height) == (600, 600)
    assert sum(fp.reads) < 65_000  # less than one of the three skipped bodies


def test_a_first_scan_without_every_component_buffers_the_whole_image() -> None:
    """A baseline frame whose scans are one component each: libjpeg keeps every block."""
    header = b"\xff\xd8" + sof(0xC0, 6000, 6000, [0x11, 0x11, 0x11])
    assert frame_of(header + sos(3)) == JpegFrame(6000, 6000, 3, 3 * 750 * 750, False, False)
    frame = frame_of(header + sos(1))
    assert frame is not None and frame.whole_image


def test_junk_and_fill_bytes_between_segments_are_skipped_in_blocks() -> None:
    """Decoders skip non-marker bytes between segments; so does read_frame, without a
    read a byte (a megabyte of junk must not cost a million reads)."""
    frame = sof(0xC0, 640, 480, [0x22, 0x11, 0x11])
    data = b"\xff\xd8" + b"\x00" * 1_000_000 + b"\xff" * 1000 + frame[1:] + b"junk" + sos(3)
    fp = ReadSeekTell(data)
    found = read_frame(cast(BinaryIO, fp), len(data))
    assert found == JpegFrame(640, 480, 3, 80 * 60 + 2 * 40 * 30, False, False)
    assert len(fp.reads) < 3000


def test_lossless_frames_are_marked() -> None:
    frame = frame_of(b"\xff\xd8" + sof(0xC3, 800, 600, [0x11]) + sos(1))
    assert frame is not None and frame.lossless and frame.whole_image


def test_of_two_frame_headers_the_largest_counts() -> None:
    data = b"\xff\xd8" + sof(0xC2, 6000, 6000, [0x11]) + sof(0xC0, 480, 480, [0x11]) + sos(1)
    frame = frame_of(data)
    assert frame is not None
    assert (frame.width, frame.blocks, frame.whole_image) == (6000, 750 * 750, True)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"GIF89a" + b"\0" * 100,
        b"\xff\xd8" + sof(0xC0, 640, 480, [0x11]),  # no scan header
        b"\xff\xd8" + sos(1),  # a scan before any frame
        b"\xff\xd8" + sof(0xC0, 640, 480, [0x11])[:8],  # cut inside the frame header
        b"\xff\xd8\xff\xd9" + sof(0xC0, 640, 480, [0x11]) + sos(1),  # ends first
        b"\xff\xd8" + segment(0xE0, b"") * 5000 + sof(0xC0, 640, 480, [0x11]) + sos(1),
    ],
)
def test_no_frame_when_the_markers_do_not_say(data: bytes) -> None:
    assert frame_of(data) is None


def test_only_size_bytes_are_read_for_the_frame() -> None:
    photo = saved("L", 600)
    scan = photo.index(b"\xff\xda")
    assert read_frame(io.BytesIO(photo), scan) is None
    assert read_frame(io.BytesIO(photo), scan + 5) is not None
