"""The certificate of erasure for a period (特記事項 11–12: 消去証明書).

Built from the hash-chained erasure ledger, which is verified first: a broken chain is
an error that says where it breaks, never a report. Entries are taken per submission,
the last one winning (a crash between ledger and erasure records one twice). The
certificate carries the fields NIST SP 800-88 asks of a sanitization record.

For each record it says when its own data key was destroyed (the server copy became
unreadable) and when its key epoch was destroyed (every backup copy became unreadable),
or that the epoch is still to be destroyed. It does not claim the spool is not backed
up: it states the one backup condition the erasure depends on, for the ward to sign.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, date, datetime, time, timedelta, timezone
from typing import Any

from gateway import __version__
from gateway.ops.chain import GENESIS, ChainEntry, HashChainLog

JST = timezone(timedelta(hours=9), "JST")
RECORD_FIELDS = (
    "submission_id", "channel", "received_at", "delivered_at", "erased_at", "reason",
    "method", "ciphertext_sha256", "key_destroyed_at", "key_epoch", "epoch_destroyed_at",
)  # fmt: skip
EPOCH_EVENT = "key_epoch_destroyed"


def period_bounds(start: date, end: date) -> tuple[float, float]:
    """[start 00:00 JST, end+1 00:00 JST) as epoch seconds: both days included."""
    first = datetime.combine(start, time(), JST)
    after = datetime.combine(end + timedelta(days=1), time(), JST)
    return first.timestamp(), after.timestamp()


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def select(
    entries: Iterable[ChainEntry], start: float, end: float
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The period's erasures, one per submission (the last entry wins), oldest first; and
    when each key epoch was destroyed (any time: an epoch outlives its records' erasure)."""
    latest: dict[str, dict[str, Any]] = {}
    epochs: dict[str, float] = {}
    for entry in entries:
        body = dict(entry.body)
        if body.get("event") == EPOCH_EVENT:
            epochs[str(body["key_epoch"])] = float(body["destroyed_at"])
            continue
        erased_at = body.get("erased_at")
        if isinstance(erased_at, int | float) and start <= erased_at < end:
            latest[str(body.get("submission_id"))] = body
    records = sorted(latest.values(), key=lambda b: (b["erased_at"], b["submission_id"]))
    return records, epochs


def certificate(
    ledger: HashChainLog,
    start: date,
    end: date,
    *,
    operator: str,
    organization: str,
    now: datetime,
    keystore: str = "the keystore",
    retention_days: int | None = None,
) -> dict[str, Any]:
    """Verify the ledger and build the certificate for [start, end] (JST dates)."""
    low, high = period_bounds(start, end)
    total, head_seq, head_hash = 0, 0, GENESIS

    def verified() -> Iterable[ChainEntry]:
        """The ledger read once: each entry verified as it comes (ChainBroken names the
        line and the reason), counted, and the last one taken as the head."""
        nonlocal total, head_seq, head_hash
        for entry in ledger.entries():
            total, head_seq, head_hash = total + 1, entry.seq, entry.hash
            yield entry

    records, epochs = select(verified(), low, high)
    pending = sorted({str(r["key_epoch"]) for r in records if r.get("key_epoch")} - set(epochs))
    kept = f"{retention_days} days" if retention_days else "the longest retention"
    counts: Counter[tuple[str, str]] = Counter((r["channel"], r["reason"]) for r in records)
    by_channel: dict[str, dict[str, int]] = {}
    for (channel, reason), n in sorted(counts.items()):
        by_channel.setdefault(channel, {})[reason] = n
    methods = sorted({str(r.get("method")) for r in records}) or ["(no erasures)"]
    return {
        "title": "Certificate of erasure of server copies (サーバー上の一時保存データの消去証明書)",
        "period": {"from": start.isoformat(), "to": end.isoformat(), "timezone": "Asia/Tokyo"},
        "generated_at": now.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "ledger": {
            "verified": True,
            "entries": total,
            "head_seq": head_seq,
            "head_hash": head_hash,
            "path": str(ledger.path),
        },
        "counts": by_channel,
        "total": len(records),
        "sanitization_record": {  # the fields of NIST SP 800-88's certificate of sanitization
            "person_performing": {
                "name": "gatewayd (automatic retention sweeper)",
                "reviewed_by": operator,
                "organization": organization,
            },
            "media": {
                "type": "spool records: one encrypted file per submission, SQLite index",
                "source": "secure transmission gateway spool",
                "data_backup": (
                    f"Backups of the spool may exist. Their copies of these records became "
                    f"unreadable when each record's key epoch was destroyed (epoch_destroyed_at), "
                    f"provided the keystore {keystore} is excluded from every backup, or any "
                    f"backup of it is kept no longer than {kept}. The ward states that this "
                    "condition holds by signing this certificate."
                ),
                "key_epochs_pending": pending,
            },
            "sanitization": {
                "method_type": "Purge",
                "method": "Cryptographic Erase",
                "details": methods,
                "tool": f"jp-mynumber-gateway {__version__}",
                "verification": "hash-chained erasure ledger verified end to end; each record "
                "erased only after its ledger entry was written",
                "post_sanitization_classification": "no personal data remains readable",
                "notes": "a record's data key is wrapped by its key epoch's key; destroying "
                "the epoch key (overwritten, fsynced, unlinked, directory fsynced) leaves every "
                "copy of the record, in backups, free blocks or the index's WAL, unreadable "
                "with any key that still exists, the master key included. Until then a backup "
                "copy is readable only with the keystore and the master key together",
            },
            "media_destination": "reused (the spool continues in service)",
        },
        "records": [
            {
                **r,
                "received_at": _iso(r.get("received_at")),
                "delivered_at": _iso(r.get("delivered_at")),
                "erased_at": _iso(r["erased_at"]),
                "key_destroyed_at": _iso(r["erased_at"]),
                "key_epoch": r.get("key_epoch"),
                "epoch_destroyed_at": _iso(epochs.get(str(r.get("key_epoch")))),
            }
            for r in records
        ],
    }


def as_csv(cert: dict[str, Any]) -> str:
    """The records as CSV, after comment lines carrying the certificate's summary."""
    out = io.StringIO()
    ledger = cert["ledger"]
    out.write(f"# {cert['title']}\n")
    out.write(
        f"# period {cert['period']['from']} to {cert['period']['to']} (JST); "
        f"{cert['total']} erasures; ledger verified, {ledger['entries']} entries, "
        f"head {ledger['head_seq']} {ledger['head_hash']}\n"
    )
    writer = csv.DictWriter(out, fieldnames=RECORD_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(cert["records"])
    return out.getvalue()
