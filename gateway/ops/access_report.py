"""The monthly review of the access log (取得したログは定期的に分析): what a security
reviewer looks at, computed from the verified entries of a period.

- counts per device, staff user, channel and listener (attempts, accepted, refused);
- refusals by reason (the problem type);
- revoked or unregistered certificates that tried, with their fingerprints and addresses;
- lockouts (the staff users locked out, and how often);
- activity outside office hours: before or after the configured hours on a working day,
  or on a day the office is closed (Saturdays, Sundays, national holidays and the
  year-end closure of 12月29日–1月3日);
- devices and staff users of the registries not seen for ``idle_days`` (candidates for
  revocation), also those never seen;
- the chain's head at the end of the period.

National holidays come from the ``holidays`` package's Japan calendar (国民の祝日に関する
法律, as the Cabinet Office publishes it: 内閣府「国民の祝日」について, including the
substitute and 国民の休日 rules); the year-end closure is that of 行政機関の休日に関する
法律 第1条. The office's own extra closures can be listed in the configuration.
"""

from __future__ import annotations

import functools
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from importlib.metadata import version
from typing import Any

import holidays

from gateway.japan import JST

HOLIDAY_SOURCE = (
    f"python-holidays {version('holidays')}, Japan: 国民の祝日に関する法律 (内閣府「国民の祝日」"
    "について); year-end closure 12/29–1/3: 行政機関の休日に関する法律 第1条"
)
REFUSED_DEVICE = ("device-revoked", "device-unknown")


@functools.cache
def _holidays(year: int) -> Mapping[date, str]:
    """Japan's national holidays of ``year``, with their Japanese names."""
    return dict(holidays.country_holidays("JP", years=year, language="ja"))


@dataclass(frozen=True)
class OfficeHours:
    """When the ward office works: ``opens``–``closes`` (JST) on days it is open."""

    opens: time = time(8, 30)
    closes: time = time(17, 15)
    closed_days: frozenset[date] = frozenset()
    """The office's own closures besides weekends and holidays."""

    def is_working_day(self, day: date) -> bool:
        if day.weekday() >= 5 or day in self.closed_days:
            return False
        if (day.month, day.day) >= (12, 29) or (day.month, day.day) <= (1, 3):
            return False
        return day not in _holidays(day.year)

    def outside(self, moment: datetime) -> str | None:
        """Why ``moment`` is outside office hours (None: inside)."""
        local = moment.astimezone(JST)
        day = local.date()
        if not self.is_working_day(day):
            name = _holidays(day.year).get(day)
            if name:
                return f"holiday ({name})"
            if day.weekday() >= 5:
                return "weekend"
            return "office closed"
        if local.time() < self.opens:
            return "before hours"
        if local.time() >= self.closes:
            return "after hours"
        return None


@dataclass
class _Tally:
    attempts: int = 0
    accepted: int = 0
    refused: int = 0

    def add(self, body: Mapping[str, Any]) -> None:
        self.attempts += 1
        status = body.get("status")
        if body.get("outcome") in ("accepted", "replayed"):
            self.accepted += 1
        elif status is None or (isinstance(status, int) and status >= 400):
            self.refused += 1


@dataclass
class Review:
    first: date
    last: date
    entries: int = 0
    per: dict[str, dict[str, _Tally]] = field(
        default_factory=lambda: {
            k: defaultdict(_Tally) for k in ("device", "user", "channel", "listener")
        }
    )
    refusals: Counter[str] = field(default_factory=Counter)
    certificates: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    lockouts: Counter[str] = field(default_factory=Counter)
    outside: dict[tuple[str | None, ...], dict[str, Any]] = field(default_factory=dict)
    """Activity outside office hours, by (day, why, device, user, channel)."""
    last_seen: dict[str, dict[str, str]] = field(default_factory=lambda: {"device": {}, "user": {}})
    head: tuple[int, str] | None = None


def review(
    bodies: Iterable[tuple[int, str, Mapping[str, Any]]],
    *,
    first: date,
    last: date,
    office: OfficeHours,
) -> Review:
    """The review of the ``(seq, hash, body)`` entries whose time falls in [first, last];
    entries before ``first`` count only for when each device and user was last seen."""
    result = Review(first, last)
    for seq, digest, body in bodies:
        moment = datetime.fromisoformat(str(body["time"]))
        day = moment.astimezone(JST).date()
        if day > last:
            continue
        device, user = body.get("device_id"), body.get("user_id")
        for kind, key in (("device", device), ("user", user)):
            if key and key != "unregistered" and body.get("outcome") not in REFUSED_DEVICE:
                result.last_seen[kind][str(key)] = str(body["time"])
        if day < first:
            continue  # counted for "last seen" only
        result.entries += 1
        result.head = (seq, digest)
        for kind, key in (
            ("device", device),
            ("user", user),
            ("channel", body.get("channel")),
            ("listener", body.get("listener")),
        ):
            if key:
                result.per[kind][str(key)].add(body)
        problem = body.get("problem")
        if problem:
            result.refusals[str(problem)] += 1
        if body.get("outcome") in REFUSED_DEVICE:
            cert = (str(body.get("outcome")), str(device), str(body.get("fingerprint")))
            seen = result.certificates.setdefault(
                cert, {"attempts": 0, "addresses": set(), "first": body["time"]}
            )
            seen["attempts"] += 1
            seen["addresses"].add(str(body.get("remote")))
            seen["last"] = body["time"]
        if body.get("outcome") == "locked-out" and user:
            result.lockouts[str(user)] += 1
        why = office.outside(moment)
        if why is not None and body.get("outcome") != "tls-handshake-failed":
            key = (day.isoformat(), why, device, user, body.get("channel"))
            group = result.outside.setdefault(
                key, {"count": 0, "first": body["time"], "outcomes": Counter()}
            )
            group["count"] += 1
            group["last"] = body["time"]
            group["outcomes"][str(body.get("outcome"))] += 1
    return result


def idle(
    last_seen: Mapping[str, str], registered: Iterable[str], *, today: date, idle_days: int
) -> list[dict[str, Any]]:
    """Registered ids not seen for ``idle_days`` before ``today`` (or never)."""
    cutoff = today - timedelta(days=idle_days)
    found = []
    for key in sorted(registered):
        seen = last_seen.get(key)
        day = None if seen is None else datetime.fromisoformat(seen).astimezone(JST).date()
        if day is None or day < cutoff:
            found.append({"id": key, "last_seen": seen})
    return found


def as_document(
    result: Review,
    *,
    devices: Iterable[str],
    users: Iterable[str],
    today: date,
    idle_days: int,
    office: OfficeHours,
) -> dict[str, Any]:
    """The review as one JSON-ready document."""

    def tallies(kind: str) -> dict[str, dict[str, int]]:
        return {k: vars(v) for k, v in sorted(result.per[kind].items())}

    return {
        "period": {"from": result.first.isoformat(), "to": result.last.isoformat()},
        "entries": result.entries,
        "per_device": tallies("device"),
        "per_user": tallies("user"),
        "per_channel": tallies("channel"),
        "per_listener": tallies("listener"),
        "refusals_by_reason": dict(sorted(result.refusals.items())),
        "refused_certificates": [
            {
                "outcome": outcome,
                "device_id": device,
                "fingerprint": fingerprint,
                "attempts": seen["attempts"],
                "addresses": sorted(seen["addresses"]),
                "first": seen["first"],
                "last": seen["last"],
            }
            for (outcome, device, fingerprint), seen in sorted(result.certificates.items())
        ],
        "lockouts": dict(sorted(result.lockouts.items())),
        "outside_office_hours": {
            "hours": f"{office.opens:%H:%M}–{office.closes:%H:%M} JST on working days",
            "holidays": HOLIDAY_SOURCE,
            "count": sum(g["count"] for g in result.outside.values()),
            "groups": [
                {
                    **dict(
                        zip(("day", "why", "device_id", "user_id", "channel"), key, strict=True)
                    ),
                    "count": group["count"],
                    "first": group["first"],
                    "last": group["last"],
                    "outcomes": dict(sorted(group["outcomes"].items())),
                }
                for key, group in sorted(
                    result.outside.items(), key=lambda item: [k or "" for k in item[0]]
                )
            ],
        },
        "idle": {
            "days": idle_days,
            "devices": idle(result.last_seen["device"], devices, today=today, idle_days=idle_days),
            "users": idle(result.last_seen["user"], users, today=today, idle_days=idle_days),
        },
        "chain_head": None
        if result.head is None
        else {"seq": result.head[0], "hash": result.head[1]},
    }
