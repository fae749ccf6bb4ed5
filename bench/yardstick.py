"""The yardstick: nginx as a bare mutual-TLS relay beside gatewayd, in one run.

The same 300 KB multipart POST, the same device client (its certificate, 16 keep-alive
connections, closed loop), the same upstream simulator (mutual TLS, keep-alive) for:

* **nginx** (Debian's package, 2 workers): TLS with the device CA, the body buffered in
  memory, proxied over a keep-alive upstream connection pool with the gateway's client
  certificate. It checks nothing and stores nothing: the cost of relaying alone.
* **gatewayd**, the destination unsealed: validation, photo check, fsync, encryption at
  rest, delivery and erasure.
* **gatewayd** as shipped: the same, with the payload sealed for its recipient (HPKE).

Both gatewayd rows run on asyncio's loop (the default), then on uvloop
(``--event-loop uvloop``).

CPU per request is read from /proc (utime + stime) of nginx's master and workers, and of
gatewayd and its child processes, over the measured run, including the delivery of every
accepted submission (the run ends when the upstream has them all).
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w

from bench.load import closed_loop, latency_ms, progress
from gateway.ops.loops import DEFAULT as DEFAULT_LOOP
from gateway.ops.loops import LOOPS
from gateway.testing.client import DeviceClient
from gateway.testing.process import DaemonProcess, cpu_seconds_of
from gateway.testing.sandbox import Sandbox

CHANNEL = "online-application"
DESTINATION = "dnp-relay"
NGINX = "/usr/sbin/nginx"
SEALING_KEYS = (
    "payload_kem", "recipient_id", "recipient_key", "recipient_key_not_after",
    "signing_key", "signing_key_not_after",
)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Nginx:
    """nginx relaying device posts to ``upstream`` with the gateway's own certificates."""

    def __init__(
        self, sandbox: Sandbox, directory: Path, upstream_port: int, path: str = "/submissions"
    ) -> None:
        self.directory = directory
        self.port = _free_port()
        pki = sandbox.pki
        client = pki.clients[DESTINATION]
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "nginx.conf").write_text(
            f"""worker_processes 2;
daemon off;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    client_max_body_size 16m;
    client_body_buffer_size 16m;
    proxy_request_buffering on;
    upstream relay {{ server 127.0.0.1:{upstream_port}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{self.port} ssl;
        ssl_certificate {pki.gateway_server.cert};
        ssl_certificate_key {pki.gateway_server.key};
        ssl_client_certificate {pki.device_ca.cert};
        ssl_verify_client on;
        ssl_protocols TLSv1.2 TLSv1.3;
        keepalive_requests 100000;
        location / {{
            # Every device path goes to the upstream's one path. (A URI in proxy_pass
            # would replace only the matched "/": /v1/... became /submissionsv1/...)
            rewrite ^ {path} break;
            proxy_pass https://relay;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Idempotency-Key $request_id;
            proxy_set_header Gateway-Channel {CHANNEL};
            proxy_ssl_certificate {client.cert};
            proxy_ssl_certificate_key {client.key};
            proxy_ssl_trusted_certificate {pki.upstream_ca.cert};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
        }}
    }}
}}
""",
            "utf-8",
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [NGINX, "-p", str(self.directory), "-c", str(self.directory / "nginx.conf")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    async def __aenter__(self) -> Nginx:
        self.process = self.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                assert self.process.stderr is not None
                raise RuntimeError(f"nginx did not start: {self.process.stderr.read().decode()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                await asyncio.sleep(0.05)
        raise RuntimeError("nginx did not listen within 10 s")

    async def __aexit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            await asyncio.to_thread(self.process.wait, 10)

    def cpu_seconds(self) -> float:
        assert self.process is not None
        master = self.process.pid
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        return cpu_seconds_of(master) + sum(cpu_seconds_of(int(pid)) for pid in children)


def unsealed_config(sandbox: Sandbox) -> Path:
    """The sandbox's configuration with the bench's destination unsealed."""
    data = tomllib.loads(sandbox.config_path.read_text("utf-8"))
    destination = data["destinations"][DESTINATION]
    destination["payload_encryption"] = "none"
    for key in SEALING_KEYS:
        destination.pop(key, None)
    path = sandbox.config_path.with_name("gateway-unsealed.toml")
    path.write_text(tomli_w.dumps(data), "utf-8")
    return path


async def _measure(
    label: str,
    sandbox: Sandbox,
    port: int,
    cpu: Callable[[], float],
    body: bytes,
    ctype: str,
    total: int,
    concurrency: int,
) -> dict[str, Any]:
    sim = sandbox.simulators[DESTINATION]
    async with DeviceClient(sandbox, "tablet-01", port=port, limit=concurrency) as poster:
        progress(f"{label}: warming up")
        start = len(sim.received)
        *_, failed = await closed_loop(poster, body, ctype, total=100, concurrency=concurrency)
        await sim.wait_for(start + 100 - failed, timeout=60)  # every warm-up post delivered
        await asyncio.sleep(1)  # the warm-up's deliveries and erasures settle
        progress(f"{label}: {total} × {len(body) // 1000} KB, {concurrency} connections")
        before, cpu_before = len(sim.received), cpu()
        elapsed, latencies, failures = await closed_loop(
            poster, body, ctype, total=total, concurrency=concurrency
        )
        if failures:  # a relay's cost on refusals is no yardstick
            raise RuntimeError(f"{label}: {failures} of {total} posts were not accepted")
        await sim.wait_for(before + total, timeout=180)
        used = cpu() - cpu_before
    sim.forget()  # 300 KB a body: the next row's load generator starts light
    return {
        "relay": label,
        "requests": total,
        "failures": failures,
        "per_second": round(total / elapsed, 1),
        **latency_ms(latencies),
        "cpu_ms_per_request": round(used / total * 1000, 3),
    }


async def run(
    sandbox: Sandbox, directory: Path, body: bytes, ctype: str, *, total: int, concurrency: int
) -> list[dict[str, Any]]:
    sim = sandbox.simulators[DESTINATION]
    load = (body, ctype, total, concurrency)
    rows = []
    upstream_port = int(sim.url.split(":")[2].split("/")[0])
    opener, sim.opener = sim.opener, None  # nginx and the unsealed gatewayd post plain bodies
    try:
        async with Nginx(sandbox, directory / "nginx", upstream_port, sim.path) as nginx:
            label = "nginx (mTLS relay, 2 workers)"
            rows.append(await _measure(label, sandbox, nginx.port, nginx.cpu_seconds, *load))
    finally:
        sim.opener = opener
    unsealed = unsealed_config(sandbox)
    for loop in LOOPS:
        for config, label in (
            (unsealed, "gatewayd (validation, fsync, encryption)"),
            (sandbox.config_path, "gatewayd with HPKE sealing (shipped)"),
        ):
            if loop != DEFAULT_LOOP:
                label = f"{label}, --event-loop {loop}"
            sim.opener = opener if config == sandbox.config_path else None
            try:
                log = directory / f"daemon-{config.stem}-{loop}.log"
                async with DaemonProcess(config, log, args=("--event-loop", loop)) as daemon:
                    port = daemon.port_of("tablet-01")
                    cpu = daemon.total_cpu_seconds
                    rows.append(await _measure(label, sandbox, port, cpu, *load))
            finally:
                sim.opener = opener
    base = rows[0]["cpu_ms_per_request"] or 1e-9
    for row in rows:
        row["cpu_vs_nginx"] = round(row["cpu_ms_per_request"] / base, 1)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| relay | req/s | p50 ms | p99 ms | CPU ms per request | ÷ nginx |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['relay']} | {r['per_second']} | {r['p50_ms']} | {r['p99_ms']} | "
            f"{r['cpu_ms_per_request']} | {r['cpu_vs_nginx']} |"
        )
    return "\n".join(lines)
