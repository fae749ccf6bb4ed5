"""The monthly review (定期的な分析) from a month of synthetic traffic, every figure checked:
counts per device, user, channel and listener; refusals by reason; revoked and
unregistered certificates with their addresses; lockouts; activity outside office
hours (weekends, 文化の日 and 勤労感謝の日, before and after hours); idle devices and
users; the chain's head. Also in CSV and text, and refused on a log that does not verify."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import ctl

from gateway.ingress.access import encode
from gateway.japan import JST
from gateway.ops.access_log import AccessLog
from gateway.ops.access_report import OfficeHours, as_document, review
from gateway.testing.sandbox import Sandbox, build_sandbox

pytestmark = pytest.mark.usefixtures("hermetic_cli")

CHANNEL = "online-application"
FP_LOST = "sha256:" + "1" * 64
FP_STRANGER = "sha256:" + "2" * 64


def at(day: int, hour: int, minute: int = 0, month: int = 11) -> str:
    moment = datetime(2026, month, day, hour, minute, tzinfo=JST)
    return moment.isoformat(timespec="milliseconds")


def entry(time: str, **fields: Any) -> dict[str, Any]:
    base = {
        "time": time,
        "listener": "tablets",
        "remote": "10.1.2.3",
        "port": 50000,
        "fingerprint": "sha256:" + "a" * 64,
        "serial": "01",
        "device_id": "tablet-01",
        "user_id": "staff-001",
        "channel": CHANNEL,
        "method": "POST",
        "outcome": "accepted",
        "problem": None,
        "status": 202,
        "bytes": 1000,
        "submission_id": None,
        "request_id": "0" * 16,
    }
    return {**base, **fields}


def month() -> Iterator[dict[str, Any]]:
    """November 2026: working days 2, 4–6, 9–13, 16–20, 24–27, 30; 3 and 23 are
    national holidays (文化の日, 勤労感謝の日); 1, 7–8, ... are weekends."""
    # An October entry: only "last seen" (pc-01 on 10-15).
    yield entry(at(15, 10, month=10), device_id="pc-01", user_id="staff-002", listener="lgwan",
                channel="overseas-application")  # fmt: skip
    for day in (2, 4, 5, 6, 9, 10, 11, 12, 13, 16, 17, 18, 19, 20, 24, 25, 26, 27, 30):
        for hour in (9, 11, 14, 16):  # 4 accepted a working day, all in hours
            yield entry(at(day, hour))
    yield entry(at(10, 10), outcome="invalid-fields", problem="invalid-fields", status=422)
    yield entry(at(10, 10, 5), outcome="invalid-fields", problem="invalid-fields", status=422)
    for minute in range(5):
        yield entry(at(12, 13, minute), outcome="unauthorized", problem="unauthorized",
                    status=401, user_id=None)  # fmt: skip
    yield entry(at(12, 13, 6), outcome="locked-out", problem="locked-out", status=429)
    yield entry(at(12, 13, 7), outcome="locked-out", problem="locked-out", status=429)
    revoked = {"outcome": "device-revoked", "problem": "device-revoked", "status": 403,
               "device_id": "tablet-lost", "fingerprint": FP_LOST, "user_id": None}  # fmt: skip
    yield entry(at(18, 8, 10), remote="10.9.9.9", **revoked)
    yield entry(at(19, 9, 0), remote="10.9.9.8", **revoked)
    yield entry(at(20, 22, 30), outcome="device-unknown", problem="device-unknown", status=403,
                device_id="unregistered", fingerprint=FP_STRANGER, remote="10.7.7.7",
                user_id=None)  # fmt: skip
    yield entry(at(3, 10))  # 文化の日
    yield entry(at(23, 15), device_id="counter-01", user_id="staff-005",
                listener="office-lan", channel="window-reception")  # fmt: skip  # 勤労感謝の日
    yield entry(at(7, 10))  # Saturday
    yield entry(at(9, 8, 29))  # before 08:30
    yield entry(at(9, 17, 15))  # at closing: outside
    yield entry(at(1, 9, 0, month=12))  # after the period: not counted


def write_log(sandbox: Sandbox) -> AccessLog:
    assert sandbox.config is not None
    access = AccessLog(sandbox.config.access_log_directory)
    rows = [(n, encode(body)) for n, body in enumerate(month(), start=1)]
    access.append(rows)
    return access


@pytest.fixture
async def sandbox(tmp_path: Path) -> Sandbox:
    return await build_sandbox(tmp_path, start_simulators=False)


def report(
    capsys: pytest.CaptureFixture[str], sandbox: Sandbox, *extra: str
) -> tuple[int, str, str]:
    return ctl(
        capsys,
        "access-report",
        "--config",
        sandbox.config_path,
        "--from",
        "2026-11-01",
        "--to",
        "2026-11-30",
        *extra,
    )


def test_every_figure_of_a_month(sandbox: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    access = write_log(sandbox)
    code, out, err = report(capsys, sandbox, "--format", "json")
    assert code == 0, err
    doc = json.loads(out)
    working = 19 * 4
    assert doc["period"] == {"from": "2026-11-01", "to": "2026-11-30"}
    assert doc["entries"] == working + 2 + 5 + 2 + 2 + 1 + 5
    tablet = doc["per_device"]["tablet-01"]
    assert tablet == {"attempts": working + 2 + 5 + 2 + 4, "accepted": working + 4, "refused": 9}
    assert doc["per_device"]["tablet-lost"] == {"attempts": 2, "accepted": 0, "refused": 2}
    assert doc["per_device"]["unregistered"]["attempts"] == 1
    assert doc["per_device"]["counter-01"] == {"attempts": 1, "accepted": 1, "refused": 0}
    assert "pc-01" not in doc["per_device"]  # seen in October only
    assert doc["per_user"]["staff-001"]["attempts"] == working + 2 + 2 + 4
    assert doc["per_user"]["staff-005"]["attempts"] == 1
    assert doc["per_channel"]["window-reception"]["attempts"] == 1
    assert doc["per_listener"]["tablets"]["attempts"] == doc["entries"] - 1
    assert doc["per_listener"]["office-lan"]["attempts"] == 1
    assert doc["refusals_by_reason"] == {
        "device-revoked": 2,
        "device-unknown": 1,
        "invalid-fields": 2,
        "locked-out": 2,
        "unauthorized": 5,
    }
    revoked, unknown = doc["refused_certificates"]
    assert (revoked["outcome"], revoked["device_id"], revoked["fingerprint"]) == (
        "device-revoked",
        "tablet-lost",
        FP_LOST,
    )
    assert revoked["attempts"] == 2 and revoked["addresses"] == ["10.9.9.8", "10.9.9.9"]
    assert (unknown["device_id"], unknown["addresses"]) == ("unregistered", ["10.7.7.7"])
    assert doc["lockouts"] == {"staff-001": 2}
    outside = doc["outside_office_hours"]
    whys = sorted((g["first"][:16], g["why"]) for g in outside["groups"])
    assert whys == [
        ("2026-11-03T10:00", "holiday (文化の日)"),
        ("2026-11-07T10:00", "weekend"),
        ("2026-11-09T08:29", "before hours"),
        ("2026-11-09T17:15", "after hours"),
        ("2026-11-18T08:10", "before hours"),
        ("2026-11-20T22:30", "after hours"),
        ("2026-11-23T15:00", "holiday (勤労感謝の日)"),
    ]
    assert outside["count"] == 7
    assert "国民の祝日に関する法律" in outside["holidays"]
    idle = doc["idle"]
    assert idle["days"] == 90
    idle_devices = {d["id"]: d["last_seen"] for d in idle["devices"]}
    # Registered and not revoked, not seen in the 90 days to 11-30 (pc-01 was, in October).
    assert set(idle_devices) == {"callcentre-01", "records-01"}
    assert all(seen is None for seen in idle_devices.values())
    assert "pc-01" not in idle_devices and "tablet-lost" not in idle_devices
    idle_users = {u["id"] for u in idle["users"]}
    assert "staff-001" not in idle_users and "staff-002" not in idle_users
    head_seq = next(e.seq for _, e in access.entries() if e.body["time"].startswith("2026-11-30"))
    last_in_period = max(e.seq for _, e in access.entries() if e.body["time"] < "2026-12-01")
    assert doc["chain_head"]["seq"] == last_in_period >= head_seq


def test_csv_and_text_carry_the_same_figures(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    write_log(sandbox)
    code, out, _ = report(capsys, sandbox, "--format", "csv")
    assert code == 0
    rows = [line.split(",") for line in out.splitlines()]
    assert rows[0] == ["section", "key", "attempts", "accepted", "refused", "count", "detail"]
    assert ["refusal", "unauthorized", "", "", "", "5", ""] in rows
    assert ["lockout", "staff-001", "", "", "", "2", ""] in rows
    assert any(r[0] == "idle_devices" and r[1] == "records-01" for r in rows)
    code, out, _ = report(capsys, sandbox)
    assert code == 0
    assert "Outside office hours (08:30–17:15 JST on working days): 7" in out
    assert (
        "2026-11-09 after hours: tablet-01 staff-001 online-application 1 between 17:15:00 "
        "and 17:15:00 (accepted 1)"
    ) in out
    assert "device-revoked tablet-lost" in out and "10.9.9.8, 10.9.9.9" in out


def test_outside_hours_activity_is_grouped_by_day_device_user_and_channel() -> None:
    """A weekend's work is one line a device, user and channel, not one per request."""
    saturday = [entry(at(7, 10, m), outcome="accepted") for m in range(0, 50, 5)]
    saturday += [entry(at(7, 12), outcome="invalid-fields", problem="invalid-fields", status=422)]
    saturday += [entry(at(7, 13), device_id="pc-01", user_id="staff-002")]
    saturday += [entry(at(9, 8, 0))]  # Monday, before hours: a group of its own
    bodies = [(n, "h", body) for n, body in enumerate(saturday, start=1)]
    result = review(bodies, first=date(2026, 11, 1), last=date(2026, 11, 30), office=OfficeHours())
    doc = as_document(result, devices=[], users=[], today=date(2026, 11, 30), idle_days=90,
                      office=OfficeHours())  # fmt: skip
    groups = doc["outside_office_hours"]["groups"]
    assert doc["outside_office_hours"]["count"] == 13
    assert [(g["day"], g["why"], g["device_id"], g["count"]) for g in groups] == [
        ("2026-11-07", "weekend", "pc-01", 1),
        ("2026-11-07", "weekend", "tablet-01", 11),
        ("2026-11-09", "before hours", "tablet-01", 1),
    ]
    tablet = groups[1]
    assert (tablet["first"][11:16], tablet["last"][11:16]) == ("10:00", "12:00")
    assert tablet["outcomes"] == {"accepted": 10, "invalid-fields": 1}


def test_no_report_from_a_log_that_does_not_verify(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    access = write_log(sandbox)
    _, path = access.files()[3]
    lines = path.read_text("utf-8").splitlines()
    lines[0] = lines[0].replace('"accepted"', '"refused"')
    path.write_text("\n".join(lines) + "\n", "utf-8")
    code, out, err = report(capsys, sandbox)
    assert code == 1 and out == ""
    assert f"BROKEN in {path.name} line 1" in err


def test_office_hours_know_holidays_substitutes_and_the_year_end_closure() -> None:
    office = OfficeHours()
    assert not office.is_working_day(date(2026, 5, 6))  # 振替休日
    assert not office.is_working_day(date(2026, 9, 22))  # 国民の休日
    assert not office.is_working_day(date(2026, 12, 29))
    assert not office.is_working_day(date(2027, 1, 3))
    assert office.is_working_day(date(2027, 1, 4))
    closed = OfficeHours(closed_days=frozenset({date(2027, 1, 4)}))
    assert not closed.is_working_day(date(2027, 1, 4))
    assert office.outside(datetime(2026, 12, 29, 10, tzinfo=JST)) == "office closed"
    assert office.outside(datetime(2026, 11, 30, 10, tzinfo=JST) - timedelta(hours=9)) == (
        "before hours"
    )
