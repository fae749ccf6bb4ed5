"""End to end over real mutual TLS: the relay leg (docs/contract.md, "Egress" and "Promises").

The daemon's relay sleep is injected (``gateway.sleep`` records every backoff and returns
at once), and the upstream simulators inject failures, so retries run without waiting.
Requests are held open at the simulator by replacing its sleep with a gate.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import FakeSleep, Running, hold, start_gateway, until

from gateway.crypto.certs import load_cert_der, spki_sha256_b64
from gateway.testing.client import DeviceClient
from gateway.testing.samples import sample_submission
from gateway.testing.sandbox import (
    CHANNEL_DESTINATION,
    CHANNEL_DEVICE,
    UPSTREAM_CREDENTIAL,
    Sandbox,
    build_sandbox,
)

INITIAL_BACKOFF = 0.05  # what build_sandbox configures for every destination
MAX_BACKOFF = 0.5

DEVICE_OF = CHANNEL_DEVICE
DESTINATION_OF = CHANNEL_DESTINATION


async def submit(client: DeviceClient, channel: str) -> str:
    """Post the channel's sample submission; return its submission id."""
    fields, files = sample_submission(channel)
    reply = await client.submit(channel, fields, files)
    assert reply.status == 202, reply.body
    submission_id = reply.body["submission_id"]
    assert isinstance(submission_id, str)
    return submission_id


async def wait_state(client: DeviceClient, submission_id: str, state: str) -> dict[str, Any]:
    """Poll the status endpoint (real requests, no sleeping) until ``state`` is reached."""
    async with asyncio.timeout(10):
        while True:
            reply = await client.status(submission_id)
            assert reply.status == 200, reply.body
            if reply.body["state"] == state:
                return reply.body
            # Erase-on-delivery channels move from delivered to erased at once.
            if state == "delivered" and reply.body["state"] == "erased":
                assert reply.body["delivered_at"] is not None, reply.body
                return reply.body


def attempts(gateway: Running, destination: str, outcome: str) -> float:
    labels = {"destination": destination, "outcome": outcome}
    value = gateway.metrics.registry.get_sample_value("gateway_relay_attempts_total", labels)
    return value or 0.0


def in_flight(gateway: Running, destination: str) -> float:
    labels = {"destination": destination}
    value = gateway.metrics.registry.get_sample_value("gateway_relay_in_flight", labels)
    return value or 0.0


@dataclass
class StallingSleep(FakeSleep):
    """Records delays and returns at once, until ``limit`` calls: then it never returns."""

    limit: int = 3
    reached: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        if len(self.calls) >= self.limit:
            self.reached.set()
            await asyncio.Event().wait()  # parks the relay worker until shutdown
        await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def running(box: Sandbox, sleep: FakeSleep | None = None) -> AsyncIterator[Running]:
    """Run a daemon on ``box``; stop it and the simulators afterwards."""
    try:
        gateway = await start_gateway(box, sleep)
        try:
            yield gateway
        finally:
            await gateway.shutdown()
    finally:
        await box.stop_simulators()


# ------------------------------------------------------------------------ retries


async def test_5xx_is_retried_with_bounded_backoff_until_delivered(gateway: Running) -> None:
    """Three 503s then success: four attempts, three backoffs within the configured bounds."""
    sim = gateway.sandbox.simulators["dnp-relay"]
    sim.fail_next(3, 503)
    async with gateway.client() as client:
        submission_id = await submit(client, "online-application")
        await sim.wait_for(1, timeout=10)
        status = await wait_state(client, submission_id, "delivered")
    assert sim.attempts == 4
    assert [r.idempotency_key for r in sim.received] == [submission_id]
    assert len(gateway.sleep.calls) == 3
    for attempt, delay in enumerate(gateway.sleep.calls):
        assert 0 <= delay <= min(MAX_BACKOFF, INITIAL_BACKOFF * 2**attempt), gateway.sleep.calls
    assert attempts(gateway, "dnp-relay", "503") == 3
    assert attempts(gateway, "dnp-relay", "delivered") == 1
    assert status["attempts"] == 4
    assert status["upstream_receipt"] == sim.received[0].receipt_id


async def test_backoff_never_exceeds_max_backoff(tmp_path: Path) -> None:
    """Many failures in a row (circuit breaker out of the way): every backoff <= max_backoff."""
    box = await build_sandbox(
        tmp_path, overrides={"destinations.jlis-express.retry.circuit_threshold": 100}
    )
    async with running(box) as gateway, gateway.client() as client:
        sim = gateway.sandbox.simulators["jlis-express"]
        sim.fail_next(12, 500)
        submission_id = await submit(client, "express-issuance")
        await wait_state(client, submission_id, "delivered")
        assert sim.attempts == 13
        assert len(gateway.sleep.calls) == 12
        assert all(0 <= d <= MAX_BACKOFF for d in gateway.sleep.calls), gateway.sleep.calls


async def test_circuit_breaker_holds_requests_back_from_a_failing_upstream(
    tmp_path: Path,
) -> None:
    """After 5 failures no request goes upstream until the cool-down; then one probe, and
    each failed probe doubles the cool-down. One worker, so that which attempt fails is
    decided by the test, not by the scheduler (with several, attempts sent before the
    circuit opened may also fail, which is legitimate but leaves fewer probes)."""
    box = await build_sandbox(tmp_path, overrides={"destinations.jlis-express.concurrency": 1})
    running = await start_gateway(box)
    try:
        sim = box.simulators["jlis-express"]
        sim.fail_next(8, 503)
        async with running.client() as client:
            ids = [await submit(client, "express-issuance") for _ in range(3)]
            for submission_id in ids:
                await wait_state(client, submission_id, "delivered")
        # 8 refused attempts (5 to open, then one failed probe per cool-down) + 3
        # deliveries: nothing was sent while the circuit was open.
        assert sim.attempts == 8 + 3
        cooldowns = [d for d in running.sleep.calls if d > MAX_BACKOFF]
        assert cooldowns, running.sleep.calls
        assert max(cooldowns) >= 4 * 30 - 1  # 30 s, then doubled after each failed probe
        labels = {"destination": "jlis-express"}
        assert running.metrics.registry.get_sample_value("gateway_relay_circuit_open", labels) == 0
    finally:
        await running.shutdown()
        await box.stop_simulators()


async def test_retry_after_is_honoured(gateway: Running) -> None:
    """A 429 with Retry-After: 7 makes the relay wait at least seven seconds."""
    sim = gateway.sandbox.simulators["dnp-relay"]
    sim.fail_next(1, 429, retry_after="7")
    async with gateway.client() as client:
        submission_id = await submit(client, "online-application")
        await wait_state(client, submission_id, "delivered")
    assert sim.attempts == 2
    assert len(gateway.sleep.calls) == 1
    assert gateway.sleep.calls[0] >= 7
    assert attempts(gateway, "dnp-relay", "429") == 1


async def test_503_retry_after_is_honoured(gateway: Running) -> None:
    """A 503 with Retry-After also sets the wait before the next attempt."""
    sim = gateway.sandbox.simulators["ward-issuance"]
    sim.fail_next(1, 503, retry_after="30")
    async with gateway.client("callcentre-01") as client:
        submission_id = await submit(client, "issuance-reservation")
        await wait_state(client, submission_id, "delivered")
    assert gateway.sleep.calls[0] >= 30


async def test_retry_after_http_date_is_honoured(gateway: Running) -> None:
    """A Retry-After given as an HTTP-date a minute ahead makes the relay wait about that long."""
    sim = gateway.sandbox.simulators["dnp-relay"]
    when = datetime.now(UTC) + timedelta(seconds=60)
    sim.fail_next(1, 503, retry_after=email.utils.format_datetime(when, usegmt=True))
    async with gateway.client() as client:
        submission_id = await submit(client, "online-application")
        await wait_state(client, submission_id, "delivered")
    assert len(gateway.sleep.calls) == 1
    assert 50 <= gateway.sleep.calls[0] <= 61


async def test_retry_after_is_capped_by_max_retry_after(gateway: Running) -> None:
    """An absurd Retry-After is capped at the destination's max_retry_after."""
    sim = gateway.sandbox.simulators["dnp-relay"]
    cap = gateway.sandbox.config.destinations["dnp-relay"].retry.max_retry_after  # type: ignore[union-attr]
    sim.fail_next(1, 429, retry_after="99999999")
    async with gateway.client() as client:
        submission_id = await submit(client, "online-application")
        await wait_state(client, submission_id, "delivered")
    assert gateway.sleep.calls == [cap]


async def test_408_is_retried(gateway: Running) -> None:
    """An upstream 408 Request Timeout is retried and the record delivered."""
    sim = gateway.sandbox.simulators["jlis-express"]
    sim.fail_next(1, 408)
    async with gateway.client() as client:
        submission_id = await submit(client, "express-issuance")
        await wait_state(client, submission_id, "delivered")
    assert sim.attempts == 2
    assert attempts(gateway, "jlis-express", "408") == 1
    assert attempts(gateway, "jlis-express", "delivered") == 1


async def test_connection_reset_is_retried(gateway: Running) -> None:
    """Two dropped connections are retried as connection errors, then delivered."""
    sim = gateway.sandbox.simulators["ward-issuance"]
    sim.reset_connection_next(2)
    async with gateway.client("counter-01") as client:
        submission_id = await submit(client, "window-reception")
        await wait_state(client, submission_id, "delivered")
    assert sim.attempts == 3
    assert len(sim.received) == 1
    assert len(gateway.sleep.calls) == 2
    assert attempts(gateway, "ward-issuance", "connection_error") == 2
    assert attempts(gateway, "ward-issuance", "delivered") == 1


@pytest.mark.parametrize("status", [400, 403, 409, 422])
async def test_other_4xx_puts_record_on_hold(gateway: Running, status: int) -> None:
    """A 4xx other than 408/429 is not retried: the record goes to held."""
    sim = gateway.sandbox.simulators["jlis-overseas"]
    sim.fail_next(1, status)
    async with gateway.client("pc-01") as client:
        submission_id = await submit(client, "overseas-application")
        held = await wait_state(client, submission_id, "held")
        # A later submission is still delivered: the destination is not blocked.
        later = await submit(client, "overseas-application")
        await wait_state(client, later, "delivered")
    assert held["held_at"] is not None
    assert held["delivered_at"] is None
    assert held["attempts"] == 1
    assert gateway.sleep.calls == []
    assert sim.attempts == 2
    assert [r.idempotency_key for r in sim.received] == [later]
    assert attempts(gateway, "jlis-overseas", str(status)) == 1
    assert attempts(gateway, "jlis-overseas", "delivered") == 1


async def test_duplicate_delivery_is_answered_by_idempotency_key(gateway: Running) -> None:
    """The upstream sees the submission id as Idempotency-Key on every attempt."""
    sim = gateway.sandbox.simulators["jlis-card-management"]
    sim.fail_next(2, 502)
    async with gateway.client("records-01") as client:
        submission_id = await submit(client, "card-delegation-batch")
        await wait_state(client, submission_id, "delivered")
    assert list(sim.deliveries) == [submission_id]
    assert sim.duplicates == 0


# --------------------------------------------------------------- identity on the wire


async def test_every_destination_sees_its_own_client_certificate_and_headers(
    gateway: Running,
) -> None:
    """All six channels: each upstream sees the client certificate of its own destination
    (one per destination, none shared) and the egress headers."""
    ids: dict[str, str] = {}
    for channel, device in DEVICE_OF.items():
        async with gateway.client(device) as client:
            ids[channel] = await submit(client, channel)
    clients = gateway.sandbox.pki.clients
    assert len({c.fingerprint for c in clients.values()}) == len(gateway.sandbox.simulators)
    for channel, submission_id in ids.items():
        destination = DESTINATION_OF[channel]
        sim = gateway.sandbox.simulators[destination]
        await sim.wait_for(2 if destination == "ward-issuance" else 1, timeout=10)
        got = sim.deliveries[submission_id]
        assert got.client_fingerprint == clients[destination].fingerprint
        assert got.channel == channel
        assert got.idempotency_key == submission_id


async def test_overseas_destination_gets_the_ward_credential(gateway: Running) -> None:
    """jlis-overseas receives the ward's own HTTP Basic credential; others receive none."""
    async with gateway.client("pc-01") as pc, gateway.client() as tablet:
        overseas = await submit(pc, "overseas-application")
        online = await submit(tablet, "online-application")
    jlis = gateway.sandbox.simulators["jlis-overseas"]
    dnp = gateway.sandbox.simulators["dnp-relay"]
    await jlis.wait_for(1, timeout=10)
    await dnp.wait_for(1, timeout=10)
    assert jlis.deliveries[overseas].authorization_user == UPSTREAM_CREDENTIAL[0]
    assert dnp.deliveries[online].authorization_user is None


# ------------------------------------------------------------------- concurrency


async def test_per_destination_concurrency_is_never_exceeded(gateway: Running) -> None:
    """ward-issuance (concurrency 4): with the upstream stalled, only four requests are open."""
    sim = gateway.sandbox.simulators["ward-issuance"]
    limit = gateway.sandbox.config.destinations["ward-issuance"].concurrency  # type: ignore[union-attr]
    assert limit == 4
    gate = hold(sim)
    async with gateway.client("callcentre-01") as client:
        ids = [await submit(client, "issuance-reservation") for _ in range(limit + 3)]
        await gate.wait_inside(limit)
        # Real round trips through the gateway give the relay every chance to overrun.
        states = [(await client.status(i)).body["state"] for i in ids]
        assert gate.inside == limit
        assert states.count("delivering") == limit
        assert states.count("queued") == 3
        assert in_flight(gateway, "ward-issuance") == limit
        gate.opened.set()
        await sim.wait_for(len(ids), timeout=10)
        for submission_id in ids:
            await wait_state(client, submission_id, "erased")  # delivered, then erased
    assert gate.peak == limit
    assert sim.attempts == len(ids)
    await until(lambda: in_flight(gateway, "ward-issuance") == 0)  # its erasure done too


async def test_stalled_destination_does_not_block_others(gateway: Running) -> None:
    """A destination with every worker stuck does not delay another destination."""
    stalled = gateway.sandbox.simulators["jlis-card-management"]
    gate = hold(stalled)
    async with gateway.client("records-01") as records, gateway.client() as tablet:
        batch = await submit(records, "card-delegation-batch")
        await gate.wait_inside(1)
        online = await submit(tablet, "online-application")
        await wait_state(tablet, online, "delivered")
        assert (await records.status(batch)).body["state"] == "delivering"
        gate.opened.set()
        await wait_state(records, batch, "delivered")


# ----------------------------------------------------------------------- SPKI pins


async def test_wrong_spki_pin_never_delivers(tmp_path: Path) -> None:
    """A pin that does not match the upstream's key: connection errors, nothing delivered."""
    wrong_pin = "A" * 43 + "="
    box = await build_sandbox(tmp_path, overrides={"destinations.dnp-relay.spki_pins": [wrong_pin]})
    sleep = StallingSleep(limit=3)
    async with running(box, sleep) as gateway, gateway.client() as client:
        submission_id = await submit(client, "online-application")
        async with asyncio.timeout(10):
            await sleep.reached.wait()
        status = (await client.status(submission_id)).body
        assert status["state"] in {"queued", "delivering"}
        assert status["delivered_at"] is None
        sim = box.simulators["dnp-relay"]
        assert sim.received == []
        assert sim.attempts == 0
        assert attempts(gateway, "dnp-relay", "connection_error") == 3
        assert attempts(gateway, "dnp-relay", "delivered") == 0


def _pin_destination(box: Sandbox, destination: str, pins: list[str]) -> None:
    """Rewrite the sandbox's configuration with SPKI pins for ``destination``."""
    box.edit_config(lambda d: d["destinations"][destination].update(spki_pins=pins))
    box.reload_config()


async def test_right_spki_pin_delivers(tmp_path: Path) -> None:
    """The upstream certificate's own SPKI pin (among others) lets delivery through."""
    box = await build_sandbox(tmp_path)
    right = spki_sha256_b64(load_cert_der(box.pki.upstreams["dnp-relay"].cert))
    _pin_destination(box, "dnp-relay", ["B" * 43 + "=", right])
    async with running(box) as gateway, gateway.client() as client:
        submission_id = await submit(client, "online-application")
        await wait_state(client, submission_id, "delivered")
        assert [r.idempotency_key for r in box.simulators["dnp-relay"].received] == [submission_id]
        assert attempts(gateway, "dnp-relay", "connection_error") == 0
        assert gateway.sleep.calls == []


async def test_pin_of_another_upstream_is_refused(tmp_path: Path) -> None:
    """A pin of a different, equally trusted upstream certificate does not pass."""
    box = await build_sandbox(tmp_path)
    other = spki_sha256_b64(load_cert_der(box.pki.upstreams["jlis-express"].cert))
    _pin_destination(box, "dnp-relay", [other])
    sleep = StallingSleep(limit=2)
    async with running(box, sleep) as gateway, gateway.client() as client:
        submission_id = await submit(client, "online-application")
        async with asyncio.timeout(10):
            await sleep.reached.wait()
        assert (await client.status(submission_id)).body["state"] != "delivered"
        assert box.simulators["dnp-relay"].received == []
        assert attempts(gateway, "dnp-relay", "delivered") == 0


# ------------------------------------------------------------- records and redirects


@dataclass
class CorruptingSleep(FakeSleep):
    """Between the first and the second attempt, flips one ciphertext byte of every record."""

    records: Path = Path()

    async def __call__(self, seconds: float) -> None:
        for path in self.records.iterdir():
            data = bytearray(path.read_bytes())
            data[16 + 65536 + 16 + 100] ^= 0x01  # inside the second segment
            path.write_bytes(bytes(data))
        await super().__call__(seconds)


async def test_a_corrupt_record_is_held_not_retried_as_a_network_error(tmp_path: Path) -> None:
    """A record that fails authentication mid-stream goes to held; the circuit stays closed."""
    box = await build_sandbox(tmp_path)
    assert box.config is not None
    sleep = CorruptingSleep(records=box.config.spool.directory / "records")
    async with running(box, sleep) as gateway, gateway.client() as client:
        sim = box.simulators["dnp-relay"]
        sim.fail_next(1, 503)
        submission_id = await submit(client, "online-application")
        await wait_state(client, submission_id, "held")
        assert sim.received == []
        assert len(sleep.calls) == 1
        assert attempts(gateway, "dnp-relay", "record_unreadable") == 1
        labels = {"destination": "dnp-relay"}
        assert gateway.metrics.registry.get_sample_value("gateway_relay_circuit_open", labels) == 0


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_is_never_followed_and_holds_the_record(
    gateway: Running, status: int
) -> None:
    """Egress goes only to the configured URL: a 3xx puts the record on held."""
    sim = gateway.sandbox.simulators["dnp-relay"]
    sim.fail_next(1, status)
    async with gateway.client() as client:
        submission_id = await submit(client, "online-application")
        await wait_state(client, submission_id, "held")
    assert sim.attempts == 1
    assert gateway.sleep.calls == []


@pytest.mark.parametrize("style", ["json", "header", "trickled"])
async def test_the_upstream_receipt_is_recorded_however_it_is_sent(
    gateway: Running, style: str
) -> None:
    """A receipt sent as a JSON body, as a Receipt-Id header, or as a JSON body that
    arrives in several pieces is recorded with the delivery and shown to the device."""
    sim = gateway.sandbox.simulators["dnp-relay"]
    sim.receipt_style = style
    async with gateway.client() as client:
        submission_id = await submit(client, "online-application")
        doc = await wait_state(client, submission_id, "delivered")
    assert doc["upstream_receipt"] == sim.deliveries[submission_id].receipt_id
