"""The personal-data canary (docs/contract.md, "Promises").

Distinctive values are planted in every field of every channel, plus fields the channels
do not list (one of them with a personal-looking *name*), and posted through every path
the gateway has: accepted, dropped, 422, 400, 401, 403, 404, 409, 413, 415, an upstream
that fails (retry) and one that refuses (held). None of them may then appear in any log
line (structlog JSON and the standard library's loggers), the /metrics text, any response
body or header, or any exception string; the photo's and the batch file's bytes may not
appear in plaintext in any file the gateway wrote, the SQLite index and its WAL included.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import random
import re
import ssl
import traceback
import urllib.parse
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from conftest import Running, start_gateway

from gateway.channels.fields import individual_number_check_digit
from gateway.cli import gatewayctl
from gateway.crypto.tls import client_context
from gateway.ops import logs
from gateway.testing.client import DeviceClient
from gateway.testing.samples import make_jpeg
from gateway.testing.sandbox import CHANNEL_DEVICE, Sandbox

# ------------------------------------------------------------------ planted values

FIRST11 = "39471629385"
INDIVIDUAL_NUMBER = FIRST11 + str(individual_number_check_digit(FIRST11))
WRONG_INDIVIDUAL_NUMBER = FIRST11 + str((individual_number_check_digit(FIRST11) + 1) % 10)
APPLICATION_ID = "73917391739173917391739"

PHOTO_MARKER = b"CANARY-PHOTO-16B"  # 16 bytes in a JPEG COM segment
BATCH_MARKER = b"CANARY-BATCH-FILE-BYTES"
BATCH_FILE = BATCH_MARKER + random.Random(11).randbytes(30_000) + BATCH_MARKER


def _photo_with_marker() -> bytes:
    jpeg = make_jpeg(600, 800, seed=29)
    segment = b"\xff\xfe" + (2 + len(PHOTO_MARKER)).to_bytes(2, "big") + PHOTO_MARKER
    return jpeg[:2] + segment + jpeg[2:]


PHOTO = _photo_with_marker()

# One distinctive, valid value for every field any channel lists.
VALUES: Mapping[str, str] = {
    "application_id": APPLICATION_ID,
    "wants_e_certificate": "true",
    "wants_braille": "false",
    "pin_signature_cert": "CANARY99",
    "pin_user_cert": "7391",
    "pin_resident_registry": "8264",
    "pin_card_info_input": "5173",
    "name": "カナリア花子",
    "name_kana": "カナリア ハナコ",
    "alias_name": "カナリア別名",
    "birth_date": "1931-07-29",
    "sex": "2",
    "registered_domicile": "北海道カナリア村1番地",
    "address": "東京都カナリア区9-9-9",
    "phone": "090-7391-5286",
    "email": "kanaria.hanako@canary.example",
    "foreign_resident_category": "CANARY-FRC-77",
    "residence_period_expiry": "2031-09-17",
    "manufacture_control_number": "CANARY-MFG-4471",
    "shipment_number": "CANARY-SHP-8823",
    "reservation_number": "CANARY-RSV-5519",
    "recipient_type": "CANARY-RCP-3391",
    "proxy_name": "カナリア代理人",
    "reservation_datetime": "2031-10-13T14:27:00+09:00",
    "issuance_window": "カナリア窓口7番",
    "reception_number": "CANARY-RCV-6630",
    "processing_status": "CANARY-STS-2208",
    "card_expiry_date": "2037-02-19",
    "individual_number": INDIVIDUAL_NUMBER,
    "batch_id": "CANARY-BATCH-0042",
    "record_count": "739173",
    "sha256": hashlib.sha256(BATCH_FILE).hexdigest(),
}
# Fields no channel lists; one of them has a name that is itself personal.
PERSONAL_FIELD_NAME = "tanaka_taro_1985"
UNLISTED: Mapping[str, str] = {
    "favourite_colour": "カナリア色",
    PERSONAL_FIELD_NAME: "カナリア田中",
}
STAFF_PASSWORD = "カナリア-password-0815"  # a wrong password: the staff secret a device sent
INVALID_VALUES = {
    "application_id": APPLICATION_ID + "0",
    "pin_user_cert": "CANARY99",
    "birth_date": "1931-02-30",
    "sha256": "ca11ab1e" * 8,
    "email": "kanaria.hanako@@canary.example",
    "individual_number": WRONG_INDIVIDUAL_NUMBER,
    "name": "カナリア\u202e花子",
}

SHORT = 8  # values shorter than this are only searched for as a whole token
PLANTED_TEXT = sorted(
    {
        v
        for v in [*VALUES.values(), *UNLISTED.values(), *INVALID_VALUES.values()]
        if len(v) >= 4 and v not in ("true", "false")
    }
    | {STAFF_PASSWORD, WRONG_INDIVIDUAL_NUMBER}
)
PLANTED_NAMES = (PERSONAL_FIELD_NAME,)
PLANTED_BYTES = (PHOTO_MARKER, BATCH_MARKER)

FIELDS_OF = {
    "online-application": ("application_id", "wants_e_certificate", "wants_braille"),
    "express-issuance": (
        "application_id",
        "wants_e_certificate",
        "wants_braille",
        "pin_signature_cert",
        "pin_user_cert",
        "pin_resident_registry",
        "pin_card_info_input",
    ),
    "overseas-application": (
        "application_id",
        "wants_e_certificate",
        "wants_braille",
        "name",
        "name_kana",
        "birth_date",
        "sex",
        "registered_domicile",
        "pin_signature_cert",
        "pin_user_cert",
        "pin_resident_registry",
        "pin_card_info_input",
    ),
    "card-delegation-batch": ("batch_id", "record_count", "sha256"),
    "issuance-reservation": (
        "name",
        "alias_name",
        "birth_date",
        "address",
        "phone",
        "foreign_resident_category",
        "residence_period_expiry",
        "application_id",
        "manufacture_control_number",
        "shipment_number",
        "reservation_number",
        "email",
        "recipient_type",
        "proxy_name",
        "reservation_datetime",
        "issuance_window",
        "reception_number",
        "processing_status",
        "card_expiry_date",
    ),
    "window-reception": (  # the 13 items of 交付窓口受付業務
        "name",
        "alias_name",
        "birth_date",
        "address",
        "manufacture_control_number",
        "shipment_number",
        "reservation_number",
        "recipient_type",
        "proxy_name",
        "reservation_datetime",
        "issuance_window",
        "reception_number",
        "individual_number",
    ),
}
FILE_OF = {
    "online-application": ("face_photo", PHOTO),
    "express-issuance": ("face_photo", PHOTO),
    "overseas-application": ("face_photo", PHOTO),
    "card-delegation-batch": ("batch_file", BATCH_FILE),
}
DROP_CHANNELS = ("online-application", "express-issuance", "overseas-application")
DEVICE_OF = CHANNEL_DEVICE
# One invalid field per channel, while every other field carries its planted value.
INVALID_FIELD_OF = {
    "online-application": "application_id",
    "express-issuance": "pin_user_cert",
    "overseas-application": "birth_date",
    "card-delegation-batch": "sha256",
    "issuance-reservation": "email",
    "window-reception": "individual_number",
}

# ------------------------------------------------------------------ multipart bodies

BOUNDARY = "canary-7c1d0e"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
Part = tuple[str, bytes, bool]  # name, data, is a file part


def planted_parts(channel: str, **replace: str) -> list[Part]:
    """Every field of ``channel`` with its planted value, its file, and on drop channels
    every other personal field and the unlisted ones too (all to be dropped)."""
    parts: list[Part] = []
    for name in FIELDS_OF[channel]:
        parts.append((name, replace.get(name, VALUES[name]).encode(), False))
    if channel in FILE_OF:
        name, data = FILE_OF[channel]
        parts.append((name, data, True))
    if channel in DROP_CHANNELS:
        extra = {n: v for n, v in VALUES.items() if n not in FIELDS_OF[channel]}
        for name, value in {**extra, **UNLISTED}.items():
            parts.append((name, value.encode(), False))
    return parts


def body_of(parts: Sequence[Part]) -> bytes:
    out = bytearray()
    for name, data, is_file in parts:
        head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"'
        if is_file:
            media = "image/jpeg" if name == "face_photo" else "application/octet-stream"
            head += f'; filename="{name}.bin"\r\nContent-Type: {media}'
        out += head.encode() + b"\r\n\r\n" + data + b"\r\n"
    out += f"--{BOUNDARY}--\r\n".encode()
    return bytes(out)


# ------------------------------------------------------------------ what was seen


@dataclass(frozen=True)
class Answer:
    status: int
    text: str
    headers: tuple[tuple[str, str], ...]

    def json(self) -> dict[str, Any]:
        doc = json.loads(self.text)
        assert isinstance(doc, dict)
        return doc


@dataclass
class Observed:
    """Every text the gateway produced that a person could read, by where it came from."""

    texts: list[tuple[str, str]] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)

    def answer(self, what: str, answer: Answer) -> Answer:
        self.answers.append(answer)
        self.texts.append((f"{what}: body", answer.text))
        for key, value in answer.headers:
            self.texts.append((f"{what}: header {key}", f"{key}: {value}"))
        return answer


async def _answer(response: aiohttp.ClientResponse) -> Answer:
    return Answer(response.status, await response.text(), tuple(response.headers.items()))


async def post(
    seen: Observed,
    client: DeviceClient,
    channel: str,
    body: Any,
    *,
    what: str,
    content_type: str = MULTIPART,
    headers: Mapping[str, str] | None = None,
) -> Answer:
    sent = {"Authorization": client.authorization, "Content-Type": content_type}
    sent.update(headers or {})
    if isinstance(body, bytes):
        body = io.BytesIO(body)
    async with client.session.post(
        f"{client.base}/v1/channels/{channel}/submissions", data=body, headers=sent
    ) as response:
        return seen.answer(what, await _answer(response))


async def get_status(seen: Observed, client: DeviceClient, submission_id: str) -> Answer:
    async with client.session.get(
        f"{client.base}/v1/submissions/{submission_id}",
        headers={"Authorization": client.authorization},
    ) as response:
        return seen.answer(f"status {submission_id}", await _answer(response))


def _variants(text: str) -> list[str]:
    """The text, plus its JSON with non-ASCII unescaped (JSON lines or a JSON body)."""
    out = [text]
    for line in text.splitlines() or [text]:
        try:
            out.append(json.dumps(json.loads(line), ensure_ascii=False))
        except ValueError:
            continue
    return out


def _forms(value: str) -> set[str]:
    """How a value could be written: raw, JSON-escaped, percent-encoded."""
    return {
        value,
        json.dumps(value)[1:-1],
        urllib.parse.quote(value),
        urllib.parse.quote_plus(value),
    }


def _found(value: str, haystack: str) -> bool:
    for form in _forms(value):
        if len(value) >= SHORT:
            if form in haystack:
                return True
        elif re.search(rf"(?<![0-9A-Za-z]){re.escape(form)}(?![0-9A-Za-z])", haystack):
            return True
    return False


def leaks(texts: Iterable[tuple[str, str]], values: Iterable[str]) -> list[str]:
    found = []
    wanted = list(values)
    for where, text in texts:
        for variant in _variants(text):
            found += [f"{value!r} in {where}" for value in wanted if _found(value, variant)]
    return sorted(set(found))


def byte_leaks_in(data: bytes, values: Iterable[bytes]) -> list[bytes]:
    """Planted values in raw bytes; short ones (a 4-digit PIN) only as a whole token,
    since random hex (a fingerprint, an id) contains any four digits now and then."""
    found = []
    for value in values:
        if len(value) < 8:
            token = rb"(?<![0-9A-Za-z])" + re.escape(value) + rb"(?![0-9A-Za-z])"
            if re.search(token, data):
                found.append(value)
        elif value in data:
            found.append(value)
    return found


def byte_leaks(files: Iterable[Path], values: Iterable[bytes]) -> list[str]:
    """Planted values in the raw bytes of files (see :func:`byte_leaks_in`)."""
    found = []
    for path in files:
        data = path.read_bytes()
        found += [f"{value!r} in {path}" for value in byte_leaks_in(data, values)]
    return found


def files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


# ------------------------------------------------------------------ fixtures


@dataclass
class Capture:
    """The gateway's structlog JSON lines and everything else that was logged or raised."""

    stream: io.StringIO
    loop_errors: list[str]

    def texts(self, caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
        lines = self.stream.getvalue().splitlines()
        return [
            *((f"log line {i}", line) for i, line in enumerate(lines)),
            ("standard library logs", caplog.text),
            *(("loop exception", e) for e in self.loop_errors),
        ]


@pytest.fixture
async def capture(caplog: pytest.LogCaptureFixture) -> AsyncIterator[Capture]:
    """structlog JSON into a StringIO, stdlib logs at DEBUG, loop exceptions; restored after."""
    saved = structlog.get_config()
    stream = io.StringIO()
    logs.configure(stream, level=logging.DEBUG)
    caplog.set_level(logging.DEBUG)
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    errors: list[str] = []

    def on_error(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        text = "".join(traceback.format_exception(exc)) if exc is not None else ""
        errors.append(f"{context.get('message')}\n{text}")

    loop.set_exception_handler(on_error)
    try:
        yield Capture(stream, errors)
    finally:
        loop.set_exception_handler(previous)
        structlog.configure(**saved)


# ------------------------------------------------------------------ the canary


def test_planted_values_are_valid_and_distinct() -> None:
    """The canary's own data: each value valid, distinctive, the photo and batch intact."""
    assert INDIVIDUAL_NUMBER != WRONG_INDIVIDUAL_NUMBER and len(INDIVIDUAL_NUMBER) == 12
    assert PHOTO.count(PHOTO_MARKER) == 1 and len(PHOTO) > 20_000
    assert len(PHOTO_MARKER) == 16
    for channel, names in FIELDS_OF.items():
        assert set(names) <= set(VALUES), channel
    assert {"カナリア花子", "東京都カナリア区9-9-9", "CANARY99", "7391", INDIVIDUAL_NUMBER} <= set(
        PLANTED_TEXT
    )


class Canary:
    """Posts as the sandbox's devices through a running gateway, recording every answer."""

    def __init__(self, gateway: Running) -> None:
        self.gateway = gateway
        self.seen = Observed()
        self.accepted: dict[str, str] = {}
        self._clients: dict[tuple[str, str, str], DeviceClient] = {}

    def client(self, device: str, user: str = "staff-001", password: str = "") -> DeviceClient:
        key = (device, user, password)
        if key not in self._clients:
            extra = {"password": password} if password else {}
            self._clients[key] = self.gateway.client(device, user=user, **extra)
        return self._clients[key]

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()

    async def post(
        self, what: str, channel: str, body: Any, status: int, *, device: str = "", **kw: Any
    ) -> Answer:
        """Post as ``device`` (the channel's own by default); the status must be ``status``."""
        client = self.client(
            device or DEVICE_OF.get(channel, "tablet-01"),
            kw.pop("user", "staff-001"),
            kw.pop("password", ""),
        )
        answer = await post(self.seen, client, channel, body, what=what, **kw)
        assert answer.status == status, (what, answer.text)
        return answer

    async def wait_state(self, channel: str, states: set[str]) -> None:
        """Poll the status endpoint (real requests, no sleeping) until one of ``states``."""
        client = self.client(DEVICE_OF[channel])
        async with asyncio.timeout(15):
            while True:
                answer = await get_status(self.seen, client, self.accepted[channel])
                if answer.json()["state"] in states:
                    return


def replace_file(parts: list[Part], data: bytes) -> list[Part]:
    return [(n, data, True) if is_file else (n, d, is_file) for n, d, is_file in parts]


async def post_accepted(canary: Canary) -> None:
    """Every channel, every field planted; on drop channels every unlisted field dropped."""
    for channel in DEVICE_OF:
        headers = {"Idempotency-Key": "canary-1"} if channel == "overseas-application" else {}
        body = body_of(planted_parts(channel))
        answer = await canary.post(f"accepted {channel}", channel, body, 202, headers=headers)
        canary.accepted[channel] = answer.json()["submission_id"]


async def post_invalid(canary: Canary) -> None:
    """422: one field invalid while every other one carries its planted value."""
    for channel, bad in INVALID_FIELD_OF.items():
        parts = planted_parts(channel, **{bad: INVALID_VALUES[bad]})
        if channel not in DROP_CHANNELS:  # refused by name on a reject channel
            parts.append(("favourite_colour", UNLISTED["favourite_colour"].encode(), False))
        answer = await canary.post(f"422 {channel}", channel, body_of(parts), 422)
        named = "batch_file" if bad == "sha256" else bad  # a mismatch names the file
        assert named in {v["field"] for v in answer.json()["violations"]}, answer.text
    cases = [
        (
            "overseas-application",
            planted_parts("overseas-application", name=INVALID_VALUES["name"]),
        ),
        ("online-application", replace_file(planted_parts("online-application"), PHOTO[:60_000])),
        ("express-issuance", replace_file(planted_parts("express-issuance"), PHOTO[:15_000])),
    ]
    for channel, parts in cases:
        await canary.post(f"422 more {channel}", channel, body_of(parts), 422)


async def post_refused(canary: Canary) -> None:
    """400, 401, 403 (revoked, device and staff user not allowed), 404 (no channel, and a
    channel of another network), 409, 413 and 415, each carrying the planted values."""
    online = body_of(planted_parts("online-application"))
    await canary.post("400 truncated", "online-application", online[:-40], 400)
    await canary.post(
        "401 password", "online-application", online, 401,
        user="staff-002", password=STAFF_PASSWORD,
    )  # fmt: skip
    await canary.post(
        "401 user", "online-application", online, 401,
        user=PERSONAL_FIELD_NAME, password=STAFF_PASSWORD,
    )  # fmt: skip
    await canary.post("403 revoked", "online-application", online, 403, device="tablet-lost")
    window = body_of(planted_parts("window-reception"))
    reservation = body_of(planted_parts("issuance-reservation"))
    await canary.post(
        "403 not allowed", "issuance-reservation", reservation, 403, device="counter-01"
    )
    await canary.post(
        "403 staff not named", "issuance-reservation", reservation, 403, user="staff-counter"
    )
    await canary.post("404 other network", "window-reception", window, 404, device="tablet-01")
    for name in (PERSONAL_FIELD_NAME, VALUES["name"]):
        await canary.post("404 channel", name, online, 404)
    # The accepted overseas key again: other content is 409, the same content a replay.
    key = {"Idempotency-Key": "canary-1"}
    other = body_of(planted_parts("overseas-application", name="カナリア次郎"))
    await canary.post("409", "overseas-application", other, 409, headers=key)
    same = body_of(planted_parts("overseas-application"))
    replay = await canary.post("replay", "overseas-application", same, 202, headers=key)
    assert replay.json()["submission_id"] == canary.accepted["overseas-application"]
    # Too large as declared, and too large while streaming.
    big = planted_parts("issuance-reservation", proxy_name=VALUES["proxy_name"] * 5000)
    big_body = body_of(big)
    await canary.post("413 declared", "issuance-reservation", big_body, 413)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big_body), 8192):
            yield big_body[start : start + 8192]

    await canary.post("413 streamed", "issuance-reservation", chunks(), 413)
    for media, raw in {
        "application/json": json.dumps({**VALUES, **UNLISTED}, ensure_ascii=False).encode(),
        "application/x-www-form-urlencoded": urllib.parse.urlencode(VALUES).encode(),
        "text/plain; charset=utf-8": " ".join(VALUES.values()).encode(),
    }.items():
        await canary.post(f"415 {media}", "online-application", raw, 415, content_type=media)


async def fetch_admin(canary: Canary) -> str:
    """GET /metrics, /healthz and /readyz from the admin listener; returns the metrics."""
    port = canary.gateway.bound.admin_port
    async with aiohttp.ClientSession() as admin:
        for path in ("/healthz", "/readyz", "/metrics"):
            async with admin.get(f"http://127.0.0.1:{port}{path}") as response:
                answer = canary.seen.answer(f"admin {path}", await _answer(response))
                assert answer.status == 200, path
    return answer.text


async def operator_outputs(canary: Canary, sandbox: Sandbox) -> None:
    """What operators see: spool list/show, the audit log, and a reload's answer."""
    config = str(sandbox.config_path)
    held = canary.accepted["online-application"]
    for argv in (
        ["spool", "list", "--state", "all", "--format", "json", "--config", config],
        ["spool", "show", held, "--config", config],
        ["spool", "requeue", held, "--config", config],  # through the control socket
        ["reload", "--config", config],
        ["audit", "list", "--config", config],
    ):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            await asyncio.to_thread(gatewayctl.main, argv)
        canary.seen.texts.append((f"gatewayctl {argv[0]} {argv[1]}", out.getvalue()))
        canary.seen.texts.append((f"gatewayctl {argv[0]} {argv[1]} stderr", err.getvalue()))
    assert held in canary.seen.texts[-10][1]  # the listing was not empty


async def test_no_planted_value_leaks_on_any_path(
    sandbox: Sandbox, capture: Capture, caplog: pytest.LogCaptureFixture
) -> None:
    """No planted value or name in logs, metrics, responses or errors; no plaintext on disk."""
    assert sandbox.config is not None
    sims = sandbox.simulators
    sims["dnp-relay"].fail_next(1, 400)  # online-application: held for an operator
    sims["jlis-express"].fail_next(2, 503)  # retried twice, then delivered
    sims["ward-issuance"].fail_next(1, 429, retry_after="3")  # Retry-After honoured
    gateway = await start_gateway(sandbox)
    canary = Canary(gateway)
    on_disk_bytes = [*PLANTED_BYTES, *(v.encode() for v in PLANTED_TEXT)]
    on_disk_bytes.append(PERSONAL_FIELD_NAME.encode())
    try:
        await post_accepted(canary)
        await post_invalid(canary)
        await post_refused(canary)
        # The relay's paths: held, retried, delivered (and erased on delivery).
        await canary.wait_state("online-application", {"held"})
        for channel in DEVICE_OF:
            if channel != "online-application":
                await canary.wait_state(channel, {"delivered", "erased"})
        assert sims["jlis-express"].attempts == 3
        assert gateway.sleep.calls, "no retry was scheduled"
        metrics = await fetch_admin(canary)
        await operator_outputs(canary, sandbox)  # requeues the held one: delivered, erased
        # Every delivered copy is erased: one more is held, so that an encrypted record
        # (photo included) is on disk for the search below.
        sims["dnp-relay"].fail_next(1, 400)
        kept = await canary.post(
            "accepted, to be held",
            "online-application",
            body_of(planted_parts("online-application")),
            202,
        )
        canary.accepted["online-application"] = kept.json()["submission_id"]
        await canary.wait_state("online-application", {"held"})
        on_disk_while_running = files_under(sandbox.dir)
        running_leaks = byte_leaks(on_disk_while_running, on_disk_bytes)
    finally:
        await canary.close()
        await gateway.shutdown()

    # The canary is not vacuous: planted values travelled where allowed, nothing unlisted
    # did, the unlisted fields were counted, a retry and a hold were logged, and the held
    # record (with its photo) and the index's WAL were on disk to be searched.
    window = next(r for r in sims["ward-issuance"].received if r.channel == "window-reception")
    assert INDIVIDUAL_NUMBER.encode() in window.body
    for received in (r for sim in sims.values() for r in sim.received):
        assert PERSONAL_FIELD_NAME.encode() not in received.body
        assert UNLISTED["favourite_colour"].encode() not in received.body
    sealed = [r for sim in sims.values() for r in sim.received if r.sealed is not None]
    assert {r.channel for r in sealed} == {
        "online-application",
        "express-issuance",
        "overseas-application",
    }
    for received in sealed:  # encrypted before sending: nothing planted on the wire
        assert not byte_leaks_in(received.wire, on_disk_bytes), received.channel
    assert 'gateway_fields_dropped_total{channel="online-application",field="other"} 2.0' in (
        metrics
    )
    texts = [*canary.seen.texts, *capture.texts(caplog)]
    assert any('"event": "retry"' in text for _where, text in texts)
    assert any('"event": "held"' in text for _where, text in texts)
    assert any(p.name.endswith("-wal") for p in on_disk_while_running)
    on_disk = files_under(sandbox.dir)
    assert any(p.name == canary.accepted["online-application"] for p in on_disk)

    assert not leaks(texts, PLANTED_TEXT)
    assert not leaks(texts, PLANTED_NAMES)
    assert not leaks(texts, [PHOTO_MARKER.decode(), PHOTO_MARKER.hex(), BATCH_MARKER.decode()])
    assert not running_leaks
    assert not byte_leaks(on_disk, on_disk_bytes)


async def test_made_up_part_name_is_never_echoed(
    sandbox: Sandbox, capture: Capture, caplog: pytest.LogCaptureFixture
) -> None:
    """An unlisted or repeated part with a personal-looking name is refused without its name."""
    seen = Observed()
    gateway = await start_gateway(sandbox)
    try:
        reservation = [
            *planted_parts("issuance-reservation"),
            (PERSONAL_FIELD_NAME, UNLISTED[PERSONAL_FIELD_NAME].encode(), False),
        ]
        twice = [*planted_parts("online-application"), (PERSONAL_FIELD_NAME, b"x", False)]
        async with gateway.client("callcentre-01") as office, gateway.client() as tablet:
            unlisted = await post(seen, office, "issuance-reservation", body_of(reservation),
                                  what="422 unlisted")  # fmt: skip
            repeated = await post(seen, tablet, "online-application", body_of(twice),
                                  what="422 repeated")  # fmt: skip
        assert (unlisted.status, repeated.status) == (422, 422)
    finally:
        await gateway.shutdown()
    assert not leaks([*seen.texts, *capture.texts(caplog)], PLANTED_NAMES)


def test_the_multipart_parsers_own_logger_is_silenced() -> None:
    """python-multipart's warnings quote body bytes, so configuring logs disables them."""
    logs.configure()
    assert logging.getLogger("python_multipart").disabled


def test_standard_library_logs_keep_no_text(caplog: pytest.LogCaptureFixture) -> None:
    """A library's message may quote request bytes: the multipart parser (and its child
    loggers) says nothing, and any other library's record keeps only logger, level and
    exception type."""
    stream = io.StringIO()
    logs.configure(stream)
    planted = "PLANTED-983205673214"
    logging.getLogger("python_multipart.multipart").warning("Expected %r", planted)
    try:
        raise ValueError(planted)
    except ValueError:
        logging.getLogger("aiohttp.server").exception("Error handling %s", planted)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert planted not in stream.getvalue()
    assert [(d["event"], d["logger_name"], d["error"]) for d in lines] == [
        ("library_log", "aiohttp.server", "ValueError")
    ]


RAW_PLANTED = "yamada-983205673214"
GOOD_LOGIN = "Authorization: Basic c3RhZmYtMDAxOmNvcnJlY3QgaG9yc2UgYmF0dGVyeQ==\r\n"
RAW_REQUESTS = {
    # aiohttp's own parser refuses these; its stock answer quotes the offending line.
    "a header with a control byte": (
        f"Idempotency-Key: {RAW_PLANTED}\x01x\r\n{GOOD_LOGIN}Content-Length: 0\r\n\r\n",
        400,
        "/malformed",
    ),
    "a broken chunk size": (
        f"{GOOD_LOGIN}Content-Type: multipart/form-data; boundary=b\r\n"
        f"Transfer-Encoding: chunked\r\n\r\n{RAW_PLANTED}\r\n",
        400,
        "/malformed",
    ),
    # Refused before the body, on the Expect: 100-continue path (outside the middlewares).
    "a login that is not ASCII, with Expect": (
        "Authorization: Basic 山田太郎983205673214\r\nExpect: 100-continue\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 10\r\n\r\n",
        401,
        "/unauthorized",
    ),
    "a media type that is not Latin-1, with Expect": (
        f"{GOOD_LOGIN}Expect: 100-continue\r\n"
        "Content-Type: multipart/form-data; boundary=山田983205673214\r\n"
        "Content-Length: 10\r\n\r\n",
        415,
        "/unsupported-media-type",
    ),
}


@pytest.mark.parametrize("what", sorted(RAW_REQUESTS))
async def test_requests_the_parser_refuses_are_answered_without_their_bytes(
    gateway: Running, what: str
) -> None:
    """problem+json naming no byte of the request, never a 5xx for bad input."""
    headers, status, slug = RAW_REQUESTS[what]
    sandbox = gateway.sandbox
    device = sandbox.pki.devices["tablet-01"]
    context = client_context(ca=sandbox.pki.gateway_ca.cert, cert=device.cert, key=device.key)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gateway.port_of("tablet-01"), ssl=context, server_hostname="localhost"
    )
    try:
        request = "POST /v1/channels/online-application/submissions HTTP/1.1\r\nHost: x\r\n"
        writer.write((request + headers).encode("utf-8"))
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
        length = int(re.search(rb"Content-Length: (\d+)", head, re.I)[1])  # type: ignore[index]
        answer = head + await asyncio.wait_for(reader.readexactly(length), timeout=10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == str(status).encode(), head  # HTTP/1.0 when unparsed
    assert b"application/problem+json" in head
    assert json.loads(body)["type"].endswith(slug)
    for value in (RAW_PLANTED, "983205673214", "山田"):
        assert value.encode() not in answer
