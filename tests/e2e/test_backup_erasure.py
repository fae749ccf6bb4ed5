"""Erasure that reaches backups (002: バックアップデータの完全消去).

A backup of the whole state directory (spool, index and its WAL, ledger, audit log,
registries) is taken while submissions are in the spool, the master key kept, and the
keystore left out as the README's backup policy says. Once the injected clock passes
the records' epoch, nothing in that backup decrypts with the master key and the live
keystore; before, it did (so the check can fail). Restored in place of the live state,
the backup resurrects nothing: its records are held as unreadable, erased under
``epoch_destroyed`` with the ledger saying so, and never delivered again.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
from datetime import datetime
from pathlib import Path

from conftest import FakeSleep, hold, start_gateway

from gateway.crypto.envelope import unwrap_key
from gateway.crypto.envelope_reader import iter_plaintext
from gateway.crypto.keys import load_master_key
from gateway.crypto.keystore import KeyStore, epoch_of
from gateway.errors import RecordCorrupt
from gateway.japan import JST
from gateway.retention.ledger import erasure_ledger
from gateway.testing.samples import sample_submission
from gateway.testing.sandbox import build_sandbox

DAY = 86400.0
CHANNEL = "online-application"
T0 = datetime(2026, 12, 1, 10, 0, tzinfo=JST).timestamp()


def copy_state(state: Path, to: Path, *, keystore: bool) -> None:
    """What a file-level backup takes: every regular file (sockets and the like are not
    data), the keystore only when the backup policy is broken."""

    def skip(directory: str, names: list[str]) -> set[str]:
        here = Path(directory)
        return {
            n
            for n in names
            if (here / n).is_symlink()
            or not (stat.S_ISREG((here / n).lstat().st_mode) or (here / n).is_dir())
            or (here == state and n == "keystore" and not keystore)
        }

    shutil.copytree(state, to, ignore=skip)


def decryptable(state: Path, master: bytes, keystore: Path, scratch: Path) -> list[bytes]:
    """Every record in ``state`` that decrypts with ``master`` and ``keystore`` (tried
    with every key: its epoch's, every live epoch's, the master key itself)."""
    work = scratch / f"try-{len(list(scratch.glob('try-*')))}"
    shutil.copytree(state / "spool", work / "spool")  # the index with its WAL, as backed up
    if keystore.exists():
        shutil.copytree(keystore, work / "keystore", ignore=shutil.ignore_patterns("lock"))
    keys = KeyStore(work / "keystore", master)
    keys.open()
    candidates = [master, *(k for e in keys.live() if (k := keys.get(e)) is not None)]
    keys.close()
    with sqlite3.connect(work / "spool" / "index.sqlite3") as conn:
        rows = conn.execute(
            "SELECT id, wrapped_key, plaintext_size FROM records WHERE wrapped_key IS NOT NULL"
        ).fetchall()
    readable = []
    for record_id, wrapped, size in rows:
        for key in candidates:
            try:
                dek = unwrap_key(key, bytes(wrapped))
            except RecordCorrupt:
                continue
            with open(work / "spool" / "records" / record_id, "rb") as fileobj:
                readable.append(b"".join(iter_plaintext(fileobj, dek, record_id.encode(), size)))
            break
    return readable


async def test_a_backup_is_unreadable_once_its_epoch_is_destroyed_and_resurrects_nothing(
    tmp_path: Path,
) -> None:
    box = await build_sandbox(tmp_path / "box")
    assert box.config is not None
    state = box.config.spool.directory.parent
    master = load_master_key(Path(str(box.config.spool.master_key)))
    sleep = FakeSleep()
    sleep.now = T0
    sim = box.simulators["dnp-relay"]
    fields, files = sample_submission(CHANNEL)
    photo = files["face_photo"]

    running = await start_gateway(box, sleep)
    try:
        gate = hold(sim)
        ids = []
        async with running.client("tablet-01") as client:
            for _ in range(3):
                reply = await client.submit(CHANNEL, fields, files)
                assert reply.status == 202
                ids.append(reply.body["submission_id"])
        await gate.wait_inside(1)
        copy_state(state, tmp_path / "backup", keystore=False)  # the policy kept
        copy_state(state, tmp_path / "backup-with-keys", keystore=True)  # the policy broken
        gate.opened.set()
        await sim.wait_for(3, timeout=30)
    finally:
        await running.shutdown()
    epoch = epoch_of(T0 + 7 * DAY)
    backup = tmp_path / "backup"

    # While the epoch lives, the backup is readable with the live keystore: the window.
    assert len(decryptable(backup, master, state / "keystore", tmp_path)) == 3
    with_keys = decryptable(backup, master, tmp_path / "backup-with-keys" / "keystore", tmp_path)
    assert len(with_keys) == 3 and all(photo in body for body in with_keys)

    sleep.now = T0 + 8 * DAY + 60  # the epoch's day is over; a start sweeps
    running = await start_gateway(box, sleep)
    await running.shutdown()
    assert (state / "keystore" / "destroyed" / epoch).exists()
    assert not list((state / "keystore").glob(f"epoch-{epoch}.*"))
    ledger = [e.body for e in erasure_ledger(box.config.spool.directory).entries()]
    destroyed = [b for b in ledger if b.get("event") == "key_epoch_destroyed"]
    assert [b["key_epoch"] for b in destroyed] == [epoch]

    # Nothing in the backup decrypts now: not with the master key, not with any live key.
    assert decryptable(backup, master, state / "keystore", tmp_path) == []
    # Only a backup of the keystore itself (the policy broken) still opens it.
    assert len(decryptable(backup, master, tmp_path / "backup-with-keys" / "keystore", tmp_path))

    # The backup restored in place of the live state (the live keystore kept).
    for entry in state.iterdir():
        if entry.name != "keystore":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    for entry in backup.iterdir():
        shutil.move(entry, state / entry.name)
    delivered = len(sim.received)
    running = await start_gateway(box, sleep)
    try:
        async with running.client("tablet-01") as client:
            for submission_id in ids:
                assert (await client.status(submission_id)).body["state"] == "erased"
    finally:
        await running.shutdown()
        await box.stop_simulators()
    assert len(sim.received) == delivered  # nothing was delivered again
    ledger = [e.body for e in erasure_ledger(box.config.spool.directory).entries()]
    last = {b["submission_id"]: b for b in ledger if "submission_id" in b}
    assert {last[i]["reason"] for i in ids} == {"epoch_destroyed"}
    assert {last[i]["key_epoch"] for i in ids} == {epoch}
    assert os.listdir(box.config.spool.directory / "records") == []
    with sqlite3.connect(box.config.spool.directory / "index.sqlite3") as conn:
        errors = conn.execute(
            "SELECT held_at IS NOT NULL, last_error FROM records WHERE id IN (?, ?, ?)",
            ids,
        ).fetchall()
    assert errors == [(1, f"unreadable: key epoch {epoch} destroyed")] * 3  # held, then erased
