"""Channel policy: device and network allow-lists, JST windows, retention, field rules."""

from __future__ import annotations

import ipaddress
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import pytest

from gateway.channels.policy import (
    JST,
    KNOWN_FIELD_NAMES,
    ChannelPolicy,
    FieldRule,
    check_batch,
    device_allowed,
    expires_at,
    field_label,
    source_allowed,
    window_closed,
)
from gateway.config import ChannelConfig, GatewayConfig, load_config
from gateway.errors import Violation
from gateway.ingress.problems import problem_of

SHIPPED = Path(__file__).resolve().parents[2] / "conf" / "gateway.toml"


@pytest.fixture(scope="module")
def config() -> GatewayConfig:
    return load_config(SHIPPED)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def with_changes(channel: ChannelConfig, **changes: object) -> ChannelConfig:
    """A validated copy of ``channel`` with some keys changed."""
    return ChannelConfig.model_validate({**channel.model_dump(), **changes})


# ------------------------------------------------------------------- devices


def test_device_allowed_by_group(config: GatewayConfig) -> None:
    """A device of group assist-tablet may post on a channel listing group:assist-tablet."""
    channel = config.channels["online-application"]
    assert device_allowed(channel, "tablet-01", "assist-tablet")
    assert not device_allowed(channel, "tablet-01", "intranet-pc")


def test_device_allowed_by_id(config: GatewayConfig) -> None:
    """A channel listing a device id admits that device whatever its group, and only it."""
    channel = with_changes(config.channels["window-reception"], devices=["counter-07"])
    assert device_allowed(channel, "counter-07", "")
    assert device_allowed(channel, "counter-07", "somewhere-else")
    assert not device_allowed(channel, "counter-08", "counter-terminal")


def test_device_without_group_never_matches_a_group_entry(config: GatewayConfig) -> None:
    """An empty group is no group: it never matches "group:" entries."""
    channel = with_changes(config.channels["window-reception"], devices=["group:"])
    assert not device_allowed(channel, "counter-07", "")


def test_group_name_is_not_a_device_id(config: GatewayConfig) -> None:
    """A device whose id equals a group name is not admitted by group:NAME."""
    channel = config.channels["online-application"]
    assert not device_allowed(channel, "assist-tablet", "")


# ----------------------------------------------------------------- networks


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("10.60.0.1", True),
        ("10.60.0.255", True),
        ("10.60.1.1", False),
        ("10.61.0.1", False),
        ("127.0.0.1", False),
        ("::ffff:10.60.0.7", True),  # IPv4-mapped IPv6 from a dual-stack socket
        ("::ffff:10.61.0.7", False),
        ("fd00:60::5", True),
        ("fd00:60::5%eth0", True),  # a zone index is ignored
        ("fd00:61::5", False),
        ("::1", False),
        ("not-an-address", False),
        ("10.60.0.1/24", False),
        ("10.60.0", False),
        (" 10.60.0.1", False),
        ("", False),
        (None, False),
    ],
)
def test_source_allowed(config: GatewayConfig, address: str | None, allowed: bool) -> None:
    """Source addresses are matched against IPv4 and IPv6 networks; garbage and None refused."""
    channel = with_changes(
        config.channels["window-reception"], source_networks=["10.60.0.0/24", "fd00:60::/64"]
    )
    assert source_allowed(channel, address) is allowed


def test_ipv4_channel_refuses_every_ipv6_peer(config: GatewayConfig) -> None:
    """A channel with only IPv4 networks refuses an IPv6 peer that is not IPv4-mapped."""
    channel = config.channels["issuance-reservation"]
    assert channel.source_networks == (ipaddress.ip_network("10.60.0.0/24"),)
    assert not source_allowed(channel, "::a3c:5")  # IPv4-compatible, not mapped
    assert source_allowed(channel, "::ffff:a3c:5")  # 10.60.0.5, mapped


# -------------------------------------------------------------------- window


@pytest.mark.parametrize(
    ("now", "inside"),
    [
        ("2026-05-25T14:59:59", False),  # 2026-05-25 23:59:59 JST
        ("2026-05-25T15:00:00", True),  # 2026-05-26 00:00:00 JST, the first day
        ("2026-12-01T00:00:00", True),
        ("2027-03-31T14:59:59", True),  # 2027-03-31 23:59:59 JST, the last day
        ("2027-03-31T15:00:00", False),  # 2027-04-01 00:00:00 JST
        ("2030-01-01T00:00:00", False),
    ],
)
def test_window_uses_jst_dates(config: GatewayConfig, now: str, inside: bool) -> None:
    """The overseas channel's active window is judged by the JST calendar date."""
    problem = window_closed(config.channels["overseas-application"], utc(now))
    assert (problem is None) is inside


def test_window_before_and_after_say_which(config: GatewayConfig) -> None:
    """Before the window is 403 "opens on", after it 403 "closed after", both channel-inactive."""
    channel = config.channels["overseas-application"]
    before = window_closed(channel, utc("2026-01-01T00:00:00"))
    after = window_closed(channel, utc("2027-04-01T00:00:00"))
    assert before is not None and after is not None
    assert (problem_of(before).status, problem_of(before).slug) == (403, "channel-inactive")
    assert (problem_of(after).status, problem_of(after).slug) == (403, "channel-inactive")
    assert "opens on 2026-05-26" in before.detail
    assert "closed after 2027-03-31" in after.detail


def test_window_accepts_any_aware_time_zone(config: GatewayConfig) -> None:
    """The same instant written in JST or in UTC-5 gives the same answer."""
    channel = config.channels["overseas-application"]
    last_second = datetime(2027, 3, 31, 23, 59, 59, tzinfo=JST)
    assert window_closed(channel, last_second) is None
    new_york = last_second.astimezone(timezone(timedelta(hours=-5)))
    assert new_york.date() == date(2027, 3, 31)
    assert window_closed(channel, new_york) is None
    assert window_closed(channel, last_second + timedelta(seconds=1)) is not None


def test_channel_without_window_is_always_open(config: GatewayConfig) -> None:
    """A channel with no active_from/active_until never refuses for time."""
    channel = config.channels["online-application"]
    for when in ("1999-01-01T00:00:00", "2026-05-25T00:00:00", "2099-12-31T23:59:59"):
        assert window_closed(channel, utc(when)) is None


def test_open_ended_window(config: GatewayConfig) -> None:
    """A window with only active_from is open from that JST date on."""
    channel = with_changes(
        config.channels["online-application"], active_from=date(2027, 1, 1), active_until=None
    )
    assert window_closed(channel, utc("2026-12-31T14:59:59")) is not None
    assert window_closed(channel, utc("2026-12-31T15:00:00")) is None
    assert window_closed(channel, utc("2099-01-01T00:00:00")) is None


# ----------------------------------------------------------------- retention


def test_expires_at_is_received_plus_retention_days() -> None:
    """expires_at = received_at + days * 86400 (受信後1週間で消去 for 7 days)."""
    assert expires_at(1_800_000_000.0, 7) == 1_800_000_000.0 + 7 * 86400
    assert expires_at(1_800_000_000.25, 1) == 1_800_086_400.25


# -------------------------------------------------------------- field labels


def test_field_label_keeps_known_names() -> None:
    """Known field names are safe labels and stay as they are."""
    for name in ("individual_number", "face_photo", "postal_code", "batch_file"):
        assert field_label(name) == name


@pytest.mark.parametrize("name", ["my_number_copy", "983205673214", "新宿 花子", "", "NAME"])
def test_field_label_maps_unknown_names_to_other(name: str) -> None:
    """A name a device made up (maybe a value) becomes "other" in labels and logs."""
    assert field_label(name) == "other"


def test_field_label_accepts_extra_names() -> None:
    """Names passed as extra (e.g. a channel's own fields) are kept."""
    assert field_label("custom_field", extra={"custom_field"}) == "custom_field"
    assert field_label("custom_field", extra=()) == "other"


def test_every_shipped_field_is_a_known_label(config: GatewayConfig) -> None:
    """Every field of every shipped channel is a known label (none collapses to other)."""
    names = {n for c in config.channels.values() for n in c.fields}
    assert names <= KNOWN_FIELD_NAMES


# ------------------------------------------------------------- channel policy


def test_policy_from_config(config: GatewayConfig) -> None:
    """ChannelPolicy carries the channel's rules, unlisted policy and body limit."""
    policy = ChannelPolicy.from_config("window-reception", config.channels["window-reception"])
    assert policy.name == "window-reception"
    assert policy.on_unlisted == "reject"
    assert policy.max_body_bytes == 65536
    assert set(policy.fields) == set(config.channels["window-reception"].fields)
    assert policy.rule_for("individual_number") == FieldRule(
        "individual_number", "individual_number", True, None
    )
    assert policy.rule_for("phone") is None
    assert policy.file_field is None


def test_policy_file_field_and_limits(config: GatewayConfig) -> None:
    """The photo limit is the photo rule's 7 MB; an opaque batch file gets the body limit."""
    photo = ChannelPolicy.from_config("online-application", config.channels["online-application"])
    batch = ChannelPolicy.from_config(
        "card-delegation-batch", config.channels["card-delegation-batch"]
    )
    assert photo.file_field is not None and photo.file_field.name == "face_photo"
    assert photo.file_field.is_file
    assert photo.max_file_bytes(photo.file_field) == 7_000_000
    assert batch.file_field is not None and batch.file_field.name == "batch_file"
    assert batch.max_file_bytes(batch.file_field) == 64 * 1024 * 1024


def test_text_rule_and_byte_bound(config: GatewayConfig) -> None:
    """A text rule carries format and max_length; its byte bound is 16 bytes a character + 64."""
    policy = ChannelPolicy.from_config(
        "overseas-application", config.channels["overseas-application"]
    )
    name = policy.fields["name"]
    assert not name.is_file
    assert (name.text_rule.format, name.text_rule.limit) == ("text", 100)
    assert name.max_text_bytes == 100 * 16 + 64
    assert policy.fields["application_id"].max_text_bytes == 23 * 16 + 64


def test_missing_lists_each_required_field(config: GatewayConfig) -> None:
    """missing() names every required field not present, with rule "required"."""
    policy = ChannelPolicy.from_config(
        "overseas-application", config.channels["overseas-application"]
    )
    violations = policy.missing(["application_id", "wants_braille", "unlisted"])
    assert violations == [
        Violation("face_photo", "required", "is required on this channel"),
        Violation("name", "required", "is required on this channel"),
        Violation("birth_date", "required", "is required on this channel"),
    ]
    required = [n for n, r in policy.fields.items() if r.required]
    assert policy.missing(required) == []
    assert policy.missing(iter(required)) == []


def test_policy_is_frozen(config: GatewayConfig) -> None:
    """A ChannelPolicy cannot be changed after it is built."""
    policy = ChannelPolicy.from_config("online-application", config.channels["online-application"])
    with pytest.raises(AttributeError):
        policy.on_unlisted = "reject"  # type: ignore[misc]


# ---------------------------------------------------------------- batch check

DIGEST = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


def test_check_batch_match() -> None:
    """A manifest sha256 equal to the file's digest passes, in either case."""
    assert check_batch(DIGEST, DIGEST, "batch_file") == []
    assert check_batch(DIGEST.upper(), DIGEST, "batch_file") == []


def test_check_batch_mismatch() -> None:
    """A different digest is one sha256_mismatch violation on the file field."""
    other = "0" * 64
    (violation,) = check_batch(other, DIGEST, "batch_file")
    assert (violation.field, violation.rule) == ("batch_file", "sha256_mismatch")
    assert DIGEST not in violation.message and other not in violation.message


def test_check_batch_without_either_side_is_silent() -> None:
    """No manifest digest (already a required/format violation) or no file: nothing added."""
    assert check_batch(None, DIGEST, "batch_file") == []
    assert check_batch(DIGEST, None, "batch_file") == []
