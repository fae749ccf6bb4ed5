"""Reload (SIGHUP), revocation on open connections, certificate rotation, handshake counts.

All on a real gateway over real mutual TLS on loopback. Time for the registry watcher is
the daemon's injected clock, moved forward by the test: nothing here sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Running, start_gateway, until

from gateway.cli import gatewayctl
from gateway.crypto.certs import cert_fingerprint
from gateway.crypto.pki import init_pki, reissue_gateway_server
from gateway.crypto.tls import client_context
from gateway.identity.registry import DeviceRegistry, load_devices, save_devices
from gateway.ops.chain import HashChainLog
from gateway.testing.client import DeviceClient
from gateway.testing.process import DaemonProcess
from gateway.testing.samples import multipart_body, sample_submission
from gateway.testing.sandbox import Sandbox, build_sandbox

CHANNEL = "online-application"


def sample_value(name: str, labels: dict[str, str], running: Running) -> float:
    value = running.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


class CountingClient(DeviceClient):
    """A device client that counts the TCP+TLS connections it opens."""

    def __init__(self, sandbox: Sandbox, device_id: str, *, port: int) -> None:
        trace = aiohttp.TraceConfig()

        async def opened(*_args: object) -> None:
            self.connections += 1

        trace.on_connection_create_end.append(opened)
        super().__init__(sandbox, device_id, port=port, limit=1, trace_configs=[trace])
        self.connections = 0

    async def post_sample(self) -> int:
        fields, files = sample_submission(CHANNEL)
        return (await self.submit(CHANNEL, fields, files)).status


async def server_fingerprint(sandbox: Sandbox, port: int) -> str:
    """The certificate a new connection to the ingress is shown."""
    device = sandbox.pki.devices["tablet-01"]
    context = client_context(ca=sandbox.pki.gateway_ca.cert, cert=device.cert, key=device.key)
    _reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost"
    )
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(True)
        return cert_fingerprint(der)
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.fixture
async def keepalive(gateway: Running) -> AsyncIterator[CountingClient]:
    async with CountingClient(gateway.sandbox, "tablet-01", port=gateway.port_of("tablet-01")) as c:
        yield c


# --------------------------------------------------------------- revocation


async def test_a_revoked_device_is_refused_on_its_open_keepalive_connection(
    gateway: Running, keepalive: CountingClient
) -> None:
    """gatewayctl device revoke needs no restart: once it returns, the very next request,
    on a connection that was already open, is refused (the daemon's clock never moves)."""
    assert await keepalive.post_sample() == 202
    status = await asyncio.to_thread(
        gatewayctl.main,
        ["device", "revoke", "--config", str(gateway.sandbox.config_path), "--id", "tablet-01"],
    )
    assert status == 0
    assert await keepalive.post_sample() == 403
    assert keepalive.connections == 1  # the same keep-alive connection both times
    labels = {"listener": "tablets", "reason": "device_revoked"}
    assert sample_value("gateway_auth_failures_total", labels, gateway) == 1


async def test_without_gatewayctl_the_file_watch_applies_within_half_a_second(
    gateway: Running, keepalive: CountingClient
) -> None:
    """The fallback when the daemon is not told (the file edited or replaced by other
    means): the registry files are looked at (two stats) at most every half second, so a
    request inside that half second may still pass, the first one after it is refused."""
    assert await keepalive.post_sample() == 202  # the files were looked at just now
    config = gateway.sandbox.config
    assert config is not None
    registry = load_devices(config.auth.devices_file)
    save_devices(
        config.auth.devices_file,
        DeviceRegistry(
            tuple(replace(d, revoked=d.id == "tablet-01" or d.revoked) for d in registry.devices)
        ),
    )
    gateway.sleep.now += 0.4
    assert await keepalive.post_sample() == 202
    gateway.sleep.now += 0.1
    assert await keepalive.post_sample() == 403


async def test_a_disabled_user_is_refused_on_the_open_connection(
    gateway: Running, keepalive: CountingClient
) -> None:
    """Disabling a staff user takes effect before the command returns, verification
    cache or not."""
    assert await keepalive.post_sample() == 202
    assert await keepalive.post_sample() == 202  # now in the verification cache
    status = await asyncio.to_thread(
        gatewayctl.main,
        ["user", "disable", "--config", str(gateway.sandbox.config_path), "--id", "staff-001"],
    )
    assert status == 0
    assert await keepalive.post_sample() == 401
    assert keepalive.connections == 1


# ------------------------------------------------------------------- reload


async def test_reload_applies_a_changed_channel(gateway: Running) -> None:
    """A reload changes what the next request is judged by."""
    async with gateway.client() as client:
        fields, files = sample_submission(CHANNEL)
        assert (await client.submit(CHANNEL, fields, files)).status == 202

        def shrink(data: dict[str, Any]) -> None:
            data["channels"][CHANNEL]["max_body_bytes"] = 2048

        gateway.sandbox.edit_config(shrink)
        applied, reason = await gateway.bound.reload()
        assert applied, reason
        reply = await client.submit(CHANNEL, fields, files)
        assert reply.status == 413
        assert "2048" in reply.body["detail"]
    assert sample_value("gateway_config_reloads_total", {"outcome": "applied"}, gateway) == 1
    assert sample_value("gateway_config_last_reload_success_timestamp_seconds", {}, gateway) > 0


@pytest.mark.parametrize(
    ("what", "change", "expected"),
    [
        (
            "a misspelt key",
            lambda d: d["ingress"].update(keepalive_timout=5),
            "ingress.keepalive_timout: unknown key (did you mean 'keepalive_timeout'?)",
        ),
        (
            "a missing certificate",
            lambda d: d["listeners"]["tablets"].update(certificate="/nonexistent/server.pem"),
            "listeners.tablets.certificate: /nonexistent/server.pem: file not found",
        ),
        (
            "a listener's address, which needs a restart",
            lambda d: d["listeners"]["tablets"].update(port=1),
            "listeners.tablets.port: changing it needs a restart",
        ),
        (
            "a listener's host, which needs a restart",
            lambda d: d["listeners"]["lgwan"].update(host="127.0.0.9"),
            "listeners.lgwan.host: changing it needs a restart",
        ),
        (
            "a new listener, which needs a restart",
            lambda d: d["listeners"].__setitem__("spare", {**d["listeners"]["lgwan"], "port": 1}),
            "listeners.spare: adding a listener needs a restart",
        ),
        (
            "a channel bound to an unknown listener",
            lambda d: d["channels"][CHANNEL].update(listeners=["tablet"]),
            "no listener named 'tablet' (did you mean 'tablets'?)",
        ),
        (
            "a channel sent to an unknown destination",
            lambda d: d["channels"][CHANNEL].update(destination="dnp-rely"),
            "did you mean 'dnp-relay'?",
        ),
    ],
)
async def test_a_broken_configuration_is_refused_and_the_old_one_kept(
    gateway: Running, what: str, change: Callable[[dict[str, Any]], None], expected: str
) -> None:
    """Refused, logged, counted and audited; the gateway goes on as before."""
    gateway.sandbox.edit_config(change)
    applied, reason = await gateway.bound.reload()
    assert not applied, what
    assert expected in reason
    async with gateway.client() as client:
        fields, files = sample_submission(CHANNEL)
        assert (await client.submit(CHANNEL, fields, files)).status == 202
        await gateway.sandbox.simulators["dnp-relay"].wait_for(1, timeout=10)
    assert sample_value("gateway_config_reloads_total", {"outcome": "failed"}, gateway) == 1
    assert sample_value("gateway_config_reloads_total", {"outcome": "applied"}, gateway) == 0


async def test_a_key_that_does_not_match_its_certificate_is_refused(gateway: Running) -> None:
    """The TLS context is built before the swap: a mismatched pair changes nothing."""
    pki = gateway.sandbox.pki
    gateway.sandbox.edit_config(
        lambda d: d["listeners"]["tablets"].update(private_key=str(pki.gateway_client.key)),
    )
    applied, reason = await gateway.bound.reload()
    assert not applied
    assert "SSLError" in reason or "key" in reason.lower()
    async with gateway.client() as client:
        fields, files = sample_submission(CHANNEL)
        assert (await client.submit(CHANNEL, fields, files)).status == 202


async def test_certificate_rotation_keeps_the_listener_and_open_connections(
    gateway: Running, keepalive: CountingClient
) -> None:
    """New connections get the new certificate; the open one carries on; same port."""
    port = gateway.port_of("tablet-01")
    assert await keepalive.post_sample() == 202
    old = await server_fingerprint(gateway.sandbox, port)
    assert old == gateway.sandbox.pki.gateway_server.fingerprint
    renewed = reissue_gateway_server(gateway.sandbox.pki.dir)
    applied, reason = await gateway.bound.reload()
    assert applied, reason
    assert await keepalive.post_sample() == 202  # on the connection opened before
    assert keepalive.connections == 1
    assert await server_fingerprint(gateway.sandbox, port) == renewed.fingerprint != old
    async with CountingClient(gateway.sandbox, "tablet-01", port=port) as fresh:
        assert await fresh.post_sample() == 202


async def test_reload_rebuilds_destinations_and_deliveries_go_on(gateway: Running) -> None:
    """Destinations are rebuilt (new certificates and credentials are read) on reload."""
    gateway.sandbox.edit_config(lambda d: d["destinations"]["dnp-relay"].update(concurrency=1))
    applied, reason = await gateway.bound.reload()
    assert applied, reason
    async with gateway.client() as client:
        for _ in range(3):
            fields, files = sample_submission(CHANNEL)
            assert (await client.submit(CHANNEL, fields, files)).status == 202
    await gateway.sandbox.simulators["dnp-relay"].wait_for(3, timeout=10)


async def test_removing_a_destination_with_waiting_records_is_refused(tmp_path: Path) -> None:
    """Records waiting for a destination are never stranded by a reload."""
    box = await build_sandbox(tmp_path, start_simulators=False, simulator_ports={})
    running = await start_gateway(box)
    try:
        async with running.client("records-01") as client:
            fields, files = sample_submission("card-delegation-batch")
            reply = await client.submit("card-delegation-batch", fields, files)
            assert reply.status == 202

        def drop(data: dict[str, Any]) -> None:
            del data["channels"]["card-delegation-batch"]
            data["channel_groups"]["records-office"] = []  # staff may still name it
            del data["destinations"]["jlis-card-management"]

        box.edit_config(drop)
        applied, reason = await running.bound.reload()
        assert not applied
        assert "destinations.jlis-card-management: removed while 1 record(s) wait" in reason
    finally:
        await running.shutdown()


# ------------------------------------------------------------ TLS handshakes


async def _handshake(port: int, context: ssl.SSLContext) -> None:
    """Connect and try one request; the failure shows on the client's first read."""
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="localhost"
        )
    except (ssl.SSLError, ConnectionError):
        return
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await writer.drain()
        await reader.read(100)
    except (ssl.SSLError, ConnectionError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()


async def test_failed_handshakes_are_counted_by_reason(gateway: Running, tmp_path: Path) -> None:
    """No client certificate, and one from a CA the gateway does not know, each counted."""
    pki = gateway.sandbox.pki
    port = gateway.port_of("tablet-01")
    anonymous = ssl.create_default_context(cafile=str(pki.gateway_ca.cert))
    await _handshake(port, anonymous)
    labels = {"listener": "tablets", "reason": "no_client_certificate"}
    await until(lambda: sample_value("gateway_tls_handshake_failures_total", labels, gateway) == 1)

    stranger = init_pki(tmp_path / "other-pki", devices=("tablet-01",))
    foreign = client_context(
        ca=pki.gateway_ca.cert,
        cert=stranger.devices["tablet-01"].cert,
        key=stranger.devices["tablet-01"].key,
    )
    await _handshake(port, foreign)
    labels = {"listener": "tablets", "reason": "certificate"}
    await until(lambda: sample_value("gateway_tls_handshake_failures_total", labels, gateway) == 1)

    async with gateway.client() as client:  # a good device still gets in
        fields, files = sample_submission(CHANNEL)
        assert (await client.submit(CHANNEL, fields, files)).status == 202


# ---------------------------------------------------- the real process, signals


class NotifySocket:
    """The systemd side of sd_notify: a datagram socket the daemon reports to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.seen: list[str] = []

    async def expect(self, line: str) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(30):
            while True:
                message = (await loop.sock_recv(self.sock, 4096)).decode()
                self.seen.append(message)
                if line in message.split("\n"):
                    return

    def close(self) -> None:
        self.sock.close()


async def _log_event(log: Path, event: str, count: int = 1) -> list[dict[str, Any]]:
    import json

    found: list[dict[str, Any]] = []

    def scan() -> bool:
        found.clear()
        if log.exists():
            for line in log.read_text("utf-8").splitlines():
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                if doc.get("event") == event:
                    found.append(doc)
        return len(found) >= count

    await until(scan)
    return found


@pytest.mark.slow
async def test_sighup_reloads_sigterm_drains_and_systemd_hears_of_both(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """gatewayd as a process: READY, WATCHDOG, RELOADING, STOPPING over the notify
    socket; a broken config refused on SIGHUP, a good one applied; SIGTERM exits 0."""
    notify = NotifySocket(tmp_path / "notify.sock")
    log = tmp_path / "gatewayd.log"
    good = sandbox.config_path.read_text("utf-8")
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"}
    daemon = DaemonProcess(sandbox.config_path, log, env=env)
    try:
        await daemon.start()
        await notify.expect("READY=1")
        await notify.expect("WATCHDOG=1")
        limits = Path(f"/proc/{daemon.pid}/limits").read_text()  # noqa: ASYNC240 - procfs
        core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
        assert core.split()[4:6] == ["0", "0"]  # no core file holds decrypted submissions

        sandbox.config_path.write_text(good.replace("[ingress]", "[ingres]"), "utf-8")
        daemon.signal(signal.SIGHUP)
        await notify.expect("RELOADING=1")
        await notify.expect("READY=1")
        refused = await _log_event(log, "reload_refused")
        assert "ingres" in refused[0]["reason"]

        sandbox.config_path.write_text(good, "utf-8")
        daemon.signal(signal.SIGHUP)
        await _log_event(log, "reloaded")

        async with DeviceClient(sandbox, "tablet-01", port=daemon.port_of("tablet-01")) as client:
            fields, files = sample_submission(CHANNEL)
            assert (await client.submit(CHANNEL, fields, files)).status == 202
        assert await daemon.terminate() == 0
        await notify.expect("STOPPING=1")
    finally:
        if daemon.process is not None and daemon.process.returncode is None:
            await daemon.kill()
        notify.close()
    assert sandbox.config is not None
    audit = sandbox.config.audit_log
    entries = [e.body for e in HashChainLog(audit.log, anchor=audit.anchor).entries()]
    actions = [(e["action"], e["outcome"], e["actor"]) for e in entries]
    assert actions == [
        ("gatewayd.start", "ok", "gatewayd"),
        ("gatewayd.reload", "refused", "signal:SIGHUP"),
        ("gatewayd.reload", "ok", "signal:SIGHUP"),
        ("gatewayd.stop", "ok", "gatewayd"),
    ]
    assert all(e["uid"] == os.geteuid() for e in entries)


async def test_sigterm_drain_finishes_the_request_under_way_and_refuses_new_ones(
    gateway: Running,
) -> None:
    """Shutdown stops accepting, lets a body that is half-sent finish with its 202 (the
    record is kept and delivered later), then the daemon stops."""
    sandbox = gateway.sandbox
    fields, files = sample_submission(CHANNEL)
    body, content_type = multipart_body(fields, files)
    device = sandbox.pki.devices["tablet-01"]
    context = client_context(ca=sandbox.pki.gateway_ca.cert, cert=device.cert, key=device.key)
    port = gateway.port_of("tablet-01")
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost"
    )
    head = (
        f"POST /v1/channels/{CHANNEL}/submissions HTTP/1.1\r\nHost: localhost\r\n"
        "Authorization: Basic c3RhZmYtMDAxOmNvcnJlY3QgaG9yc2UgYmF0dGVyeQ==\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body[:1000])
    await writer.drain()
    await until(lambda: sample_value("gateway_ingress_requests_in_flight", {}, gateway) == 1)
    gateway.gateway.stop.set()  # what SIGTERM does
    async with gateway.client() as late:  # a new request during the drain
        with contextlib.suppress(aiohttp.ClientError):
            reply = await late.submit(CHANNEL, fields, files)
            assert reply.status == 503
    writer.write(body[1000:])
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), timeout=10)
    assert status_line.startswith(b"HTTP/1.1 202"), status_line
    writer.close()
    await writer.wait_closed()
    await asyncio.wait_for(gateway.task, timeout=30)
    assert (
        sample_value(
            "gateway_submissions_total",
            {"listener": "tablets", "channel": CHANNEL, "outcome": "accepted"},
            gateway,
        )
        == 1
    )
