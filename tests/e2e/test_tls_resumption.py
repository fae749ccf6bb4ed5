"""Devices that reconnect for each upload resume their TLS 1.3 session instead of paying
a full mutual-TLS handshake each time. A resumed session still carries the device's
certificate: the submission is the device's, and a device revoked since is refused on a
resumed session exactly as on a fresh one."""

from __future__ import annotations

import asyncio
import ssl

import pytest
from conftest import Running, actl

from gateway.crypto.tls import client_context
from gateway.spool.reader import read_records
from gateway.testing.client import OneShot, post_on_new_connection
from gateway.testing.samples import multipart_body, sample_submission

pytestmark = pytest.mark.usefixtures("hermetic_cli")
CHANNEL = "online-application"


def post(port: int, context: ssl.SSLContext, session: ssl.SSLSession | None = None) -> OneShot:
    body, ctype = multipart_body(*sample_submission(CHANNEL))
    return post_on_new_connection(port, context, CHANNEL, body, ctype, session=session)


async def test_a_resumed_session_is_still_the_device_and_revocation_still_holds(
    gateway: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    box = gateway.sandbox
    assert box.config is not None
    device = box.pki.devices["tablet-01"]
    context = client_context(ca=box.pki.gateway_ca.cert, cert=device.cert, key=device.key)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    port = gateway.port_of("tablet-01")

    first = await asyncio.to_thread(post, port, context)
    assert (first.resumed, first.status) == (False, 202)
    second = await asyncio.to_thread(post, port, context, first.session)
    assert (second.resumed, second.status) == (True, 202)  # the ticket was accepted
    records = {r.id: r for r in read_records(box.config.spool.directory, states=())}
    resumed = records[str(second.body["submission_id"])]
    assert resumed.device_id == "tablet-01"  # the certificate came back with the session

    code, _, err = await actl(
        capsys, "device", "revoke", "--id", "tablet-01", "--config", box.config_path
    )
    assert code == 0, err
    third = await asyncio.to_thread(post, port, context, second.session)
    assert third.resumed is True
    assert third.status == 403 and str(third.body["type"]).endswith("device-revoked")
