"""``gatewayctl spool list|show|requeue|erase`` against a real daemon on loopback.

One record is held (its upstream answered 422 once) and one delivered. Listing and
showing read the spool index read-only and print metadata, never a field's value;
requeue and erase go through the daemon's control socket, and each is audited.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from typing import Any

import pytest
from conftest import Running, actl, until

from gateway.config import GatewayConfig
from gateway.ops.chain import ChainEntry, HashChainLog
from gateway.testing.client import DeviceClient
from gateway.testing.samples import sample_submission
from gateway.testing.sandbox import Sandbox

OPERATOR = "operator-tanaka"
HELD_CHANNEL = "issuance-reservation"  # callcentre-01 → ward-issuance
DELIVERED_CHANNEL = "online-application"  # tablet-01 → dnp-relay (erased once delivered)
PLANTED = {
    "name": "秘匿 蘭丸",
    "address": "東京都千代田区秘密町9-8-7",
    "email": "planted.zx81@example.jp",
    "phone": "03-9876-5432",
    "reservation_number": "R-PLANT-424242",
    "application_id": "31415926535897932384626",
    "birth_date": "1977-07-17",
}
PLANTED_DELIVERED_ID = "27182818284590452353602"


@pytest.fixture(autouse=True)
def _hermetic(hermetic_cli: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A known sudo caller (see conftest.hermetic_cli for the rest)."""
    monkeypatch.setenv("SUDO_USER", OPERATOR)


def config_of(sandbox: Sandbox) -> GatewayConfig:
    assert sandbox.config is not None
    return sandbox.config


def json_out(out: str) -> Any:
    """The JSON document gatewayctl printed (it starts at the first line opening one)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line in ("[", "{", "[]"))
    return json.loads("\n".join(lines[start:]))


def audit_entries(sandbox: Sandbox) -> list[ChainEntry]:
    where = config_of(sandbox).audit_log
    return list(HashChainLog(where.log, anchor=where.anchor).entries())


def ledger(sandbox: Sandbox) -> list[ChainEntry]:
    directory = config_of(sandbox).spool.directory
    log = HashChainLog(
        directory / "erasure-ledger.jsonl", anchor=directory / "erasure-ledger.anchor"
    )
    return list(log.entries())


async def wait_state(client: DeviceClient, submission_id: str, state: str) -> dict[str, Any]:
    """Poll the device's status endpoint (real requests) until ``state`` is reached."""
    async with asyncio.timeout(10):
        while True:
            reply = await client.status(submission_id)
            assert reply.status == 200, reply.body
            if reply.body["state"] == state:
                return reply.body


async def held_and_delivered(gateway: Running) -> tuple[str, str]:
    """Post one submission its upstream refuses (422: held) and one it takes (delivered,
    then erased: no delivered copy is kept)."""
    gateway.sandbox.simulators["ward-issuance"].fail_next(1, 422)
    fields, files = sample_submission(HELD_CHANNEL)
    async with gateway.client("callcentre-01") as client:
        reply = await client.submit(HELD_CHANNEL, {**fields, **PLANTED}, files)
        assert reply.status == 202, reply.body
        held = reply.body["submission_id"]
        await wait_state(client, held, "held")
    fields, files = sample_submission(DELIVERED_CHANNEL)
    async with gateway.client("tablet-01") as client:
        reply = await client.submit(
            DELIVERED_CHANNEL, {**fields, "application_id": PLANTED_DELIVERED_ID}, files
        )
        assert reply.status == 202, reply.body
        delivered = reply.body["submission_id"]
        await wait_state(client, delivered, "erased")
    assert isinstance(held, str) and isinstance(delivered, str)
    return held, delivered


async def held_online(gateway: Running) -> str:
    """A second held record, on the online channel (its upstream answers 422)."""
    gateway.sandbox.simulators["dnp-relay"].fail_next(1, 422)
    fields, files = sample_submission(DELIVERED_CHANNEL)
    async with gateway.client("tablet-01") as client:
        reply = await client.submit(DELIVERED_CHANNEL, fields, files)
        assert reply.status == 202, reply.body
        submission_id = reply.body["submission_id"]
        await wait_state(client, submission_id, "held")
    assert isinstance(submission_id, str)
    return submission_id


def gauge(gateway: Running, name: str, **labels: str) -> float | None:
    return gateway.metrics.registry.get_sample_value(name, labels)


def spool_states(gateway: Running) -> dict[str, float | None]:
    return {
        state: gauge(gateway, "gateway_spool_records", state=state)
        for state in ("queued", "held", "delivered")
    }


def assert_no_values(text: str) -> None:
    for value in (*PLANTED.values(), PLANTED_DELIVERED_ID):
        assert value not in text, value


# ------------------------------------------------------------------------- list, show


async def test_spool_list_shows_held_by_default_and_filters(
    gateway: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    held, delivered = await held_and_delivered(gateway)
    config = gateway.sandbox.config_path

    code, out, err = await actl(capsys, "spool", "list", "--config", config)
    assert code == 0, err
    assert held in out
    assert delivered not in out
    assert "1 record(s)" in err
    assert_no_values(out + err)

    code, out, err = await actl(
        capsys, "spool", "list", "--config", config, "--state", "all", "--format", "json"
    )
    assert code == 0, err
    assert_no_values(out + err)
    rows = {row["submission_id"]: row for row in json_out(out)}
    assert set(rows) == {held, delivered}
    assert rows[held]["state"] == "held"
    assert rows[held]["channel"] == HELD_CHANNEL
    assert rows[held]["destination"] == "ward-issuance"
    assert rows[held]["device_id"] == "callcentre-01"
    assert rows[held]["user_id"] == "staff-001"
    assert rows[held]["attempts"] == 1
    assert rows[held]["held_at"] is not None
    assert rows[held]["delivered_at"] is None
    assert "422" in rows[held]["last_error"]
    assert set(PLANTED) <= set(rows[held]["fields"])
    assert rows[held]["size"] > 0
    assert rows[delivered]["state"] == "erased"  # no delivered copy is kept
    assert rows[delivered]["channel"] == DELIVERED_CHANNEL
    assert rows[delivered]["delivered_at"] is not None
    assert rows[delivered]["erased_at"] is not None
    assert rows[delivered]["upstream_receipt"]
    assert "application_id" in rows[delivered]["fields"]

    code, out, err = await actl(
        capsys,
        "spool",
        "list",
        "--config",
        config,
        "--state",
        "all",
        "--channel",
        DELIVERED_CHANNEL,
        "--format",
        "json",
    )
    assert code == 0, err
    assert [row["submission_id"] for row in json_out(out)] == [delivered]

    code, out, err = await actl(
        capsys, "spool", "list", "--config", config, "--state", "erased", "--format", "json"
    )
    assert code == 0, err
    assert [row["submission_id"] for row in json_out(out)] == [delivered]
    code, out, err = await actl(
        capsys, "spool", "list", "--config", config, "--state", "delivered", "--format", "json"
    )
    assert code == 0, err
    assert json_out(out) == []


async def test_spool_show_prints_field_names_never_values(
    gateway: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    held, delivered = await held_and_delivered(gateway)
    config = gateway.sandbox.config_path
    for submission_id, state, names in (
        (held, "held", set(PLANTED)),
        (delivered, "erased", {"application_id", "face_photo"}),
    ):
        code, out, err = await actl(
            capsys, "spool", "show", "--config", config, submission_id, "--format", "json"
        )
        assert code == 0, err
        assert_no_values(out + err)
        shown = json_out(out)
        assert shown["submission_id"] == submission_id
        assert shown["state"] == state
        assert names <= set(shown["fields"]), shown["fields"]

        code, out, err = await actl(capsys, "spool", "show", "--config", config, submission_id)
        assert code == 0, err  # text: one "key: value" line each, the same metadata
        assert_no_values(out + err)
        lines = dict(line.split(":", 1) for line in out.splitlines())
        assert lines["submission_id"].strip() == submission_id
        assert lines["state"].strip() == state
        assert names <= {n.strip() for n in lines["fields"].split(",")}

    code, out, err = await actl(capsys, "spool", "show", "--config", config, "not-an-id")
    assert code == 2  # a usage error: not a submission id at all
    assert err.startswith("gatewayctl: 'not-an-id' is not a submission id"), err
    assert "Traceback" not in err

    unknown = "0" * 32
    code, out, err = await actl(capsys, "spool", "show", "--config", config, unknown)
    assert code == 1
    assert f"no record {unknown}" in err
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- requeue


async def test_spool_requeue_delivers_a_held_record_and_is_audited(
    gateway: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    held, delivered = await held_and_delivered(gateway)
    config = gateway.sandbox.config_path
    ward = gateway.sandbox.simulators["ward-issuance"]
    assert ward.received == []  # the 422 answer is not a delivery
    assert spool_states(gateway) == {"queued": 0, "held": 1, "delivered": 0}
    socket = config_of(gateway.sandbox).admin.control_socket
    assert socket is not None
    assert stat.S_IMODE(socket.stat().st_mode) == 0o600

    # While the audit log cannot take the entry, the record is not requeued.
    audit_log = config_of(gateway.sandbox).audit_log.log
    intact = audit_log.stat().st_size
    with audit_log.open("ab") as handle:
        handle.write(b'{"at":"2026-')  # a torn final line
    code, out, err = await actl(capsys, "spool", "requeue", "--config", config, held)
    assert code == 1
    assert "not made" in err
    assert "queued again" not in out
    code, out, err = await actl(
        capsys, "spool", "show", "--config", config, held, "--format", "json"
    )
    assert json_out(out)["state"] == "held"
    os.truncate(audit_log, intact)  # what an operator does after inspecting the torn line

    code, out, err = await actl(capsys, "spool", "requeue", "--config", config, held)
    assert code == 0, err
    assert f"{held} queued again" in out
    await ward.wait_for(1, timeout=10)
    assert [r.idempotency_key for r in ward.received] == [held]
    for name, value in PLANTED.items():  # the values the other tests search for were sent
        assert ward.received[0].fields[name] == value
    async with gateway.client("callcentre-01") as client:
        await wait_state(client, held, "erased")  # delivered, then erased
    await until(lambda: spool_states(gateway) == {"queued": 0, "held": 0, "delivered": 0})
    assert gauge(gateway, "gateway_spool_oldest_undelivered_age_seconds") == 0
    last = audit_entries(gateway.sandbox)[-1]
    assert last.body["action"] == "spool.requeue"
    assert last.body["target"] == held
    assert last.body["outcome"] == "ok"
    assert last.body["via"] == "gatewayctl"
    assert last.body["actor"] == OPERATOR

    # A record that is not held (delivered and erased) is refused, and the refusal recorded.
    code, out, err = await actl(capsys, "spool", "requeue", "--config", config, delivered)
    assert code == 1
    assert "queued again" not in out
    assert delivered in err
    assert "only a held record can be requeued" in err
    log = audit_entries(gateway.sandbox)
    assert log[-1].body["action"] == "spool.requeue"
    assert log[-1].body["target"] == delivered
    assert log[-1].body["outcome"] == "failed"
    assert "only a held record" in log[-1].body["detail"]["reason"]
    assert len(ward.received) == 1
    assert len(gateway.sandbox.simulators["dnp-relay"].received) == 1  # not sent again

    code, _out, err = await actl(capsys, "spool", "requeue", "--config", config, "xyz")
    assert code == 2
    assert "is not a submission id" in err


# ------------------------------------------------------------------------------- erase


async def test_spool_erase_crypto_erases_records_ledger_metric_and_audit(
    gateway: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    held, delivered = await held_and_delivered(gateway)
    other = await held_online(gateway)
    sandbox = gateway.sandbox
    config = sandbox.config_path
    records = config_of(sandbox).spool.directory / "records"
    assert (records / held).is_file()
    assert not (records / delivered).exists()
    assert [e.body["reason"] for e in ledger(sandbox)] == ["delivered"]

    # Not a terminal, no --yes: refused as a usage error, nothing erased or recorded.
    audited = len(audit_entries(sandbox))
    code, out, err = await actl(capsys, "spool", "erase", "--config", config, held)
    assert code == 2
    assert out == ""
    assert "add --yes" in err
    assert (records / held).is_file()
    assert len(audit_entries(sandbox)) == audited

    code, out, err = await actl(capsys, "spool", "erase", "--yes", "--config", config, held)
    assert code == 0, err
    assert f"{held} erased" in out
    assert not (records / held).exists()
    assert (records / other).is_file()
    assert spool_states(gateway) == {"queued": 0, "held": 1, "delivered": 0}
    assert gauge(gateway, "gateway_spool_oldest_undelivered_age_seconds") == 0

    code, out, err = await actl(
        capsys, "spool", "show", "--config", config, held, "--format", "json"
    )
    assert code == 0, err
    shown = json_out(out)
    assert shown["state"] == "erased"
    assert shown["erased_at"] is not None
    async with gateway.client("callcentre-01") as client:
        status = await client.status(held)
    assert status.status == 200, status.body
    assert status.body["state"] == "erased"

    [_delivery, entry] = ledger(sandbox)
    assert entry.body["submission_id"] == held
    assert entry.body["reason"] == "operator"
    assert entry.body["channel"] == HELD_CHANNEL
    erasures = gateway.metrics.registry.get_sample_value(
        "gateway_erasures_total", {"channel": HELD_CHANNEL, "reason": "operator"}
    )
    assert erasures == 1
    last = audit_entries(sandbox)[-1]
    assert last.body["action"] == "spool.erase"
    assert last.body["target"] == held
    assert last.body["outcome"] == "ok"
    assert last.body["actor"] == OPERATOR

    # Again, together with a live one: the erased one fails, the live one is erased.
    code, out, err = await actl(capsys, "spool", "erase", "--config", config, "--yes", held, other)
    assert code == 1
    assert f"{held}: " in err
    assert "already erased" in err
    assert f"{other} erased" in out
    assert not (records / other).exists()
    assert spool_states(gateway) == {"queued": 0, "held": 0, "delivered": 0}
    assert gauge(gateway, "gateway_spool_bytes") == 0
    log = audit_entries(sandbox)
    assert [(e.body["action"], e.body["target"], e.body["outcome"]) for e in log[-2:]] == [
        ("spool.erase", held, "failed"),
        ("spool.erase", other, "ok"),
    ]
    assert [(e.body["submission_id"], e.body["reason"]) for e in ledger(sandbox)] == [
        (delivered, "delivered"),
        (held, "operator"),
        (other, "operator"),
    ]
    erasures = gateway.metrics.registry.get_sample_value(
        "gateway_erasures_total", {"channel": HELD_CHANNEL, "reason": "operator"}
    )
    assert erasures == 1  # not counted twice


# ------------------------------------------------------------------------- no daemon


async def test_without_a_daemon_requeue_fails_clearly_and_list_still_works(
    gateway: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    held, _delivered = await held_and_delivered(gateway)
    await gateway.shutdown()
    config = gateway.sandbox.config_path
    socket = config_of(gateway.sandbox).admin.control_socket
    assert socket is not None
    for left_behind in (True, False):  # a stale socket file, then none at all
        if not left_behind:
            socket.unlink(missing_ok=True)
        code, out, err = await actl(capsys, "spool", "requeue", "--config", config, held)
        assert code == 69  # EX_UNAVAILABLE
        assert "queued again" not in out
        assert "gatewayd is not answering" in err
        assert "Error" not in err  # no exception class names
        assert "Traceback" not in err
        last = audit_entries(gateway.sandbox)[-1]
        assert (last.body["action"], last.body["target"]) == ("spool.requeue", held)
        assert last.body["outcome"] == "failed"

    code, out, err = await actl(capsys, "spool", "list", "--config", config)
    assert code == 0, err
    assert held in out
    assert "1 record(s)" in err
