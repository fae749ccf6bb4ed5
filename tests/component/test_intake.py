"""Streaming multipart intake into a real encrypted pending record, through the channel policy."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path
from unittest import mock

import pytest
from aiohttp import MultipartReader
from aiohttp.streams import StreamReader
from multidict import CIMultiDict

from gateway.channels.photo import PhotoRules
from gateway.channels.policy import EXTRA_PARTS, KNOWN_FIELD_NAMES, ChannelPolicy
from gateway.config import GatewayConfig, load_config
from gateway.errors import Refusal, TooManyParts
from gateway.ingress.intake import IntakeResult, MultipartIntake, multipart_boundary
from gateway.ingress.problems import answered
from gateway.spool.pending import PendingRecord
from gateway.spool.records import NewRecord, new_submission_id
from gateway.spool.store import Spool

SHIPPED = Path(__file__).resolve().parents[2] / "conf" / "gateway.toml"
BOUNDARY = b"----DeviceBoundary7MA4YWxkTrZu0gW"
APPLICATION_ID = "12345678901234567890123"
CHUNKS = [1, 7, 1 << 30]  # byte by byte, odd, the whole body at once

# A "photo" that is not a JPEG (intake does not decode it) but is full of traps for a
# streaming parser: CRLFs, dashes, and a near-miss of the device's boundary.
TRAPS = b"\r\n--\r\n\r\n\r\n--" + BOUNDARY[:-1] + b"X\r\n-\r"
PHOTO = b"\xff\xd8\xff\xe0JFIF" + TRAPS + random.Random(3).randbytes(3000) + TRAPS + b"\xff\xd9"
BIG_PHOTO = TRAPS + random.Random(4).randbytes(150_000) + TRAPS  # spans spool segments


@pytest.fixture(scope="module")
def config() -> GatewayConfig:
    return load_config(SHIPPED)


def policy_for(config: GatewayConfig, channel: str) -> ChannelPolicy:
    return ChannelPolicy.from_config(channel, config.channels[channel])


# ------------------------------------------------------------------ builders


def part(
    name: str | bytes,
    value: str | bytes,
    *,
    filename: str | None = None,
    content_type: str | None = None,
) -> bytes:
    """One multipart part, written by hand."""
    raw_name = name.encode() if isinstance(name, str) else name
    head = b'Content-Disposition: form-data; name="' + raw_name + b'"'
    if filename is not None:
        head += b'; filename="' + filename.encode() + b'"'
    head += b"\r\n"
    if content_type is not None:
        head += b"Content-Type: " + content_type.encode() + b"\r\n"
    data = value.encode() if isinstance(value, str) else value
    return head + b"\r\n" + data


def body(parts: Iterable[bytes], *, close: bool = True, boundary: bytes = BOUNDARY) -> bytes:
    out = b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts)
    return out + (b"--" + boundary + b"--\r\n" if close else b"")


def online_parts(**extra: str) -> list[bytes]:
    parts = [
        part("application_id", APPLICATION_ID),
        part("wants_e_certificate", "1"),
        part("face_photo", PHOTO, filename="IMG_0001 新宿.jpg", content_type="image/png"),
        part("wants_braille", "false"),
    ]
    parts += [part(k, v) for k, v in extra.items()]
    return parts


OPEN: list[PendingRecord] = []


@pytest.fixture(autouse=True)
def _close_pending() -> Iterator[None]:
    """Every pending record a test leaves uncommitted is abandoned (file closed, unlinked)."""
    yield
    while OPEN:
        pending = OPEN.pop()
        if not pending.path.exists() or pending.committed:
            continue
        pending.abandon()


@dataclasses.dataclass
class Fed:
    intake: MultipartIntake
    pending: PendingRecord
    result: IntakeResult

    def plaintext(self) -> bytes:
        size = self.pending.writer.plaintext_size
        with self.pending.window(0, size) as stream:
            return stream.read()


def feed(
    spool: Spool,
    policy: ChannelPolicy,
    data: bytes,
    chunk: int = 1 << 30,
    boundary: bytes = BOUNDARY,
    *,
    content_digest: bool = True,
    keep_photo: int = 0,
) -> Fed:
    """Stream ``data`` through a fresh intake in ``chunk``-byte pieces and finish it."""
    pending = spool.begin(new_submission_id())
    OPEN.append(pending)
    intake = MultipartIntake(
        policy, pending, boundary, content_digest=content_digest, keep_photo=keep_photo
    )
    for i in range(0, len(data), chunk):
        intake.feed(data[i : i + chunk])
    result = intake.finish()
    pending.finish()
    return Fed(intake, pending, result)


async def read_back(content_type: str, data: bytes) -> list[tuple[str, str | None, str, bytes]]:
    """Parse a stored record with aiohttp: (name, filename, content type, bytes) per part."""
    stream = StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop())
    stream.feed_data(data)
    stream.feed_eof()
    reader = MultipartReader(CIMultiDict({"Content-Type": content_type}), stream)
    parts = []
    while True:
        item = await reader.next()
        if item is None:
            break
        assert not isinstance(item, MultipartReader)
        media = item.headers.get("Content-Type", "text/plain")
        parts.append((item.name or "", item.filename, media, await item.read()))
    return parts


# ------------------------------------------------------------- allowed fields


@pytest.mark.parametrize("chunk", CHUNKS)
async def test_allowed_fields_are_stored_as_egress_multipart(
    spool: Spool, config: GatewayConfig, chunk: int
) -> None:
    """Every allowed part reaches the record, which aiohttp reads back part for part."""
    fed = feed(spool, policy_for(config, "online-application"), body(online_parts()), chunk)
    assert fed.result.violations == []
    assert fed.result.dropped == []
    assert fed.result.fields == [
        "application_id",
        "wants_e_certificate",
        "face_photo",
        "wants_braille",
    ]
    parts = await read_back(fed.intake.content_type, fed.plaintext())
    assert [(n, v) for n, _, _, v in parts] == [
        ("application_id", APPLICATION_ID.encode()),
        ("wants_e_certificate", b"true"),  # normalised from "1"
        ("face_photo", PHOTO),
        ("wants_braille", b"false"),
    ]


@pytest.mark.parametrize("chunk", CHUNKS)
async def test_device_filename_and_media_type_are_not_forwarded(
    spool: Spool, config: GatewayConfig, chunk: int
) -> None:
    """The egress file part has the fixed filename face_photo.jpg and image/jpeg."""
    fed = feed(spool, policy_for(config, "online-application"), body(online_parts()), chunk)
    parts = await read_back(fed.intake.content_type, fed.plaintext())
    photo = next(p for p in parts if p[0] == "face_photo")
    assert photo[1:3] == ("face_photo.jpg", "image/jpeg")
    plaintext = fed.plaintext()
    assert b"IMG_0001" not in plaintext
    assert "新宿".encode() not in plaintext
    assert b"image/png" not in plaintext


def test_record_uses_its_own_random_boundary(spool: Spool, config: GatewayConfig) -> None:
    """The record's boundary is the egress one (gw-...), never the device's."""
    policy = policy_for(config, "online-application")
    first = feed(spool, policy, body(online_parts()))
    second = feed(spool, policy, body(online_parts()))
    assert first.intake.egress_boundary.startswith("gw-")
    assert first.intake.egress_boundary != second.intake.egress_boundary
    assert first.intake.content_type == (
        f"multipart/form-data; boundary={first.intake.egress_boundary}"
    )
    plaintext = first.plaintext()
    assert BOUNDARY not in plaintext
    assert plaintext.startswith(b"--" + first.intake.egress_boundary.encode() + b"\r\n")
    assert plaintext.endswith(b"--" + first.intake.egress_boundary.encode() + b"--\r\n")


@pytest.mark.parametrize("chunk", [7, 4096, 1 << 30])
async def test_large_photo_spanning_segments_is_unchanged(
    spool: Spool, config: GatewayConfig, chunk: int
) -> None:
    """A photo larger than two spool segments is stored byte for byte."""
    parts = online_parts()
    parts[2] = part("face_photo", BIG_PHOTO, filename="p.jpg", content_type="image/jpeg")
    fed = feed(spool, policy_for(config, "online-application"), body(parts), chunk)
    assert fed.result.violations == []
    stored = {n: v for n, _, _, v in await read_back(fed.intake.content_type, fed.plaintext())}
    assert stored["face_photo"] == BIG_PHOTO


def test_file_part_window_holds_the_photo_bytes(spool: Spool, config: GatewayConfig) -> None:
    """result.file locates the photo inside the record (a photo is not hashed again: only a
    batch file, checked against its manifest, carries its own SHA-256)."""
    fed = feed(spool, policy_for(config, "online-application"), body(online_parts()), 7)
    file = fed.result.file
    assert file is not None
    assert file.length == len(PHOTO)
    assert file.sha256 == ""
    with fed.pending.window(file.start, file.length) as stream:
        assert stream.read() == PHOTO


@pytest.mark.parametrize("chunk", [7, 4096, 1 << 30])
def test_a_photo_kept_in_memory_is_the_photo_the_record_holds(
    spool: Spool, config: GatewayConfig, chunk: int
) -> None:
    """With ``keep_photo``, the photo part's bytes are also kept in memory, exactly those
    the record holds; a photo over the bound is not (nor any photo by default)."""
    policy = policy_for(config, "online-application")
    parts = online_parts()
    parts[2] = part("face_photo", BIG_PHOTO, filename="p.jpg", content_type="image/jpeg")
    fed = feed(spool, policy, body(parts), chunk, keep_photo=len(BIG_PHOTO))
    file = fed.result.file
    assert file is not None and file.data is not None
    with fed.pending.window(file.start, file.length) as stream:
        assert file.data.getvalue() == stream.read() == BIG_PHOTO
    over = feed(spool, policy, body(parts), chunk, keep_photo=len(BIG_PHOTO) - 1)
    assert over.result.file is not None and over.result.file.data is None
    assert over.result.file.length == len(BIG_PHOTO)  # stored whole all the same
    kept_by_default = feed(spool, policy, body(parts), chunk).result.file
    assert kept_by_default is not None and kept_by_default.data is None


async def test_text_values_are_nfc_normalised(spool: Spool, config: GatewayConfig) -> None:
    """Decomposed (NFD) kana and names are stored in NFC."""
    name = "新宿 ガブリエル"
    kana = "シンジュク ガブリエル"
    parts = [
        part("application_id", APPLICATION_ID),
        part("face_photo", PHOTO, filename="p.jpg"),
        part("name", unicodedata.normalize("NFD", name)),
        part("name_kana", unicodedata.normalize("NFD", kana)),
        part("birth_date", "1990-01-31"),
    ]
    fed = feed(spool, policy_for(config, "overseas-application"), body(parts), 1)
    assert fed.result.violations == []
    stored = {n: v for n, _, _, v in await read_back(fed.intake.content_type, fed.plaintext())}
    assert stored["name"] == name.encode()
    assert stored["name_kana"] == kana.encode()
    assert unicodedata.normalize("NFD", name).encode() not in fed.plaintext()


def test_text_part_sent_as_file_is_still_text(spool: Spool, config: GatewayConfig) -> None:
    """A text field sent with a filename is validated as text; the filename is not kept."""
    parts = online_parts()
    parts[0] = part("application_id", APPLICATION_ID, filename="secret-name.txt")
    fed = feed(spool, policy_for(config, "online-application"), body(parts))
    assert fed.result.violations == []
    assert b"secret-name" not in fed.plaintext()


# ------------------------------------------------------------ unlisted fields


@pytest.mark.parametrize("chunk", CHUNKS)
async def test_unlisted_field_is_dropped_and_never_stored(
    spool: Spool, config: GatewayConfig, chunk: int
) -> None:
    """With on_unlisted = drop, name and address are dropped; their values never reach disk."""
    data = body(online_parts(name="PLANTED-新宿花子", address="PLANTED-歌舞伎町1-4-1"))
    fed = feed(spool, policy_for(config, "online-application"), data, chunk)
    assert fed.result.violations == []
    assert fed.result.dropped == ["name", "address"]
    assert "name" not in fed.result.fields
    plaintext = fed.plaintext()
    assert b"PLANTED" not in plaintext
    assert "新宿花子".encode() not in plaintext
    assert b'name="name"' not in plaintext
    assert b"PLANTED" not in fed.pending.path.read_bytes()
    names = [n for n, *_ in await read_back(fed.intake.content_type, plaintext)]
    assert names == ["application_id", "wants_e_certificate", "face_photo", "wants_braille"]


async def test_dropped_value_does_not_survive_commit(spool: Spool, config: GatewayConfig) -> None:
    """After commit, open_plaintext of the record holds no trace of a dropped value."""
    data = body(online_parts(birth_date="1985-04-01-PLANTED"))
    fed = feed(spool, policy_for(config, "online-application"), data, 7)
    record = await spool.commit(
        fed.pending,
        NewRecord(
            channel="online-application",
            destination="dnp-relay",
            device_id="tablet-01",
            user_id="staff-001",
            received_at=1.0,
            expires_at=2.0,
            content_type=fed.intake.content_type,
            body_sha256=fed.result.body_sha256,
            content_sha256=fed.result.content_sha256,
            field_names=tuple(fed.result.fields),
            idempotency_key=None,
        ),
    )
    plaintext = b"".join(await spool.open_plaintext(record))
    assert plaintext == fed.plaintext()
    assert b"PLANTED" not in plaintext
    assert record.field_names == tuple(fed.result.fields)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_unlisted_field_is_rejected_on_reject_channel(
    spool: Spool, config: GatewayConfig, chunk: int
) -> None:
    """With on_unlisted = reject, an unlisted part is a not_allowed violation, value unstored."""
    parts = [
        part("name", "新宿 花子"),
        part("birth_date", "1985-04-01"),
        part("reception_number", "U-0042"),
        part("individual_number", "983205673214"),
        part("phone", "03-3209-PLANTED"),
    ]
    fed = feed(spool, policy_for(config, "window-reception"), body(parts), chunk)
    assert [(v.field, v.rule) for v in fed.result.violations] == [("phone", "not_allowed")]
    assert fed.result.dropped == []
    assert b"PLANTED" not in fed.plaintext()


def test_rejected_part_name_that_may_be_a_value_is_not_repeated(
    spool: Spool, config: GatewayConfig
) -> None:
    """A part named like a value (a 個人番号) is reported as "(unlisted part)"."""
    parts = [
        part("name", "新宿 花子"),
        part("birth_date", "1985-04-01"),
        part("reception_number", "U-0042"),
        part("individual_number", "983205673214"),
        part("123456789018", "x"),
    ]
    fed = feed(spool, policy_for(config, "window-reception"), body(parts))
    (violation,) = fed.result.violations
    assert (violation.field, violation.rule) == ("(unlisted part)", "not_allowed")


# ------------------------------------------------------------------ violations


@pytest.mark.parametrize("chunk", CHUNKS)
def test_duplicate_part_is_a_violation(spool: Spool, config: GatewayConfig, chunk: int) -> None:
    """A field sent twice is a "duplicate" violation; the second value is not stored."""
    parts = online_parts()
    parts.append(part("application_id", "99999999999999999999999"))
    fed = feed(spool, policy_for(config, "online-application"), body(parts), chunk)
    assert [(v.field, v.rule) for v in fed.result.violations] == [("application_id", "duplicate")]
    assert b"99999999999999999999999" not in fed.plaintext()


def test_missing_required_fields_are_violations(spool: Spool, config: GatewayConfig) -> None:
    """Each required field that is absent is one "required" violation."""
    parts = [part("wants_braille", "true"), part("name", "dropped")]
    fed = feed(spool, policy_for(config, "online-application"), body(parts))
    assert sorted((v.field, v.rule) for v in fed.result.violations) == [
        ("application_id", "required"),
        ("face_photo", "required"),
    ]


def test_invalid_required_field_is_not_also_missing(spool: Spool, config: GatewayConfig) -> None:
    """A required field with a bad value gives its format violation, not "required" too."""
    parts = online_parts()
    parts[0] = part("application_id", "12345")
    fed = feed(spool, policy_for(config, "online-application"), body(parts))
    assert [(v.field, v.rule) for v in fed.result.violations] == [("application_id", "format")]
    assert "application_id" not in fed.result.fields
    assert b'name="application_id"' not in fed.plaintext()


def test_invalid_value_is_not_stored_nor_echoed(spool: Spool, config: GatewayConfig) -> None:
    """A bad 個人番号 (check digit) is a violation whose message does not carry the value."""
    parts = [
        part("name", "新宿 花子"),
        part("birth_date", "1985-04-01"),
        part("reception_number", "U-0042"),
        part("individual_number", "983205673215"),
    ]
    fed = feed(spool, policy_for(config, "window-reception"), body(parts))
    (violation,) = fed.result.violations
    assert (violation.field, violation.rule) == ("individual_number", "check_digit")
    assert "983205673215" not in violation.message
    assert b"983205673215" not in fed.plaintext()


@pytest.mark.parametrize("chunk", CHUNKS)
def test_text_part_over_the_bound_is_max_length(
    spool: Spool, config: GatewayConfig, chunk: int
) -> None:
    """A text part longer than its byte bound is a max_length violation, not buffered."""
    policy = policy_for(config, "overseas-application")
    too_long = "PLANTED" + "あ" * policy.fields["name"].max_text_bytes
    parts = [*online_parts()[:3], part("name", too_long), part("birth_date", "1990-01-31")]
    fed = feed(spool, policy, body(parts), chunk)
    assert [(v.field, v.rule) for v in fed.result.violations] == [("name", "max_length")]
    assert b"PLANTED" not in fed.plaintext()


def test_text_over_max_length_after_nfc_is_max_length(spool: Spool, config: GatewayConfig) -> None:
    """101 characters for a 100-character name is a max_length violation."""
    parts = [*online_parts()[:3], part("name", "あ" * 101), part("birth_date", "1990-01-31")]
    fed = feed(spool, policy_for(config, "overseas-application"), body(parts))
    assert [(v.field, v.rule) for v in fed.result.violations] == [("name", "max_length")]


def test_file_over_its_limit_is_a_size_violation(spool: Spool, config: GatewayConfig) -> None:
    """A photo larger than the photo rule's max_bytes is a "size" violation."""
    policy = dataclasses.replace(
        policy_for(config, "online-application"), photo=PhotoRules(max_bytes=1000)
    )
    fed = feed(spool, policy, body(online_parts()), 7)
    assert [(v.field, v.rule) for v in fed.result.violations] == [("face_photo", "size")]
    assert "1000" in fed.result.violations[0].message
    file = fed.result.file
    assert file is not None and file.length <= 1000


# --------------------------------------------------------------------- batch

BATCH = random.Random(7).randbytes(5_000) + b"\r\n--" + BOUNDARY[:-3]


def batch_parts(digest: str) -> list[bytes]:
    return [
        part("batch_id", "B-20261122-01"),
        part("record_count", "42"),
        part("sha256", digest),
        part("batch_file", BATCH, filename="../../etc/passwd", content_type="text/plain"),
    ]


@pytest.mark.parametrize("chunk", CHUNKS)
async def test_batch_with_matching_sha256_is_accepted(
    spool: Spool, config: GatewayConfig, chunk: int
) -> None:
    """A batch whose manifest sha256 matches the file passes; the file is stored unchanged."""
    digest = hashlib.sha256(BATCH).hexdigest().upper()
    fed = feed(spool, policy_for(config, "card-delegation-batch"), body(batch_parts(digest)), chunk)
    assert fed.result.violations == []
    assert fed.intake.manifest == {
        "batch_id": "B-20261122-01",
        "record_count": "42",
        "sha256": digest.lower(),
    }
    parts = await read_back(fed.intake.content_type, fed.plaintext())
    assert parts[-1] == ("batch_file", "batch_file.bin", "application/octet-stream", BATCH)
    assert b"passwd" not in fed.plaintext()


def test_batch_sha256_mismatch_is_a_violation(spool: Spool, config: GatewayConfig) -> None:
    """A manifest sha256 that is not the file's digest is a sha256_mismatch on batch_file."""
    fed = feed(spool, policy_for(config, "card-delegation-batch"), body(batch_parts("0" * 64)), 7)
    assert [(v.field, v.rule) for v in fed.result.violations] == [("batch_file", "sha256_mismatch")]


def test_manifest_values_are_kept_only_on_file_channels(
    spool: Spool, config: GatewayConfig
) -> None:
    """A channel without a file field keeps no values in memory (no manifest)."""
    parts = [
        part("name", "新宿 花子"),
        part("birth_date", "1985-04-01"),
        part("reception_number", "U-0042"),
        part("individual_number", "983205673214"),
    ]
    fed = feed(spool, policy_for(config, "window-reception"), body(parts))
    assert fed.result.violations == []
    assert fed.intake.manifest == {}


# ------------------------------------------------------------------ malformed


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"this is not multipart at all", id="garbage"),
        pytest.param(
            b"--"
            + BOUNDARY
            + b"\r\nContent-Type: text/plain\r\n\r\nvalue\r\n--"
            + BOUNDARY
            + b"--",
            id="no-content-disposition",
        ),
        pytest.param(
            b"--"
            + BOUNDARY
            + b'\r\nContent-Disposition: attachment; name="application_id"\r\n\r\nv\r\n--'
            + BOUNDARY
            + b"--",
            id="not-form-data",
        ),
        pytest.param(
            b"--" + BOUNDARY + b"\r\nContent-Disposition: form-data\r\n\r\nv\r\n--" + BOUNDARY,
            id="no-name",
        ),
        pytest.param(body([part(b"\xff\xfe", "v")]), id="name-not-utf8"),
        pytest.param(
            b"--" + BOUNDARY + b"\r\nX-Long: " + b"a" * 20_000 + b"\r\n\r\nv", id="huge-header"
        ),
    ],
)
@pytest.mark.parametrize("chunk", [1, 1 << 30])
def test_malformed_multipart_is_400(
    spool: Spool, config: GatewayConfig, data: bytes, chunk: int
) -> None:
    """A body that is not well-formed multipart/form-data is 400 malformed."""
    with pytest.raises(Refusal) as info:
        feed(spool, policy_for(config, "online-application"), data, chunk)
    assert (answered(info.value).status, answered(info.value).slug) == (400, "malformed")


@pytest.mark.parametrize("chunk", CHUNKS)
def test_truncated_body_is_400(spool: Spool, config: GatewayConfig, chunk: int) -> None:
    """A body without its closing boundary (a cut connection) is 400 at finish()."""
    data = body(online_parts(), close=False)
    with pytest.raises(Refusal) as info:
        feed(spool, policy_for(config, "online-application"), data, chunk)
    assert answered(info.value).status == 400
    assert "closing boundary" in answered(info.value).detail


def test_body_cut_inside_a_part_is_400(spool: Spool, config: GatewayConfig) -> None:
    """A body cut in the middle of the photo is 400."""
    data = body(online_parts())
    with pytest.raises(Refusal) as info:
        feed(spool, policy_for(config, "online-application"), data[: len(data) // 2], 7)
    assert answered(info.value).status == 400


def test_empty_body_is_400(spool: Spool, config: GatewayConfig) -> None:
    """An empty body is 400, not an empty submission."""
    with pytest.raises(Refusal) as info:
        feed(spool, policy_for(config, "online-application"), b"")
    assert answered(info.value).status == 400


def test_epilogue_after_closing_boundary_is_ignored(spool: Spool, config: GatewayConfig) -> None:
    """Bytes after the closing boundary (RFC 2046 epilogue) are not parsed nor stored."""
    data = body(online_parts()) + b"epilogue PLANTED --" + BOUNDARY + b"\r\n"
    fed = feed(spool, policy_for(config, "online-application"), data, 7)
    assert fed.result.violations == []
    assert b"PLANTED" not in fed.plaintext()
    assert fed.result.body_bytes == len(data)


# --------------------------------------------------------------------- digests


def test_body_digest_and_size(spool: Spool, config: GatewayConfig) -> None:
    """body_sha256 and body_bytes describe exactly the bytes received."""
    data = body(online_parts())
    fed = feed(spool, policy_for(config, "online-application"), data, 7)
    assert fed.result.body_sha256 == hashlib.sha256(data).hexdigest()
    assert fed.result.body_bytes == len(data)


def test_content_digest_ignores_the_boundary(spool: Spool, config: GatewayConfig) -> None:
    """The same parts under another boundary give the same content digest, not body digest."""
    policy = policy_for(config, "online-application")
    other = b"AnotherBoundary123"
    first = feed(spool, policy, body(online_parts()))
    second = feed(spool, policy, body(online_parts(), boundary=other), 7, boundary=other)
    assert first.result.content_sha256 == second.result.content_sha256
    assert first.result.body_sha256 != second.result.body_sha256


def test_content_digest_changes_with_a_value(spool: Spool, config: GatewayConfig) -> None:
    """A different value, even in a dropped part, gives a different content digest."""
    policy = policy_for(config, "online-application")
    first = feed(spool, policy, body(online_parts(memo="a")))
    second = feed(spool, policy, body(online_parts(memo="b")))
    assert first.result.content_sha256 != second.result.content_sha256


def test_without_an_idempotency_key_no_content_digest_is_made(
    spool: Spool, config: GatewayConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The digest serves only the Idempotency-Key replay check: without a key the parts
    are not hashed at all; the photo's bytes go through SHA-256 once, for the receipt."""
    hashed: list[int] = []
    real = hashlib.sha256

    class Counting:
        def __init__(self) -> None:
            self._h = real()

        def update(self, data: bytes | memoryview) -> None:
            hashed.append(len(data))
            self._h.update(data)

        def hexdigest(self) -> str:
            return self._h.hexdigest()

        def digest(self) -> bytes:
            return self._h.digest()

    monkeypatch.setattr("gateway.ingress.intake.hashlib.sha256", Counting)
    data = body(online_parts())
    fed = feed(spool, policy_for(config, "online-application"), data, content_digest=False)
    assert fed.result.content_sha256 == ""
    assert fed.result.body_sha256 == real(data).hexdigest()
    # The body once (the receipt) and the ciphertext once (the spool writer): no more.
    without = sum(hashed)
    assert 2 * len(data) - 1000 < without < 2 * len(data) + 1000
    hashed.clear()
    feed(spool, policy_for(config, "online-application"), data, content_digest=True)
    assert sum(hashed) >= without + len(PHOTO)  # with a key: every part as well


# ------------------------------------------------------------ content type


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("multipart/form-data; boundary=abc", b"abc"),
        ('multipart/form-data; boundary="a b:c"', b"a b:c"),
        ("Multipart/Form-Data; charset=utf-8; boundary=" + "x" * 70, b"x" * 70),
    ],
)
def test_multipart_boundary(header: str, expected: bytes) -> None:
    """The boundary parameter is read from a multipart/form-data Content-Type."""
    assert multipart_boundary(header) == expected


@pytest.mark.parametrize(
    "header",
    ["", "application/json", "multipart/mixed; boundary=abc", "text/plain; boundary=abc"],
)
def test_non_form_data_is_415(header: str) -> None:
    """Anything but multipart/form-data is 415 unsupported-media-type."""
    with pytest.raises(Refusal) as info:
        multipart_boundary(header)
    assert (answered(info.value).status, answered(info.value).slug) == (
        415,
        "unsupported-media-type",
    )


@pytest.mark.parametrize(
    "header",
    [
        "multipart/form-data",
        "multipart/form-data; boundary=",
        'multipart/form-data; boundary=""',
        "multipart/form-data; boundary=" + "x" * 71,
    ],
)
def test_missing_or_overlong_boundary_is_400(header: str) -> None:
    """multipart/form-data without a usable boundary (1 to 70 characters) is 400."""
    with pytest.raises(Refusal) as info:
        multipart_boundary(header)
    assert (answered(info.value).status, answered(info.value).slug) == (400, "malformed")


def test_a_body_with_more_parts_than_the_channel_takes_is_refused_at_the_first_too_many(
    spool: Spool, config: GatewayConfig
) -> None:
    """The channel's fields, the known item names and 16 more parts are read (the
    extras dropped); the part after that is refused 413 before it is parsed, whatever
    follows it."""
    policy = policy_for(config, "online-application")
    limit = len(policy.fields) + len(KNOWN_FIELD_NAMES) + EXTRA_PARTS
    assert policy.max_parts == limit
    extras = [part(f"extra_{i}", "x") for i in range(limit - len(online_parts()))]
    fed = feed(spool, policy, body(online_parts() + extras))
    assert fed.result.violations == [] and len(fed.result.dropped) == len(extras)

    pending = spool.begin(new_submission_id())
    OPEN.append(pending)
    intake = MultipartIntake(policy, pending, BOUNDARY)
    allowed = body(online_parts() + extras, close=False)
    intake.feed(allowed)  # every part the channel takes
    hostile = body([part("one_more", "x")] + [part("x", "y")] * 60_000)
    with pytest.raises(TooManyParts) as refused:
        intake.feed(hostile)
    problem = answered(refused.value)
    assert (problem.status, problem.slug) == (413, "too-many-parts")
    assert str(limit) in problem.detail
    assert len(intake.result.dropped) == len(extras)  # nothing past the limit was listed
