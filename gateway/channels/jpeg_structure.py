"""Face photo check without decoding: the JPEG's markers and segments walked in pure code.

The cheaper alternative to :func:`gateway.channels.photo.check_jpeg` (a channel's
``photo_check = "structure"``). It reads ``fp`` once, front to back, in blocks, and
answers with the same Violations for the same faults: "size" before reading, "format"
when the file does not start like a JPEG, "dimensions" and "color_mode" from the frame
header (checked at the first scan, as Pillow does after reading the header), and
"decode" for any other fault in the structure.

What is checked: SOI first; every segment's length within the file and consistent with
its body; exactly one frame header, baseline, extended or progressive with Huffman
coding (SOF0, 1, 2; lossless, hierarchical and arithmetic frames are refused), 8-bit,
1, 3 or 4 components (4 = CMYK, refused by rule color_mode unless the rules allow it);
the quantisation tables of every component and the Huffman tables of every scan defined
before that scan; every scan header's components in the frame; every scan's
entropy-coded data non-empty and ending in a marker (0xFF00 stuffing and RSTn inside);
every component in some scan; EOI last, followed by at most :data:`TRAILING_LIMIT`
bytes. Nothing between segments but 0xFF fill bytes.

What is not: the entropy-coded data itself (Huffman codes, coefficient ranges): a photo
whose scan bytes are corrupt but well-framed passes this check, not the decode check.
"""

from __future__ import annotations

import re
import struct
from typing import BinaryIO

from gateway.channels.photo import (
    COLOR_MODE,
    DECODE,
    FORMAT,
    SIZE,
    PhotoRules,
    _BoundedSource,
    _dimensions,
    _SourceFailure,
)
from gateway.errors import Violation

__all__ = ["TRAILING_LIMIT", "check_structure"]

TRAILING_LIMIT = 4096
"""Bytes tolerated after EOI (some encoders pad; the decoders ignore anything there)."""
_BLOCK = 65536
_MAX_SEGMENTS = 4096
_RULES = PhotoRules()
_FRAMES = frozenset({0xC0, 0xC1, 0xC2})  # baseline, extended, progressive (Huffman)
_SKIPPED = frozenset({*range(0xE0, 0xF0), *range(0xF0, 0xFE), 0xFE})  # APPn, JPGn, COM
_DHT, _DQT, _DRI, _SOS, _EOI = 0xC4, 0xDB, 0xDD, 0xDA, 0xD9
_MODES = {1: "L", 3: "RGB", 4: "CMYK"}
# 0xFF followed by anything but stuffing (0x00) or a restart marker: the end of a scan
# (or fill bytes before the marker that ends it).
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")


class _Bad(Exception):
    """Internal: the structure is wrong; answered with rule decode."""


class _Cursor:
    """Sequential reads over the bounded source, in blocks; never the whole photo."""

    def __init__(self, source: _BoundedSource) -> None:
        self._source = source
        self._buf = b""
        self._at = 0

    def _fill(self, n: int) -> bool:
        """At least ``n`` unread bytes buffered; False at the end of the photo."""
        while len(self._buf) - self._at < n:
            block = self._source.read(max(_BLOCK, n))
            if not block:
                return False
            self._buf = self._buf[self._at :] + block
            self._at = 0
        return True

    def read(self, n: int) -> bytes:
        if not self._fill(n):
            raise _Bad
        out = self._buf[self._at : self._at + n]
        self._at += n
        return out

    def byte(self) -> int:
        return self.read(1)[0]

    def skip_fill(self) -> int:
        """Past 0xFF fill bytes; the byte after them (consumed)."""
        while True:
            b = self.byte()
            if b != 0xFF:
                return b

    def marker(self) -> int:
        """The next marker, which must come right here (fill bytes allowed)."""
        if self.byte() != 0xFF:
            raise _Bad
        return self.skip_fill()

    def segment(self) -> bytes:
        """A marker segment's body, after its 2-byte length."""
        length = int.from_bytes(self.read(2), "big")
        if length < 2:
            raise _Bad
        return self.read(length - 2)

    def scan(self) -> int:
        """Past a scan's entropy-coded data (at least a byte); the marker ending it."""
        count = 0
        while True:
            found = _SCAN_END.search(self._buf, self._at)
            if found is None:
                tail = self._buf[self._at :]
                keep = 1 if tail.endswith(b"\xff") else 0  # its next byte decides
                count += len(tail) - keep
                self._at = len(self._buf) - keep
                if not self._fill(keep + 1):
                    raise _Bad  # the scan runs to the end: truncated
                continue
            count += found.start() - self._at
            self._at = found.start() + 1
            marker = self.skip_fill()
            if marker == 0x00 or 0xD0 <= marker <= 0xD7:
                count += 1  # fill bytes, then stuffing or a restart: still the scan
                continue
            if count == 0:
                raise _Bad
            return marker

    def rest(self) -> int:
        """Bytes left after the current position, read (and dropped) up to the limit."""
        left = len(self._buf) - self._at
        self._buf, self._at = b"", 0
        while left <= TRAILING_LIMIT and (block := self._source.read(_BLOCK)):
            left += len(block)
        return left


def check_structure(
    field: str, fp: BinaryIO, size: int, rules: PhotoRules = _RULES
) -> Violation | None:
    """Check the structure of the JPEG of ``size`` bytes readable from ``fp``.

    Same calling convention as :func:`~gateway.channels.photo.check_jpeg`: ``fp``
    needs read, seek and tell; its own errors propagate unchanged; None when acceptable.
    """
    if not rules.min_bytes <= size <= rules.max_bytes:
        return Violation(
            field, SIZE, f"must be between {rules.min_bytes} and {rules.max_bytes} bytes"
        )
    source = _BoundedSource(fp, size)
    try:
        source.seek(0)
        cursor = _Cursor(source)
        try:
            if cursor.read(3) != b"\xff\xd8\xff":
                return Violation(field, FORMAT, "must be a JPEG image")
        except _Bad:
            return Violation(field, FORMAT, "must be a JPEG image")
        try:
            return _walk(field, cursor, rules)
        except (_Bad, IndexError, struct.error):
            return Violation(field, DECODE, "could not be decoded as a JPEG image")
    except _SourceFailure as failure:
        raise failure.original from None


def _walk(field: str, cursor: _Cursor, rules: PhotoRules) -> Violation | None:
    frame: _Frame | None = None
    quant: set[int] = set()
    huffman: set[tuple[int, int]] = set()  # (class: 0 DC, 1 AC; id)
    scanned: set[int] = set()
    marker = cursor.skip_fill()  # SOI and the first 0xFF are read
    for _ in range(_MAX_SEGMENTS):
        if marker == _EOI:
            if frame is None or scanned != set(frame.components):
                raise _Bad  # no scan, or a component never coded
            return None if cursor.rest() <= TRAILING_LIMIT else _bad(field)
        if marker in _SKIPPED or marker == _DRI:
            cursor.segment()
        elif marker == _DQT:
            quant |= {ident for _, ident in _tables(cursor.segment(), huffman=False)}
        elif marker == _DHT:
            huffman |= _tables(cursor.segment(), huffman=True)
        elif marker in _FRAMES and frame is None and not scanned:
            frame = _frame(cursor.segment(), progressive=marker == 0xC2)
        elif marker == _SOS and frame is not None:
            if not scanned:  # Pillow reads the header up to here, then judges these
                violation = _judge(field, frame, rules)
                if violation is not None:
                    return violation
                if not {tq for _, tq in frame.components.values()} <= quant:
                    raise _Bad
            scanned |= _scan(cursor.segment(), frame, huffman)
            marker = cursor.scan()
            continue
        else:
            raise _Bad  # SOI again, a second frame, a scan before the frame, TEM, DNL...
        marker = cursor.marker()
    raise _Bad


class _Frame:
    """A frame header's content: size, and per component id its (H×V, Tq)."""

    def __init__(
        self, width: int, height: int, components: dict[int, tuple[int, int]], progressive: bool
    ) -> None:
        self.width = width
        self.height = height
        self.components = components
        self.progressive = progressive


def _frame(body: bytes, *, progressive: bool) -> _Frame:
    precision, height, width, count = struct.unpack(">BHHB", body[:6])
    # Pillow refuses other precisions and component counts while reading the header.
    if precision != 8 or count not in _MODES or len(body) != 6 + 3 * count:
        raise _Bad
    if width == 0 or height == 0:
        raise _Bad  # height in a DNL segment: refused by the decoders too
    components: dict[int, tuple[int, int]] = {}
    for i in range(count):
        ident, hv, tq = body[6 + 3 * i : 9 + 3 * i]
        h, v = hv >> 4, hv & 15
        if ident in components or not (1 <= h <= 4 and 1 <= v <= 4) or tq > 3:
            raise _Bad
        components[ident] = (h * v, tq)
    return _Frame(width, height, components, progressive)


def _judge(field: str, frame: _Frame, rules: PhotoRules) -> Violation | None:
    """What check_jpeg answers from the header: dimensions, then colour mode."""
    if not all(rules.min_side <= side <= rules.max_side for side in (frame.width, frame.height)):
        return _dimensions(field, rules)
    if _MODES[len(frame.components)] not in rules.modes:
        allowed = ", ".join(sorted(rules.modes))
        return Violation(field, COLOR_MODE, f"colour mode must be one of {allowed}")
    return None


def _tables(body: bytes, *, huffman: bool) -> set[tuple[int, int]]:
    """The (class, id) of the Huffman tables, or (precision, id) of the quantisation
    tables, that a DHT or DQT body defines; every table's length checked against the body's."""
    found: set[tuple[int, int]] = set()
    at = 0
    while at < len(body):
        kind, ident = body[at] >> 4, body[at] & 15
        if kind > 1 or ident > 3:
            raise _Bad
        if huffman:
            values = sum(body[at + 1 : at + 17])
            if len(body) < at + 17 or values > 256:
                raise _Bad
            at += 17 + values
        else:
            at += 1 + 64 * (kind + 1)
        found.add((kind, ident))
    if at != len(body) or not found:
        raise _Bad
    return found


def _scan(body: bytes, frame: _Frame, huffman: set[tuple[int, int]]) -> set[int]:
    """A scan header's components, checked against the frame and the tables defined."""
    count = body[0]
    if not 1 <= count <= 4 or len(body) != 4 + 2 * count:
        raise _Bad
    ss, se, ah_al = body[1 + 2 * count :]
    if frame.progressive:
        if ss > se or se > 63 or (ss == 0) != (se == 0) or (ss > 0 and count != 1):
            raise _Bad
    elif (ss, se, ah_al) != (0, 63, 0):
        raise _Bad
    needs_dc, needs_ac = ss == 0 and ah_al >> 4 == 0, se > 0
    ids: set[int] = set()
    for i in range(count):
        ident, tables = body[1 + 2 * i], body[2 + 2 * i]
        if ident not in frame.components or ident in ids:
            raise _Bad
        ids.add(ident)
        if (needs_dc and (0, tables >> 4) not in huffman) or (
            needs_ac and (1, tables & 15) not in huffman
        ):
            raise _Bad
    if count > 1 and sum(frame.components[i][0] for i in ids) > 10:
        raise _Bad  # more blocks in an MCU than the decoders take
    return ids


def _bad(field: str) -> Violation:
    return Violation(field, DECODE, "could not be decoded as a JPEG image")
