"""The simulated upstream: mutual TLS, receipts, idempotency and injected faults."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from gateway.crypto.pki import PkiLayout, init_pki
from gateway.crypto.sealed.generate import generate_recipient_key, generate_signing_key
from gateway.crypto.sealed.keys import load_recipient, load_signing_key
from gateway.crypto.sealed.seal import Sealer
from gateway.crypto.tls import client_context
from gateway.testing.upstream import UpstreamSimulator
from gateway.testing.upstream_cli import main

REPO = Path(__file__).resolve().parents[2]
PHOTO = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4 + b"\xff\xd9"


@pytest.fixture
def pki(tmp_path: Path) -> PkiLayout:
    """A development PKI with one upstream named jlis."""
    return init_pki(tmp_path / "pki", upstreams=("jlis",))


@pytest.fixture
def gateway_ctx(pki: PkiLayout) -> ssl.SSLContext:
    """The gateway's egress client context (gateway client cert, upstream CA)."""
    return client_context(
        ca=pki.upstream_ca.cert, cert=pki.gateway_client.cert, key=pki.gateway_client.key
    )


def make_sim(pki: PkiLayout, **kwargs: object) -> UpstreamSimulator:
    """A simulator for jlis that accepts only the gateway's client certificate."""
    jlis = pki.upstreams["jlis"]
    return UpstreamSimulator(
        "jlis",
        cert=jlis.cert,
        key=jlis.key,
        client_ca=pki.gateway_ca.cert,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture
async def sim(pki: PkiLayout) -> AsyncIterator[UpstreamSimulator]:
    """A running simulator, stopped after the test."""
    async with make_sim(pki) as running:
        yield running


@pytest.fixture
async def session(gateway_ctx: ssl.SSLContext) -> AsyncIterator[aiohttp.ClientSession]:
    """A client session that presents the gateway's client certificate."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=gateway_ctx)) as s:
        yield s


def form() -> aiohttp.FormData:
    """A multipart body with one text field and one file part."""
    data = aiohttp.FormData()
    data.add_field("family_name", "山田")
    data.add_field("birth_date", "1980-01-02")
    data.add_field("face_photo", PHOTO, filename="face.jpg", content_type="image/jpeg")
    return data


def headers(key: str = "sub-1", channel: str = "card-application") -> dict[str, str]:
    """Egress headers as the gateway sends them."""
    return {"Idempotency-Key": key, "Gateway-Channel": channel}


async def test_records_multipart_submission(
    sim: UpstreamSimulator, session: aiohttp.ClientSession, pki: PkiLayout
) -> None:
    """A multipart POST is recorded with fields, files, headers and client fingerprint."""
    async with session.post(sim.url, data=form(), headers=headers()) as resp:
        assert resp.status == 201
        answer = await resp.json()
    assert answer["receipt_id"] == "jlis-00000001"
    assert isinstance(answer["received_at"], str)
    await sim.wait_for(1, timeout=5)
    (got,) = sim.received
    assert got.idempotency_key == "sub-1"
    assert got.channel == "card-application"
    assert got.content_type.startswith("multipart/form-data")
    assert dict(got.fields) == {"family_name": "山田", "birth_date": "1980-01-02"}
    assert dict(got.files) == {"face_photo": PHOTO}
    assert PHOTO in got.body
    assert got.client_fingerprint == pki.gateway_client.fingerprint
    assert got.authorization_user is None
    assert got.receipt_id == "jlis-00000001"
    assert sim.deliveries == {"sub-1": got}
    assert sim.attempts == 1
    assert sim.duplicates == 0
    assert sim.received_event.is_set()
    assert sim.url == f"https://localhost:{sim.port}/submissions"


async def test_duplicate_key_returns_original_receipt(
    sim: UpstreamSimulator, session: aiohttp.ClientSession
) -> None:
    """A repeated Idempotency-Key gets 200 with the original receipt and is not recorded."""
    async with session.post(sim.url, data=form(), headers=headers("k")) as resp:
        assert resp.status == 201
        first = await resp.json()
    async with session.post(sim.url, data=form(), headers=headers("k")) as resp:
        assert resp.status == 200
        second = await resp.json()
    assert second == first
    assert sim.duplicates == 1
    assert sim.attempts == 2
    assert [r.receipt_id for r in sim.received] == [first["receipt_id"]]


async def test_forget_drops_the_bodies_and_a_key_is_new_again(
    sim: UpstreamSimulator, session: aiohttp.ClientSession
) -> None:
    """What a bench calls between phases: nothing received is kept, so the same key is
    recorded afresh (201, a new receipt) rather than answered as a duplicate."""
    async with session.post(sim.url, data=form(), headers=headers("k")) as resp:
        assert resp.status == 201
    sim.forget()
    assert sim.received == [] and sim.deliveries == {}
    async with session.post(sim.url, data=form(), headers=headers("k")) as resp:
        assert resp.status == 201
        again = await resp.json()
    assert again["receipt_id"] == "jlis-00000002"
    assert [r.receipt_id for r in sim.received] == ["jlis-00000002"]
    assert sim.duplicates == 0


async def test_fail_next_then_success(
    sim: UpstreamSimulator, session: aiohttp.ClientSession
) -> None:
    """fail_next(2, 503, retry_after) answers two problem+json 503s, then 201."""
    sim.fail_next(2, 503, retry_after="3")
    for _ in range(2):
        async with session.post(sim.url, data=form(), headers=headers()) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "3"
            assert resp.content_type == "application/problem+json"
            assert (await resp.json())["status"] == 503
    async with session.post(sim.url, data=form(), headers=headers()) as resp:
        assert resp.status == 201
    assert sim.attempts == 3
    assert len(sim.received) == 1


async def test_reset_connection_next(
    sim: UpstreamSimulator, session: aiohttp.ClientSession
) -> None:
    """reset_connection_next drops the connection; the client sees a ClientError."""
    sim.reset_connection_next(1)
    with pytest.raises(aiohttp.ClientError):
        async with session.post(sim.url, data=form(), headers=headers()) as resp:
            await resp.read()
    assert sim.received == []
    async with session.post(sim.url, data=form(), headers=headers()) as resp:
        assert resp.status == 201
    assert sim.attempts == 2


async def test_set_delay_uses_injected_sleep(
    pki: PkiLayout, session: aiohttp.ClientSession
) -> None:
    """set_delay waits through the injected sleep, which records the delay."""
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    async with make_sim(pki, sleep=fake_sleep) as sim:
        sim.set_delay(30.0)
        async with session.post(sim.url, data=form(), headers=headers()) as resp:
            assert resp.status == 201
    assert slept == [30.0]


async def test_credential_enforced(pki: PkiLayout, session: aiohttp.ClientSession) -> None:
    """With a credential set, requests without it get 401 and with it get 201."""
    async with make_sim(pki, credential=("gw", "s3cret")) as sim:
        async with session.post(sim.url, data=form(), headers=headers()) as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"].startswith("Basic")
        bad = {**headers(), "Authorization": aiohttp.encode_basic_auth("gw", "wrong")}
        async with session.post(sim.url, data=form(), headers=bad) as resp:
            assert resp.status == 401
        good = {**headers(), "Authorization": aiohttp.encode_basic_auth("gw", "s3cret")}
        async with session.post(sim.url, data=form(), headers=good) as resp:
            assert resp.status == 201
        assert [r.authorization_user for r in sim.received] == ["gw"]


async def test_client_without_certificate_is_refused(
    sim: UpstreamSimulator, pki: PkiLayout
) -> None:
    """A client that presents no certificate fails the TLS handshake."""
    ctx = client_context(ca=pki.upstream_ca.cert)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        with pytest.raises(aiohttp.ClientError):
            async with s.post(sim.url, data=form(), headers=headers()) as resp:
                await resp.read()
    assert sim.attempts == 0


async def test_device_certificate_is_refused(sim: UpstreamSimulator, pki: PkiLayout) -> None:
    """A client certificate signed by the device CA fails the TLS handshake."""
    device = pki.devices["tablet-01"]
    ctx = client_context(ca=pki.upstream_ca.cert, cert=device.cert, key=device.key)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        with pytest.raises(aiohttp.ClientError):
            async with s.post(sim.url, data=form(), headers=headers()) as resp:
                await resp.read()
    assert sim.attempts == 0


async def test_missing_idempotency_key_is_400(
    sim: UpstreamSimulator, session: aiohttp.ClientSession
) -> None:
    """A request without Idempotency-Key is answered 400 and not recorded."""
    hdrs = {"Gateway-Channel": "card-application"}
    async with session.post(sim.url, data=form(), headers=hdrs) as resp:
        assert resp.status == 400
        assert resp.content_type == "application/problem+json"
    assert sim.received == []


async def test_missing_channel_is_400(
    sim: UpstreamSimulator, session: aiohttp.ClientSession
) -> None:
    """A request without Gateway-Channel is answered 400."""
    async with session.post(sim.url, data=form(), headers={"Idempotency-Key": "k"}) as resp:
        assert resp.status == 400
    assert sim.received == []


async def test_wrong_media_type_is_415(
    sim: UpstreamSimulator, session: aiohttp.ClientSession
) -> None:
    """A text/plain body is answered 415."""
    hdrs = {**headers(), "Content-Type": "text/plain"}
    async with session.post(sim.url, data=b"hello", headers=hdrs) as resp:
        assert resp.status == 415
    assert sim.received == []


async def test_opaque_application_body_recorded(
    sim: UpstreamSimulator, session: aiohttp.ClientSession
) -> None:
    """An application/* body (sealed payload) is recorded with empty fields and files."""
    hdrs = {**headers(), "Content-Type": "application/octet-stream"}
    async with session.post(sim.url, data=b"\x00sealed", headers=hdrs) as resp:
        assert resp.status == 201
    (got,) = sim.received
    assert got.body == b"\x00sealed"
    assert dict(got.fields) == {}
    assert dict(got.files) == {}


async def test_wait_for_times_out(sim: UpstreamSimulator) -> None:
    """wait_for raises TimeoutError when too few submissions arrive."""
    with pytest.raises(TimeoutError):
        await sim.wait_for(1, timeout=0)


def test_main_rejects_missing_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    """The command line requires --name, --cert, --key and --client-ca."""
    with pytest.raises(SystemExit) as exc:
        main(["--name", "x"])
    assert exc.value.code == 2
    assert "--cert" in capsys.readouterr().err


async def test_log_names_fields_never_values(
    sim: UpstreamSimulator, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """The per-submission log line carries field names and sizes, never values."""
    caplog.set_level(logging.INFO, logger="gateway.simulator")
    async with session.post(sim.url, data=form(), headers=headers("k-log")) as resp:
        assert resp.status == 201
    (line,) = [r.getMessage() for r in caplog.records if r.name == "gateway.simulator"]
    entry = json.loads(line)
    assert set(entry) == {"name", "idempotency_key", "channel", "fields", "bytes"}
    assert entry["fields"] == ["birth_date", "face_photo", "family_name"]
    assert entry["bytes"] == len(sim.received[0].body)
    assert "山田" not in line
    assert "1980" not in line


async def test_command_line_serves_until_sigterm(
    pki: PkiLayout, session: aiohttp.ClientSession
) -> None:
    """python -m gateway.testing.upstream serves, logs each submission, ends on SIGTERM."""
    jlis = pki.upstreams["jlis"]
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.testing.upstream",
        "--name",
        "jlis",
        "--cert",
        str(jlis.cert),
        "--key",
        str(jlis.key),
        "--client-ca",
        str(pki.gateway_ca.cert),
        "--port",
        "0",
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert proc.stderr is not None
    try:
        listening = json.loads(await asyncio.wait_for(proc.stderr.readline(), 30))
        assert listening["event"] == "listening"
        async with session.post(listening["url"], data=form(), headers=headers()) as resp:
            assert resp.status == 201
        entry = json.loads(await asyncio.wait_for(proc.stderr.readline(), 30))
        assert entry["idempotency_key"] == "sub-1"
        assert "山田" not in json.dumps(entry, ensure_ascii=False)
        proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(proc.stderr.read(), 30)
        assert await proc.wait() == 0
        assert json.loads(rest.splitlines()[-1])["event"] == "stopped"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_command_line_opens_sealed_payloads_and_refuses_plain_ones(
    pki: PkiLayout, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """--recipient-key/--trusted-signer: a sealed payload for it is opened and accepted;
    a plain multipart body is refused with 415."""
    jlis = pki.upstreams["jlis"]
    private, public = generate_recipient_key("x25519")
    recipient_key = tmp_path / "recipient.key"
    recipient_key.write_bytes(private)
    recipient_key.chmod(0o600)
    signing_key = tmp_path / "signing.key"
    signing_key.write_bytes(generate_signing_key("ed25519"))
    signing_key.chmod(0o600)
    signer = load_signing_key(signing_key)
    signer_pub = tmp_path / "signer.pub"
    signer_pub.write_bytes(signer.public_pem())
    recipient_pub = tmp_path / "recipient.pub"
    recipient_pub.write_bytes(public)
    sealer = Sealer(
        load_recipient(
            recipient_pub, suite="hpke", not_after=datetime.now(UTC) + timedelta(days=1)
        ),
        signer,
    )
    sealed = sealer.seal(
        b'--b\r\nContent-Disposition: form-data; name="application_id"\r\n\r\n1\r\n--b--\r\n',
        channel="card-application",
        submission_id="sub-1",
        destination="jlis",
        content_type="multipart/form-data; boundary=b",
        created=datetime.now(UTC),
    )
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.testing.upstream",
        *("--name", "jlis", "--cert", str(jlis.cert), "--key", str(jlis.key)),
        *("--client-ca", str(pki.gateway_ca.cert), "--port", "0"),
        *("--recipient-key", str(recipient_key), "--trusted-signer", str(signer_pub)),
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": pythonpath},
    )
    assert proc.stderr is not None
    try:
        listening = json.loads(await asyncio.wait_for(proc.stderr.readline(), 30))
        url = listening["url"]
        async with session.post(url, data=form(), headers=headers("sub-0")) as resp:
            assert resp.status == 415
        sealed_headers = {**headers(), "Content-Type": sealed.media_type}
        async with session.post(url, data=sealed.data, headers=sealed_headers) as resp:
            assert resp.status == 201
        entry = json.loads(await asyncio.wait_for(proc.stderr.readline(), 30))
        assert entry["fields"] == ["application_id"]
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.stderr.read(), 30)
        assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
