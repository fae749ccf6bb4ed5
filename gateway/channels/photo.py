"""Face photo (顔写真) check: a real JPEG decode with Pillow, decompression bombs refused.

The photo is read through ``fp`` (in production a decrypting reader over the spool),
in the decoder's own blocks; it is never read into memory whole here. Violations name
the field and the rule only.

Order of checks: size bounds ("size"); Image.open restricted to JPEG ("format");
width and height from the header, before any decoding ("dimensions"; Pillow's own
decompression-bomb error or warning also lands here); colour mode ("color_mode"); a
full decode at 1/8 scale through libjpeg's DCT scaling, so memory stays small
("decode": truncated or corrupt data).

:func:`read_frame` reads only the marker segments up to the first scan, so that a caller
can tell what the decode will cost before it runs (the frame's size, its components and
their sampling, and whether the decoder must hold the whole image's coefficients).

Warnings: ``warnings.catch_warnings`` mutates process-wide state and is not
thread-safe, and this check may run in worker threads, so it is not used. Instead a
Pillow warning turned into an exception by the filters (``-W error``) is caught like
any other bad-data exception: the answer is then a Violation, never an escaped warning.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import IO, BinaryIO, cast

from PIL import Image, ImageFile, UnidentifiedImageError

from gateway.errors import Violation

__all__ = ["JpegFrame", "PhotoRules", "check_jpeg", "read_frame"]

SIZE = "size"
FORMAT = "format"
DIMENSIONS = "dimensions"
COLOR_MODE = "color_mode"
DECODE = "decode"

# What Pillow raises for bad data. Warning covers DecompressionBombWarning and the
# malformed-MPO UserWarning when the warning filters turn them into exceptions.
_BAD_DATA: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    struct.error,
    Image.DecompressionBombError,
    Warning,
)


@dataclass(frozen=True)
class PhotoRules:
    """Bounds for the face photo (docs/contract.md, "Channels")."""

    min_bytes: int = 20_000
    max_bytes: int = 7_000_000
    min_side: int = 480
    max_side: int = 6000
    modes: frozenset[str] = frozenset({"RGB", "L"})


class _SourceFailure(Exception):
    """Internal: the underlying reader failed; not the photo's fault."""

    def __init__(self, original: BaseException) -> None:
        super().__init__("photo source read failed")
        self.original = original


class _BoundedSource:
    """read/seek/tell over ``fp`` that never goes past ``size`` bytes.

    Failures of ``fp`` itself are wrapped so they are re-raised to the caller instead
    of being mistaken for a corrupt photo.
    """

    def __init__(self, fp: BinaryIO, size: int) -> None:
        self._fp = fp
        self._size = size
        self._pos = 0

    def read(self, n: int | None = -1) -> bytes:
        remaining = max(0, self._size - self._pos)
        want = remaining if n is None or n < 0 else min(n, remaining)
        if want == 0:
            return b""
        try:
            data = self._fp.read(want)
        except Exception as exc:
            raise _SourceFailure(exc) from exc
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}.get(whence)
        if base is None or base + offset < 0:
            raise ValueError("invalid seek")
        target = base + offset
        try:
            self._fp.seek(target)
        except Exception as exc:
            raise _SourceFailure(exc) from exc
        self._pos = target
        return target

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        """Pillow closes its file on Image.close(); the caller's ``fp`` stays open."""


def check_jpeg(
    field: str, fp: BinaryIO, size: int, rules: PhotoRules = PhotoRules()
) -> Violation | None:
    """Check the JPEG of ``size`` bytes readable from ``fp``; None when acceptable.

    ``fp`` must support read, seek and tell (no fileno needed). Errors of ``fp`` itself
    propagate unchanged. Raises RuntimeError if ``ImageFile.LOAD_TRUNCATED_IMAGES`` is
    enabled, since truncated and corrupt photos would then pass.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is enabled; refusing")
    if not rules.min_bytes <= size <= rules.max_bytes:
        return Violation(
            field, SIZE, f"must be between {rules.min_bytes} and {rules.max_bytes} bytes"
        )
    source = _BoundedSource(fp, size)
    try:
        return _check(field, source, rules)
    except _SourceFailure as failure:
        raise failure.original from None


def _check(field: str, source: _BoundedSource, rules: PhotoRules) -> Violation | None:
    source.seek(0)
    try:
        im = Image.open(cast("IO[bytes]", source), formats=["JPEG"])
    except UnidentifiedImageError:
        return Violation(field, FORMAT, "must be a JPEG image")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return _dimensions(field, rules)
    except _BAD_DATA:
        return Violation(field, DECODE, "could not be decoded as a JPEG image")
    try:
        width, height = im.size
        sides_ok = all(rules.min_side <= side <= rules.max_side for side in (width, height))
        if not sides_ok:
            return _dimensions(field, rules)
        if im.mode not in rules.modes:
            allowed = ", ".join(sorted(rules.modes))
            return Violation(field, COLOR_MODE, f"colour mode must be one of {allowed}")
        try:
            im.draft(im.mode, (max(1, width // 8), max(1, height // 8)))
            im.load()
        except _BAD_DATA:
            return Violation(field, DECODE, "could not be decoded as a JPEG image")
    finally:
        im.close()  # frees the decoded image now, not at garbage collection
    return None


@dataclass(frozen=True)
class JpegFrame:
    """What a JPEG's frame header (SOFn) and first scan header (SOS) say, before decoding."""

    width: int
    height: int
    components: int
    blocks: int
    """8×8 DCT blocks over all components, as libjpeg lays them out (each component at
    its own sampling, rounded up to whole MCUs)."""
    whole_image: bool
    """The decoder holds every block's coefficients at once (libjpeg's "multiple scans":
    a progressive, lossless or hierarchical frame, or a first scan without every
    component), whatever the output scale: ``blocks`` × 128 bytes. A sequential photo
    with every component in its first scan decodes an MCU row at a time instead."""
    lossless: bool
    """A lossless frame (SOF3, 7, 11, 15): no DCT, so its decode cannot be scaled down
    and outputs every pixel."""


_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # not DHT, JPG, DAC
_SEQUENTIAL = frozenset({0xC0, 0xC1, 0xC9})  # baseline, extended (Huffman, arithmetic)
_LOSSLESS = frozenset({0xC3, 0xC7, 0xCB, 0xCF})
_NO_LENGTH = frozenset({0x00, 0x01, 0xD8, *range(0xD0, 0xD8)})  # stuffing, TEM, SOI, RSTn
_EOI, _SOS = 0xD9, 0xDA
_SCAN_BLOCK = 512
_MAX_SEGMENTS = 4096
"""Marker segments read before giving up (None): real photos have tens, up to a few
hundred with a chunked ICC profile."""


def read_frame(fp: BinaryIO, size: int) -> JpegFrame | None:
    """The frame of the JPEG in the first ``size`` bytes of ``fp``, from its markers.

    Reads marker segments up to the first SOS, skipping (seeking over) every body but
    the frame's; None when no frame header followed by a scan header is found within
    the first 4096 segments. With
    more than one frame header (libjpeg refuses such a file, Pillow keeps the last) the
    largest is returned and ``whole_image`` is true if it is for any. Errors of ``fp``
    itself propagate unchanged.
    """
    source = _BoundedSource(fp, size)
    try:
        return _read_frame(source)
    except _SourceFailure as failure:
        raise failure.original from None


def _read_frame(source: _BoundedSource) -> JpegFrame | None:
    source.seek(0)
    if source.read(2) != b"\xff\xd8":
        return None
    frames: list[JpegFrame] = []
    for _ in range(_MAX_SEGMENTS):
        marker = _next_marker(source)
        if marker is None or marker == _EOI:
            return None
        if marker in _NO_LENGTH:
            continue
        head = source.read(2)
        length = int.from_bytes(head, "big") - 2
        if len(head) < 2 or length < 0:
            return None
        if marker in _SOF:
            frame = _frame(marker, source.read(length))
            if frame is None:
                return None
            frames.append(frame)
        elif marker == _SOS:
            in_scan = source.read(1)
            if not frames or not in_scan:
                return None
            largest = max(frames, key=lambda f: f.blocks)
            return JpegFrame(
                largest.width,
                largest.height,
                largest.components,
                largest.blocks,
                whole_image=any(f.whole_image or in_scan[0] < f.components for f in frames),
                lossless=any(f.lossless for f in frames),
            )
        else:
            source.seek(length, 1)
    return None


def _next_marker(source: _BoundedSource) -> int | None:
    """The next marker's code, past junk between segments (the decoders skip it too) and
    fill bytes, read in blocks; the source is left just after it. None at the end."""
    pair = source.read(2)
    if len(pair) == 2 and pair[0] == 0xFF and pair[1] != 0xFF:
        return pair[1]  # the usual case: the marker right after the last segment
    source.seek(-len(pair), 1)
    after_ff = False
    while block := source.read(_SCAN_BLOCK):
        start = 0
        if not after_ff:
            start = block.find(b"\xff")
            if start < 0:
                continue
            after_ff = True
        rest = block[start:].lstrip(b"\xff")
        if rest:
            source.seek(1 - len(rest), 1)
            return rest[0]
    return None


def _frame(marker: int, body: bytes) -> JpegFrame | None:
    """A frame header's body: precision, height, width, then (id, HV, Tq) a component."""
    if len(body) < 6 or len(body) < 6 + 3 * body[5]:
        return None
    height, width = struct.unpack(">HH", body[1:5])
    count = body[5]
    sampling = [(max(1, body[7 + 3 * i] >> 4), max(1, body[7 + 3 * i] & 15)) for i in range(count)]
    h_max = max((h for h, _ in sampling), default=1)
    v_max = max((v for _, v in sampling), default=1)
    blocks = 0
    for h, v in sampling:  # libjpeg: blocks per component, padded to whole MCUs
        across = -(-width * h // (h_max * 8))
        down = -(-height * v // (v_max * 8))
        blocks += -(-across // h) * h * -(-down // v) * v
    return JpegFrame(
        width,
        height,
        count,
        blocks,
        whole_image=marker not in _SEQUENTIAL,
        lossless=marker in _LOSSLESS,
    )


def _dimensions(field: str, rules: PhotoRules) -> Violation:
    return Violation(
        field,
        DIMENSIONS,
        f"width and height must each be between {rules.min_side} and {rules.max_side} pixels",
    )
