"""The PostgreSQL spool beside the SQLite one, in one run (``--phases postgresql``).

One private PostgreSQL server (:class:`gateway.testing.postgres.Postgres`: ``initdb`` in
a temporary directory, loopback, SCRAM, ``fsync`` and ``synchronous_commit`` on, 64 MB
of shared buffers) serves the whole phase, on the same two cores as everything else.
Every row uses the throughput phase's client (16 keep-alive devices, closed loop), its
318 KB post (a 300 KB JPEG and the channel's fields), the sandbox's sealed destination
(HPKE) and its upstream simulator:

* **one node**: gatewayd with ``[spool] backend = "sqlite"``, then ``"postgresql"``;
* **two nodes** sharing one database (each with its own staging directory, control
  socket and access log), the devices split across their two ports;

each for a fixed number of posts after a warm-up, every one delivered (and so erased)
before the row ends: submissions/s, p50/p99 time-to-202, and CPU ms per submission of
gatewayd (with its children) and of the PostgreSQL server (the postmaster of
``postmaster.pid``, its live children found by their ppid in /proc, and those that
ended meanwhile, from the postmaster's cutime/cstime).

Then the **accept cost with 1,000 and with 100,000 records queued**, for each backend:
the destination points at a closed port, so nothing is delivered and every record
stays queued (the relay's workers hold their first records in backoff behind an open
circuit). The spool is filled by :mod:`bench.prefill` while the daemon is stopped; the
daemon is started on it (the time to ready is reported), warmed up, and the same
closed loop measures time-to-202 and CPU per accepted submission (no delivery in it).

Each row also says how many cores the machine's other processes kept busy meanwhile
(/proc/stat's busy time less gatewayd's, the server's and this process's; the kernel's
own threads, such as writeback, count as others): on a shared machine a row with
other load is not comparable, and the table says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from bench import prefill
from bench.load import closed_loop, latency_ms, progress
from gateway.config import MAX_UNIX_SOCKET_PATH
from gateway.crypto.keys import load_master_key
from gateway.testing.client import DeviceClient
from gateway.testing.postgres import Postgres, free_loopback_port
from gateway.testing.process import DaemonProcess
from gateway.testing.sandbox import Sandbox

DESTINATION = "dnp-relay"
DEVICE = "tablet-01"
WARM_UP = 100
ACCEPT_WARM_UP = 50
SMALL = 1_000
DISTURBED = 0.2
"""Cores of other processes' load during a row above which the table warns."""
TICK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------- CPU from /proc


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def server_cpu_seconds(server: Postgres) -> float:
    """CPU seconds of the PostgreSQL server so far: its postmaster, the children it
    reaped (cutime + cstime) and those alive now (utime + stime)."""
    master = int((server.data / "postmaster.pid").read_text().split()[0])
    fields = _stat(master)
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            child = _stat(int(entry.name))
        except OSError:  # gone meanwhile: its time is in the postmaster's cutime
            continue
        if int(child[1]) == master:
            ticks += int(child[11]) + int(child[12])
    return ticks / TICK


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine spent busy since boot (/proc/stat)."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / TICK


class Cpu:
    """CPU seconds used by some daemons and, when given, the database server, from
    :meth:`start` to :meth:`stop`; and by every other process of the machine but this
    one (the load generator): other sessions' work makes a row's figures worthless,
    so it is reported beside them."""

    def __init__(self, daemons: list[DaemonProcess], server: Postgres | None) -> None:
        self.daemons = daemons
        self.server = server
        self.gateway = self.database = self.others = self.seconds = 0.0

    def _now(self) -> tuple[float, float, float, float, float]:
        gateway = sum(d.total_cpu_seconds() for d in self.daemons)
        database = server_cpu_seconds(self.server) if self.server else 0.0
        me = os.times()
        return (gateway, database, me.user + me.system, machine_busy_seconds(), time.monotonic())

    def start(self) -> None:
        self._started = self._now()

    def stop(self) -> None:
        gateway, database, me, busy, now = (
            b - a for a, b in zip(self._started, self._now(), strict=True)
        )
        self.gateway, self.database, self.seconds = gateway, database, now
        self.others = max(0.0, busy - gateway - database - me)

    def per_request(self, requests: int) -> dict[str, float | None]:
        database = round(self.database / requests * 1000, 2) if self.server else None
        gateway = round(self.gateway / requests * 1000, 2)
        return {
            "gatewayd_cpu_ms": gateway,
            "postgresql_cpu_ms": database,
            "total_cpu_ms": round(gateway + (database or 0.0), 2),
            "other_processes_cores": round(self.others / self.seconds, 2),
        }


# --------------------------------------------------------------- configurations


def _control_socket(state: Path) -> Path:
    path = state / "control.sock"
    if len(os.fsencode(path)) <= MAX_UNIX_SOCKET_PATH:
        return path
    return Path("/tmp") / f"gateway-{hashlib.sha256(os.fsencode(path)).hexdigest()[:16]}.sock"


def node_config(
    sandbox: Sandbox,
    directory: Path,
    name: str,
    *,
    dsn_file: Path | None = None,
    url: str | None = None,
) -> Path:
    """The sandbox's configuration with a state of its own in ``directory/name``
    (spool, keystore, audit log, access log, control socket); on the PostgreSQL spool
    in ``dsn_file`` as node ``name`` when given; ``url``: the bench destination's."""
    data = tomllib.loads(sandbox.config_path.read_text("utf-8"))
    state = directory / name
    state.mkdir(parents=True, exist_ok=True)
    data["spool"].update(directory=str(state / "spool"), keystore=str(state / "keystore"))
    if dsn_file is not None:
        data["spool"].update(backend="postgresql", dsn=str(dsn_file), node_id=name)
    data["audit"] = {"log": str(state / "audit.jsonl"), "anchor": str(state / "audit.anchor")}
    data["access_log"]["directory"] = str(state / "access")
    data["admin"]["control_socket"] = str(_control_socket(state))
    if url is not None:
        data["destinations"][DESTINATION]["url"] = url
    path = directory / f"{name}.toml"
    path.write_text(tomli_w.dumps(data), "utf-8")
    return path


def _dsn_file(server: Postgres, directory: Path, name: str) -> Path:
    path = directory / f"{name}.dsn"
    path.write_text(server.new_database() + "\n", "utf-8")
    path.chmod(0o600)
    return path


# --------------------------------------------------------------------- load


async def _load(
    posters: list[DeviceClient], body: bytes, ctype: str, *, total: int, concurrency: int
) -> tuple[float, list[float], int]:
    """The closed loop, its posts and devices split evenly across ``posters``."""
    n = len(posters)
    started = time.perf_counter()
    runs = await asyncio.gather(
        *(
            closed_loop(p, body, ctype, total=total // n, concurrency=concurrency // n)
            for p in posters
        )
    )
    elapsed = time.perf_counter() - started
    return elapsed, [t for _, lat, _ in runs for t in lat], sum(f for *_, f in runs)


def _row(elapsed: float, latencies: list[float], failures: int, cpu: Cpu) -> dict[str, Any]:
    return {
        "submissions": len(latencies),
        "failures": failures,
        "per_second": round(len(latencies) / elapsed, 1),
        **latency_ms(latencies),
        **cpu.per_request(len(latencies)),
    }


async def _sustained(
    label: str,
    configs: list[Path],
    sandbox: Sandbox,
    server: Postgres | None,
    load: tuple[bytes, str, int, int],
) -> dict[str, Any]:
    body, ctype, total, concurrency = load
    sim = sandbox.simulators[DESTINATION]
    async with contextlib.AsyncExitStack() as stack:
        daemons = [
            await stack.enter_async_context(DaemonProcess(c, c.with_suffix(".log")))
            for c in configs
        ]
        posters = [
            await stack.enter_async_context(
                DeviceClient(sandbox, DEVICE, port=d.port_of(DEVICE), limit=concurrency)
            )
            for d in daemons
        ]
        progress(f"{label}: warming up")
        sim.forget()
        _, _, failed = await _load(posters, body, ctype, total=WARM_UP, concurrency=concurrency)
        await sim.wait_for(WARM_UP - failed, timeout=60)
        await asyncio.sleep(1)  # the warm-up's deliveries and erasures settle
        sim.forget()
        progress(f"{label}: {total} × {len(body) // 1000} KB, {concurrency} devices")
        cpu = Cpu(daemons, server)
        cpu.start()
        elapsed, latencies, failed = await _load(
            posters, body, ctype, total=total, concurrency=concurrency
        )
        await sim.wait_for(len(latencies) - failed, timeout=300)
        cpu.stop()
        sim.forget()
    return {"spool": label, "nodes": len(configs), **_row(elapsed, latencies, failed, cpu)}


# -------------------------------------------------------------- accept cost


async def _accept_cost(
    backend: str,
    sandbox: Sandbox,
    directory: Path,
    server: Postgres,
    load: tuple[bytes, str, int, int],
    sizes: tuple[int, int],
) -> dict[str, Any]:
    """Time-to-202 and CPU per accepted submission with each of ``sizes`` records
    queued, delivery held (the destination is a closed port)."""
    body, ctype, samples, concurrency = load
    closed = f"https://localhost:{free_loopback_port()}/submissions"
    dsn_file = _dsn_file(server, directory, f"accept-{backend}") if backend != "sqlite" else None
    config = node_config(sandbox, directory, f"accept-{backend}", dsn_file=dsn_file, url=closed)
    data = tomllib.loads(config.read_text("utf-8"))
    master = load_master_key(Path(data["spool"]["master_key"]))
    measured_server = server if dsn_file is not None else None

    async def posting(total: int) -> tuple[float, list[float], int, Cpu, float]:
        started = time.perf_counter()
        async with contextlib.AsyncExitStack() as stack:
            d = await DaemonProcess(config, config.with_suffix(".log")).start(ready_within=300)
            stack.push_async_callback(d.terminate)
            ready = time.perf_counter() - started
            port = d.port_of(DEVICE)
            async with DeviceClient(sandbox, DEVICE, port=port, limit=concurrency) as poster:
                await closed_loop(
                    poster, body, ctype, total=ACCEPT_WARM_UP, concurrency=concurrency
                )
                cpu = Cpu([d], measured_server)
                cpu.start()
                elapsed, latencies, failed = await closed_loop(
                    poster, body, ctype, total=total, concurrency=concurrency
                )
                cpu.stop()
        return elapsed, latencies, failed, cpu, ready

    progress(f"accept cost, {backend}: first start, {ACCEPT_WARM_UP} real records")
    await posting(0)
    rows: dict[str, Any] = {}
    for size in sizes:
        started = time.perf_counter()
        if dsn_file is None:
            spool = Path(data["spool"]["directory"])
            keystore = Path(data["spool"]["keystore"])
            added = await asyncio.to_thread(prefill.fill_sqlite, spool, keystore, master, size)
        else:
            dsn = dsn_file.read_text("utf-8").strip()
            added = await asyncio.to_thread(prefill.fill_postgresql, dsn, master, size)
        fill = time.perf_counter() - started
        progress(f"accept cost, {backend}: {size} records ({added} added in {fill:.1f} s)")
        elapsed, latencies, failed, cpu, ready = await posting(samples)
        rows[str(size)] = {
            "records_queued": size,
            "fill_seconds": round(fill, 1),
            "ready_seconds": round(ready, 2),
            **_row(elapsed, latencies, failed, cpu),
        }
    small, large = (rows[str(s)] for s in sizes)
    rows["ratio"] = {
        key: round(large[key] / small[key], 2) if small[key] else None
        for key in (
            "per_second",
            "p50_ms",
            "p99_ms",
            "gatewayd_cpu_ms",
            "postgresql_cpu_ms",
            "total_cpu_ms",
        )
    }
    return rows


# ---------------------------------------------------------------------- phase


async def run(
    sandbox: Sandbox,
    directory: Path,
    body: bytes,
    ctype: str,
    *,
    total: int,
    concurrency: int,
    samples: int,
    records: int,
) -> dict[str, Any]:
    started = time.perf_counter()
    progress("PostgreSQL: starting a private server (initdb)")
    server = await asyncio.to_thread(Postgres().start)
    try:
        load = (body, ctype, total, concurrency)
        one_sqlite = node_config(sandbox, directory, "sqlite")
        one_pg = node_config(
            sandbox, directory, "pg-one", dsn_file=_dsn_file(server, directory, "pg-one")
        )
        shared = _dsn_file(server, directory, "pg-two")
        two = [node_config(sandbox, directory, f"pg-{n}", dsn_file=shared) for n in "ab"]
        rows = [
            await _sustained("sqlite", [one_sqlite], sandbox, None, load),
            await _sustained("postgresql", [one_pg], sandbox, server, load),
            await _sustained("postgresql", two, sandbox, server, load),
        ]
        accept_load = (body, ctype, samples, concurrency)
        accept = {
            backend: await _accept_cost(
                backend, sandbox, directory, server, accept_load, (SMALL, records)
            )
            for backend in ("sqlite", "postgresql")
        }
    finally:
        await asyncio.to_thread(server.remove)
    return {
        "server": "PostgreSQL (Debian's package), initdb defaults but shared_buffers=64MB, "
        "max_connections=200; fsync and synchronous_commit on; same two cores",
        "sustained": rows,
        "accept_cost_delivery_held": accept,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _cell(value: object) -> str:
    return "–" if value is None else f"{value}"


def table(results: dict[str, Any]) -> str:
    lines = [
        "| spool | nodes | submissions/s | p50 ms | p99 ms "
        "| CPU ms per submission: gatewayd | PostgreSQL | total | other load, cores |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["sustained"]:
        lines.append(
            f"| {r['spool']} | {r['nodes']} | {r['per_second']} | {r['p50_ms']} | "
            f"{r['p99_ms']} | {r['gatewayd_cpu_ms']} | {_cell(r['postgresql_cpu_ms'])} | "
            f"{r['total_cpu_ms']} | {r['other_processes_cores']} |"
        )
    lines += [
        "",
        "| spool | records queued | ready s | accepted/s | p50 ms | p99 ms "
        "| CPU ms per accept: gatewayd | PostgreSQL | total | other load, cores |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for backend, rows in results["accept_cost_delivery_held"].items():
        sizes = [f"{int(k) // 1000}k" for k in rows if k != "ratio"]
        for key, r in rows.items():
            if key == "ratio":
                continue
            lines.append(
                f"| {backend} | {r['records_queued']:,} | {r['ready_seconds']} | "
                f"{r['per_second']} | {r['p50_ms']} | {r['p99_ms']} | {r['gatewayd_cpu_ms']} | "
                f"{_cell(r['postgresql_cpu_ms'])} | {r['total_cpu_ms']} | "
                f"{r['other_processes_cores']} |"
            )
        q = rows["ratio"]
        lines.append(
            f"| {backend} | ratio {' / '.join(reversed(sizes))} | | {_cell(q['per_second'])} | "
            f"{_cell(q['p50_ms'])} | {_cell(q['p99_ms'])} | {_cell(q['gatewayd_cpu_ms'])} | "
            f"{_cell(q['postgresql_cpu_ms'])} | {_cell(q['total_cpu_ms'])} | |"
        )
    worst = max(
        r["other_processes_cores"]
        for r in [
            *results["sustained"],
            *(r for rows in results["accept_cost_delivery_held"].values() for r in rows.values()),
        ]
        if "other_processes_cores" in r
    )
    if worst > DISTURBED:
        lines.append(
            f"\nWARNING: other processes used up to {worst} cores during a row: "
            "this machine was not quiet, the figures are not comparable"
        )
    return "\n".join(lines)
