"""Devices that connect for each upload and hang up (``--phases reconnect``).

16 device threads post the 300 KB photo, each on a new TLS connection: once with a full
mutual-TLS handshake every time, once resuming the previous TLS 1.3 session (a ticket
the gateway issued). Reported: req/s, p50, p99 and gatewayd's CPU per request for each,
and the saving resumption brings.
"""

from __future__ import annotations

import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.load import latency_ms
from gateway.crypto.tls import client_context
from gateway.testing.client import post_on_new_connection
from gateway.testing.process import DaemonProcess
from gateway.testing.sandbox import Sandbox

CHANNEL = "online-application"
STATUSES: dict[int, int] = {}
"""Statuses other than 202, for the report (a full run has none)."""


def _device_loop(
    port: int, sandbox: Sandbox, body: bytes, ctype: str, count: int, resume: bool
) -> tuple[list[float], int, int]:
    device = sandbox.pki.devices["tablet-01"]
    context = client_context(ca=sandbox.pki.gateway_ca.cert, cert=device.cert, key=device.key)
    latencies, failures, resumed = [], 0, 0
    session = None
    for _ in range(count):
        started = time.perf_counter()
        shot = post_on_new_connection(
            port, context, CHANNEL, body, ctype, session=session if resume else None
        )
        latencies.append(time.perf_counter() - started)
        if shot.status != 202:
            failures += 1
            STATUSES[shot.status] = STATUSES.get(shot.status, 0) + 1
        resumed += shot.resumed
        session = shot.session
    return latencies, failures, resumed


async def run(
    sandbox: Sandbox,
    directory: Path,
    body: bytes,
    ctype: str,
    *,
    total: int,
    concurrency: int,
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    sim = sandbox.simulators["dnp-relay"]
    async with DaemonProcess(sandbox.config_path, directory / "daemon-reconnect.log") as daemon:
        port = daemon.port_of("tablet-01")
        for label, resume in (("full_handshake", False), ("resumed", True)):
            print(f"  … reconnect: {total} posts, {label}", file=sys.stderr, flush=True)
            per_thread = max(1, total // concurrency)
            before, cpu = len(sim.received), daemon.total_cpu_seconds()
            started = time.perf_counter()
            latencies: list[float] = []
            failures = resumed = 0
            with ThreadPoolExecutor(concurrency) as pool:
                loop = asyncio.get_running_loop()
                runs = [
                    loop.run_in_executor(
                        pool, _device_loop, port, sandbox, body, ctype, per_thread, resume
                    )
                    for _ in range(concurrency)
                ]
                for lat, failed, reused in await asyncio.gather(*runs):
                    latencies += lat
                    failures += failed
                    resumed += reused
            elapsed = time.perf_counter() - started
            done = per_thread * concurrency
            await sim.wait_for(before + done - failures, timeout=180)
            used = daemon.total_cpu_seconds() - cpu
            sim.forget()  # the bodies (300 KB each) would weigh on this process
            results[label] = {
                "requests": done,
                "failures": failures,
                "resumed": resumed,
                "per_second": round(done / elapsed, 1),
                **latency_ms(latencies),
                "cpu_ms_per_request": round(used / done * 1000, 3),
                "other_statuses": dict(STATUSES),
            }
            STATUSES.clear()
    full, fast = results["full_handshake"], results["resumed"]
    results["cpu_saved_ms_per_request"] = round(
        full["cpu_ms_per_request"] - fast["cpu_ms_per_request"], 3
    )
    return results
