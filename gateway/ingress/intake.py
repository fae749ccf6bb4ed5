"""Streams a device's multipart body through the channel policy into a pending record.

The body is read once. python-multipart parses it as it arrives; each allowed part is
written straight into the record's encrypted file already encoded as the upstream's
multipart body, so relaying never parses or re-encodes it. A field outside the channel's
allow-list is never written: its bytes are dropped as they pass (or, with
``on_unlisted = "reject"``, noted as a violation). Text values are validated and
NFC-normalised; only the batch manifest's values are kept in memory past their part,
and, when the caller asks for it (``keep_photo``), a photo's bytes, up to a bound, so
that the photo check reads them from memory rather than back from the record.
"""

from __future__ import annotations

import hashlib
import io
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from gateway.channels.fields import SAFE_FIELD_NAME, validate_text
from gateway.channels.policy import ChannelPolicy, FieldRule, check_batch, field_label
from gateway.errors import Malformed, TooManyParts, UnsupportedMediaType, Violation
from gateway.spool.pending import PendingRecord

MANIFEST_VALUES = frozenset({"batch_id", "record_count", "sha256"})
FILE_PART_HEADERS = {
    "jpeg_photo": ("face_photo.jpg", "image/jpeg"),
    "opaque_file": ("batch_file.bin", "application/octet-stream"),
}


def malformed(detail: str) -> Malformed:
    return Malformed(detail)


def multipart_boundary(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` Content-Type, or 415/400."""
    try:
        media, params = parse_options_header(content_type)
    except UnicodeError:  # not Latin-1: no media type of ours
        media, params = b"", {}
    if media.lower() != b"multipart/form-data":  # case-insensitive (RFC 9110 8.3.1)
        raise UnsupportedMediaType
    boundary = params.get(b"boundary", b"")
    if not 1 <= len(boundary) <= 70:
        raise malformed("the multipart boundary is missing or longer than 70 characters")
    return boundary


class _Mode(Enum):
    SKIP = 0
    TEXT = 1
    FILE = 2


@dataclass
class FilePart:
    """Where the file part's bytes sit inside the record's plaintext."""

    rule: FieldRule
    start: int
    length: int = 0
    sha256: str = ""
    """The file's SHA-256, for a batch file checked against its manifest (else empty)."""
    data: io.BytesIO | None = None
    """The photo's bytes, when they were kept in memory (``keep_photo``) and fit."""


@dataclass
class IntakeResult:
    """What the body held: names only, never values (except the batch manifest)."""

    fields: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    file: FilePart | None = None
    body_sha256: str = ""
    content_sha256: str = ""
    body_bytes: int = 0


def safe_name(name: str, policy: ChannelPolicy) -> str:
    """A part name fit to repeat in an error or a log line.

    A device chooses its part names, and a name can itself be personal (a resident's
    name typed into the wrong box): only names the gateway knows are repeated.
    """
    known = name in policy.fields or field_label(name) != "other"
    return name if known and SAFE_FIELD_NAME.fullmatch(name) else "(unlisted part)"


class MultipartIntake:
    """Push-based: :meth:`feed` raw body chunks, then :meth:`finish`."""

    def __init__(
        self,
        policy: ChannelPolicy,
        pending: PendingRecord,
        boundary: bytes,
        *,
        on_file_bytes: Callable[[memoryview], None] | None = None,
        content_digest: bool = True,
        keep_photo: int = 0,
    ) -> None:
        self.policy = policy
        self._keep_photo = keep_photo
        """A photo part of at most this many bytes is also kept in memory (FilePart.data)."""
        self._digest = content_digest
        """Digest each part for the Idempotency-Key replay check (only needed, and only
        paid for, when the device sent a key)."""
        self.pending = pending
        self.on_file_bytes = on_file_bytes
        """Called with each piece of the file part as it is written (the scan)."""
        self.egress_boundary = "gw-" + secrets.token_hex(16)
        self._eb = self.egress_boundary.encode()
        self.result = IntakeResult()
        self._body_hash = hashlib.sha256()
        # The content digest ignores the multipart boundary: a device that retries with
        # the same Idempotency-Key re-encodes its body with a new boundary, and that is
        # still the same submission. Per part: name length, name, SHA-256 of its bytes.
        self._content_hash = hashlib.sha256()
        self._part_hash = hashlib.sha256()
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
        )
        self._hname = bytearray()
        self._hvalue = bytearray()
        self._disposition = b""
        self._mode = _Mode.SKIP
        self._rule: FieldRule | None = None
        self._text = bytearray()
        self._text_over = False
        self._file_hash = hashlib.sha256()
        self._file_over = False
        self._seen: set[str] = set()
        self._parts = 0
        self._ended = False
        self.manifest: dict[str, str] = {}

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.egress_boundary}"

    # ------------------------------------------------------------------ driving

    def feed(self, chunk: bytes) -> None:
        self._body_hash.update(chunk)
        self.result.body_bytes += len(chunk)
        if self._ended:
            return  # an epilogue after the closing boundary is ignored, as RFC 2046 says
        try:
            self._parser.write(chunk)
        except MultipartParseError:
            raise malformed("the multipart body is malformed") from None

    def finish(self) -> IntakeResult:
        result = self.result
        result.body_sha256 = self._body_hash.hexdigest()
        result.content_sha256 = self._content_hash.hexdigest() if self._digest else ""
        if not self._ended:
            raise malformed("the multipart body ends before its closing boundary")
        result.violations.extend(self.policy.missing(self._seen))
        file = result.file
        if file is not None and file.rule.format == "opaque_file":
            result.violations.extend(
                check_batch(self.manifest.get("sha256"), file.sha256, file.rule.name)
            )
        return result

    # ---------------------------------------------------------------- callbacks

    def _part_begin(self) -> None:
        # Counted before the part is read: a body of 60,000 tiny parts is refused at
        # the first one too many, not parsed (and listed) to its end.
        self._parts += 1
        if self._parts > self.policy.max_parts:
            raise TooManyParts(self.policy.max_parts)
        self._disposition = b""
        self._mode = _Mode.SKIP
        self._rule = None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def _header_end(self) -> None:
        if bytes(self._hname).lower() == b"content-disposition":
            self._disposition = bytes(self._hvalue)
        self._hname.clear()
        self._hvalue.clear()

    def _headers_finished(self) -> None:
        kind, params = parse_options_header(self._disposition)
        raw_name = params.get(b"name")
        if kind != b"form-data" or raw_name is None:
            raise malformed("every part needs Content-Disposition: form-data with a name")
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise malformed("a part name is not valid UTF-8") from None
        if self._digest:
            encoded = name.encode()
            self._content_hash.update(len(encoded).to_bytes(4, "big") + encoded)
            self._part_hash = hashlib.sha256()
        result = self.result
        if name in self._seen:
            result.violations.append(
                Violation(safe_name(name, self.policy), "duplicate", "is sent more than once")
            )
            return
        self._seen.add(name)
        rule = self.policy.rule_for(name)
        if rule is None:
            if self.policy.on_unlisted == "reject":
                result.violations.append(
                    Violation(
                        safe_name(name, self.policy),
                        "not_allowed",
                        "is not allowed on this channel",
                    )
                )
            else:
                result.dropped.append(name)
            return
        self._rule = rule
        if rule.is_file:
            filename, media = FILE_PART_HEADERS[rule.format]
            self._write_part_header(name, filename, media)
            result.file = FilePart(rule, self.pending.writer.plaintext_size)
            if self._keep_photo and rule.format == "jpeg_photo":
                result.file.data = io.BytesIO()
            self._mode = _Mode.FILE
        else:
            self._text.clear()
            self._text_over = False
            self._mode = _Mode.TEXT

    def _write_part_header(
        self, name: str, filename: str | None = None, media: str | None = None
    ) -> None:
        head = b"--" + self._eb + b'\r\nContent-Disposition: form-data; name="' + name.encode()
        if filename:
            head += b'"; filename="' + filename.encode()
        head += b'"\r\n'
        if media:
            head += b"Content-Type: " + media.encode() + b"\r\n"
        self.pending.write(head + b"\r\n")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._digest:
            self._part_hash.update(memoryview(data)[start:end])
        if self._mode is _Mode.FILE:
            file = self.result.file
            assert file is not None and self._rule is not None
            size = end - start
            if file.length + size > self.policy.max_file_bytes(self._rule):
                self._file_over = True
                file.data = None
                return
            piece = memoryview(data)[start:end]
            self.pending.write(piece)
            if self.on_file_bytes is not None:
                self.on_file_bytes(piece)  # the virus scanner sees it as the spool does
            if self._rule.format == "opaque_file":  # checked against the batch's manifest
                self._file_hash.update(piece)
            elif file.data is not None:  # kept for the photo check, while it fits
                if file.length + size <= self._keep_photo:
                    file.data.write(piece)
                else:
                    file.data = None
            file.length += size
        elif self._mode is _Mode.TEXT:
            assert self._rule is not None
            if len(self._text) + (end - start) > self._rule.max_text_bytes:
                self._text_over = True
            else:
                self._text += data[start:end]

    def _part_end(self) -> None:
        if self._digest:
            self._content_hash.update(self._part_hash.digest())
        rule, mode = self._rule, self._mode
        self._mode = _Mode.SKIP
        if rule is None:
            return
        result = self.result
        if mode is _Mode.FILE:
            self.pending.write(b"\r\n")
            assert result.file is not None
            if rule.format == "opaque_file":
                result.file.sha256 = self._file_hash.hexdigest()
            result.fields.append(rule.name)
            if self._file_over:
                result.violations.append(
                    Violation(
                        rule.name,
                        "size",
                        f"must be at most {self.policy.max_file_bytes(rule)} bytes",
                    )
                )
            return
        if self._text_over:
            result.violations.append(Violation(rule.name, "max_length", "is too long"))
            return
        value, violation = validate_text(rule.name, bytes(self._text), rule.text_rule)
        self._text.clear()
        if violation is not None:
            result.violations.append(violation)
            return
        self._write_part_header(rule.name)
        self.pending.write(value.encode("utf-8") + b"\r\n")
        result.fields.append(rule.name)
        if rule.name in MANIFEST_VALUES and self.policy.file_field is not None:
            self.manifest[rule.name] = value

    def _end(self) -> None:
        self.pending.write(b"--" + self._eb + b"--\r\n")
        self._ended = True
