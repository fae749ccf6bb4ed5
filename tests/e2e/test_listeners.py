"""One listener per network: channels bound to listeners, a device CA per listener,
destinations with their own client certificate and source address.

The end-to-end tests run two listeners on two loopback addresses, 127.0.0.2 (the
tablets' network, device CA A) and 127.0.0.3 (LGWAN, device CA B), over real mutual TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
from conftest import FakeSleep, Running, until

from gateway.crypto.pki import PkiLayout, init_pki
from gateway.crypto.tls import client_context
from gateway.daemon import ListenerError
from gateway.identity.registry import Device, upsert_device
from gateway.testing.client import DeviceClient, Reply
from gateway.testing.samples import sample_submission
from gateway.testing.sandbox import RunningGateway, Sandbox, build_sandbox, start_gateway

TABLETS, LGWAN = "127.0.0.2", "127.0.0.3"

# --------------------------------------------------------------- two real listeners


@dataclass
class TwoNetworks:
    sandbox: Sandbox
    lgwan_pki: PkiLayout
    gateway: RunningGateway

    def tablet(self, host: str = TABLETS, **kwargs: Any) -> DeviceClient:
        """tablet-01, a device of CA A (the tablets' network)."""
        port = self.gateway.bound.ports["tablets" if host == TABLETS else "lgwan"]
        return DeviceClient(self.sandbox, "tablet-01", port=port, host=host, **kwargs)

    def lgwan_pc(self, host: str = LGWAN, **kwargs: Any) -> DeviceClient:
        """lgwan-pc, a device of CA B (LGWAN)."""
        port = self.gateway.bound.ports["lgwan" if host == LGWAN else "tablets"]
        return DeviceClient(self.lgwan_pki, "lgwan-pc", port=port, host=host, **kwargs)

    def metric(self, name: str, **labels: str) -> float:
        value = self.gateway.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@pytest.fixture
async def networks(tmp_path: Path) -> AsyncIterator[TwoNetworks]:
    """The sandbox with tablets on 127.0.0.2 (device CA A) and LGWAN on 127.0.0.3 with a
    device CA, server certificate and device of a second PKI (B)."""
    lgwan_pki = init_pki(tmp_path / "pki-lgwan", devices=("lgwan-pc",), upstreams=("x",))
    box = await build_sandbox(
        tmp_path / "box",
        overrides={
            "listeners.tablets.host": TABLETS,
            "listeners.lgwan.host": LGWAN,
            "listeners.lgwan.client_ca": str(lgwan_pki.device_ca.cert),
            "listeners.lgwan.certificate": str(lgwan_pki.gateway_server.cert),
            "listeners.lgwan.private_key": str(lgwan_pki.gateway_server.key),
        },
    )
    assert box.config is not None
    issued = lgwan_pki.devices["lgwan-pc"]
    upsert_device(
        box.config.auth.devices_file, Device("lgwan-pc", issued.fingerprint, "intranet-pc")
    )
    fake = FakeSleep()
    running = await start_gateway(
        box.config, sleep=fake, clock=fake.clock, config_path=box.config_path
    )
    try:
        yield TwoNetworks(box, lgwan_pki, running)
    finally:
        await running.shutdown()
        await box.stop_simulators()


def without_instance(reply: Reply) -> dict[str, Any]:
    return {k: v for k, v in reply.body.items() if k != "instance"}


async def test_each_network_takes_its_own_channel(networks: TwoNetworks) -> None:
    """The tablet posts the online application on 127.0.0.2, the LGWAN PC the overseas
    application on 127.0.0.3: both accepted, each counted under its listener."""
    fields, files = sample_submission("online-application")
    async with networks.tablet() as tablet:
        assert (await tablet.submit("online-application", fields, files)).status == 202
    fields, files = sample_submission("overseas-application")
    async with networks.lgwan_pc() as pc:
        assert (await pc.submit("overseas-application", fields, files)).status == 202
    accepted = "gateway_submissions_total"
    assert (
        networks.metric(
            accepted, listener="tablets", channel="online-application", outcome="accepted"
        )
        == 1
    )
    assert (
        networks.metric(
            accepted, listener="lgwan", channel="overseas-application", outcome="accepted"
        )
        == 1
    )


@pytest.mark.parametrize(
    ("who", "channel"),
    [("lgwan_pc", "online-application"), ("tablet", "overseas-application")],
)
async def test_a_channel_of_another_network_is_an_unknown_channel(
    networks: TwoNetworks, who: str, channel: str
) -> None:
    """On a listener that does not serve it, a channel answers exactly like a name that
    is no channel at all (404, same problem document), though the listener accepts the
    device's certificate and the device may post on that channel elsewhere."""
    fields, files = sample_submission(channel)
    client: DeviceClient = getattr(networks, who)()
    async with client:
        with structlog.testing.capture_logs() as logs:
            elsewhere = await client.submit(channel, fields, files)
        nowhere = await client.submit("no-such-channel", fields, files)
    assert elsewhere.status == nowhere.status == 404
    assert without_instance(elsewhere) == without_instance(nowhere)
    assert elsewhere.body["type"].endswith("/unknown-channel")
    (line,) = [e for e in logs if e["event"] == "request"]
    listener = "lgwan" if who == "lgwan_pc" else "tablets"
    assert line["listener"] == listener
    assert line["outcome"] == "unknown-channel" and line["channel"] == channel


async def test_a_submission_is_not_visible_from_another_network(gateway: Running) -> None:
    """GET /v1/submissions/ID answers only on the listeners that serve its channel: the
    same device, on another listener that accepts its certificate, gets 404."""
    fields, files = sample_submission("online-application")
    async with gateway.client("tablet-01") as tablet:
        reply = await tablet.submit("online-application", fields, files)
        assert reply.status == 202
        assert (await tablet.status(reply.body["submission_id"])).status == 200
    lgwan = gateway.bound.ports["lgwan"]
    async with DeviceClient(gateway.sandbox, "tablet-01", port=lgwan) as elsewhere:
        answer = await elsewhere.status(reply.body["submission_id"])
    assert answer.status == 404
    assert answer.body["type"].endswith("/unknown-submission")


async def handshake(host: str, port: int, context: ssl.SSLContext) -> bool:
    """Whether a TLS handshake with a request on top completes (False: refused)."""
    try:
        reader, writer = await asyncio.open_connection(
            host, port, ssl=context, server_hostname="localhost"
        )
    except (ssl.SSLError, ConnectionError):
        return False
    try:
        writer.write(b"GET /v1/submissions/x HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await writer.drain()
        return bool(await reader.read(100))
    except (ssl.SSLError, ConnectionError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()


async def test_a_device_certificate_of_one_network_fails_the_handshake_on_the_other(
    networks: TwoNetworks,
) -> None:
    """CA A's tablet is refused by the LGWAN listener in the TLS handshake, and CA B's
    PC by the tablets' listener, though each trusts the server it talks to: no HTTP
    request is read. Each refusal is counted under the listener that refused it."""
    a, b = networks.sandbox.pki, networks.lgwan_pki
    tablet, pc = a.devices["tablet-01"], b.devices["lgwan-pc"]
    ports = networks.gateway.bound.ports
    cases = (
        (LGWAN, ports["lgwan"], b.gateway_ca.cert, tablet, "lgwan"),
        (TABLETS, ports["tablets"], a.gateway_ca.cert, pc, "tablets"),
    )
    for host, port, server_ca, device, listener in cases:
        own = client_context(ca=server_ca, cert=device.cert, key=device.key)
        assert not await handshake(host, port, own)
        await until(
            lambda listener=listener: (
                networks.metric(
                    "gateway_tls_handshake_failures_total", listener=listener, reason="certificate"
                )
                == 1
            )
        )
    # The same devices on their own networks get in.
    assert await handshake(
        TABLETS,
        ports["tablets"],
        client_context(ca=a.gateway_ca.cert, cert=tablet.cert, key=tablet.key),
    )
    assert await handshake(
        LGWAN, ports["lgwan"], client_context(ca=b.gateway_ca.cert, cert=pc.cert, key=pc.key)
    )


async def test_a_reload_rotates_a_listeners_device_ca(
    networks: TwoNetworks, tmp_path: Path
) -> None:
    """Pointing the LGWAN listener at a new device CA takes effect on reload, without a
    restart: the old CA's devices are refused in the handshake, the new one's accepted."""
    newer = init_pki(tmp_path / "pki-lgwan-2", devices=("lgwan-pc-2",), upstreams=("x",))
    box = networks.sandbox
    assert box.config is not None
    upsert_device(
        box.config.auth.devices_file,
        Device("lgwan-pc-2", newer.devices["lgwan-pc-2"].fingerprint, "intranet-pc"),
    )
    box.edit_config(
        lambda d: d["listeners"]["lgwan"].update(
            client_ca=str(newer.device_ca.cert),
            certificate=str(newer.gateway_server.cert),
            private_key=str(newer.gateway_server.key),
        )
    )
    applied, reason = await networks.gateway.bound.reload()
    assert applied, reason
    fields, files = sample_submission("overseas-application")
    port = networks.gateway.bound.ports["lgwan"]
    async with DeviceClient(newer, "lgwan-pc-2", port=port, host=LGWAN) as fresh:
        assert (await fresh.submit("overseas-application", fields, files)).status == 202
    old = DeviceClient(networks.lgwan_pki, "lgwan-pc", port=port, host=LGWAN)
    async with old:
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            await old.submit("overseas-application", fields, files)


# ------------------------------------------------------------------ start-up errors


async def test_a_listener_whose_address_is_taken_names_its_key(tmp_path: Path) -> None:
    """A listener that cannot bind stops the start with an error naming listeners.NAME
    and the address; nothing is left listening."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        box = await build_sandbox(tmp_path, overrides={"listeners.jukinet.port": port})
        assert box.config is not None
        with pytest.raises(ListenerError) as info:
            await start_gateway(box.config)
        await box.stop_simulators()
    finally:
        taken.close()
    assert str(info.value).startswith(f"listeners.jukinet: cannot listen on 127.0.0.1:{port}: ")
    assert "in use" in str(info.value)


# -------------------------------------------------------------- egress source address


async def test_a_destination_leaves_from_its_source_address(tmp_path: Path) -> None:
    """With source_address set, the upstream sees the connection come from it."""
    box = await build_sandbox(
        tmp_path, overrides={"destinations.ward-issuance.source_address": "127.0.0.5"}
    )
    assert box.config is not None
    running = await start_gateway(box.config)
    try:
        fields, files = sample_submission("window-reception")
        port = running.port_of("counter-01")
        async with DeviceClient(box, "counter-01", port=port, user="staff-counter") as counter:
            assert (await counter.submit("window-reception", fields, files)).status == 202
        ward = box.simulators["ward-issuance"]
        await ward.wait_for(1, timeout=10)
        assert ward.received[0].peer_address == "127.0.0.5"
        fields, files = sample_submission("online-application")
        async with DeviceClient(box, "tablet-01", port=running.port_of("tablet-01")) as tablet:
            assert (await tablet.submit("online-application", fields, files)).status == 202
        dnp = box.simulators["dnp-relay"]
        await dnp.wait_for(1, timeout=10)
        assert dnp.received[0].peer_address == "127.0.0.1"  # no source_address: the default
    finally:
        await running.shutdown()
        await box.stop_simulators()
