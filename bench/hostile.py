"""Hostile-memory phases of ``make bench``: what an attacker's requests cost the daemon.

Each phase runs on a freshly started daemon and reports its peak RSS (VmHWM):

* 1,000 staff logins with wrong passwords, all at once (each a scrypt check);
* one body of 60,000 tiny multipart parts.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from gateway.identity.auth import basic_authorization
from gateway.testing.client import DeviceClient
from gateway.testing.process import DaemonProcess
from gateway.testing.sandbox import Sandbox

CHANNEL = "online-application"
WRONG_PASSWORDS = 1000
PARTS = 60_000


def _progress(text: str) -> None:
    print(f"  … {text}", file=sys.stderr, flush=True)


def _many_parts(count: int) -> tuple[bytes, str]:
    boundary = "hostile-boundary"
    part = (f'--{boundary}\r\nContent-Disposition: form-data; name="x"\r\n\r\ny\r\n').encode()
    return part * count + f"--{boundary}--\r\n".encode(), (
        f"multipart/form-data; boundary={boundary}"
    )


async def run(sandbox: Sandbox, directory: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    _progress(f"hostile: {WRONG_PASSWORDS} wrong passwords at once, on a fresh daemon")
    async with DaemonProcess(sandbox.config_path, directory / "daemon.log") as daemon:
        port = daemon.port_of("tablet-01")
        rss_before = daemon.rss_bytes()
        started = time.perf_counter()
        statuses: Counter[int] = Counter()
        async with DeviceClient(sandbox, "tablet-01", port=port, limit=WRONG_PASSWORDS) as poster:

            async def guess(i: int) -> None:
                # A different made-up user each time: no lockout stops the checks.
                wrong = {"Authorization": basic_authorization(f"staff-{i:06d}", f"wrong-{i}")}
                status = await poster.post_raw(CHANNEL, b"", "multipart/form-data; b=x", wrong)
                statuses[status] += 1

            await asyncio.gather(*(guess(i) for i in range(WRONG_PASSWORDS)))
        results["wrong_passwords"] = {
            "requests": WRONG_PASSWORDS,
            "answers": {str(k): v for k, v in sorted(statuses.items())},
            "seconds": round(time.perf_counter() - started, 2),
            "daemon_rss_at_start_mb": round(rss_before / 2**20, 1),
            "daemon_peak_rss_mb": round(daemon.peak_rss_bytes() / 2**20, 1),
        }

    _progress(f"hostile: one body of {PARTS} parts, on a fresh daemon")
    body, ctype = _many_parts(PARTS)
    async with DaemonProcess(sandbox.config_path, directory / "daemon.log") as daemon:
        rss_before = daemon.rss_bytes()
        async with DeviceClient(sandbox, "tablet-01", port=daemon.port_of("tablet-01")) as poster:
            status = await poster.post_raw(CHANNEL, body, ctype)
        results["many_parts"] = {
            "parts": PARTS,
            "body_bytes": len(body),
            "status": status,
            "daemon_rss_at_start_mb": round(rss_before / 2**20, 1),
            "daemon_peak_rss_mb": round(daemon.peak_rss_bytes() / 2**20, 1),
        }
    return results
