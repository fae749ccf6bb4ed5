"""A refusal's request line names who and from where, so security staff can act on it:
the device (revoked ones too, ``unregistered`` for a certificate the registry does not
know), its certificate's fingerprint, and the client's address and port. Refusals are
logged at warning, so ``journalctl -p warning`` lists them."""

from __future__ import annotations

import dataclasses

import structlog
from conftest import Running

from gateway.identity.registry import DeviceRegistry, load_devices, save_devices
from gateway.testing.samples import sample_submission

CHANNEL = "online-application"


async def refusal_line(gateway: Running, device: str) -> dict[str, object]:
    fields, files = sample_submission(CHANNEL)
    async with gateway.client(device) as client:
        with structlog.testing.capture_logs() as logs:
            reply = await client.submit(CHANNEL, fields, files)
    assert reply.status == 403
    (line,) = [e for e in logs if e["event"] == "request"]
    return line


async def test_a_revoked_devices_refusal_names_it_its_certificate_and_its_address(
    gateway: Running,
) -> None:
    line = await refusal_line(gateway, "tablet-lost")
    assert line["log_level"] == "warning"
    assert line["outcome"] == "device-revoked"
    assert line["device_id"] == "tablet-lost"
    assert line["fingerprint"] == gateway.sandbox.pki.devices["tablet-lost"].fingerprint
    assert line["remote"] == "127.0.0.1"
    assert isinstance(line["client_port"], int) and line["client_port"] > 0


async def test_an_unregistered_certificate_is_logged_as_unregistered_with_its_fingerprint(
    gateway: Running,
) -> None:
    config = gateway.sandbox.config
    assert config is not None
    path = config.auth.devices_file
    kept = [d for d in load_devices(path).devices if d.id != "tablet-01"]
    save_devices(path, dataclasses.replace(DeviceRegistry(), devices=tuple(kept)))
    line = await refusal_line(gateway, "tablet-01")
    assert line["outcome"] == "device-unknown"
    assert line["device_id"] == "unregistered"
    assert line["fingerprint"] == gateway.sandbox.pki.devices["tablet-01"].fingerprint
    assert line["remote"] == "127.0.0.1"


async def test_an_accepted_submission_is_logged_at_info(gateway: Running) -> None:
    fields, files = sample_submission(CHANNEL)
    async with gateway.client() as client:
        with structlog.testing.capture_logs() as logs:
            assert (await client.submit(CHANNEL, fields, files)).status == 202
    (line,) = [e for e in logs if e["event"] == "request"]
    assert line["log_level"] == "info"
