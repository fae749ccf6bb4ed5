"""Face photo (顔写真) check: a real JPEG decode with Pillow, decompression bombs refused.

The photo is read through ``fp`` (in production a decrypting reader over the spool),
in the decoder's own blocks; it is never read into memory whole here. Violations name
the field and the rule only.

Order of checks: size bounds ("size"); Image.open restricted to JPEG ("format");
width and height from the header, before any decoding ("dimensions"; Pillow's own
decompression-bomb error or warning also lands here); colour mode ("color_mode"); a
full decode at 1/8 scale through libjpeg's DCT scaling, so memory stays small
("decode": truncated or corrupt data).

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

__all__ = ["PhotoRules", "check_jpeg"]

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


def _dimensions(field: str, rules: PhotoRules) -> Violation:
    return Violation(
        field,
        DIMENSIONS,
        f"width and height must each be between {rules.min_side} and {rules.max_side} pixels",
    )
