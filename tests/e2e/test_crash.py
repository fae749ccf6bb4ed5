"""SIGKILL while accepting and relaying: nothing acknowledged is lost, nothing half-present,
and every delivered copy is erased in the end.

gatewayd runs as a real process; the upstream simulators run here and outlive it. Each
round kills the daemon with SIGKILL once a few submissions have been acknowledged
while more are in flight, both on the ingress and on the relay, then restarts it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from gateway.crypto.keys import load_master_key
from gateway.ops.access_log import AccessLog
from gateway.retention.ledger import erasure_ledger
from gateway.spool.store import Spool
from gateway.testing.client import DeviceClient
from gateway.testing.process import DaemonProcess
from gateway.testing.samples import make_jpeg
from gateway.testing.sandbox import Sandbox, build_sandbox

pytestmark = pytest.mark.slow

CHANNEL = "online-application"
ROUNDS = 4
PER_ROUND = 24
KILL_AFTER_ACKS = 6


@dataclass
class Posted:
    key: str
    fields: dict[str, str]
    photo: bytes
    submission_id: str | None = None  # set once a 202 was seen


def _post(n: int) -> Posted:
    fields = {
        "application_id": f"{n:023d}",
        "wants_e_certificate": "true",
        "wants_braille": "false",
        "name": "落とされる名前",
    }
    photo = make_jpeg(480 + n % 7 * 16, 640, seed=n, quality=60)
    return Posted(f"crash-{n:05d}", fields, photo)


async def _send(client: DeviceClient, posted: Posted) -> tuple[int, str | None, bool]:
    reply = await client.submit(
        CHANNEL, posted.fields, {"face_photo": posted.photo}, idempotency_key=posted.key
    )
    return reply.status, reply.body.get("submission_id"), "Idempotent-Replayed" in reply.headers


async def _round(box: Sandbox, log: Path, batch: list[Posted]) -> None:
    """Post ``batch`` concurrently and SIGKILL the daemon after a few 202s."""
    daemon = await DaemonProcess(box.config_path, log).start()
    acked = asyncio.Event()
    count = 0

    async def one(client: DeviceClient, posted: Posted) -> None:
        nonlocal count
        status, submission_id, _ = await _send(client, posted)
        assert status == 202, status
        posted.submission_id = submission_id
        count += 1
        if count >= KILL_AFTER_ACKS:
            acked.set()

    async with DeviceClient(box, "tablet-01", port=daemon.port_of("tablet-01")) as client:
        tasks = [asyncio.create_task(one(client, p)) for p in batch]
        async with asyncio.timeout(60):
            await acked.wait()
        await daemon.kill()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        # A post cut off by the kill fails on the connection; nothing else may fail.
        assert result is None or isinstance(result, OSError | aiohttp.ClientError), result


async def test_sigkill_during_accept_and_relay_loses_nothing_acknowledged(
    tmp_path: Path,
) -> None:
    """After repeated SIGKILLs every 202 is delivered as accepted; retries get the original."""
    box = await build_sandbox(tmp_path)
    sim = box.simulators["dnp-relay"]
    log = tmp_path / "daemon.log"
    posted: list[Posted] = []
    try:
        for r in range(ROUNDS):
            batch = [_post(r * PER_ROUND + i) for i in range(PER_ROUND)]
            posted += batch
            await _round(box, log, batch)
        acknowledged = [p for p in posted if p.submission_id]
        assert len(acknowledged) >= ROUNDS * KILL_AFTER_ACKS

        daemon = await DaemonProcess(box.config_path, log).start()
        try:
            async with DeviceClient(box, "tablet-01", port=daemon.port_of("tablet-01")) as client:
                # Every device retries what it has no receipt for, and some of what it has.
                for p in posted:
                    status, submission_id, replayed = await _send(client, p)
                    assert status == 202
                    if p.submission_id:
                        assert submission_id == p.submission_id and replayed
                    else:
                        p.submission_id = submission_id
                await sim.wait_for(len(posted), timeout=60)
        finally:
            assert await daemon.terminate() == 0
    finally:
        await box.stop_simulators()

    # Exactly one record per idempotency key reached the upstream, exactly as accepted.
    by_id = {p.submission_id: p for p in posted}
    assert set(sim.deliveries) == set(by_id)
    for submission_id, received in sim.deliveries.items():
        p = by_id[submission_id]
        expected = {k: v for k, v in p.fields.items() if k != "name"}
        assert dict(received.fields) == expected
        assert received.files["face_photo"] == p.photo

    # Nothing is half-present and no delivered copy is kept: every accepted record was
    # delivered exactly as accepted (above), then erased, each erasure in the ledger.
    assert box.config is not None
    master = load_master_key(Path(box.config.spool.master_key))
    spool = Spool(box.config.spool.directory, master)
    report = await spool.open()
    try:
        assert report.missing_files == 0
        assert report.orphans_removed == 0
        assert report.records == 0  # no live copy left: all delivered and erased
        for p in posted:
            assert p.submission_id is not None
            record = await spool.get(p.submission_id)
            assert record is not None and record.state == "erased"
            assert record.delivered_at is not None and record.erased_at is not None
        assert list((box.config.spool.directory / "records").iterdir()) == []
    finally:
        await spool.close()
    ledger = erasure_ledger(box.config.spool.directory)
    erased = {e.body["submission_id"]: e.body["reason"] for e in ledger.entries()}
    assert erased == dict.fromkeys(by_id, "delivered")

    # The access log (written out at the clean stop) holds every acknowledged submission
    # as accepted, each once: an accepted entry is committed with its record, before the
    # 202, so no SIGKILL lost one; and the chain across the day files verifies.
    access = AccessLog(box.config.access_log_directory)
    verified = access.verify()
    accepted = [
        e.body["submission_id"] for _, e in access.entries() if e.body["outcome"] == "accepted"
    ]
    assert sorted(accepted) == sorted(p.submission_id for p in posted)
    assert verified.entries >= len(posted)
