"""``gatewayctl demo``: the end-to-end tour reports every outcome, and neither its output
nor its JSON log carries any personal value it posted."""

from __future__ import annotations

import io
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog

from gateway.channels.policy import KNOWN_FIELD_NAMES
from gateway.demo import run_demo
from gateway.testing.samples import make_jpeg, sample_submission
from gateway.testing.sandbox import CHANNEL_DEVICE

CHANNELS = tuple(CHANNEL_DEVICE)
DEMO_EXTRA = ("新宿 花子", "東京都新宿区")  # the name and address the demo adds to be dropped
WRONG_NUMBER = "983205673215"


def personal_values() -> set[str]:
    """Every value the demo posts that could identify a person (or is a PIN)."""
    values: set[str] = set(DEMO_EXTRA)
    for channel in CHANNELS:
        fields, _files = sample_submission(channel)
        for name, value in fields.items():
            ordinary = len(value) >= 4 and value not in {"true", "false"} | KNOWN_FIELD_NAMES
            if ordinary or name.startswith("pin_"):
                values.add(value)
    values |= {"983205673214", WRONG_NUMBER}
    head = make_jpeg()[:32].hex()
    return values | {head, head.upper()}


def occurs(value: str, text: str) -> bool:
    """Whether ``value`` is in ``text``; short values only as a whole token.

    A 4-digit PIN inside a longer number (a timestamp's microseconds, a port) is a
    coincidence, not a leak; standing alone, or in any longer value, it would be one.
    """
    if len(value) >= 8:
        return value in text
    return re.search(rf"(?<![0-9A-Za-z]){re.escape(value)}(?![0-9A-Za-z])", text) is not None


def outcomes(output: str) -> dict[str, str]:
    """Each posting's title mapped to what the gateway answered (the '→' line below it)."""
    lines = output.splitlines()
    result = {}
    for title_line, answer_line in itertools.pairwise(lines):
        if answer_line.strip().startswith("→ "):
            _channel, _device, title = title_line.split(None, 2)
            result[title] = answer_line.strip().removeprefix("→ ")
    return result


def deliveries(output: str) -> dict[str, list[set[str]]]:
    """Per channel, the field names of each submission a simulated upstream received."""
    section = output.split("delivered upstream", 1)[1].split("\n\n", 1)[0]
    result: dict[str, list[set[str]]] = {}
    for line in section.splitlines()[1:]:
        head, _, names = line.partition("fields: ")
        _dest, channel, *_rest = head.split()
        result.setdefault(channel, []).append(set(names.split(", ")))
    return result


@dataclass(frozen=True)
class DemoRun:
    code: int
    output: str
    keep: Path
    log_factory_before: object
    log_factory_after: object


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """One run of the demo, shared by the assertions below."""
    keep = tmp_path_factory.mktemp("demo")
    out = io.StringIO()
    before = structlog.get_config()["logger_factory"]
    code = run_demo(keep=keep, out=out)
    return DemoRun(code, out.getvalue(), keep, before, structlog.get_config()["logger_factory"])


def test_demo_exits_0_and_stops_cleanly(demo: DemoRun) -> None:
    """The demo returns 0, keeps its files, and reports a clean drain."""
    code, output, keep = demo.code, demo.output, demo.keep
    assert code == 0, output
    assert f"demo files in {keep}" in output
    assert "gateway drained and stopped cleanly" in output
    assert (keep / "gateway.log").is_file()


def test_demo_restores_logging_when_done(demo: DemoRun) -> None:
    """After the demo, structlog no longer writes to the demo's (closed) log file."""
    assert demo.log_factory_after is demo.log_factory_before


def test_demo_accepts_and_delivers_every_channel(demo: DemoRun) -> None:
    """Each of the six channels gets 202 and arrives at its simulated upstream."""
    output = demo.output
    answers = outcomes(output)
    delivered = deliveries(output)
    for channel in CHANNELS:
        assert answers[f"valid {channel}"].startswith("202 accepted as "), channel
        assert delivered.get(channel), channel
    assert re.search(r"summary: 7 accepted, 7 delivered, [1-9]\d* upstream attempt", output)


def test_demo_summary_counts_every_erasure_after_waiting_for_them(demo: DemoRun) -> None:
    """Every delivered copy, on every channel, is erased, and the summary (read after
    the demo waited for the erasures) counts all seven: it is never read too early."""
    assert "waiting for the gateway to erase each delivered copy" in demo.output
    erased = demo.output.split("(送信後に自動消去): ", 1)[1].split(";")[0].split("\n")[0]
    counts = {name: int(n) for name, n in (item.split("×") for item in erased.split(", "))}
    assert counts == {channel: 2 if channel == "online-application" else 1 for channel in CHANNELS}


def test_demo_drops_name_and_address(demo: DemoRun) -> None:
    """The post carrying name and address is accepted, and both are dropped and counted."""
    output = demo.output
    answer = outcomes(output)["name and address must not travel (dropped)"]
    assert answer.startswith("202 accepted as ")
    assert "fields dropped: address×1, name×1" in output
    for names in deliveries(output)["online-application"]:
        assert names == {"application_id", "face_photo", "wants_braille", "wants_e_certificate"}


def test_demo_reports_every_mistake_with_its_rule(demo: DemoRun) -> None:
    """Retry, revoked tablet, wrong password, small photo, bad check digit, a channel of
    another network, a device and a staff user on a channel not theirs each show."""
    output = demo.output
    answers = outcomes(output)
    retry = answers["the same post again with its Idempotency-Key (device retry)"]
    assert retry.startswith("202 ") and "original receipt" in retry
    first = answers["name and address must not travel (dropped)"].split()[3]
    assert retry.split()[3] == first
    assert answers["lost tablet, revoked"].startswith("403 device-revoked")
    assert answers["wrong staff password"].startswith("401 ")
    photo = answers["photo below 480 px a side (400×400)"]
    assert photo.startswith("422 ") and "face_photo: dimensions" in photo
    number = answers["個人番号 with a wrong check digit"]
    assert number.startswith("422 ") and "individual_number: check_digit" in number
    elsewhere = "tablet asking for the counter's channel (not served on the tablets' network)"
    assert answers[elsewhere].startswith("404 unknown-channel")
    same_network = "counter terminal on the call centre's channel (same network, not its channel)"
    assert answers[same_network].startswith("403 device-not-allowed")
    staff = answers["staff user not named for the overseas channel (取扱者の指定)"]
    assert staff.startswith("403 user-not-allowed-on-channel")


def test_demo_log_is_json_lines(demo: DemoRun) -> None:
    """gateway.log holds one JSON object per line, including each delivery."""
    keep = demo.keep
    events = [json.loads(line) for line in (keep / "gateway.log").read_text("utf-8").splitlines()]
    assert events and all(isinstance(e, dict) and "event" in e for e in events)
    assert sum(e["event"] == "delivered" for e in events) == 7


def test_demo_output_and_log_carry_no_personal_value(demo: DemoRun) -> None:
    """No posted name, address, PIN, 個人番号 or photo bytes in the output or the log."""
    output, keep = demo.output, demo.keep
    raw = (keep / "gateway.log").read_text("utf-8")
    # JSON escapes non-ASCII text: search the decoded lines as well as the raw file.
    decoded = [json.dumps(json.loads(line), ensure_ascii=False) for line in raw.splitlines()]
    log = "\n".join([raw, *decoded])
    values = personal_values()
    assert {"新宿 花子", "1234", "ABC12345", "hanako@example.jp", WRONG_NUMBER} <= values
    for where, text in (("output", output), ("gateway.log", log)):
        leaked = sorted(v for v in values if occurs(v, text))
        assert not leaked, f"personal values in the demo's {where}: {leaked}"
