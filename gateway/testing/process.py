"""``gatewayd`` as a subprocess on a sandbox's configuration (crash tests and the bench):
started, signalled, killed, and measured through /proc."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gateway.testing.sandbox import DEVICE_LISTENER


def cpu_seconds_of(pid: int) -> float:
    """User and system CPU seconds of process ``pid`` from /proc (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class DaemonProcess:
    """``gatewayd`` as a separate process (crash tests and the bench).

    Waits for the daemon's ``ready`` log line to learn its port, then copies its JSON log
    lines to ``log_path`` while it runs.
    """

    def __init__(
        self,
        config_path: Path,
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.config_path = config_path
        self.args = tuple(args)  # more of gatewayd's options
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.process: asyncio.subprocess.Process | None = None
        self.ports: dict[str, int] = {}
        self._pump: asyncio.Task[None] | None = None

    async def start(self, *, ready_within: float = 30.0) -> DaemonProcess:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli.gatewayd",
            "--config",
            str(self.config_path),
            *self.args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
        )
        assert self.process.stderr is not None
        log = self.log_path.open("ab")
        async with asyncio.timeout(ready_within):
            while True:
                line = await self.process.stderr.readline()
                if not line:
                    log.close()
                    raise RuntimeError(f"gatewayd exited before ready (log: {self.log_path})")
                log.write(line)
                event = _json_line(line)
                if event.get("event") == "ready":
                    self.ports = {str(k): int(v) for k, v in event["ports"].items()}
                    break
        self._pump = asyncio.create_task(self._copy(self.process.stderr, log))
        return self

    @staticmethod
    async def _copy(stream: asyncio.StreamReader, log: Any) -> None:
        try:
            while line := await stream.readline():
                log.write(line)
                log.flush()  # readable by a test waiting for a line
        finally:
            log.close()

    def port_of(self, device_id: str) -> int:
        """The port of the listener a sandbox device reaches the gateway on."""
        return self.ports[DEVICE_LISTENER[device_id]]

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def kill(self) -> int:
        """SIGKILL: no drain, no cleanup; what a power cut or an OOM kill does."""
        assert self.process is not None
        self.process.kill()
        return await self._reap()

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def terminate(self) -> int:
        """SIGTERM: the daemon drains and exits."""
        assert self.process is not None
        self.process.terminate()
        return await self._reap()

    async def _reap(self) -> int:
        assert self.process is not None
        code = await self.process.wait()
        if self._pump is not None:
            await self._pump
        return code

    def cpu_seconds(self) -> float:
        return cpu_seconds_of(self.pid)

    def total_cpu_seconds(self) -> float:
        """The daemon's CPU time and that of every process it started."""
        return self.cpu_seconds() + self.helpers_cpu_seconds()

    def _status(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def rss_bytes(self) -> int:
        return self._status("VmRSS")

    def peak_rss_bytes(self) -> int:
        return self._status("VmHWM")

    def helpers(self) -> list[int]:
        """Pids of the daemon's descendants (the photo-check fork server and workers)."""
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                parents[int(entry.name)] = int(stat[1])
        found: list[int] = []
        frontier = {self.pid}
        while frontier:
            frontier = {pid for pid, ppid in parents.items() if ppid in frontier}
            found.extend(frontier)
        return found

    def helpers_cpu_seconds(self) -> float:
        return sum(cpu_seconds_of(pid) for pid in self.helpers())

    def helpers_peak_rss_bytes(self) -> int:
        """Sum of the helpers' peak RSS (an upper bound of their peak together)."""
        total = 0
        for pid in self.helpers():
            try:
                text = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
        return total

    async def __aenter__(self) -> DaemonProcess:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        if self.process is not None and self.process.returncode is None:
            await self.terminate()


def _json_line(line: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(line)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}
