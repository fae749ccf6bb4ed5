"""The cost of the security evidence (``make bench``): the access log, the photo scan and
the monthly review.

* **Access log.** The daemon's own Spool and exporter without HTTP: the CPU and time of
  committing a record with its access entry against without one (the entry rides in the
  record's group commit), and of writing the entries out to the day files (one write
  and one fsync per batch). Their sum is the log's cost per accepted request.
* **Scan.** The real daemon with a private clamd (:mod:`gateway.testing.clamd`), one
  device posting 300 KB photos one after another, with ``scan`` on and then off:
  the added time-to-202 and CPU (the daemon's and clamd's) per photo.
* **Review.** A month of synthetic traffic (100,000 entries over November's 19 working
  days, one in 100 in the evening) in the access log, then ``gatewayctl access-log
  verify`` and ``gatewayctl access-report`` (text and JSON) on it, timed as an operator
  would run them.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import tomllib
from datetime import date, datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from typing import Any

import tomli_w

from bench.load import latency_ms, progress
from gateway.ingress.access import encode
from gateway.ops.access_log import JST, AccessExporter, AccessLog
from gateway.ops.access_report import OfficeHours
from gateway.ops.metrics import Metrics
from gateway.spool.records import NewRecord, new_submission_id
from gateway.spool.store import Spool
from gateway.testing.clamd import Clamd
from gateway.testing.client import DeviceClient
from gateway.testing.process import DaemonProcess, cpu_seconds_of
from gateway.testing.samples import multipart_body, photo_of_size, sample_submission
from gateway.testing.sandbox import build_sandbox

CHANNEL = "online-application"
PAYLOAD = os.urandom(4096)


def _entry(moment: datetime, n: int, **fields: Any) -> dict[str, Any]:
    """An access entry as the ingress writes one for an accepted photo submission."""
    return {
        "time": moment.isoformat(timespec="milliseconds"),
        "listener": "tablets",
        "remote": f"10.20.{n % 8}.{n % 200 + 10}",
        "port": 40000 + n % 20000,
        "fingerprint": "sha256:" + f"{n % 40:02x}" * 32,
        "serial": f"{n % 40:032x}",
        "device_id": f"tablet-{n % 40:02d}",
        "user_id": f"staff-{n % 25:03d}",
        "channel": CHANNEL,
        "method": "POST",
        "outcome": "accepted",
        "problem": None,
        "status": 202,
        "bytes": 308_112,
        "submission_id": f"01J{n:023d}",
        "request_id": f"{n:016x}",
        **fields,
    }


def _meta(received: float) -> NewRecord:
    return NewRecord(
        channel=CHANNEL, destination="dnp-relay", device_id="tablet-01",
        user_id="staff-001", received_at=received, expires_at=received + 86400,
        content_type="multipart/form-data; boundary=bench", body_sha256="0" * 64,
        content_sha256="1" * 64, field_names=("application_id", "face_photo"),
        idempotency_key=None,
    )  # fmt: skip


async def _commit_cost(spool: Spool, count: int, *, with_entry: bool) -> tuple[float, float]:
    """(CPU s, wall s) for ``count`` records committed 16 at a time, as under load."""
    now = time.time()
    remaining = iter(range(count))

    async def device() -> None:
        for n in remaining:
            pending = await spool.create(new_submission_id(time.time))
            pending.write(PAYLOAD)
            access = encode(_entry(datetime.now(JST), n)) if with_entry else None
            await spool.commit(pending, _meta(now), access=access)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(device() for _ in range(16)))
    return time.process_time() - cpu, time.perf_counter() - wall


async def access_cost(directory: Path, count: int = 4000) -> dict[str, Any]:
    """The access log's cost per accepted request, from the daemon's own code."""
    progress(f"access log: {count} records with and without their entry, then exported")
    spool = Spool(directory / "spool", os.urandom(32))
    await spool.open()
    access = AccessLog(directory / "access")
    exporter = AccessExporter(
        spool, access, Metrics(), retention_days=400, on_expired=lambda _: None, clock=time.time
    )
    try:
        await exporter.prepare()
        await _commit_cost(spool, 500, with_entry=True)  # warm up
        await exporter.export()
        plain_cpu, plain_wall = await _commit_cost(spool, count, with_entry=False)
        logged_cpu, logged_wall = await _commit_cost(spool, count, with_entry=True)
        cpu, wall = time.process_time(), time.perf_counter()
        exported = await exporter.export()
        export_cpu, export_wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        await spool.close()
    size = sum(p.stat().st_size for _, p in access.files())
    per = 1000 / count
    added = (logged_cpu - plain_cpu + export_cpu) * per
    return {
        "records": count,
        "commit_cpu_ms_without_entry": round(plain_cpu * per, 3),
        "commit_cpu_ms_with_entry": round(logged_cpu * per, 3),
        "commit_wall_ms_without_entry": round(plain_wall * per, 3),
        "commit_wall_ms_with_entry": round(logged_wall * per, 3),
        "export_cpu_ms_per_entry": round(export_cpu / exported * 1000, 4),
        "export_entries_per_second": round(exported / export_wall),
        "added_cpu_ms_per_request": round(added, 3),
        "bytes_per_entry": round(size / access.head()[0]),
    }


async def _sequential(poster: DeviceClient, body: bytes, ctype: str, count: int) -> list[float]:
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        status = await poster.post_raw(CHANNEL, body, ctype)
        latencies.append(time.perf_counter() - started)
        if status != 202:
            raise RuntimeError(f"the bench's photo was refused: HTTP {status}")
    return latencies


async def scan_cost(directory: Path, count: int = 300) -> dict[str, Any]:
    """Added time-to-202 and CPU of scanning one 300 KB photo (one device, in turn)."""
    with Clamd(directory / "clamd") as clamd:
        sandbox = await build_sandbox(directory / "gw", clamd_socket=clamd.socket)
        data = tomllib.loads(sandbox.config_path.read_text("utf-8"))
        for channel in data["channels"].values():
            channel["scan"] = False
        unscanned = sandbox.config_path.with_name("gateway-no-scan.toml")
        unscanned.write_text(tomli_w.dumps(data), "utf-8")
        fields, _ = sample_submission(CHANNEL)
        body, ctype = multipart_body(fields, {"face_photo": photo_of_size(300_000)})
        figures: dict[str, dict[str, float]] = {}
        assert clamd.process is not None
        for label, config in (("scan_off", unscanned), ("scan_on", sandbox.config_path)):
            progress(f"scan: {count} × 300 KB photos one after another, {label}")
            async with (
                DaemonProcess(config, directory / f"daemon-{label}.log") as daemon,
                DeviceClient(sandbox, "tablet-01", port=daemon.port_of("tablet-01")) as poster,
            ):
                sim = sandbox.simulators["dnp-relay"]
                start = len(sim.received)
                await _sequential(poster, body, ctype, 30)  # warm up (each one a 202)
                await sim.wait_for(start + 30, timeout=60)  # and delivered
                before = len(sim.received)
                cpu = daemon.total_cpu_seconds()
                clamd_cpu = cpu_seconds_of(clamd.process.pid)
                latencies = await _sequential(poster, body, ctype, count)
                await sim.wait_for(before + count, timeout=120)
                cpu = daemon.total_cpu_seconds() - cpu
                clamd_cpu = cpu_seconds_of(clamd.process.pid) - clamd_cpu
            figures[label] = {
                **latency_ms(latencies),
                "daemon_cpu_ms": round(cpu / count * 1000, 3),
                "clamd_cpu_ms": round(clamd_cpu / count * 1000, 3),
            }
        await sandbox.stop_simulators()
    on, off = figures["scan_on"], figures["scan_off"]
    return {
        "photos": count,
        **figures,
        "added_p50_ms": round(on["p50_ms"] - off["p50_ms"], 2),
        "added_cpu_ms": round(
            on["daemon_cpu_ms"] + on["clamd_cpu_ms"] - off["daemon_cpu_ms"] - off["clamd_cpu_ms"],
            3,
        ),
    }


def _month(access: AccessLog, entries: int) -> None:
    """``entries`` over the working days of November 2026, in office hours but for one
    in 100 in the evening, with refusals mixed in: a busy ward's month."""
    office = OfficeHours()
    days = [
        d for d in (date(2026, 11, 1) + timedelta(n) for n in range(30)) if office.is_working_day(d)
    ]
    per_day = -(-entries // len(days))
    step = timedelta(hours=8, minutes=30) / per_day
    batch: list[tuple[int, str]] = []
    for n in range(1, entries + 1):
        day, index = divmod(n - 1, per_day)
        moment = datetime.combine(days[day], dtime(8, 40), JST) + index * step
        if n % 100 == 0:
            moment = datetime.combine(days[day], dtime(19, 0), JST) + index * timedelta(seconds=1)
        extra: dict[str, Any] = {}
        if n % 50 == 0:
            extra = {"outcome": "invalid-fields", "problem": "invalid-fields", "status": 422}
        elif n % 997 == 0:
            extra = {"outcome": "device-revoked", "problem": "device-revoked", "status": 403}
        batch.append((n, encode(_entry(moment, n, **extra))))
        if len(batch) == 5000 or n == entries or (n % per_day == 0):
            access.append(batch)
            batch = []


def _timed(command: list[str]) -> tuple[float, int]:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[2:4])} failed: {done.stderr.decode()[-500:]}")
    return time.perf_counter() - started, len(done.stdout)


async def review_runtime(directory: Path, entries: int = 100_000) -> dict[str, Any]:
    """The monthly review's runtime over a month of ``entries`` requests."""
    progress(f"review: {entries} entries over a month, then verify and report")
    sandbox = await build_sandbox(directory, start_simulators=False)
    assert sandbox.config is not None
    access = AccessLog(sandbox.config.access_log_directory)
    started = time.perf_counter()
    _month(access, entries)
    write_seconds = time.perf_counter() - started
    size = sum(p.stat().st_size for _, p in access.files())
    ctl = [sys.executable, "-m", "gateway.cli.gatewayctl"]
    config = ["--config", str(sandbox.config_path)]
    period = ["--from", "2026-11-01", "--to", "2026-11-30"]
    verify, _ = _timed([*ctl, "access-log", "verify", *config])
    text, _ = _timed([*ctl, "access-report", *config, *period])
    as_json, json_bytes = _timed([*ctl, "access-report", *config, *period, "--format", "json"])
    return {
        "entries": entries,
        "files": len(access.files()),
        "log_mb": round(size / 2**20, 1),
        "write_seconds": round(write_seconds, 2),
        "verify_seconds": round(verify, 2),
        "report_text_seconds": round(text, 2),
        "report_json_seconds": round(as_json, 2),
        "report_json_bytes": json_bytes,
    }


async def run(directory: Path) -> dict[str, Any]:
    return {
        "access_log": await access_cost(directory / "access-cost"),
        "scan": await scan_cost(directory / "scan"),
        "review": await review_runtime(directory / "review"),
    }
