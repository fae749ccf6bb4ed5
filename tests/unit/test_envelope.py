"""Tests for the chunked AES-256-GCM spool envelope."""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path

import pytest

from gateway.crypto.envelope import (
    HEADER_SIZE,
    MAGIC,
    SEGMENT_SIZE,
    TAG_SIZE,
    EncryptingWriter,
    ciphertext_size,
    new_data_key,
    unwrap_key,
    wrap_key,
)
from gateway.crypto.envelope_reader import DecryptingReader, iter_plaintext
from gateway.errors import RecordCorrupt

AAD = b"submission-0001"
SIZES = [0, 1, SEGMENT_SIZE - 1, SEGMENT_SIZE, SEGMENT_SIZE + 1, 3 * SEGMENT_SIZE, 300_000]
SMALL_SEGMENTS = [1, 7, 16, 1000]


def _random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def _encrypt(
    plaintext: bytes,
    dek: bytes,
    *,
    aad: bytes = AAD,
    segment_size: int = SEGMENT_SIZE,
    chunk: int | None = None,
) -> bytes:
    out = io.BytesIO()
    writer = EncryptingWriter(out, dek, aad, segment_size)
    step = chunk or max(len(plaintext), 1)
    view = memoryview(plaintext)
    for i in range(0, len(plaintext), step):
        writer.write(view[i : i + step])
    writer.close()
    return out.getvalue()


def _decrypt_all(ciphertext: bytes, dek: bytes, size: int, aad: bytes = AAD) -> bytes:
    return b"".join(iter_plaintext(io.BytesIO(ciphertext), dek, aad, size))


def _reader(ciphertext: bytes, dek: bytes, size: int, **kw: int) -> DecryptingReader:
    return DecryptingReader(io.BytesIO(ciphertext), dek, AAD, size, **kw)


def _segments(ciphertext: bytes, segment_size: int) -> list[bytes]:
    body = ciphertext[HEADER_SIZE:]
    step = segment_size + TAG_SIZE
    return [body[i : i + step] for i in range(0, len(body), step)]


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_default_segments(size: int) -> None:
    """Plaintext of every boundary size decrypts back unchanged, sequentially and randomly."""
    dek = new_data_key()
    plaintext = _random_bytes(size, seed=size)
    ciphertext = _encrypt(plaintext, dek)
    assert len(ciphertext) == ciphertext_size(size)
    assert _decrypt_all(ciphertext, dek, size) == plaintext
    with _reader(ciphertext, dek, size) as reader:
        assert reader.read() == plaintext


@pytest.mark.parametrize("segment_size", SMALL_SEGMENTS)
@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 1000, 3001])
def test_round_trip_small_segments(segment_size: int, size: int) -> None:
    """Small segment sizes round-trip, including sizes that are exact multiples."""
    dek = new_data_key()
    plaintext = _random_bytes(size, seed=size + segment_size)
    ciphertext = _encrypt(plaintext, dek, segment_size=segment_size, chunk=5)
    assert len(ciphertext) == ciphertext_size(size, segment_size)
    assert _decrypt_all(ciphertext, dek, size) == plaintext
    with _reader(ciphertext, dek, size) as reader:
        assert reader.read() == plaintext


@pytest.mark.parametrize("chunk", [1, 3, 4095, 65535, 65537, 100_003])
def test_odd_write_chunks_give_identical_layout(chunk: int) -> None:
    """Writing in odd chunk sizes yields the same plaintext and file length as one write."""
    dek = new_data_key()
    plaintext = _random_bytes(300_000, seed=chunk)
    if chunk == 1:
        plaintext = plaintext[:20_000]
    ciphertext = _encrypt(plaintext, dek, chunk=chunk)
    assert len(ciphertext) == ciphertext_size(len(plaintext))
    assert _decrypt_all(ciphertext, dek, len(plaintext)) == plaintext


def test_writer_accepts_bytes_bytearray_memoryview_and_empty_writes() -> None:
    """write() takes bytes, bytearray and memoryview, and empty writes change nothing."""
    dek = new_data_key()
    out = io.BytesIO()
    writer = EncryptingWriter(out, dek, AAD, 16)
    writer.write(b"")
    writer.write(b"abc")
    writer.write(bytearray(b"defghijklmnopqrstu"))
    writer.write(memoryview(b"vwxyz"))
    writer.write(memoryview(b""))
    writer.close()
    writer.close()
    assert writer.plaintext_size == 26
    assert _decrypt_all(out.getvalue(), dek, 26) == b"abcdefghijklmnopqrstuvwxyz"


def test_write_after_close_is_refused() -> None:
    """Writing to a closed writer raises instead of producing an unauthenticated tail."""
    writer = EncryptingWriter(io.BytesIO(), new_data_key(), AAD)
    writer.close()
    with pytest.raises(ValueError):
        writer.write(b"late")


def test_header_layout() -> None:
    """The file starts with the magic, the segment size and four zero bytes."""
    ciphertext = _encrypt(b"x", new_data_key(), segment_size=4096)
    assert ciphertext[:8] == MAGIC
    assert ciphertext[8:12] == (4096).to_bytes(4, "big")
    assert ciphertext[12:16] == bytes(4)


def test_header_written_immediately() -> None:
    """The header is written when the writer is created, before any data."""
    out = io.BytesIO()
    writer = EncryptingWriter(out, new_data_key(), AAD)
    assert out.getvalue()[:8] == MAGIC
    assert writer.ciphertext_size == HEADER_SIZE


@pytest.mark.parametrize("size", SIZES)
def test_ciphertext_size_and_sha256_match_the_file(size: int, tmp_path: Path) -> None:
    """ciphertext_size and ciphertext_sha256 agree with the bytes actually on disk."""
    path = tmp_path / "record.bin"
    plaintext = _random_bytes(size, seed=7)
    with path.open("wb") as fh:
        writer = EncryptingWriter(fh, new_data_key(), AAD)
        writer.write(plaintext)
        writer.close()
        assert not fh.closed
    on_disk = path.read_bytes()
    assert writer.plaintext_size == size
    assert writer.ciphertext_size == len(on_disk) == ciphertext_size(size)
    assert writer.ciphertext_sha256() == hashlib.sha256(on_disk).hexdigest()


def test_ciphertext_size_formula() -> None:
    """Each record has one final segment after the last full one, so sizes are exact."""
    assert ciphertext_size(0) == HEADER_SIZE + TAG_SIZE
    assert ciphertext_size(SEGMENT_SIZE) == HEADER_SIZE + SEGMENT_SIZE + 2 * TAG_SIZE
    assert ciphertext_size(10, 4) == HEADER_SIZE + 10 + 3 * TAG_SIZE
    assert ciphertext_size(12, 4) == HEADER_SIZE + 12 + 4 * TAG_SIZE
    with pytest.raises(ValueError):
        ciphertext_size(-1)


def test_no_plaintext_in_ciphertext() -> None:
    """A distinctive 32-byte marker planted in the plaintext never appears in the file."""
    marker = b"MARKER-0123456789-ABCDEFGHIJKLMN"
    assert len(marker) == 32
    plaintext = b"".join([_random_bytes(1000), marker, bytes(200_000), marker * 3, b"tail"])
    ciphertext = _encrypt(plaintext, new_data_key(), chunk=4097)
    assert marker not in ciphertext
    assert marker[:16] not in ciphertext
    assert bytes(64) not in ciphertext[HEADER_SIZE:]


def test_same_plaintext_different_keys_differ() -> None:
    """Two records of identical plaintext under fresh keys share no ciphertext bytes."""
    plaintext = bytes(1000)
    a = _encrypt(plaintext, new_data_key())
    b = _encrypt(plaintext, new_data_key())
    assert a[:HEADER_SIZE] == b[:HEADER_SIZE]
    assert a[HEADER_SIZE:] != b[HEADER_SIZE:]


@pytest.mark.parametrize("segment_size", [SEGMENT_SIZE, 1000, 17])
def test_reader_random_seeks_match_plaintext(segment_size: int) -> None:
    """A deterministic sweep of seek/read/readinto calls matches slicing the plaintext."""
    rng = random.Random(segment_size)
    dek = new_data_key()
    size = 300_000
    plaintext = rng.randbytes(size)
    ciphertext = _encrypt(plaintext, dek, segment_size=segment_size, chunk=12_345)
    reader = _reader(ciphertext, dek, size)
    assert reader.seekable() and reader.readable() and not reader.writable()
    pos = 0
    for _ in range(400):
        op = rng.randrange(4)
        if op == 0:
            pos = reader.seek(rng.randrange(size + 10))
        elif op == 1:
            delta = rng.randrange(-pos, 5000)
            pos = reader.seek(delta, io.SEEK_CUR)
        elif op == 2:
            pos = reader.seek(-rng.randrange(size + 1), io.SEEK_END)
        n = rng.choice([0, 1, 2, 15, 16, 17, segment_size, segment_size + 1, 70_000])
        if rng.random() < 0.5:
            got = reader.read(n)
        else:
            buf = bytearray(n)
            got = bytes(buf[: reader.readinto(buf)])
        assert got == plaintext[pos : pos + n]
        pos += len(got)
        assert reader.tell() == pos
    reader.close()


def test_reader_window_exposes_only_the_part() -> None:
    """A window [start, start+length) reads as a stream positioned at 0 of that part."""
    rng = random.Random(3)
    dek = new_data_key()
    plaintext = rng.randbytes(250_000)
    ciphertext = _encrypt(plaintext, dek, segment_size=4096)
    start, length = 70_001, 123_457
    part = plaintext[start : start + length]
    reader = _reader(ciphertext, dek, len(plaintext), start=start, length=length)
    assert reader.tell() == 0
    assert reader.read(10) == part[:10]
    assert reader.seek(0, io.SEEK_END) == length
    assert reader.read(1) == b""
    assert reader.seek(-5, io.SEEK_END) == length - 5
    assert reader.read() == part[-5:]
    reader.seek(length + 100)
    assert reader.read(10) == b""
    assert reader.readinto(bytearray(10)) == 0
    for _ in range(200):
        pos = rng.randrange(length)
        n = rng.randrange(1, 10_000)
        reader.seek(pos)
        assert reader.read(n) == part[pos : pos + n]
    reader.seek(0)
    assert reader.read() == part
    assert _reader(ciphertext, dek, len(plaintext), start=start).read() == plaintext[start:]
    empty = _reader(ciphertext, dek, len(plaintext), start=len(plaintext))
    assert empty.read() == b""


def test_reader_window_outside_plaintext_is_refused() -> None:
    """Windows that do not lie inside the plaintext are a programming error."""
    dek = new_data_key()
    ciphertext = _encrypt(b"x" * 100, dek)
    for kw in ({"start": -1}, {"start": 101}, {"start": 50, "length": 51}, {"length": -1}):
        with pytest.raises(ValueError):
            _reader(ciphertext, dek, 100, **kw)


def test_reader_rejects_negative_seek_and_bad_whence() -> None:
    """Seeking before the start or with an unknown whence raises ValueError."""
    dek = new_data_key()
    reader = _reader(_encrypt(b"abc", dek), dek, 3)
    with pytest.raises(ValueError):
        reader.seek(-1)
    with pytest.raises(ValueError):
        reader.seek(0, 3)


def test_reader_closed_refuses_io() -> None:
    """After close() the reader refuses reads but leaves the underlying file open."""
    dek = new_data_key()
    raw = io.BytesIO(_encrypt(b"abc", dek))
    reader = DecryptingReader(raw, dek, AAD, 3)
    reader.close()
    assert not raw.closed
    with pytest.raises(ValueError):
        reader.read(1)


def test_reader_works_through_buffered_reader_and_pillow(tmp_path: Path) -> None:
    """A JPEG inside a larger body can be opened by Pillow through a window."""
    from PIL import Image

    image = Image.new("RGB", (64, 48), (200, 10, 30))
    jpeg = io.BytesIO()
    image.save(jpeg, "JPEG")
    prefix = b"--boundary\r\nContent-Type: image/jpeg\r\n\r\n"
    body = prefix + jpeg.getvalue() + b"\r\n--boundary--\r\n"
    dek = new_data_key()
    path = tmp_path / "record.bin"
    with path.open("wb") as fh:
        writer = EncryptingWriter(fh, dek, AAD, 256)
        writer.write(body)
        writer.close()
    with path.open("rb") as fh:
        reader = DecryptingReader(
            fh, dek, AAD, len(body), start=len(prefix), length=len(jpeg.getvalue())
        )
        with Image.open(io.BufferedReader(reader)) as decoded:
            assert decoded.size == (64, 48)
            decoded.load()


# -- tampering -------------------------------------------------------------------------

SEG = 1000
SIZE = 3 * SEG + 123  # segments 0..2 full, segment 3 final with 123 bytes


@pytest.fixture
def record() -> tuple[bytes, bytes, bytes]:
    dek = new_data_key()
    plaintext = _random_bytes(SIZE, seed=42)
    return dek, plaintext, _encrypt(plaintext, dek, segment_size=SEG)


def _assert_corrupt(ciphertext: bytes, dek: bytes, size: int = SIZE, aad: bytes = AAD) -> None:
    with pytest.raises(RecordCorrupt) as seq:
        _decrypt_all(ciphertext, dek, size, aad)
    with pytest.raises(RecordCorrupt) as rnd:
        reader = DecryptingReader(io.BytesIO(ciphertext), dek, aad, size)
        reader.read()
    for exc in (seq.value, rnd.value):
        assert str(exc).startswith("spool record")


def test_drop_last_segment_is_detected(record: tuple[bytes, bytes, bytes]) -> None:
    """A file missing its final segment fails in both readers."""
    dek, _, ciphertext = record
    _assert_corrupt(ciphertext[: -(123 + TAG_SIZE)], dek)


def test_cut_mid_segment_is_detected(record: tuple[bytes, bytes, bytes]) -> None:
    """A file cut in the middle of a segment fails in both readers."""
    dek, _, ciphertext = record
    _assert_corrupt(ciphertext[: HEADER_SIZE + SEG + 500], dek)
    _assert_corrupt(ciphertext[:10], dek)


def test_truncation_with_lying_size_is_detected(record: tuple[bytes, bytes, bytes]) -> None:
    """Cutting the file to match a smaller claimed size fails on the final flag."""
    dek, _, ciphertext = record
    # Claim one full segment plus 50 bytes; keep exactly that many ciphertext bytes.
    claimed = SEG + 50
    forged = ciphertext[: ciphertext_size(claimed, SEG)]
    _assert_corrupt(forged, dek, size=claimed)
    # Claim exactly two segments: the forged "final empty segment" is segment 2's head.
    forged = ciphertext[: ciphertext_size(2 * SEG, SEG)]
    _assert_corrupt(forged, dek, size=2 * SEG)


def test_extension_of_exact_multiple_is_detected() -> None:
    """Claiming a longer plaintext than was written fails even at a segment boundary."""
    dek = new_data_key()
    ciphertext = _encrypt(_random_bytes(2 * SEG), dek, segment_size=SEG)
    _assert_corrupt(ciphertext + bytes(SEG), dek, size=3 * SEG)


def test_swapped_segments_are_detected(record: tuple[bytes, bytes, bytes]) -> None:
    """Reordering two segments fails authentication."""
    dek, _, ciphertext = record
    segs = _segments(ciphertext, SEG)
    segs[0], segs[1] = segs[1], segs[0]
    _assert_corrupt(ciphertext[:HEADER_SIZE] + b"".join(segs), dek)


@pytest.mark.parametrize("offset", [0, 8, 12, HEADER_SIZE, HEADER_SIZE + 999, -1, -TAG_SIZE])
def test_flipped_bit_is_detected(record: tuple[bytes, bytes, bytes], offset: int) -> None:
    """Flipping any single bit in header, body or tag fails."""
    dek, _, ciphertext = record
    tampered = bytearray(ciphertext)
    tampered[offset] ^= 0x01
    _assert_corrupt(bytes(tampered), dek)


def test_wrong_aad_is_detected(record: tuple[bytes, bytes, bytes]) -> None:
    """A record opened under another submission id fails."""
    dek, _, ciphertext = record
    _assert_corrupt(ciphertext, dek, aad=b"submission-0002")


def test_wrong_dek_is_detected(record: tuple[bytes, bytes, bytes]) -> None:
    """A record opened with another data key fails."""
    _, _, ciphertext = record
    _assert_corrupt(ciphertext, new_data_key())


@pytest.mark.parametrize(
    "garbage", [b"\x00", bytes(TAG_SIZE), bytes(SEG + TAG_SIZE)], ids=["1", "tag", "segment"]
)
def test_appended_garbage_is_detected(record: tuple[bytes, bytes, bytes], garbage: bytes) -> None:
    """Bytes after the final segment fail in both readers."""
    dek, _, ciphertext = record
    _assert_corrupt(ciphertext + garbage, dek)


def test_error_messages_name_no_data(record: tuple[bytes, bytes, bytes]) -> None:
    """RecordCorrupt messages carry no plaintext, ciphertext or key bytes."""
    dek, plaintext, ciphertext = record
    tampered = bytearray(ciphertext)
    tampered[-1] ^= 0xFF
    with pytest.raises(RecordCorrupt) as info:
        _decrypt_all(bytes(tampered), dek, SIZE)
    message = str(info.value)
    for secret in (dek, plaintext[:8], ciphertext[HEADER_SIZE : HEADER_SIZE + 8]):
        assert secret.hex() not in message
        assert repr(secret)[2:-1] not in message
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_sequential_reader_yields_authentic_prefix_then_fails(
    record: tuple[bytes, bytes, bytes],
) -> None:
    """iter_plaintext yields verified segments and raises at the first bad one."""
    dek, plaintext, ciphertext = record
    tampered = bytearray(ciphertext)
    tampered[HEADER_SIZE + 2 * (SEG + TAG_SIZE) + 5] ^= 0x80
    it = iter_plaintext(io.BytesIO(bytes(tampered)), dek, AAD, SIZE)
    assert next(it) == plaintext[:SEG]
    assert next(it) == plaintext[SEG : 2 * SEG]
    with pytest.raises(RecordCorrupt):
        next(it)


def test_reader_tolerates_corruption_outside_the_window(
    record: tuple[bytes, bytes, bytes],
) -> None:
    """Random access authenticates the segments it reads plus the final one at open."""
    dek, plaintext, ciphertext = record
    tampered = bytearray(ciphertext)
    tampered[HEADER_SIZE + 2 * (SEG + TAG_SIZE) + 5] ^= 0x80
    reader = DecryptingReader(io.BytesIO(bytes(tampered)), dek, AAD, SIZE, length=SEG)
    assert reader.read() == plaintext[:SEG]
    whole = DecryptingReader(io.BytesIO(bytes(tampered)), dek, AAD, SIZE)
    with pytest.raises(RecordCorrupt):
        whole.read()


def test_bad_magic_is_detected(record: tuple[bytes, bytes, bytes]) -> None:
    """A file that is not a spool record is refused as corrupt."""
    dek, _, ciphertext = record
    _assert_corrupt(b"NOTSPOOL" + ciphertext[8:], dek)


# -- key wrapping ----------------------------------------------------------------------


def test_new_data_key_is_random_256_bit() -> None:
    """Data keys are 32 bytes and not repeated."""
    keys = {new_data_key() for _ in range(64)}
    assert len(keys) == 64
    assert all(len(k) == 32 for k in keys)


def test_wrap_unwrap_round_trip() -> None:
    """A wrapped DEK is 40 bytes, hides the DEK, and unwraps under the same master."""
    master, dek = new_data_key(), new_data_key()
    wrapped = wrap_key(master, dek)
    assert len(wrapped) == 40
    assert dek not in wrapped
    assert unwrap_key(master, wrapped) == dek


def test_unwrap_with_wrong_master_is_corrupt() -> None:
    """Unwrapping under another master key raises RecordCorrupt."""
    wrapped = wrap_key(new_data_key(), new_data_key())
    with pytest.raises(RecordCorrupt):
        unwrap_key(new_data_key(), wrapped)


@pytest.mark.parametrize("mangle", ["flip", "short", "odd"])
def test_unwrap_of_damaged_blob_is_corrupt(mangle: str) -> None:
    """A damaged or mis-sized wrapped key raises RecordCorrupt, not ValueError."""
    master = new_data_key()
    wrapped = bytearray(wrap_key(master, new_data_key()))
    if mangle == "flip":
        wrapped[3] ^= 1
    elif mangle == "short":
        del wrapped[16:]
    else:
        del wrapped[-3:]
    with pytest.raises(RecordCorrupt):
        unwrap_key(master, bytes(wrapped))


def test_wrong_key_sizes_are_programming_errors() -> None:
    """Keys that are not 256-bit are refused with ValueError."""
    with pytest.raises(ValueError):
        wrap_key(bytes(16), new_data_key())
    with pytest.raises(ValueError):
        EncryptingWriter(io.BytesIO(), bytes(16), AAD)
    with pytest.raises(ValueError):
        EncryptingWriter(io.BytesIO(), new_data_key(), AAD, 0)
    with pytest.raises(ValueError):
        iter_plaintext(io.BytesIO(), bytes(16), AAD, 0)
