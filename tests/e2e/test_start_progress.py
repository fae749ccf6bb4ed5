"""A start that has many overdue copies to erase says how far it got and asks systemd for
more time as it goes (EXTEND_TIMEOUT_USEC), instead of being killed by TimeoutStartSec."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.crypto.keys import load_master_key
from gateway.daemon import START_EXTENSION, Daemon
from gateway.ops.sdnotify import Notifier
from gateway.spool.records import NewRecord, new_submission_id
from gateway.spool.store import Spool
from gateway.testing.sandbox import build_sandbox

T0 = 1_800_000_000.0
OVERDUE = 1500  # two batches of the sweep


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = str(tmp_path / "notify.sock")
    sock.bind(name)
    sock.setblocking(False)
    with sock:
        yield name, sock


def messages(sock: socket.socket) -> list[str]:
    found = []
    while True:
        try:
            found += sock.recv(4096).decode().splitlines()
        except BlockingIOError:
            return found


async def test_the_start_up_sweep_extends_the_start_timeout_batch_by_batch(
    tmp_path: Path, systemd: tuple[str, socket.socket]
) -> None:
    box = await build_sandbox(tmp_path, start_simulators=False)
    assert box.config is not None
    master = load_master_key(Path(str(box.config.spool.master_key)))
    spool = Spool(
        box.config.spool.directory, master, keystore=box.config.keystore_directory, clock=lambda: T0
    )
    await spool.open()
    remaining = iter(range(OVERDUE))

    async def writer() -> None:
        for _ in remaining:
            pending = await spool.create(new_submission_id(lambda: T0))
            pending.write(b"x" * 100)
            meta = NewRecord(
                channel="online-application", destination="dnp-relay", device_id="tablet-01",
                user_id="staff-001", received_at=T0, expires_at=T0 + 60,
                content_type="text/plain", body_sha256="0" * 64, content_sha256="1" * 64,
                field_names=(), idempotency_key=None,
            )  # fmt: skip
            await spool.commit(pending, meta)

    await asyncio.gather(*(writer() for _ in range(16)))
    await spool.close()
    name, sock = systemd
    async with Daemon.start(box.config, clock=lambda: T0 + 120, notifier=Notifier(name)):
        pass
    said = messages(sock)
    extend = f"EXTEND_TIMEOUT_USEC={int(START_EXTENSION * 1_000_000)}"
    assert said.count(extend) == 2
    assert "STATUS=erasing overdue copies: 1000 of 1500 done" in said
    assert "STATUS=erasing overdue copies: 1500 of 1500 done" in said
    assert said.index("STATUS=erasing overdue copies: 1500 of 1500 done") < said.index("READY=1")
