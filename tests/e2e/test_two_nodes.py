"""Two gateway nodes share one PostgreSQL spool; one is SIGKILLed in the middle of
deliveries, several times, while devices post to both.

Every acknowledged submission is delivered, those the dead node had claimed by the
survivor once their leases ran out; nothing is lost; the only duplicates are the
deliveries a kill cut short (at least once), and they are counted; the erasure
ledger's single chain, written by both nodes, verifies.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import tomllib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import aiohttp
import pytest
import tomli_w
from conftest import actl, until

from gateway.ops.pgchain import PgChainLog
from gateway.testing.client import DeviceClient
from gateway.testing.postgres import Postgres
from gateway.testing.process import DaemonProcess
from gateway.testing.samples import make_jpeg
from gateway.testing.sandbox import Sandbox, build_sandbox

pytestmark = pytest.mark.slow

CHANNEL = "online-application"
DESTINATION = "dnp-relay"
LEASE = 5.0
ROUNDS = 3
PER_NODE = 10
DELIVERY_DELAY = 0.15  # the upstream answers slowly, so kills land in deliveries


@dataclass
class Posted:
    key: str
    fields: dict[str, str]
    photo: bytes
    submission_id: str | None = None


def _post(n: int) -> Posted:
    fields = {
        "application_id": f"{n:023d}",
        "wants_e_certificate": "true",
        "wants_braille": "false",
        "name": "二つの節点",
    }
    return Posted(f"node-{n:05d}", fields, make_jpeg(480, 640, seed=n, quality=60))


def _second_node(box: Sandbox, directory: Path) -> Path:
    """Node b's configuration: node a's, with its own name, staging directory, control
    socket and access log; the same database, keys and upstreams."""
    data = tomllib.loads(box.config_path.read_text("utf-8"))
    data["spool"].update(node_id="node-b", directory=str(directory / "spool-b"))
    data["admin"]["control_socket"] = str(directory / "b.sock")
    data["access_log"]["directory"] = str(directory / "access-b")
    path = box.config_path.with_name("gateway-b.toml")
    path.write_text(tomli_w.dumps(data), "utf-8")
    return path


async def _send(port: int, box: Sandbox, device: str, posted: Posted) -> int:
    async with DeviceClient(box, device, port=port) as client:
        reply = await client.submit(
            CHANNEL, posted.fields, {"face_photo": posted.photo}, idempotency_key=posted.key
        )
    if reply.status == 202:
        submission_id = reply.body["submission_id"]
        assert posted.submission_id in (None, submission_id)
        posted.submission_id = submission_id
    return reply.status


async def test_a_killed_node_strands_nothing(
    tmp_path: Path, postgres: Postgres, capsys: pytest.CaptureFixture[str]
) -> None:
    dsn_file = tmp_path / "spool.dsn"
    dsn_file.write_text(postgres.new_database() + "\n", "utf-8")
    os.chmod(dsn_file, 0o600)
    box = await build_sandbox(
        tmp_path,
        overrides={
            "spool.backend": "postgresql",
            "spool.dsn": str(dsn_file),
            "spool.node_id": "node-a",
            "spool.lease_seconds": LEASE,
        },
    )
    config_b = _second_node(box, tmp_path / "state")
    sim = box.simulators[DESTINATION]
    sim.set_delay(DELIVERY_DELAY)
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    posted: list[Posted] = []
    kills = 0
    kill_times: list[float] = []  # wall clock, as the ledger's erased_at
    node_b = await DaemonProcess(config_b, log_b).start()
    node_a: DaemonProcess | None = None
    try:
        for r in range(ROUNDS):
            mark = log_a.stat().st_size if log_a.exists() else 0
            node_a = await DaemonProcess(box.config_path, log_a).start()
            batch = [_post(r * 2 * PER_NODE + i) for i in range(2 * PER_NODE)]
            posted += batch
            # The tablets post to node a and to node b, all at once.
            sends = [
                asyncio.create_task(_send(node_a.port_of("tablet-01"), box, "tablet-01", p))
                for p in batch[:PER_NODE]
            ] + [
                asyncio.create_task(_send(node_b.port_of("tablet-01"), box, "tablet-01", p))
                for p in batch[PER_NODE:]
            ]
            # a has delivered one and has more under way
            await until(lambda m=mark: b'"event": "delivered"' in log_a.read_bytes()[m:], within=60)
            await node_a.kill()
            kills += 1
            killed_at = time.monotonic()
            kill_times.append(time.time())
            results = await asyncio.gather(*sends, return_exceptions=True)
            for result in results:  # a post cut off by the kill fails on its connection
                assert result == 202 or isinstance(result, OSError | aiohttp.ClientError), result
            # Whatever a tablet has no 202 for, it posts again, to the node still up.
            for p in batch[:PER_NODE]:
                if p.submission_id is None:
                    assert await _send(node_b.port_of("tablet-01"), box, "tablet-01", p) == 202
            acked = {p.submission_id for p in posted if p.submission_id}
            await until(lambda a=acked: a <= set(sim.deliveries), within=LEASE * 4 + 30)
            took = time.monotonic() - killed_at
            # The dead node's claims were taken over by b within the lease (plus the
            # rescan that finds them, a third of it), not at a's restart.
            assert took < LEASE * 2 + 10, took
            print(f"round {r}: all delivered {took:.1f} s after the kill")
        # A copy a killed node delivered but had not erased yet is erased by the next
        # sweep of any node: the start-up sweep of a's return, here.
        node_a = await DaemonProcess(box.config_path, log_a).start()
        assert await node_a.terminate() == 0
    finally:
        if node_a is not None:
            await node_a.__aexit__()  # a test that failed half-way leaves no daemon behind
        assert await node_b.terminate() == 0
        await box.stop_simulators()

    acked_ids = {p.submission_id for p in posted}
    assert None not in acked_ids
    assert acked_ids == set(sim.deliveries)  # every 202 delivered, nothing else
    for p in posted:
        received = sim.deliveries[p.submission_id or ""]
        assert received.files["face_photo"] == p.photo
    # At least once: a delivery a kill cut short may be delivered again by b, never more
    # than the deliveries that were under way when a node died.
    assert sim.duplicates <= kills * 4, sim.duplicates
    print(f"{len(posted)} acknowledged, {kills} kills, {sim.duplicates} duplicates")
    # One chain for both nodes' erasures, and it verifies; every record erased, and
    # recorded once unless a kill fell between an erasure's ledger entry and the erasure
    # (the ledger comes first: the next sweep erases the copy and records it again).
    dsn = dsn_file.read_text("utf-8").strip()
    ledger = PgChainLog(dsn, "ledger", clock=time.time)
    assert ledger.verify() >= len(acked_ids)
    recorded: dict[str, list[float]] = {}
    for entry in ledger.entries():  # when each entry was appended, by the writer's clock
        if "submission_id" in entry.body:
            at = datetime.fromisoformat(entry.at).timestamp()
            recorded.setdefault(entry.body["submission_id"], []).append(at)
    for submission_id, times in recorded.items():
        if len(times) > 1:  # the first just before a kill, the second after it
            assert len(times) == 2, (submission_id, times)
            assert any(0 <= k - times[0] < 5 and times[1] > k for k in kill_times), (
                times,
                kill_times,
            )
    missing = acked_ids - set(recorded)
    assert not missing, missing
    # The operators' view reads the shared spool from either node's configuration.
    code, out, _ = await actl(
        capsys, "spool", "list", "--state", "all", "--format", "json", "--config", config_b
    )
    assert code == 0
    listed = {row["submission_id"]: row["state"] for row in json.loads(out)}
    assert {listed[i] for i in acked_ids if i} == {"erased"}
    assert "二つの節点" not in out
    code, out, err = await actl(capsys, "audit", "verify", "--config", box.config_path)
    assert code == 0, out + err
