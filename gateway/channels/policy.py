"""Channel policy: who may send, from where, when, and which fields may travel.

Pure code: frozen dataclasses built from the configuration, decisions as functions of
their inputs (time passed in as ``now``). Nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from functools import cached_property

from gateway.channels.fields import TextRule
from gateway.channels.photo import PhotoRules
from gateway.config import FILE_FORMATS, ChannelConfig
from gateway.errors import Violation, WindowClosed
from gateway.japan import JST

KNOWN_FIELD_NAMES = frozenset(
    {
        # Everything a ward device is known to hold, allowed on some channel or not
        # (docs/contract.md, "Channels"). A dropped field outside this set is counted as
        # "other", so a metric label or log line can never carry a name a device made up.
        "application_id",
        "face_photo",
        "wants_e_certificate",
        "wants_braille",
        "pin_signature_cert",
        "pin_user_cert",
        "pin_resident_registry",
        "pin_card_info_input",
        "name",
        "name_kana",
        "alias_name",
        "birth_date",
        "sex",
        "address",
        "registered_domicile",
        "phone",
        "email",
        "foreign_resident_category",
        "residence_period_expiry",
        "manufacture_control_number",
        "shipment_number",
        "reservation_number",
        "recipient_type",
        "proxy_name",
        "reservation_datetime",
        "issuance_window",
        "reception_number",
        "processing_status",
        "card_expiry_date",
        "individual_number",
        "batch_file",
        "batch_id",
        "record_count",
        "sha256",
        "postal_code",
        "nationality",
        "gender",
        "photo",
    }
)


def field_label(name: str, extra: Iterable[str] = ()) -> str:
    """A field name safe for a metric label or a log line: known names, else ``other``."""
    return name if name in KNOWN_FIELD_NAMES or name in extra else "other"


@dataclass(frozen=True)
class FieldRule:
    """One field a channel lets through."""

    name: str
    format: str
    required: bool
    max_length: int | None

    @property
    def is_file(self) -> bool:
        return self.format in FILE_FORMATS

    @cached_property  # read for every chunk of a text part
    def text_rule(self) -> TextRule:
        return TextRule(self.format, self.max_length)

    @property
    def max_text_bytes(self) -> int:
        """Bytes to buffer for a text part: enough for ``max_length`` characters of UTF-8."""
        # validate_text bounds raw input the same way: decomposed (NFD) input may need
        # several code points, of up to four bytes each, per character after NFC.
        return self.text_rule.limit * 16 + 64


EXTRA_PARTS = 16
"""Parts beyond a channel's fields and the known item names a body may carry."""


@dataclass(frozen=True)
class ChannelPolicy:
    """The field allow-list of one channel and what to do with the rest."""

    name: str
    fields: Mapping[str, FieldRule]
    on_unlisted: str
    max_body_bytes: int
    photo: PhotoRules = field(default_factory=PhotoRules)

    @classmethod
    def from_config(cls, name: str, config: ChannelConfig) -> ChannelPolicy:
        rules = {
            field: FieldRule(field, spec.format, spec.required, spec.max_length)
            for field, spec in config.fields.items()
        }
        return cls(name, rules, config.on_unlisted, config.max_body_bytes)

    @property
    def max_parts(self) -> int:
        """Multipart parts a body may have: each of the channel's fields once, every item
        name of the council's papers (a device may send its whole form; what the channel
        does not take is dropped, or refused with ``on_unlisted = "reject"``), and a few
        more of its own."""
        return len(self.fields) + len(KNOWN_FIELD_NAMES) + EXTRA_PARTS

    @property
    def file_field(self) -> FieldRule | None:
        return next((r for r in self.fields.values() if r.is_file), None)

    def rule_for(self, part_name: str) -> FieldRule | None:
        return self.fields.get(part_name)

    def max_file_bytes(self, rule: FieldRule) -> int:
        return self.photo.max_bytes if rule.format == "jpeg_photo" else self.max_body_bytes

    def missing(self, present: Iterable[str]) -> list[Violation]:
        seen = set(present)
        return [
            Violation(name, "required", "is required on this channel")
            for name, rule in self.fields.items()
            if rule.required and name not in seen
        ]


def check_batch(
    manifest_sha256: str | None, file_sha256: str | None, file_field: str
) -> list[Violation]:
    """The batch file must hash to the manifest's sha256 (資料30: the file is opaque)."""
    if manifest_sha256 is None or file_sha256 is None:
        return []
    if manifest_sha256.lower() != file_sha256:
        return [
            Violation(
                file_field,
                "sha256_mismatch",
                "the file's SHA-256 does not match the manifest's sha256",
            )
        ]
    return []


def device_allowed(config: ChannelConfig, device_id: str, group: str) -> bool:
    return device_id in config.devices or (bool(group) and f"group:{group}" in config.devices)


def source_allowed(config: ChannelConfig, address: str | None) -> bool:
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in config.source_networks)


def window_closed(config: ChannelConfig, now: datetime) -> WindowClosed | None:
    """The fact that ``now`` (aware) is outside the channel's active window (JST dates),
    saying which end; None inside it."""
    today: date = now.astimezone(JST).date()
    if config.active_from and today < config.active_from:
        return WindowClosed(f"this channel opens on {config.active_from.isoformat()} (JST)")
    if config.active_until and today > config.active_until:
        return WindowClosed(f"this channel closed after {config.active_until.isoformat()} (JST)")
    return None


def expires_at(received_at: float, retention_days: int) -> float:
    """When the server copy must be gone (受信後1週間で消去 for 7 days)."""
    return received_at + retention_days * 86400
