"""Sealed payloads end to end: the gateway seals and signs, the simulated recipient opens.

The sandbox gives dnp-relay HPKE (X25519), jlis-express HPKE with the hybrid ML-KEM-768 +
X25519 suite and jlis-overseas CMS, as conf/gateway.toml does; each simulator holds its
recipient private key, trusts the gateway's signing key and expects its own recipient_id
in the binding (gateway/testing/sandbox.py).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Running, start_gateway, until

from gateway.cli import gatewayctl
from gateway.crypto.sealed.format import KEM_IDS, MEDIA_TYPE
from gateway.crypto.sealed.generate import generate_recipient_key, generate_signing_key
from gateway.crypto.sealed.keys import load_recipient, load_signing_key
from gateway.crypto.sealed.upstream_keys import (
    recipient_private_key_from_pem,
    verify_key_from_pem,
)
from gateway.crypto.tls import client_context
from gateway.testing.samples import sample_submission
from gateway.testing.sandbox import CHANNEL_DEVICE, Sandbox, build_sandbox
from gateway.testing.upstream import Opener, Received

SEALED = {
    "online-application": ("dnp-relay", "hpke", KEM_IDS["x25519"]),
    "express-issuance": ("jlis-express", "hpke", KEM_IDS["mlkem768-x25519"]),
    "overseas-application": ("jlis-overseas", "cms", None),
}
RECIPIENT_ID = {  # conf/gateway.toml's recipient_id: what the payload is bound to
    "dnp-relay": "jlis-online-application",
    "jlis-express": "jlis-express",
    "jlis-overseas": "jlis-overseas",
}
JST = timedelta(hours=9)


async def deliver(gateway: Running, channel: str) -> tuple[Received, dict[str, str]]:
    destination = SEALED[channel][0]
    sim = gateway.sandbox.simulators[destination]
    fields, files = sample_submission(channel)
    async with gateway.client(CHANNEL_DEVICE[channel]) as client:
        reply = await client.submit(channel, fields, files)
    assert reply.status == 202, reply.body
    await sim.wait_for(len(sim.received) + 1, timeout=15)
    received = sim.received[-1]
    assert received.idempotency_key == reply.body["submission_id"]
    return received, fields


@pytest.mark.parametrize("channel", sorted(SEALED))
async def test_each_suite_seals_signs_and_opens_at_the_recipient(
    gateway: Running, channel: str
) -> None:
    """The recipient verifies the signature, opens the payload, and finds the fields; the
    bytes on the wire hold none of them."""
    destination, suite, kem_id = SEALED[channel]
    received, fields = await deliver(gateway, channel)
    assert received.sealed is not None
    header = received.sealed
    assert (header.suite, header.kem_id) == (suite, kem_id)
    assert (header.channel, header.destination) == (channel, RECIPIENT_ID[destination])
    assert header.submission_id == received.idempotency_key
    assert received.content_type.startswith("multipart/form-data; boundary=")
    assert received.fields["application_id"] == fields["application_id"]
    assert "face_photo" in received.files
    for value in (fields["application_id"].encode(), received.files["face_photo"][:64]):
        assert value in received.body
        assert value not in received.wire  # encrypted before it was sent (資料36)


async def test_destinations_without_encryption_get_plain_multipart(gateway: Running) -> None:
    """payload_encryption = "none" (the default) sends the canonical multipart as before."""
    sim = gateway.sandbox.simulators["ward-issuance"]
    fields, files = sample_submission("issuance-reservation")
    async with gateway.client(CHANNEL_DEVICE["issuance-reservation"]) as client:
        assert (await client.submit("issuance-reservation", fields, files)).status == 202
    await sim.wait_for(1, timeout=15)
    assert sim.received[0].sealed is None
    assert sim.received[0].wire == sim.received[0].body


async def _post_to(
    sandbox: Sandbox, destination: str, wire: bytes, *, channel: str, key: str
) -> int:
    """Replay bytes straight to an upstream, as someone holding the gateway's TLS
    client certificate (the contractor's relay, say) could."""
    pki = sandbox.pki
    context = client_context(
        ca=pki.upstream_ca.cert, cert=pki.gateway_client.cert, key=pki.gateway_client.key
    )
    sim = sandbox.simulators[destination]
    headers = {
        "Content-Type": MEDIA_TYPE,
        "Idempotency-Key": key,
        "Gateway-Channel": channel,
    }
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session,
        session.post(sim.url, data=wire, headers=headers) as response,
    ):
        return response.status


async def test_replayed_on_another_channel_or_to_another_recipient_is_refused(
    gateway: Running,
) -> None:
    """The binding: the same sealed bytes are refused under another channel, another
    submission id, or at another destination."""
    received, _ = await deliver(gateway, "online-application")
    sandbox, wire = gateway.sandbox, received.wire
    dnp = sandbox.simulators["dnp-relay"]
    assert await _post_to(sandbox, "dnp-relay", wire, channel="express-issuance", key="x1") == 400
    assert dnp.sealed_refusals[-1] == "binding mismatch: channel"
    assert await _post_to(sandbox, "dnp-relay", wire, channel="online-application", key="x2") == 400
    assert dnp.sealed_refusals[-1] == "binding mismatch: submission_id"
    express = sandbox.simulators["jlis-express"]
    status = await _post_to(
        sandbox, "jlis-express", wire, channel="online-application", key=received.idempotency_key
    )
    assert status == 400
    assert express.sealed_refusals[-1] in {"binding mismatch: destination", "unsupported suite"}


@pytest.mark.parametrize("where", ["header", "body", "signature"])
async def test_a_tampered_byte_is_refused(gateway: Running, where: str) -> None:
    """One flipped bit anywhere and the recipient refuses before decrypting."""
    received, _ = await deliver(gateway, "online-application")
    wire = bytearray(received.wire)
    header_len = int.from_bytes(wire[41:45], "big")
    sig_at = 45 + header_len + 2
    index = {"header": 60, "signature": sig_at + 5, "body": len(wire) - 10}[where]
    wire[index] ^= 0x01
    status = await _post_to(
        gateway.sandbox,
        "dnp-relay",
        bytes(wire),
        channel="online-application",
        key=received.idempotency_key + "0",
    )
    assert status == 400
    reasons = gateway.sandbox.simulators["dnp-relay"].sealed_refusals
    assert reasons[-1] in {
        "signature",
        "body digest",
        "malformed",
        "binding mismatch: submission_id",
    }


async def test_a_recipient_with_another_key_refuses_and_the_record_is_held(
    gateway: Running,
) -> None:
    """Sealed to the configured key, opened by a recipient that has another: refused (400),
    so the gateway holds the record for an operator rather than retrying for ever."""
    sim = gateway.sandbox.simulators["dnp-relay"]
    assert sim.opener is not None
    private, _public = generate_recipient_key("x25519")
    sim.opener = Opener(recipient_private_key_from_pem(private), sim.opener.trusted_signers)
    fields, files = sample_submission("online-application")
    async with gateway.client() as client:
        reply = await client.submit("online-application", fields, files)
        assert reply.status == 202
        await until(lambda: bool(sim.sealed_refusals))
        submission_id = reply.body["submission_id"]
        record = await until_held(gateway, submission_id)
    assert record == "held"
    assert sim.sealed_refusals == ["wrong recipient"]


async def test_an_untrusted_signer_is_refused(gateway: Running) -> None:
    """A recipient that does not trust the gateway's signing key refuses what it signed."""
    sim = gateway.sandbox.simulators["jlis-overseas"]
    assert sim.opener is not None
    other = verify_key_from_pem(
        load_signing_key(_write_key(gateway.sandbox.dir / "other.key")).public_pem()
    )
    sim.opener = Opener(sim.opener.recipient_key, (other,))
    fields, files = sample_submission("overseas-application")
    async with gateway.client("pc-01") as client:
        assert (await client.submit("overseas-application", fields, files)).status == 202
    await until(lambda: bool(sim.sealed_refusals))
    assert sim.sealed_refusals[0] == "untrusted signer"


async def until_held(gateway: Running, submission_id: str) -> str:
    state = ""

    async def read() -> None:
        nonlocal state
        async with gateway.client() as client:
            state = (await client.status(submission_id)).body["state"]

    async with asyncio.timeout(15):
        while state != "held":
            await read()
            await asyncio.sleep(0.01)
    return state


def _write_key(path: Path) -> Path:
    path.write_bytes(generate_signing_key("ecdsa-p256-sha256"))
    os.chmod(path, 0o600)
    return path


def test_key_expiry_is_exported_as_metrics(gateway: Running) -> None:
    """gateway_payload_key_expiry_timestamp_seconds: the configured last day, 23:59:59 JST."""
    assert gateway.sandbox.config is not None
    dest = gateway.sandbox.config.destinations["dnp-relay"]
    assert dest.recipient_key_not_after is not None
    end = datetime.combine(dest.recipient_key_not_after, datetime.max.time()).replace(
        microsecond=0, tzinfo=UTC
    )
    expected = (end - JST).timestamp()
    value = gateway.metrics.registry.get_sample_value(
        "gateway_payload_key_expiry_timestamp_seconds",
        {"destination": "dnp-relay", "key": "recipient"},
    )
    assert value == pytest.approx(expected, abs=1)
    cms = gateway.metrics.registry.get_sample_value(
        "gateway_payload_key_expiry_timestamp_seconds",
        {"destination": "jlis-overseas", "key": "recipient"},
    )
    assert cms is not None and cms > datetime.now(UTC).timestamp()  # the certificate's notAfter
    none = gateway.metrics.registry.get_sample_value(
        "gateway_payload_key_expiry_timestamp_seconds",
        {"destination": "ward-issuance", "key": "recipient"},
    )
    assert none is None


@pytest.mark.parametrize(
    ("what", "change", "key", "message"),
    [
        (
            "an expired recipient key",
            lambda d, box: d["destinations"]["dnp-relay"].update(
                recipient_key_not_after=date(2020, 1, 1)
            ),
            "destinations.dnp-relay.recipient_key",
            "expired",
        ),
        (
            "a CMS recipient that is an X25519 key",
            lambda d, box: d["destinations"]["jlis-overseas"].update(
                recipient_key=str(box.dir / "recipients" / "dnp-relay.pub")
            ),
            "destinations.jlis-overseas.recipient_key",
            "certificate",
        ),
        (
            "the hybrid suite given an X25519 key",
            lambda d, box: d["destinations"]["jlis-express"].update(
                recipient_key=str(box.dir / "recipients" / "dnp-relay.pub")
            ),
            "destinations.jlis-express.recipient_key",
            "MLKEM768-X25519",
        ),
    ],
)
async def test_bad_payload_keys_are_refused_at_load(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    what: str,
    change: Callable[[dict[str, Any], Sandbox], None],
    key: str,
    message: str,
) -> None:
    """check-config names the destination's key and the rule; nothing about the key."""
    box = await build_sandbox(tmp_path, start_simulators=False)
    box.edit_config(lambda d: change(d, box))
    status = gatewayctl.main(["check-config", "--config", str(box.config_path)])
    err = capsys.readouterr().err
    assert status == 78, what  # EX_CONFIG
    line = next(line for line in err.splitlines() if key in line)
    assert message in line, line


async def test_a_signing_key_others_can_read_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    box = await build_sandbox(tmp_path, start_simulators=False)
    os.chmod(box.dir / "secrets" / "payload-signing.key", 0o644)
    assert gatewayctl.main(["check-config", "--config", str(box.config_path)]) == 78
    err = capsys.readouterr().err
    assert "destinations.dnp-relay.signing_key" in err


async def test_a_rotated_recipient_key_is_picked_up_on_reload(tmp_path: Path) -> None:
    """New recipient key on disk, simulator opening with the new private key, reload:
    the next delivery is sealed to the new key."""
    box = await build_sandbox(tmp_path)
    running = await start_gateway(box)
    try:
        await deliver(running, "online-application")
        sim = box.simulators["dnp-relay"]
        assert sim.opener is not None
        private, public = generate_recipient_key("x25519")
        (box.dir / "recipients" / "dnp-relay.pub").write_bytes(public)
        sim.opener = Opener(recipient_private_key_from_pem(private), sim.opener.trusted_signers)
        applied, reason = await running.bound.reload()
        assert applied, reason
        received, _ = await deliver(running, "online-application")
        assert received.sealed is not None
        assert (
            received.sealed.recipient_kid
            == load_recipient(
                box.dir / "recipients" / "dnp-relay.pub",
                suite="hpke",
                not_after=date.today() + timedelta(days=1),
            ).key_id
        )
    finally:
        await running.shutdown()
        await box.stop_simulators()


async def test_renaming_the_destination_changes_nothing_for_the_recipient(tmp_path: Path) -> None:
    """The payload is bound to the agreed recipient_id: the same recipient opens it after the
    gateway's table is renamed (the binding used to be the table's name)."""
    box = await build_sandbox(tmp_path)

    def rename(data: dict[str, Any]) -> None:
        data["destinations"]["contractor-relay"] = data["destinations"].pop("dnp-relay")
        data["channels"]["online-application"]["destination"] = "contractor-relay"

    box.edit_config(rename)
    box.reload_config()
    running = await start_gateway(box)
    try:
        received, _ = await deliver(running, "online-application")
        assert received.sealed is not None
        assert received.sealed.destination == "jlis-online-application"
        assert box.simulators["dnp-relay"].sealed_refusals == []
    finally:
        await running.shutdown()
        await box.stop_simulators()
