"""The access log end to end: every request attempt on a real listener, a failed TLS
handshake included, is one entry in the day's file with who, from where, what and how
it ended, and never a value the device sent; ``gatewayctl access-log verify`` checks
the chain and names the file and line of any edit."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import aiohttp
import pytest
from conftest import Running, ctl, until

from gateway.crypto.tls import client_context
from gateway.ops.access_log import AccessLog
from gateway.testing.samples import INDIVIDUAL_NUMBER, sample_submission

CHANNEL = "online-application"
PLANTED = "PLANTED-新宿花子-" + INDIVIDUAL_NUMBER

pytestmark = pytest.mark.usefixtures("hermetic_cli")


def access_of(gateway: Running) -> AccessLog:
    config = gateway.sandbox.config
    assert config is not None
    return AccessLog(config.access_log_directory)


def bodies(gateway: Running) -> list[dict[str, object]]:
    try:
        return [entry.body for _, entry in access_of(gateway).entries()]
    except FileNotFoundError:
        return []


async def test_every_attempt_is_an_entry_naming_who_from_where_and_how_it_ended(
    gateway: Running,
) -> None:
    fields, files = sample_submission(CHANNEL)
    async with gateway.client() as tablet, gateway.client("tablet-lost") as lost:
        accepted = await tablet.submit(CHANNEL, {**fields, "name": PLANTED}, files)
        invalid = await tablet.submit(CHANNEL, {**fields, "application_id": PLANTED}, files)
        revoked = await lost.submit(CHANNEL, fields, files)
        status = await tablet.status(str(accepted.body["submission_id"]))
        async with tablet.session.get(f"{tablet.base}/{PLANTED}") as unknown:
            assert unknown.status == 404
    # A client without a certificate fails the handshake: an entry with its address.
    pki = gateway.sandbox.pki
    bare = client_context(ca=pki.gateway_ca.cert)
    port = gateway.port_of("tablet-01")
    with pytest.raises((ssl.SSLError, aiohttp.ClientError, ConnectionError)):
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"https://localhost:{port}/", ssl=bare) as response,
        ):
            await response.read()
    assert (accepted.status, invalid.status, revoked.status, status.status) == (202, 422, 403, 200)
    await until(lambda: len(bodies(gateway)) >= 6)
    entries = bodies(gateway)
    by_outcome = {str(e["outcome"]): e for e in entries}
    device = pki.devices["tablet-01"]

    ok = by_outcome["accepted"]
    assert ok["status"] == 202 and ok["problem"] is None
    assert ok["submission_id"] == accepted.body["submission_id"]
    assert isinstance(ok["request_id"], str) and len(ok["request_id"]) == 16
    assert ok["device_id"] == "tablet-01" and ok["fingerprint"] == device.fingerprint
    assert isinstance(ok["serial"], str) and ok["serial"]
    assert ok["user_id"] == "staff-001" and ok["channel"] == CHANNEL
    assert ok["listener"] == "tablets" and ok["method"] == "POST"
    assert ok["remote"] == "127.0.0.1" and isinstance(ok["port"], int)
    assert isinstance(ok["bytes"], int) and ok["bytes"] > 10_000
    assert str(ok["time"]).endswith("+09:00")

    bad = by_outcome["invalid-fields"]
    assert (bad["status"], bad["problem"]) == (422, "invalid-fields")
    assert invalid.body["instance"] == f"urn:request:{bad['request_id']}"
    gone = by_outcome["device-revoked"]
    assert (gone["status"], gone["device_id"]) == (403, "tablet-lost")
    assert gone["fingerprint"] == pki.devices["tablet-lost"].fingerprint
    assert by_outcome["ok"]["method"] == "GET" and by_outcome["ok"]["status"] == 200
    assert by_outcome["not-found"]["status"] == 404
    handshake = by_outcome["tls-handshake-failed"]
    assert handshake["remote"] == "127.0.0.1" and handshake["listener"] == "tablets"

    files = "".join(p.read_text("utf-8") for _, p in access_of(gateway).files())
    assert PLANTED not in files and "新宿花子" not in files and INDIVIDUAL_NUMBER not in files
    seqs = [e.seq for _, e in access_of(gateway).entries()]
    assert seqs == list(range(1, len(seqs) + 1))


async def test_gatewayctl_access_log_verify_names_the_file_and_line_of_an_edit(
    gateway: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    fields, files = sample_submission(CHANNEL)
    async with gateway.client() as tablet:
        for _ in range(3):
            assert (await tablet.submit(CHANNEL, fields, files)).status == 202
    await until(lambda: len(bodies(gateway)) >= 3)
    config = gateway.sandbox.config_path
    code, out, err = await asyncio.to_thread(
        ctl, capsys, "access-log", "verify", "--config", config
    )
    assert code == 0, err
    assert "access log intact" in out and "3 entries in 1 files" in out
    (_, path), *_ = access_of(gateway).files()
    lines = path.read_text("utf-8").splitlines()
    lines[1] = lines[1].replace('"accepted"', '"refused"')
    path.write_text("\n".join(lines) + "\n", "utf-8")
    code, out, err = ctl(capsys, "access-log", "verify", "--config", config)
    assert code == 1
    assert f"BROKEN in {path.name} line 2 (edited)" in err


def test_access_directory_default_is_beside_the_spool(tmp_path: Path) -> None:
    from gateway.config import load_config

    base = Path(__file__).resolve().parents[2] / "conf" / "gateway.toml"
    config = load_config(base)
    assert config.access_log.retention_days == 400
    assert config.access_log_directory == Path("/var/log/gateway/access")


async def test_an_expectation_refused_before_the_handler_is_an_entry_too(
    gateway: Running,
) -> None:
    """Expect handlers run before the middlewares: a 417 still has its access log entry."""
    async with (
        gateway.client() as tablet,
        tablet.session.post(
            f"{tablet.base}/v1/channels/{CHANNEL}/submissions",
            data=b"x",
            headers={"Expect": "something-else", "Content-Type": "text/plain"},
        ) as refused,
    ):
        assert refused.status == 417
    await until(lambda: any(e["status"] == 417 for e in bodies(gateway)))
    (entry,) = [e for e in bodies(gateway) if e["status"] == 417]
    assert (entry["outcome"], entry["channel"], entry["listener"]) == (
        "expectation-failed",
        CHANNEL,
        "tablets",
    )
    assert entry["remote"] == "127.0.0.1"
