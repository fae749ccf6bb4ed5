"""Retention: every copy erased on time, every erasure recorded in the hash-chained ledger."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.crypto.keystore import epoch_end, epoch_of
from gateway.errors import KeystoreError
from gateway.japan import JST
from gateway.ops.chain import HashChainLog
from gateway.ops.metrics import Metrics
from gateway.retention.report import as_csv, certificate
from gateway.retention.sweeper import Sweeper
from gateway.spool.records import NewRecord, new_submission_id
from gateway.spool.store import Spool

WEEK = 7 * 86400
T0 = 1_800_000_000.0


@dataclass
class Clock:
    now: float = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    spool: Spool
    ledger: HashChainLog
    metrics: Metrics
    clock: Clock
    sweeper: Sweeper


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    clock = Clock()
    spool = Spool(tmp_path / "spool", os.urandom(32), clock=clock)
    await spool.open()
    ledger = HashChainLog(tmp_path / "ledger.jsonl", clock=clock, anchor=tmp_path / "anchor")
    metrics = Metrics()
    sweeper = Sweeper(spool, ledger, metrics, clock=clock, channels=("online-application",))
    yield Rig(spool, ledger, metrics, clock, sweeper)
    await spool.close()


async def put(rig: Rig, channel: str = "online-application") -> str:
    pending = rig.spool.begin(new_submission_id(rig.clock))
    pending.write(b"payload " * 1000)
    received = rig.clock()
    record = await rig.spool.commit(
        pending,
        NewRecord(
            channel=channel,
            destination="dnp-relay",
            device_id="tablet-01",
            user_id="staff-001",
            received_at=received,
            expires_at=received + WEEK,
            content_type="multipart/form-data; boundary=x",
            body_sha256="0" * 64,
            content_sha256="1" * 64,
            field_names=("application_id",),
            idempotency_key=None,
        ),
    )
    return record.id


def erasures(rig: Rig, channel: str, reason: str) -> float:
    labels = {"channel": channel, "reason": reason}
    return rig.metrics.registry.get_sample_value("gateway_erasures_total", labels) or 0.0


async def test_an_undelivered_copy_is_erased_at_seven_days_to_the_second(rig: Rig) -> None:
    """Nothing is erased one second early; at received_at + 7 days the copy goes."""
    submission_id = await put(rig)
    rig.clock.now = T0 + WEEK - 1
    assert await rig.sweeper.sweep() == 0
    rig.clock.now = T0 + WEEK
    assert await rig.sweeper.sweep() == 1
    record = await rig.spool.get(submission_id)
    assert record is not None and record.state == "erased"
    assert erasures(rig, "online-application", "expired_undelivered") == 1
    assert rig.ledger.verify() == 1
    (entry,) = list(rig.ledger.entries())
    assert entry.body["submission_id"] == submission_id
    assert entry.body["reason"] == "expired_undelivered"
    assert entry.body["received_at"] == T0 and entry.body["erased_at"] == T0 + WEEK
    assert entry.body["delivered_at"] is None
    assert len(entry.body["ciphertext_sha256"]) == 64 and "crypto-erase" in entry.body["method"]


async def test_a_delivered_copy_left_behind_is_erased_by_the_next_sweep(rig: Rig) -> None:
    """A delivered copy still present (the daemon died between delivery and erasure) is
    erased by the next sweep, long before its deadline, with reason delivered."""
    submission_id = await put(rig)
    await rig.spool.mark_delivered(submission_id, at=T0 + 60, receipt="r-1")
    rig.clock.now = T0 + 120  # six days and more before the retention deadline
    assert await rig.sweeper.sweep() == 1
    (entry,) = list(rig.ledger.entries())
    assert entry.body["reason"] == "delivered" and entry.body["delivered_at"] == T0 + 60
    assert erasures(rig, "online-application", "delivered") == 1
    record = await rig.spool.get(submission_id)
    assert record is not None and record.state == "erased"


async def test_erase_on_delivery_erases_at_once_and_records_it(rig: Rig) -> None:
    """erase_delivered removes the copy now, with reason delivered; a sweep finds nothing."""
    submission_id = await put(rig, "express-issuance")
    await rig.spool.mark_delivered(submission_id, at=T0 + 1, receipt=None)
    await rig.sweeper.erase_delivered(submission_id)
    record = await rig.spool.get(submission_id)
    assert record is not None and record.state == "erased"
    assert [e.body["reason"] for e in rig.ledger.entries()] == ["delivered"]
    rig.clock.now = T0 + WEEK
    assert await rig.sweeper.sweep() == 0
    assert rig.ledger.verify() == 1


async def test_erasures_at_delivery_are_written_in_groups(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twenty deliveries finishing together cost one ledger write, not twenty; each
    caller returns only once its own record is erased."""
    ids = [await put(rig) for _ in range(20)]
    for submission_id in ids:
        await rig.spool.mark_delivered(submission_id, at=T0 + 1, receipt=None)
    groups: list[int] = []
    append_many = rig.ledger.append_many

    def counted(bodies: list[dict[str, object]]) -> object:
        groups.append(len(bodies))
        return append_many(bodies)

    monkeypatch.setattr(rig.ledger, "append_many", counted)
    await asyncio.gather(*(rig.sweeper.erase_delivered(i) for i in ids))
    assert groups == [20]
    for submission_id in ids:
        record = await rig.spool.get(submission_id)
        assert record is not None and record.state == "erased"
    assert rig.ledger.verify() == 20
    assert erasures(rig, "online-application", "delivered") == 20


async def test_an_erasure_at_delivery_that_fails_is_reported_to_its_caller(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ledger that cannot be written fails the callers of that group (nothing is
    erased unrecorded), and the next group is tried afresh."""
    first, second = await put(rig), await put(rig)
    for submission_id in (first, second):
        await rig.spool.mark_delivered(submission_id, at=T0 + 1, receipt=None)
    append_many = rig.ledger.append_many

    def full(_bodies: list[dict[str, object]]) -> object:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rig.ledger, "append_many", full)
    with pytest.raises(OSError, match="No space"):
        await rig.sweeper.erase_delivered(first)
    record = await rig.spool.get(first)
    assert record is not None and record.state == "delivered"
    monkeypatch.setattr(rig.ledger, "append_many", append_many)
    await rig.sweeper.erase_delivered(second)
    record = await rig.spool.get(second)
    assert record is not None and record.state == "erased"
    await rig.sweeper.close()


async def test_a_large_backlog_is_swept_in_batches_with_one_ledger_entry_each(rig: Rig) -> None:
    """More due records than one batch are all erased, each recorded exactly once."""
    ids = [await put(rig) for _ in range(1203)]
    rig.clock.now = T0 + WEEK + 1
    assert await rig.sweeper.sweep() == len(ids)
    assert rig.ledger.verify() == len(ids)
    assert sorted(e.body["submission_id"] for e in rig.ledger.entries()) == sorted(ids)
    assert rig.spool.bytes == 0


async def test_records_due_to_expire_undelivered_within_a_day_are_counted_per_channel(
    rig: Rig,
) -> None:
    """The early-warning gauge counts undelivered records expiring within 24 hours."""
    soon = await put(rig)
    delivered = await put(rig)
    await rig.spool.mark_delivered(delivered, at=T0 + 1, receipt=None)
    rig.clock.now = T0 + WEEK - 86400 - 1
    await rig.sweeper.sweep()
    gauge = rig.metrics.registry.get_sample_value
    labels = {"channel": "online-application"}
    assert gauge("gateway_spool_expiring_undelivered_records", labels) == 0
    rig.clock.now = T0 + WEEK - 86400
    await rig.sweeper.sweep()
    assert gauge("gateway_spool_expiring_undelivered_records", labels) == 1  # not the delivered
    rig.clock.now = T0 + WEEK
    await rig.sweeper.sweep()
    assert gauge("gateway_spool_expiring_undelivered_records", labels) == 0
    record = await rig.spool.get(soon)
    assert record is not None and record.state == "erased"


# ------------------------------------------------------------ certificate of erasure


async def test_the_certificate_counts_and_lists_the_periods_erasures(rig: Rig) -> None:
    """The report verifies the chain, counts by channel and reason, lists each erasure."""
    first = await put(rig)
    second = await put(rig, "express-issuance")
    await rig.spool.mark_delivered(second, at=T0 + 5, receipt=None)
    await rig.sweeper.erase_delivered(second)
    rig.clock.now = T0 + WEEK
    await rig.sweeper.sweep()
    day = datetime.fromtimestamp(T0 + WEEK, JST).date()
    cert = certificate(
        rig.ledger,
        day,
        day,
        operator="sec-01",
        organization="ward",
        now=datetime.fromtimestamp(T0 + WEEK, UTC),
    )
    assert cert["total"] == 1 and [r["submission_id"] for r in cert["records"]] == [first]
    assert cert["counts"] == {"online-application": {"expired_undelivered": 1}}
    assert cert["ledger"]["verified"] and cert["ledger"]["entries"] == 2
    record = cert["sanitization_record"]
    assert record["sanitization"]["method"] == "Cryptographic Erase"
    assert record["person_performing"]["reviewed_by"] == "sec-01"
    whole = certificate(
        rig.ledger,
        datetime.fromtimestamp(T0, JST).date(),
        day,
        operator="x",
        organization="y",
        now=datetime.now(UTC),
    )
    assert whole["counts"] == {
        "express-issuance": {"delivered": 1},
        "online-application": {"expired_undelivered": 1},
    }
    table = as_csv(whole).decode("utf-8-sig").splitlines()
    assert len(table) == 1 + 2  # the header and two rows: no comment lines
    assert table[0].startswith("受付番号 (submission_id),")


# ---------------------------------------------------------------- key epochs


def epochs(rig: Rig, state: str) -> float:
    value = rig.metrics.registry.get_sample_value("gateway_keystore_epochs", {"state": state})
    return value or 0.0


async def test_an_epoch_is_destroyed_once_its_day_is_over_and_its_records_erased(
    rig: Rig,
) -> None:
    """The deadline's Japan day is the epoch; after it, the next sweep erases what is due,
    writes the destruction to the ledger, then destroys the key."""
    record_id = await put(rig)
    epoch = epoch_of(T0 + WEEK)
    assert rig.spool.keys.live() == [epoch]
    rig.clock.now = T0 + WEEK  # the record is due; its epoch's day is not over
    assert await rig.sweeper.sweep() == 1
    assert rig.spool.keys.live() == [epoch]
    assert (epochs(rig, "live"), epochs(rig, "passed"), epochs(rig, "destroyed")) == (1, 0, 0)
    rig.clock.now = epoch_end(epoch)
    await rig.sweeper.sweep()
    assert rig.spool.keys.live() == [] and rig.spool.keys.destroyed() == [epoch]
    assert (epochs(rig, "live"), epochs(rig, "destroyed")) == (0, 1)
    erased, destroyed = (e.body for e in rig.ledger.entries())
    assert erased["submission_id"] == record_id and erased["key_epoch"] == epoch
    assert destroyed["event"] == "key_epoch_destroyed" and destroyed["key_epoch"] == epoch
    assert destroyed["destroyed_at"] == epoch_end(epoch)
    assert destroyed["records_erased_with_it"] == 0
    # A record of the same deadline day cannot be made again under a destroyed key.
    rig.clock.now = T0
    with pytest.raises(KeystoreError, match="destroyed"):
        await put(rig)


async def test_at_the_latest_one_sweep_later_an_epoch_goes_with_what_is_left(rig: Rig) -> None:
    """A record still live when its epoch's day is over (its erasure failed, say) holds the
    epoch one sweep interval at most; then both go, the record as epoch_destroyed."""
    record_id = await put(rig)
    epoch = epoch_of(T0 + WEEK)
    end = epoch_end(epoch)
    assert await rig.sweeper.destroy_epochs(end) == []  # the record is still live
    assert epochs(rig, "passed") == 1
    assert await rig.sweeper.destroy_epochs(end + 60) == [epoch]  # the interval is 60 s
    record = await rig.spool.get(record_id)
    assert record is not None and record.state == "erased"
    erased, destroyed = (e.body for e in rig.ledger.entries())
    assert erased["reason"] == "epoch_destroyed"
    assert destroyed["records_erased_with_it"] == 1
    assert erasures(rig, "online-application", "epoch_destroyed") == 1


async def test_the_certificate_says_when_each_key_and_its_epoch_were_destroyed(
    rig: Rig,
) -> None:
    """Per record: its own key's destruction, its epoch, the epoch's destruction (or that
    it is pending); the backup condition is stated for the ward to sign."""
    first = await put(rig)
    rig.clock.now = T0 + WEEK
    await rig.sweeper.sweep()
    day = datetime.fromtimestamp(T0 + WEEK, JST).date()

    def cert() -> dict[str, Any]:
        return certificate(
            rig.ledger, day, day, operator="o", organization="w", now=datetime.now(UTC),
            keystore="/var/lib/gateway-keystore", retention_days=7,
        )  # fmt: skip

    epoch = epoch_of(T0 + WEEK)
    pending = cert()
    (row,) = pending["records"]
    assert (row["submission_id"], row["key_epoch"], row["epoch_destroyed_at"]) == (
        first,
        epoch,
        None,
    )
    assert row["key_destroyed_at"] == row["erased_at"]
    media = pending["sanitization_record"]["media"]
    assert media["key_epochs_pending"] == [epoch]
    assert "not backed up" not in json.dumps(pending) and "none (" not in media["data_backup"]
    assert "/var/lib/gateway-keystore" in media["data_backup"] and "7 days" in media["data_backup"]
    rig.clock.now = epoch_end(epoch) + 5
    await rig.sweeper.sweep()
    done = cert()
    assert done["records"][0]["epoch_destroyed_at"] is not None
    assert done["sanitization_record"]["media"]["key_epochs_pending"] == []
    header = as_csv(done).decode("utf-8-sig").splitlines()[0]
    assert "鍵エポックの破棄日時 (epoch_destroyed_at)" in header
    assert done["records"][0]["epoch_destroyed_at"] == "2027-01-23T00:00:05+09:00"


async def test_a_sweep_asks_the_keystore_off_the_event_loop(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Choosing each record's reason asks the keystore whether its epoch is gone; a
    shared keystore may ask its database, so the sweep asks on a thread."""
    await put(rig)
    loop_thread = threading.get_ident()
    keys = rig.spool.keys
    asked: list[int] = []
    real_get = keys.get

    def get(epoch: str) -> bytes | None:
        asked.append(threading.get_ident())
        return real_get(epoch)

    monkeypatch.setattr(keys, "get", get)
    rig.clock.now = T0 + WEEK + 1
    assert await rig.sweeper.sweep() == 1
    assert asked and loop_thread not in asked
