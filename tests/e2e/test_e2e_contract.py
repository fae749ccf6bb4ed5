"""End to end over real mutual TLS: the device-facing contract of docs/contract.md.

Each test runs the daemon in-process with a throw-away PKI and one upstream simulator
per destination, and talks to it as a ward device would. Request bodies are built here
byte by byte, so the receipt's sha256 and every planted value can be checked exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import random
import unicodedata
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from conftest import Running, hold, start_gateway
from PIL import Image

from gateway.channels.policy import EXTRA_PARTS, KNOWN_FIELD_NAMES
from gateway.crypto.pki import issue_device
from gateway.crypto.tls import client_context
from gateway.errors import Refusal
from gateway.ingress.admission import _check_room
from gateway.ingress.problems import answered
from gateway.testing.client import DeviceClient
from gateway.testing.samples import make_jpeg, sample_submission
from gateway.testing.sandbox import CHANNEL_DESTINATION, CHANNEL_DEVICE, build_sandbox

# Distinctive values that must never come back in any response body or header.
PLANTED_PIN = "ZZ99ZZ99"
PLANTED_NUMBER = "983205673215"  # a 個人番号 with the wrong check digit
PLANTED_NAME = "カナリア太郎"
PLANTED_ADDRESS = "東京都カナリア区9-9-9"
PLANTED = (PLANTED_PIN, PLANTED_NUMBER, PLANTED_NAME, PLANTED_ADDRESS)

BOUNDARY = "e2e-contract-7f3a9c"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
PROBLEM_JSON = "application/problem+json"
RECEIPT_KEYS = {"submission_id", "channel", "sha256", "received_at", "expires_at"}

DEVICE_OF = CHANNEL_DEVICE
DESTINATION_OF = CHANNEL_DESTINATION
FILE_FIELDS = {"face_photo", "batch_file"}

# Fields a drop channel must strip: (part name, value, metric label).
DROPPED_ON = {
    "online-application": [
        ("name", PLANTED_NAME, "name"),
        ("address", PLANTED_ADDRESS, "address"),
        ("pin_user_cert", PLANTED_PIN, "pin_user_cert"),
        ("individual_number", PLANTED_NUMBER, "individual_number"),
        ("favourite_food", "カナリアの餌", "other"),
    ],
    "express-issuance": [
        ("name", PLANTED_NAME, "name"),
        ("address", PLANTED_ADDRESS, "address"),
        ("individual_number", PLANTED_NUMBER, "individual_number"),
    ],
    "overseas-application": [
        ("address", PLANTED_ADDRESS, "address"),
        ("individual_number", PLANTED_NUMBER, "individual_number"),
    ],
}
# An unlisted field on each reject channel, carrying a planted value.
UNLISTED_ON = {
    "card-delegation-batch": ("name", PLANTED_NAME),
    "issuance-reservation": ("individual_number", PLANTED_NUMBER),
    "window-reception": ("phone", PLANTED_NAME),
}

Part = tuple[str, bytes, str | None, str | None]  # name, data, filename, media type


def text(name: str, value: str | bytes) -> Part:
    """A text part; ``bytes`` are sent as they are (for encoding tests)."""
    return (name, value.encode() if isinstance(value, str) else value, None, None)


def upload(name: str, data: bytes, media: str = "application/octet-stream") -> Part:
    """A file part."""
    return (name, data, f"{name}.bin", media)


def body_of(parts: Sequence[Part], boundary: str = BOUNDARY) -> bytes:
    """A multipart/form-data body, byte for byte."""
    out = bytearray()
    for name, data, filename, media in parts:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'
        if filename is not None:
            head += f'; filename="{filename}"'
        head += "\r\n"
        if media is not None:
            head += f"Content-Type: {media}\r\n"
        out += head.encode() + b"\r\n" + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out)


def sample_parts(channel: str, *, nfd: bool = False) -> list[Part]:
    """The sample submission as parts; ``nfd`` sends every text value decomposed."""
    fields, files = sample_submission(channel)
    form = unicodedata.normalize if nfd else (lambda _form, value: value)
    parts = [text(n, form("NFD", v)) for n, v in fields.items()]
    return parts + [
        upload(n, d, "image/jpeg" if n == "face_photo" else None) for n, d in files.items()
    ]


def replaced(parts: Sequence[Part], name: str, part: Part | None) -> list[Part]:
    """``parts`` with the part called ``name`` replaced (or removed when ``part`` is None)."""
    out = [p for p in parts if p[0] != name]
    return out if part is None else [*out, part]


@dataclass(frozen=True)
class Answer:
    """A raw HTTP answer: status, the full body text and every header."""

    status: int
    text: str
    headers: Sequence[tuple[str, str]]

    def json(self) -> dict[str, Any]:
        doc = json.loads(self.text)
        assert isinstance(doc, dict)
        return doc

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


async def _answer(response: aiohttp.ClientResponse) -> Answer:
    return Answer(response.status, await response.text(), list(response.headers.items()))


async def post(
    client: DeviceClient,
    channel: str,
    body: Any,
    *,
    content_type: str | None = MULTIPART,
    headers: Mapping[str, str] | None = None,
    auth: bool = True,
) -> Answer:
    """POST a submission; ``auth=False`` sends no Authorization header at all."""
    sent = dict(headers or {})
    if auth:
        sent.setdefault("Authorization", client.authorization)
    if content_type is not None:
        sent["Content-Type"] = content_type
    if isinstance(body, bytes):
        body = io.BytesIO(body)  # aiohttp warns about large raw bytes bodies
    async with client.session.post(
        f"{client.base}/v1/channels/{channel}/submissions", data=body, headers=sent
    ) as response:
        return await _answer(response)


async def get_status(client: DeviceClient, submission_id: str) -> Answer:
    """GET /v1/submissions/{id} as ``client``."""
    async with client.session.get(
        f"{client.base}/v1/submissions/{submission_id}",
        headers={"Authorization": client.authorization},
    ) as response:
        return await _answer(response)


async def wait_state(client: DeviceClient, submission_id: str, states: set[str]) -> dict[str, Any]:
    """Poll the status endpoint (real requests, no sleeping) until the state is in ``states``."""
    async with asyncio.timeout(10):
        while True:
            answer = await get_status(client, submission_id)
            assert answer.status == 200, answer.text
            doc = answer.json()
            if doc["state"] in states:
                return doc
            # Erase-on-delivery channels move from delivered to erased at once.
            if "delivered" in states and doc["state"] == "erased" and doc["delivered_at"]:
                return doc


def assert_no_planted(answer: Answer) -> None:
    """No planted value, raw or JSON-escaped, anywhere in the body or the headers."""
    haystacks = [answer.text, *(f"{k}: {v}" for k, v in answer.headers)]
    with contextlib.suppress(ValueError):
        haystacks.append(json.dumps(json.loads(answer.text), ensure_ascii=False))
    for value in PLANTED:
        for form in {value, json.dumps(value)[1:-1]}:
            for hay in haystacks:
                assert form not in hay, f"planted value echoed in {answer.status} response"


def problem(answer: Answer, status: int) -> dict[str, Any]:
    """Check an RFC 9457 problem answer with ``status`` and return its document."""
    assert answer.status == status, answer.text
    media = (answer.header("Content-Type") or "").split(";")[0].strip()
    assert media == PROBLEM_JSON, media
    doc = answer.json()
    assert isinstance(doc.get("type"), str) and doc["type"]
    assert isinstance(doc.get("title"), str) and doc["title"]
    assert doc.get("status") == status
    assert_no_planted(answer)
    return doc


def violations(doc: Mapping[str, Any]) -> set[tuple[str, str]]:
    return {(v["field"], v["rule"]) for v in doc.get("violations", [])}


def planted_parts() -> list[Part]:
    """Every planted value, as fields the online-application channel drops."""
    return [
        text("name", PLANTED_NAME),
        text("address", PLANTED_ADDRESS),
        text("pin_user_cert", PLANTED_PIN),
        text("individual_number", PLANTED_NUMBER),
    ]


def planted_online_body() -> bytes:
    """A valid online application that also carries every planted value."""
    return body_of([*sample_parts("online-application"), *planted_parts()])


def metric(gateway: Running, name: str, labels: Mapping[str, str]) -> float:
    value = gateway.metrics.registry.get_sample_value(name, dict(labels))
    return value or 0.0


def parse_ts(value: str) -> datetime:
    moment = datetime.fromisoformat(value)
    assert moment.tzinfo is not None
    return moment


@contextlib.asynccontextmanager
async def gateway_with(tmp_path: Path, overrides: Mapping[str, Any]) -> AsyncIterator[Running]:
    """A separate sandbox and daemon with configuration overrides."""
    box = await build_sandbox(tmp_path, overrides=overrides)
    try:
        running = await start_gateway(box)
        try:
            yield running
        finally:
            await running.shutdown()
    finally:
        await box.stop_simulators()


# --------------------------------------------------------------------- success path


@pytest.mark.parametrize("channel", list(DEVICE_OF))
async def test_valid_submission_gets_receipt_and_arrives_filtered(
    gateway: Running, channel: str
) -> None:
    """Every channel: 202 receipt over the exact body; upstream gets only allowed, NFC fields."""
    allowed = sample_parts(channel, nfd=True)
    if channel == "overseas-application":
        allowed = replaced(
            allowed,
            "name_kana",
            text("name_kana", unicodedata.normalize("NFD", "シンジュク ガブリエル")),
        )
    if channel in ("issuance-reservation", "window-reception"):
        allowed.append(text("alias_name", unicodedata.normalize("NFD", "ヴァン・ガブリエル")))
    dropped = DROPPED_ON.get(channel, [])
    body = body_of([*allowed, *(text(n, v) for n, v, _ in dropped)])
    sent_at = datetime.now(UTC)
    async with gateway.client(DEVICE_OF[channel]) as client:
        answer = await post(client, channel, body)
    assert answer.status == 202, answer.text
    assert_no_planted(answer)
    receipt = answer.json()
    assert set(receipt) == RECEIPT_KEYS
    assert receipt["channel"] == channel
    assert receipt["sha256"] == hashlib.sha256(body).hexdigest()
    received_at = parse_ts(receipt["received_at"])
    expires_at = parse_ts(receipt["expires_at"])
    assert abs(received_at - sent_at) < timedelta(minutes=1)
    # Both are rendered to the millisecond; float rounding may move one by a millisecond.
    assert abs(expires_at - received_at - timedelta(days=7)) <= timedelta(milliseconds=1)

    sim = gateway.sandbox.simulators[DESTINATION_OF[channel]]
    await sim.wait_for(1, timeout=10)
    got = sim.received[0]
    assert got.idempotency_key == receipt["submission_id"]
    assert got.channel == channel
    assert got.content_type.startswith("multipart/form-data")
    assert set(got.fields) | set(got.files) == {p[0] for p in allowed}
    for name, data, _, _ in allowed:
        if name in FILE_FIELDS:
            assert got.files[name] == data, name
        else:
            assert got.fields[name] == unicodedata.normalize("NFC", data.decode()), name
    for name, value, label in dropped:
        assert name not in got.fields and name not in got.files
        assert value.encode() not in got.body
        labels = {"channel": channel, "field": label}
        assert metric(gateway, "gateway_fields_dropped_total", labels) == 1, labels


async def test_formdata_submission_receipt_hashes_the_sent_body(gateway: Running) -> None:
    """A body encoded by aiohttp.FormData is hashed exactly as it went over the wire."""
    fields, files = sample_submission("online-application")
    form = aiohttp.FormData(quote_fields=False)
    for name, value in fields.items():
        form.add_field(name, value)
    form.add_field("face_photo", files["face_photo"], filename="p.jpg", content_type="image/jpeg")
    writer = form()
    body = await writer.as_bytes()
    async with gateway.client() as client:
        answer = await post(client, "online-application", body, content_type=writer.content_type)
    assert answer.status == 202, answer.text
    assert answer.json()["sha256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("channel", list(UNLISTED_ON))
async def test_unlisted_field_is_rejected_on_reject_channels(
    gateway: Running, channel: str
) -> None:
    """on_unlisted = "reject": 422 naming the field with rule not_allowed; nothing sent."""
    name, value = UNLISTED_ON[channel]
    body = body_of([*sample_parts(channel), text(name, value)])
    async with gateway.client(DEVICE_OF[channel]) as client:
        doc = problem(await post(client, channel, body), 422)
        assert (name, "not_allowed") in violations(doc)
        valid = await post(client, channel, body_of(sample_parts(channel)))
    assert valid.status == 202, valid.text
    sim = gateway.sandbox.simulators[DESTINATION_OF[channel]]
    await sim.wait_for(1, timeout=10)
    assert [r.idempotency_key for r in sim.received] == [valid.json()["submission_id"]]
    assert value.encode() not in sim.received[0].body


# ------------------------------------------------------------------------- 400


def _truncated() -> tuple[bytes, str]:
    return planted_online_body()[:-30], MULTIPART


def _nameless() -> tuple[bytes, str]:
    body = body_of(planted_parts()).replace(b'; name="name"', b"")
    return body, MULTIPART


def _not_multipart() -> tuple[bytes, str]:
    return f"name={PLANTED_NAME}&pin={PLANTED_PIN}".encode(), MULTIPART


def _no_boundary() -> tuple[bytes, str]:
    return planted_online_body(), "multipart/form-data"


@pytest.mark.parametrize("make", [_truncated, _nameless, _not_multipart, _no_boundary])
async def test_malformed_multipart_is_400(gateway: Running, make: Any) -> None:
    """A body that is not well-formed multipart answers 400 problem+json, not 5xx."""
    body, content_type = make()
    async with gateway.client() as client:
        doc = problem(
            await post(client, "online-application", body, content_type=content_type), 400
        )
    assert doc["type"].endswith("/malformed")


@pytest.mark.parametrize("key", ["k" * 256, "has space", ""])
async def test_bad_idempotency_key_is_400(gateway: Running, key: str) -> None:
    """An Idempotency-Key that is empty, too long or not visible ASCII answers 400."""
    async with gateway.client() as client:
        answer = await post(
            client, "online-application", planted_online_body(), headers={"Idempotency-Key": key}
        )
    problem(answer, 400)


# ------------------------------------------------------------------------- 401


@pytest.mark.parametrize(
    ("user", "password", "send"),
    [
        ("staff-001", None, False),
        ("staff-001", PLANTED_PIN, True),
        ("staff-999", PLANTED_PIN, True),
        ("", "", True),
    ],
    ids=["no-authorization", "wrong-password", "unknown-user", "empty-credential"],
)
async def test_bad_staff_credential_is_401(
    gateway: Running, user: str, password: str | None, send: bool
) -> None:
    """No, wrong or unknown staff credential answers 401 without echoing anything sent."""
    kwargs = {"user": user} if password is None else {"user": user, "password": password}
    async with gateway.client(**kwargs) as client:
        answer = await post(client, "online-application", planted_online_body(), auth=send)
    problem(answer, 401)
    assert (answer.header("WWW-Authenticate") or "").lower().startswith("basic")
    assert gateway.sandbox.simulators["dnp-relay"].attempts == 0


async def test_non_basic_authorization_is_401(gateway: Running) -> None:
    """An Authorization header that is not HTTP Basic answers 401."""
    async with gateway.client() as client:
        answer = await post(
            client,
            "online-application",
            planted_online_body(),
            headers={"Authorization": f"Bearer {PLANTED_PIN}"},
        )
    problem(answer, 401)


async def test_lockout_after_five_wrong_passwords_is_429(gateway: Running) -> None:
    """Five wrong passwords lock the user out: 429 with Retry-After, even for the right one."""
    body = planted_online_body()
    async with gateway.client(user="staff-002", password=PLANTED_PIN) as wrong:
        for _ in range(5):
            problem(await post(wrong, "online-application", body), 401)
        locked = await post(wrong, "online-application", body)
    doc = problem(locked, 429)
    assert doc["type"].endswith("/locked-out")
    async with gateway.client(user="staff-002") as right:
        answer = await post(right, "online-application", body)
    problem(answer, 429)
    retry_after = answer.header("Retry-After")
    assert retry_after is not None and retry_after.isdigit()
    assert 1 <= int(retry_after) <= 900
    async with gateway.client(user="staff-001") as other:
        assert (await post(other, "online-application", body)).status == 202


# ------------------------------------------------------------------------- 403


async def test_revoked_device_is_403(gateway: Running) -> None:
    """A revoked device (tablet-lost) is refused with 403 even with a good staff login."""
    async with gateway.client("tablet-lost") as client:
        doc = problem(await post(client, "online-application", planted_online_body()), 403)
    assert doc["type"].endswith("/device-revoked")


async def test_device_not_allowed_on_channel_is_403(gateway: Running) -> None:
    """The counter terminal may not post on the call centre's channel, though both are
    served on the office LAN: 403."""
    body = body_of([*sample_parts("issuance-reservation"), text("name_kana", PLANTED_NAME)])
    async with gateway.client("counter-01") as client:
        doc = problem(await post(client, "issuance-reservation", body), 403)
    assert doc["type"].endswith("/device-not-allowed")


async def test_unregistered_device_certificate_is_403(gateway: Running) -> None:
    """A certificate from the device CA that is not in the registry answers 403."""
    stranger = issue_device(gateway.sandbox.pki.dir, "tablet-99")
    context = client_context(
        ca=gateway.sandbox.pki.gateway_ca.cert, cert=stranger.cert, key=stranger.key
    )
    async with (
        gateway.client() as client,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session,
        session.post(
            f"{client.base}/v1/channels/online-application/submissions",
            data=planted_online_body(),
            headers={"Authorization": client.authorization, "Content-Type": MULTIPART},
        ) as response,
    ):
        answer = await _answer(response)
    doc = problem(answer, 403)
    assert doc["type"].endswith("/device-unknown")


async def test_source_network_not_allowed_is_403(tmp_path: Path) -> None:
    """A channel that does not list loopback among its source networks answers 403."""
    overrides = {"channels.online-application.source_networks": ["10.31.0.0/16"]}
    async with gateway_with(tmp_path, overrides) as running, running.client() as client:
        doc = problem(await post(client, "online-application", planted_online_body()), 403)
        assert doc["type"].endswith("/source-network-not-allowed")
        express = await post(client, "express-issuance", body_of(sample_parts("express-issuance")))
        assert express.status == 202, express.text


@pytest.mark.parametrize(
    ("active_from", "active_until"),
    [(date(2019, 4, 1), date(2020, 1, 1)), (date(2099, 4, 1), date(2100, 3, 31))],
    ids=["closed", "not-yet-open"],
)
async def test_channel_outside_active_window_is_403(
    tmp_path: Path, active_from: date, active_until: date
) -> None:
    """overseas-application outside its active window answers 403 channel-inactive."""
    overrides = {
        "channels.overseas-application.active_from": active_from,
        "channels.overseas-application.active_until": active_until,
    }
    body = body_of([*sample_parts("overseas-application"), text("address", PLANTED_ADDRESS)])
    async with gateway_with(tmp_path, overrides) as running, running.client("pc-01") as client:
        doc = problem(await post(client, "overseas-application", body), 403)
    assert doc["type"].endswith("/channel-inactive")


async def test_overseas_channel_is_open_inside_its_window(gateway: Running) -> None:
    """The shipped window (2026-05-26 to 2027-03-31) admits overseas applications today."""
    async with gateway.client("pc-01") as client:
        answer = await post(
            client, "overseas-application", body_of(sample_parts("overseas-application"))
        )
    assert answer.status == 202, answer.text


@pytest.mark.parametrize("certificate", ["none", "gateway-client"])
async def test_client_without_device_certificate_fails_handshake(
    gateway: Running, certificate: str
) -> None:
    """No client certificate, or one not from the device CA, fails the TLS handshake."""
    pki = gateway.sandbox.pki
    if certificate == "none":
        context = client_context(ca=pki.gateway_ca.cert)
    else:
        context = client_context(
            ca=pki.gateway_ca.cert, cert=pki.gateway_client.cert, key=pki.gateway_client.key
        )
    async with (
        gateway.client() as client,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session,
    ):
        with pytest.raises(aiohttp.ClientError):
            async with session.post(
                f"{client.base}/v1/channels/online-application/submissions",
                data=planted_online_body(),
                headers={"Authorization": client.authorization, "Content-Type": MULTIPART},
            ) as response:
                await response.read()


# ------------------------------------------------------------------------- 404


async def test_unknown_channel_is_404(gateway: Running) -> None:
    """A channel that is not configured answers 404 problem+json."""
    async with gateway.client() as client:
        doc = problem(await post(client, "no-such-channel", planted_online_body()), 404)
    assert doc["type"].endswith("/unknown-channel")


async def test_unknown_route_is_404_problem(gateway: Running) -> None:
    """Any other path answers 404 as problem+json too."""
    async with (
        gateway.client() as client,
        client.session.post(
            f"{client.base}/v2/anything",
            data=planted_online_body(),
            headers={"Authorization": client.authorization, "Content-Type": MULTIPART},
        ) as response,
    ):
        problem(await _answer(response), 404)


# ---------------------------------------------------------------- 409 / replay


async def test_same_idempotency_key_and_body_replays_the_original_receipt(
    gateway: Running,
) -> None:
    """Same key, same body: 202 with the original receipt and a single upstream delivery."""
    body = body_of(sample_parts("online-application"))
    headers = {"Idempotency-Key": "tablet-01-2026-000017"}
    async with gateway.client() as client:
        first = await post(client, "online-application", body, headers=headers)
        second = await post(client, "online-application", body, headers=headers)
        assert first.status == 202, first.text
        assert second.status == 202, second.text
        assert second.json() == first.json()
        submission_id = first.json()["submission_id"]
        await wait_state(client, submission_id, {"delivered"})
    sim = gateway.sandbox.simulators["dnp-relay"]
    assert [r.idempotency_key for r in sim.received] == [submission_id]
    assert sim.attempts == 1


async def test_retry_reencoded_with_new_boundary_replays_the_original_receipt(
    gateway: Running,
) -> None:
    """Same key, same parts under a fresh multipart boundary: the original receipt, no 409."""
    parts = sample_parts("online-application")
    first_body = body_of(parts)
    headers = {"Idempotency-Key": "tablet-01-2026-000019"}
    async with gateway.client() as client:
        first = await post(client, "online-application", first_body, headers=headers)
        assert first.status == 202, first.text
        other = "retry-boundary-0c1d"
        second = await post(
            client,
            "online-application",
            body_of(parts, boundary=other),
            content_type=f"multipart/form-data; boundary={other}",
            headers=headers,
        )
        assert second.status == 202, second.text
        assert second.json() == first.json()
        assert first.json()["sha256"] == hashlib.sha256(first_body).hexdigest()
        await wait_state(client, first.json()["submission_id"], {"delivered"})
    assert len(gateway.sandbox.simulators["dnp-relay"].received) == 1


async def test_same_idempotency_key_with_other_body_is_409(gateway: Running) -> None:
    """Same key, different body: 409 idempotency conflict; nothing new is stored."""
    headers = {"Idempotency-Key": "tablet-01-2026-000018"}
    async with gateway.client() as client:
        first = await post(
            client,
            "online-application",
            body_of(sample_parts("online-application")),
            headers=headers,
        )
        assert first.status == 202, first.text
        answer = await post(client, "online-application", planted_online_body(), headers=headers)
        doc = problem(answer, 409)
        assert doc["type"].endswith("/idempotency-conflict")
        await wait_state(client, first.json()["submission_id"], {"delivered"})
    sim = gateway.sandbox.simulators["dnp-relay"]
    assert len(sim.received) == 1


async def test_idempotency_keys_are_per_device(gateway: Running) -> None:
    """Two devices may use the same key: each gets its own submission."""
    headers = {"Idempotency-Key": "shared-key-1"}
    fields_body = body_of(sample_parts("online-application"))
    async with gateway.client("tablet-01") as tablet, gateway.client("pc-01") as pc:
        one = await post(tablet, "online-application", fields_body, headers=headers)
        two = await post(
            pc,
            "overseas-application",
            body_of(sample_parts("overseas-application")),
            headers=headers,
        )
    assert one.status == 202, one.text
    assert two.status == 202, two.text
    assert one.json()["submission_id"] != two.json()["submission_id"]


# ------------------------------------------------------------------------- 413


async def test_body_over_channel_limit_is_413(gateway: Running) -> None:
    """issuance-reservation takes at most 64 KiB: a larger body answers 413."""
    parts = [*sample_parts("issuance-reservation"), text("proxy_name", PLANTED_NAME * 12_000)]
    body = body_of(parts)
    assert len(body) > 65536
    async with gateway.client("callcentre-01") as client:
        doc = problem(await post(client, "issuance-reservation", body), 413)
    assert doc["type"].endswith("/too-large")


async def test_chunked_body_over_channel_limit_is_413(gateway: Running) -> None:
    """Without a Content-Length the limit is enforced while streaming: 413."""
    body = body_of(
        [*sample_parts("issuance-reservation"), text("proxy_name", PLANTED_NAME * 12_000)]
    )

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 8192):
            yield body[start : start + 8192]

    async with gateway.client("callcentre-01") as client:
        doc = problem(await post(client, "issuance-reservation", chunks()), 413)
    assert doc["type"].endswith("/too-large")


async def test_a_body_of_thousands_of_tiny_parts_is_413_before_it_is_parsed(
    gateway: Running,
) -> None:
    """A body of more parts than the channel's fields, the known item names and 16 more
    is refused at the first part too many (not parsed, nor listed, to its end): 413."""
    parts = [*sample_parts("online-application"), *[text("x", b"y") for _ in range(2_000)]]
    async with gateway.client() as client:
        doc = problem(await post(client, "online-application", body_of(parts)), 413)
    assert doc["type"].endswith("/too-many-parts")
    limit = len(sample_parts("online-application")) + len(KNOWN_FIELD_NAMES) + EXTRA_PARTS
    assert f"at most {limit} parts" in doc["detail"]


# ------------------------------------------------------------------------- 415


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", json.dumps({"name": PLANTED_NAME, "pin": PLANTED_PIN}).encode()),
        ("text/plain; charset=utf-8", f"{PLANTED_NAME} {PLANTED_NUMBER}".encode()),
        ("application/x-www-form-urlencoded", f"pin_user_cert={PLANTED_PIN}".encode()),
        (None, planted_online_body()),
    ],
    ids=["json", "text", "urlencoded", "none"],
)
async def test_non_multipart_media_type_is_415(
    gateway: Running, content_type: str | None, body: bytes
) -> None:
    """A body that is not multipart/form-data answers 415."""
    headers = {} if content_type is not None else {"Content-Type": ""}
    async with gateway.client() as client:
        answer = await post(
            client, "online-application", body, content_type=content_type, headers=headers
        )
    doc = problem(answer, 415)
    assert doc["type"].endswith("/unsupported-media-type")


# ------------------------------------------------------------------------- 422


def _png() -> bytes:
    out = io.BytesIO()
    noise = random.Random(3).randbytes(600 * 800 * 3)
    Image.frombytes("RGB", (600, 800), noise).save(out, format="PNG")
    data = out.getvalue()
    assert len(data) > 20_000
    return data


def _online(name: str, part: Part | None) -> list[Part]:
    return [*replaced(sample_parts("online-application"), name, part), text("name", PLANTED_NAME)]


INVALID = {
    "missing-application-id": (
        "online-application",
        lambda: _online("application_id", None),
        ("application_id", "required"),
    ),
    "missing-photo": (
        "online-application",
        lambda: _online("face_photo", None),
        ("face_photo", "required"),
    ),
    "short-application-id": (
        "online-application",
        lambda: _online("application_id", text("application_id", "1234567890")),
        ("application_id", "format"),
    ),
    "fullwidth-application-id": (
        "online-application",
        lambda: _online("application_id", text("application_id", "１" * 23)),
        ("application_id", "format"),
    ),
    "bad-pin4": (
        "express-issuance",
        lambda: replaced(
            sample_parts("express-issuance"), "pin_user_cert", text("pin_user_cert", PLANTED_PIN)
        ),
        ("pin_user_cert", "format"),
    ),
    "bad-signature-pin": (
        "express-issuance",
        lambda: replaced(
            sample_parts("express-issuance"),
            "pin_signature_cert",
            text("pin_signature_cert", PLANTED_PIN.lower()),
        ),
        ("pin_signature_cert", "format"),
    ),
    "individual-number-check-digit": (
        "window-reception",
        lambda: replaced(
            sample_parts("window-reception"),
            "individual_number",
            text("individual_number", PLANTED_NUMBER),
        ),
        ("individual_number", "check_digit"),
    ),
    "photo-png": (
        "online-application",
        lambda: _online("face_photo", upload("face_photo", _png(), "image/jpeg")),
        ("face_photo", "format"),
    ),
    "photo-cmyk": (
        "online-application",
        lambda: _online(
            "face_photo", upload("face_photo", make_jpeg(600, 800, mode="CMYK"), "image/jpeg")
        ),
        ("face_photo", "color_mode"),
    ),
    "photo-too-small": (
        "online-application",
        lambda: _online("face_photo", upload("face_photo", make_jpeg(100, 100), "image/jpeg")),
        ("face_photo", "size"),
    ),
    "photo-too-few-pixels": (
        "online-application",
        lambda: _online(
            "face_photo", upload("face_photo", make_jpeg(400, 300, quality=100), "image/jpeg")
        ),
        ("face_photo", "dimensions"),
    ),
    "photo-truncated": (
        "online-application",
        lambda: _online("face_photo", upload("face_photo", make_jpeg()[:60_000], "image/jpeg")),
        ("face_photo", "decode"),
    ),
    "name-shift-jis": (
        "issuance-reservation",
        lambda: replaced(
            sample_parts("issuance-reservation"), "name", text("name", PLANTED_NAME.encode("cp932"))
        ),
        ("name", "encoding"),
    ),
    "text-part-sent-as-jpeg": (
        "online-application",
        lambda: _online(
            "application_id",
            upload("application_id", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\xff\xd9", "image/jpeg"),
        ),
        ("application_id", "encoding"),
    ),
    "name-latin-1": (
        "overseas-application",
        lambda: replaced(
            sample_parts("overseas-application"),
            "name",
            text("name", "José Müller".encode("latin-1")),
        ),
        ("name", "encoding"),
    ),
    "batch-sha256-mismatch": (
        "card-delegation-batch",
        lambda: replaced(sample_parts("card-delegation-batch"), "sha256", text("sha256", "0" * 64)),
        ("batch_file", "sha256_mismatch"),
    ),
}


@pytest.mark.parametrize("case", list(INVALID))
async def test_field_violation_is_422_naming_field_and_rule(gateway: Running, case: str) -> None:
    """Missing or invalid fields answer 422 naming field and rule, never the value."""
    channel, make, expected = INVALID[case]
    async with gateway.client(DEVICE_OF[channel]) as client:
        doc = problem(await post(client, channel, body_of(make())), 422)
    assert doc["type"].endswith("/invalid-fields")
    assert expected in violations(doc), doc.get("violations")
    assert gateway.sandbox.simulators[DESTINATION_OF[channel]].attempts == 0


# ------------------------------------------------------------------ status endpoint


async def test_status_shows_state_to_the_submitting_device_only(gateway: Running) -> None:
    """Status: states without field values for the sender, 404 for any other device."""
    sim = gateway.sandbox.simulators["dnp-relay"]
    gate = hold(sim)
    async with gateway.client() as tablet, gateway.client("pc-01") as pc:
        answer = await post(tablet, "online-application", planted_online_body())
        assert answer.status == 202, answer.text
        submission_id = answer.json()["submission_id"]
        before = await get_status(tablet, submission_id)
        assert before.status == 200, before.text
        assert before.json()["state"] in {"queued", "delivering"}
        await gate.wait_inside(1)
        during = await get_status(tablet, submission_id)
        assert during.json()["state"] in {"queued", "delivering"}
        assert during.json()["delivered_at"] is None
        for status_answer in (before, during):
            assert_no_planted(status_answer)
            assert "12345678901234567890123" not in status_answer.text

        other = await get_status(pc, submission_id)
        doc = problem(other, 404)
        assert doc["type"].endswith("/unknown-submission")
        assert submission_id not in other.text
        problem(await get_status(tablet, "not-a-submission-id"), 404)

        gate.opened.set()
        await sim.wait_for(1, timeout=10)
        delivered = await wait_state(tablet, submission_id, {"delivered"})
    assert delivered["submission_id"] == submission_id
    assert delivered["channel"] == "online-application"
    assert delivered["upstream_receipt"] == sim.received[0].receipt_id
    assert delivered["delivered_at"] is not None
    assert delivered["received_at"] == answer.json()["received_at"]
    assert not {"fields", "application_id", "face_photo", "name"} & set(delivered)


async def test_status_needs_a_staff_credential(gateway: Running) -> None:
    """The status endpoint refuses a request without staff credential with 401."""
    async with gateway.client() as client:
        answer = await post(
            client, "online-application", body_of(sample_parts("online-application"))
        )
        submission_id = answer.json()["submission_id"]
        async with client.session.get(f"{client.base}/v1/submissions/{submission_id}") as response:
            problem(await _answer(response), 401)


async def test_a_content_encoded_body_is_415_before_it_is_read(gateway: Running) -> None:
    """A body sent with Content-Encoding is refused with 415, never decoded into a 5xx."""
    fields, files = sample_submission("online-application")
    async with gateway.client() as client:
        reply = await client.submit(
            "online-application", fields, files, headers={"Content-Encoding": "gzip"}
        )
    assert reply.status == 415
    assert reply.body["type"].endswith("/unsupported-media-type")


async def test_a_stalled_body_is_408_and_nothing_is_stored(tmp_path: Path) -> None:
    """A device that stops sending mid-body gets 408 after the idle timeout; no record."""
    box = await build_sandbox(tmp_path, overrides={"ingress.body_idle_timeout": 0.2})
    running = await start_gateway(box)
    try:
        device = box.pki.devices["tablet-01"]
        context = client_context(ca=box.pki.gateway_ca.cert, cert=device.cert, key=device.key)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", running.port_of("tablet-01"), ssl=context, server_hostname="localhost"
        )
        head = (
            "POST /v1/channels/online-application/submissions HTTP/1.1\r\n"
            "Host: localhost\r\n"
            "Authorization: Basic c3RhZmYtMDAxOmNvcnJlY3QgaG9yc2UgYmF0dGVyeQ==\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\n"
            "Content-Length: 100000\r\n\r\n--b\r\n"
        )
        writer.write(head.encode())
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), timeout=10)
        assert status_line.startswith(b"HTTP/1.1 408"), status_line
        writer.close()
        await writer.wait_closed()
        assert box.config is not None
        assert list((box.config.spool.directory / "records").iterdir()) == []
    finally:
        await running.shutdown()
        await box.stop_simulators()


async def test_the_idempotency_key_itself_is_never_stored(gateway: Running) -> None:
    """A device that uses personal data as its Idempotency-Key leaves no trace of it on disk."""
    planted = "KEY-983205673214-カナリア"
    fields, files = sample_submission("online-application")
    async with gateway.client() as client:
        reply = await client.submit(
            "online-application", fields, files, idempotency_key=planted.encode().hex()
        )
        again = await client.submit(
            "online-application", fields, files, idempotency_key=planted.encode().hex()
        )
    assert reply.status == 202 and again.body["submission_id"] == reply.body["submission_id"]
    assert gateway.sandbox.config is not None
    spool = gateway.sandbox.config.spool.directory
    for path in spool.rglob("*"):
        if path.is_file():
            assert planted.encode().hex().encode() not in path.read_bytes(), path


async def test_the_same_key_on_another_channel_is_another_submission(gateway: Running) -> None:
    """An Idempotency-Key is scoped to device and channel: reuse elsewhere is a new record."""
    online, online_files = sample_submission("online-application")
    express, express_files = sample_submission("express-issuance")
    async with gateway.client() as client:
        first = await client.submit(
            "online-application", online, online_files, idempotency_key="k-1"
        )
        second = await client.submit(
            "express-issuance", express, express_files, idempotency_key="k-1"
        )
    assert first.status == second.status == 202
    assert first.body["submission_id"] != second.body["submission_id"]


async def test_expect_100_continue_refuses_before_the_body_is_sent(gateway: Running) -> None:
    """With Expect: 100-continue a refused device never uploads; an admitted one does."""
    fields, files = sample_submission("online-application")
    body = aiohttp.FormData(quote_fields=False, default_to_multipart=True)
    for name, value in fields.items():
        body.add_field(name, value)
    body.add_field("face_photo", files["face_photo"], filename="p.jpg")
    async with gateway.client(password="wrong-password-1") as wrong, gateway.client() as right:
        url = f"{wrong.base}/v1/channels/online-application/submissions"
        async with wrong.session.post(
            url, data=body, expect100=True, headers={"Authorization": wrong.authorization}
        ) as response:
            assert response.status == 401
        ok = await right.submit(
            "online-application", fields, files, headers={"Expect": "100-continue"}
        )
    assert ok.status == 202
    refused = gateway.metrics.registry.get_sample_value(
        "gateway_submissions_total",
        {"listener": "tablets", "channel": "online-application", "outcome": "unauthorized"},
    )
    assert refused == 1


async def test_a_full_spool_is_507_with_retry_after_before_the_body(tmp_path: Path) -> None:
    """At the spool quota the device gets 507 spool-full with Retry-After; nothing stored."""
    fields, files = sample_submission("online-application")
    one = len(files["face_photo"]) + 20_000
    box = await build_sandbox(tmp_path, overrides={"spool.quota_bytes": int(one * 1.5)})
    running = await start_gateway(box)
    try:
        async with running.client() as client:
            first = await client.submit("online-application", fields, files)
            second = await client.submit("online-application", fields, files)
        assert first.status == 202
        assert second.status == 507
        assert second.body["type"].endswith("/spool-full")
        assert int(second.headers["Retry-After"]) > 0
    finally:
        await running.shutdown()
        await box.stop_simulators()


def test_bodies_being_received_hold_their_room_against_others() -> None:
    """Room is reserved at admission: what is under way counts against the quota."""
    spool_cfg = SimpleNamespace(quota_bytes=1000, min_free_bytes=0, retry_after_seconds=30)
    spool = SimpleNamespace(bytes=400, free_bytes=lambda: 10**9)
    rt = SimpleNamespace(
        config=SimpleNamespace(spool=spool_cfg), spool=spool, gate=SimpleNamespace(reserved_bytes=0)
    )
    _check_room(rt, 500)  # type: ignore[arg-type]
    rt.gate.reserved_bytes = 500  # another body of 500 bytes is being received
    with pytest.raises(Refusal) as caught:
        _check_room(rt, 500)  # type: ignore[arg-type]
    assert (answered(caught.value).status, answered(caught.value).slug) == (507, "spool-full")


async def test_a_disk_below_its_floor_is_507_disk_low(tmp_path: Path) -> None:
    """When free space would fall below min_free_bytes the device gets 507 disk-low."""
    box = await build_sandbox(tmp_path, overrides={"spool.min_free_bytes": 2**62})
    running = await start_gateway(box)
    try:
        fields, files = sample_submission("online-application")
        async with running.client() as client:
            reply = await client.submit("online-application", fields, files)
        assert reply.status == 507
        assert reply.body["type"].endswith("/disk-low")
        assert "Retry-After" in reply.headers
    finally:
        await running.shutdown()
        await box.stop_simulators()
