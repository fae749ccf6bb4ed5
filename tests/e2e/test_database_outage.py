"""PostgreSQL itself crashes and comes back under a running gateway node.

During the outage every submission is answered 503 with Retry-After (never another
5xx, never a 202 that was not committed), ``/readyz`` says the database is down, and
deliveries wait; once the server is back the node reconnects by itself: new
submissions are accepted, and every 202 ever given is in the database and delivered.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import aiohttp
import psycopg
import pytest
from test_prometheus import parse_samples, run_promtool, sample

from gateway.testing.client import DeviceClient
from gateway.testing.postgres import Postgres, free_loopback_port
from gateway.testing.process import DaemonProcess
from gateway.testing.samples import make_jpeg
from gateway.testing.sandbox import build_sandbox

pytestmark = pytest.mark.slow

CHANNEL = "online-application"
NAME = "障害中の名前"


def _fields(n: int) -> dict[str, str]:
    return {
        "application_id": f"{n:023d}",
        "wants_e_certificate": "true",
        "wants_braille": "false",
        "name": NAME,
    }


async def _metrics(session: aiohttp.ClientSession, port: int) -> str:
    async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
        return await response.text()


async def _readyz(session: aiohttp.ClientSession, port: int) -> tuple[int, dict[str, object]]:
    async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
        return response.status, await response.json()


async def test_a_database_crash_gives_503_then_the_node_reconnects(tmp_path: Path) -> None:
    server = Postgres().start()  # its own server: the session's is not to be crashed
    try:
        dsn_file = tmp_path / "spool.dsn"
        dsn = server.new_database()
        dsn_file.write_text(dsn + "\n", "utf-8")
        os.chmod(dsn_file, 0o600)
        admin_port = free_loopback_port()
        box = await build_sandbox(
            tmp_path,
            overrides={
                "spool.backend": "postgresql",
                "spool.dsn": str(dsn_file),
                "spool.node_id": "outage-node",
                "spool.lease_seconds": 5,
                "admin.port": admin_port,
            },
        )
        sim = box.simulators["dnp-relay"]
        photo = make_jpeg(480, 640, seed=3, quality=60)
        accepted: list[str] = []
        statuses: list[int] = []
        log = tmp_path / "gatewayd.log"
        daemon = await DaemonProcess(box.config_path, log).start()
        try:
            port = daemon.port_of("tablet-01")
            async with (
                DeviceClient(box, "tablet-01", port=port) as device,
                aiohttp.ClientSession() as admin,
            ):

                async def post(n: int) -> int:
                    reply = await device.submit(
                        CHANNEL, _fields(n), {"face_photo": photo}, idempotency_key=f"out-{n}"
                    )
                    statuses.append(reply.status)
                    if reply.status == 202:
                        accepted.append(reply.body["submission_id"])
                    else:
                        assert reply.status == 503, reply.status
                        assert int(reply.headers["Retry-After"]) > 0
                    return reply.status

                for n in range(3):
                    assert await post(n) == 202
                await sim.wait_for(3, timeout=30)
                assert (await _readyz(admin, admin_port))[1].get("database") == "up"
                exposition = await _metrics(admin, admin_port)
                checked = run_promtool("check", "metrics", stdin=exposition)
                assert checked.returncode == 0, checked.stdout + checked.stderr
                up = parse_samples(exposition)
                assert sample(up, "gateway_db_up") == 1
                assert (sample(up, "gateway_spool_committed_records_total") or 0) >= 3
                assert (sample(up, "gateway_spool_commit_batches_total") or 0) >= 1
                assert (sample(up, "gateway_db_pool_connections", state="idle") or 0) >= 1
                assert sample(up, "gateway_registry_listener_connected") == 1

                server.stop("immediate")  # a crash: no checkpoint, recovery at start
                started = time.monotonic()
                answers = [await post(n) for n in range(3, 8)]
                assert answers == [503] * 5
                assert time.monotonic() - started < 30  # each within the pool's timeout
                ready: dict[str, object] = {}

                async def down() -> bool:
                    nonlocal ready
                    status, ready = await _readyz(admin, admin_port)
                    return status == 503 and ready.get("database") == "down"

                async with asyncio.timeout(15):  # the next check of the database sees it
                    while not await down():  # noqa: ASYNC110 - polling another process
                        await asyncio.sleep(0.1)

                down_samples = parse_samples(await _metrics(admin, admin_port))
                assert sample(down_samples, "gateway_db_up") == 0
                server.restart()
                deadline = time.monotonic() + 30
                while await post(100 + len(statuses)) != 202:  # the node reconnects itself
                    assert time.monotonic() < deadline
                for n in range(200, 203):
                    assert await post(n) == 202
                await sim.wait_for(len(accepted), timeout=30)
                # The restart ended the session holding the node's name: taken again.
                async with asyncio.timeout(15):
                    while b'"node_name_taken_again"' not in log.read_bytes():  # noqa: ASYNC110
                        await asyncio.sleep(0.1)
        finally:
            assert await daemon.terminate() == 0
            await box.stop_simulators()

        assert set(statuses) <= {202, 503}
        assert set(accepted) <= set(sim.deliveries)  # every 202 delivered
        with psycopg.connect(dsn) as conn:
            stored = {r[0] for r in conn.execute("SELECT id FROM gateway.records")}
        assert set(accepted) <= stored  # every 202 was committed
        assert NAME not in log.read_text("utf-8")
    finally:
        server.remove()
