"""Retention on a running gateway: copies overdue while it was down erased at start, every
channel's copy erased at delivery, and ``gatewayctl erasure-report`` on a tampered ledger.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import datetime
from pathlib import Path

import pytest
from conftest import FakeSleep, Running, actl, start_gateway, until

from gateway.cli import gatewayctl
from gateway.japan import JST
from gateway.ops.chain import HashChainLog
from gateway.retention.ledger import erasure_ledger
from gateway.testing.samples import sample_submission
from gateway.testing.sandbox import CHANNEL_DEVICE, Sandbox, build_sandbox

WEEK = 7 * 86400
T0 = 1_800_000_000.0


async def test_copies_whose_deadline_passed_while_down_are_erased_at_start(
    tmp_path: Path,
) -> None:
    """A daemon started after the deadline erases the copy before it serves anything."""
    box = await build_sandbox(tmp_path)
    sleep = FakeSleep()
    fields, files = sample_submission("online-application")
    running = await start_gateway(box, sleep)
    try:
        async with running.client() as client:
            reply = await client.submit("online-application", fields, files)
        assert reply.status == 202
        submission_id = reply.body["submission_id"]
        await box.simulators["dnp-relay"].wait_for(1, timeout=10)
    finally:
        await running.shutdown()
    sleep.now += WEEK + 1  # the daemon was down for a week
    running = await start_gateway(box, sleep)
    try:
        async with running.client() as client:
            status = await client.status(submission_id)
        assert status.body["state"] == "erased"
        assert box.config is not None
        ledger = HashChainLog(
            box.config.spool.directory / "erasure-ledger.jsonl",
            anchor=box.config.spool.directory / "erasure-ledger.anchor",
        )
        assert ledger.verify() == 1
        digest = hashlib.sha256(files["face_photo"]).hexdigest()
        assert digest not in (box.config.spool.directory / "erasure-ledger.jsonl").read_text()
    finally:
        await running.shutdown()
        await box.stop_simulators()


async def test_a_tampered_ledger_is_an_error_that_says_where(
    sandbox: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    """gatewayctl erasure-report refuses a ledger with an edited line, naming the line."""
    assert sandbox.config is not None
    directory = sandbox.config.spool.directory
    directory.mkdir(parents=True, exist_ok=True)
    ledger = HashChainLog(
        directory / "erasure-ledger.jsonl",
        anchor=directory / "erasure-ledger.anchor",
        clock=lambda: T0,
    )
    for n in range(3):
        ledger.append(
            {
                "submission_id": f"{n:032x}",
                "channel": "online-application",
                "received_at": T0,
                "delivered_at": None,
                "erased_at": T0 + n,
                "reason": "retention",
                "method": "m",
                "ciphertext_sha256": "0" * 64,
            }
        )
    argv = [
        "erasure-report",
        "--config",
        str(sandbox.config_path),
        "--from",
        "2027-01-01",
        "--to",
        "2027-12-31",
        "--format",
        "json",
    ]
    assert gatewayctl.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["total"] == 3
    path = directory / "erasure-ledger.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace('"retention"', '"operator"')
    path.write_text("".join(lines))
    assert gatewayctl.main(argv) == 1
    err = capsys.readouterr().err
    assert "line 2" in err and "edited" in err


# ------------------------------------------------- no delivered copy, on any channel


async def test_every_channel_erases_its_copy_at_delivery(
    gateway: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    """One submission on each of the six channels: each copy is erased as soon as it is
    delivered, the ledger says ``delivered`` for each, and so does the certificate."""
    ids: dict[str, str] = {}
    for channel, device in CHANNEL_DEVICE.items():
        fields, files = sample_submission(channel)
        async with gateway.client(device) as client:
            reply = await client.submit(channel, fields, files)
            assert reply.status == 202, reply.body
            ids[channel] = reply.body["submission_id"]
            async with asyncio.timeout(15):
                while (state := (await client.status(ids[channel])).body)["state"] != "erased":
                    assert state["state"] in ("queued", "delivering", "delivered"), state
            assert state["delivered_at"] is not None
    config = gateway.sandbox.config
    assert config is not None
    records = config.spool.directory / "records"
    await until(lambda: not any(records.iterdir()))  # unlinked just after the key went
    ledger = erasure_ledger(config.spool.directory)
    reasons = {e.body["submission_id"]: e.body["reason"] for e in ledger.entries()}
    assert reasons == dict.fromkeys(ids.values(), "delivered")
    today = datetime.fromtimestamp(gateway.sleep.now, JST).date().isoformat()
    code, out, err = await actl(
        capsys, "erasure-report", "--config", gateway.sandbox.config_path,
        "--from", today, "--to", today,
    )  # fmt: skip
    assert code == 0, err
    cert = json.loads(out[out.index("{") :])
    assert cert["counts"] == {channel: {"delivered": 1} for channel in ids}
