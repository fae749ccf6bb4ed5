"""What is erased, and why, and what the erasure ledger says of it (pure: no I/O)."""

from __future__ import annotations

from typing import Any

from gateway.spool.records import Due, State

METHOD = "crypto-erase (AES-256-GCM data key destroyed, SQLite secure_delete) + unlink"
EPOCH_METHOD = (
    "crypto-shred of the key epoch (epoch key overwritten, fsynced, unlinked; directory "
    "fsynced): every copy of its records, backups included, unreadable"
)
SHARED_METHOD = (
    "crypto-erase (AES-256-GCM data key set to NULL in its PostgreSQL row, ciphertext rows "
    "deleted in the same transaction; dead row versions until VACUUM)"
)
SHARED_EPOCH_METHOD = (
    "crypto-shred of the key epoch (its row deleted from gateway_keys, tombstone written "
    "in the same transaction, keystore tables vacuumed): every copy of its records, "
    "backups included, unreadable"
)
ERASURE_REASONS = ("delivered", "expired_undelivered", "operator", "epoch_destroyed")
"""Why a copy is erased: the ledger's ``reason`` and the metric's label. Ledgers written
before every channel erased on delivery may also hold ``retention`` (a delivered copy
kept until its deadline); reports still count it. ``epoch_destroyed``: a copy whose key
epoch is gone (a restored backup), or one still live when its epoch was destroyed."""


def reason_for(due: Due) -> str:
    """Why a record is erased: the ledger's and the metric's reason label."""
    return "delivered" if due.state == State.DELIVERED else "expired_undelivered"


def ledger_body(due: Due, reason: str, erased_at: float, *, method: str = METHOD) -> dict[str, Any]:
    """The erasure ledger's entry for one record (no personal data)."""
    return {
        "submission_id": due.submission_id,
        "channel": due.channel,
        "received_at": due.received_at,
        "delivered_at": due.delivered_at,
        "erased_at": erased_at,
        "reason": reason,
        "method": method,
        "ciphertext_sha256": due.ciphertext_sha256,
        "key_epoch": due.key_epoch,
    }


def epoch_ledger_body(
    epoch: str, destroyed_at: float, remaining: int, *, method: str = EPOCH_METHOD
) -> dict[str, Any]:
    """The erasure ledger's entry for a destroyed key epoch."""
    return {
        "event": "key_epoch_destroyed",
        "key_epoch": epoch,
        "destroyed_at": destroyed_at,
        "records_erased_with_it": remaining,
        "method": method,
    }
