"""Key epochs on a running gateway: a spool from before them is migrated at start and
delivered intact; ``gatewayctl keys rotate-master`` retires a master key (refused while
the daemon runs, audited, the old key refused afterwards); ``keys status``."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import ctl, start_gateway

from gateway.crypto.envelope import unwrap_key, wrap_key
from gateway.crypto.keys import load_master_key
from gateway.crypto.keystore import KeyStore, master_key_id
from gateway.errors import KeystoreError, StorageFailed
from gateway.ops.audit import audit_chain
from gateway.spool import epochs, queries
from gateway.spool.records import NewRecord, new_submission_id
from gateway.spool.store import Spool
from gateway.testing.samples import multipart_body, sample_submission
from gateway.testing.sandbox import Sandbox, build_sandbox

pytestmark = pytest.mark.usefixtures("hermetic_cli")
CHANNEL = "online-application"


async def spool_records(box: Sandbox, bodies: list[tuple[bytes, str]]) -> list[str]:
    """Records written by the spool itself (as the ingress would), with idempotency keys
    ``key-0``, ``key-1``, ...; returns their ids."""
    assert box.config is not None
    master = load_master_key(Path(str(box.config.spool.master_key)))
    spool = Spool(box.config.spool.directory, master, keystore=box.config.keystore_directory)
    await spool.open()
    ids = []
    for n, (body, ctype) in enumerate(bodies):
        pending = await spool.create(new_submission_id(time.time))
        pending.write(body)
        now = time.time()
        token = spool.idempotency_token("tablet-01", CHANNEL, f"key-{n}")
        meta = NewRecord(
            channel=CHANNEL, destination="dnp-relay", device_id="tablet-01",
            user_id="staff-001", received_at=now, expires_at=now + 7 * 86400,
            content_type=ctype, body_sha256="0" * 64, content_sha256="1" * 64,
            field_names=(), idempotency_key=token,
        )  # fmt: skip
        ids.append((await spool.commit(pending, meta)).id)
    await spool.close()
    return ids


def make_it_old(box: Sandbox) -> None:
    """Turn the spool into one from before key epochs: schema 1, every data key wrapped by
    the master key directly, no keystore."""
    assert box.config is not None
    master = load_master_key(Path(str(box.config.spool.master_key)))
    keys = KeyStore(box.config.keystore_directory, master)
    keys.open()
    with sqlite3.connect(box.config.spool.directory / "index.sqlite3") as conn:
        rows = conn.execute(
            "SELECT id, wrapped_key, key_epoch FROM records WHERE wrapped_key IS NOT NULL"
        ).fetchall()
        for record_id, wrapped, epoch in rows:
            epoch_key = keys.get(epoch)
            assert epoch_key is not None
            dek = unwrap_key(epoch_key, bytes(wrapped))
            conn.execute(
                "UPDATE records SET wrapped_key=? WHERE id=?", (wrap_key(master, dek), record_id)
            )
        conn.execute("DROP INDEX records_epoch")
        conn.execute("ALTER TABLE records DROP COLUMN key_epoch")
        conn.execute("PRAGMA user_version=1")
    keys.close()
    shutil.rmtree(box.config.keystore_directory)


async def test_a_spool_from_before_key_epochs_is_migrated_at_start_and_delivered(
    tmp_path: Path,
) -> None:
    box = await build_sandbox(tmp_path)
    assert box.config is not None
    fields, files = sample_submission(CHANNEL)
    bodies = [multipart_body({**fields, "application_id": f"{n:023d}"}, files) for n in range(2)]
    ids = await spool_records(box, bodies)
    make_it_old(box)
    sim = box.simulators["dnp-relay"]
    running = await start_gateway(box)
    try:
        await sim.wait_for(2, timeout=30)
        assert sorted(r.body for r in sim.received) == sorted(body for body, _ in bodies)
        async with running.client("tablet-01") as client:
            again = await client.submit(CHANNEL, fields, files, idempotency_key="key-0")
        # The token of key-0 still matches after the migration: not a new record.
        assert again.status == 409 or again.body["submission_id"] == ids[0]
    finally:
        await running.shutdown()
        await box.stop_simulators()
    with sqlite3.connect(box.config.spool.directory / "index.sqlite3") as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (2,)
    assert (box.config.keystore_directory / "CURRENT").exists()


async def test_rotate_master_retires_the_old_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    box = await build_sandbox(tmp_path)
    assert box.config is not None
    config = box.config_path
    old = load_master_key(Path(str(box.config.spool.master_key)))
    new_file = tmp_path / "secrets" / "spool-master.new.key"
    code, _, _ = ctl(capsys, "keys", "new-master", "--out", new_file)
    assert code == 0 and new_file.stat().st_mode & 0o077 == 0
    new = load_master_key(new_file)
    fields, files = sample_submission(CHANNEL)
    running = await start_gateway(box)
    try:
        async with running.client("tablet-01") as client:
            assert (await client.submit(CHANNEL, fields, files)).status == 202
        code, _, err = ctl(
            capsys, "keys", "rotate-master", "--new", new_file, "--config", config, "--yes"
        )
        assert code == 1 and "stop gatewayd" in err
    finally:
        await running.shutdown()
    code, out, err = ctl(
        capsys, "keys", "rotate-master", "--new", new_file, "--config", config, "--yes"
    )
    assert code == 0, err
    assert master_key_id(new) in out and master_key_id(old) in out
    assert old.hex() not in out + err and new.hex() not in out + err
    entry = list(audit_chain(box.config.audit_log).entries())[-1].body
    assert (entry["action"], entry["outcome"]) == ("keys.rotate_master", "ok")
    assert entry["detail"]["from_master_key_id"] == master_key_id(old)
    assert entry["detail"]["to_master_key_id"] == master_key_id(new)
    with pytest.raises(KeystoreError, match="is under master key"):
        await start_gateway(box)  # the old key configured: refused
    text = config.read_text("utf-8").replace(str(box.config.spool.master_key), str(new_file))
    config.write_text(text, "utf-8")
    box.reload_config()
    running = await start_gateway(box)
    try:
        async with running.client("tablet-01") as client:
            assert (await client.submit(CHANNEL, fields, files)).status == 202
        await box.simulators["dnp-relay"].wait_for(2, timeout=30)
    finally:
        await running.shutdown()
        await box.stop_simulators()
    code, out, _ = ctl(capsys, "keys", "status", "--format", "json", "--config", config)
    status = json.loads(out)
    assert code == 0 and status["master_key_id"] == master_key_id(new)
    assert len(status["live"]) == 1 and status["destroyed"] == []


async def test_check_config_warns_of_a_keystore_inside_the_spool(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    box = await build_sandbox(tmp_path, start_simulators=False)
    assert box.config is not None
    code, _, err = ctl(capsys, "check-config", "--config", box.config_path)
    assert code == 0 and "warning" not in err  # the sandbox's keystore is beside the spool
    inside = box.config.spool.directory / "keys"
    text = box.config_path.read_text("utf-8").replace(
        str(box.config.keystore_directory), str(inside)
    )
    box.config_path.write_text(text, "utf-8")
    code, out, err = ctl(capsys, "check-config", "--config", box.config_path)
    assert code == 0 and "OK" in out
    assert "spool.keystore: warning" in err and "inside the spool directory" in err
    assert "out of backups" in err


async def test_a_migration_cut_short_carries_on_at_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between two batches (here: the second batch fails), the next start migrates
    the rest; every record reads back as written."""
    box = await build_sandbox(tmp_path, start_simulators=False)
    assert box.config is not None
    bodies = [(f"body {n} ".encode() * 100, "text/plain") for n in range(3)]
    ids = await spool_records(box, bodies)
    make_it_old(box)
    master = load_master_key(Path(str(box.config.spool.master_key)))
    monkeypatch.setattr(epochs, "BATCH", 1)
    real = queries.set_epoch_keys
    calls = iter(range(100))

    def second_batch_dies(conn: sqlite3.Connection, rows: list[tuple[str, str, bytes]]) -> None:
        if next(calls) == 1:
            raise OSError("killed")
        real(conn, rows)

    monkeypatch.setattr(queries, "set_epoch_keys", second_batch_dies)
    spool = Spool(box.config.spool.directory, master, keystore=box.config.keystore_directory)
    with pytest.raises(StorageFailed, match="killed"):
        await spool.open()
    await spool.close()
    monkeypatch.setattr(queries, "set_epoch_keys", real)
    with sqlite3.connect(box.config.spool.directory / "index.sqlite3") as conn:
        left = conn.execute("SELECT COUNT(*) FROM records WHERE key_epoch IS NULL").fetchone()
    assert left == (2,)  # one batch of one committed
    spool = Spool(box.config.spool.directory, master, keystore=box.config.keystore_directory)
    report = await spool.open()
    try:
        assert report.keys_migrated == 2
        for record_id, (body, _) in zip(ids, bodies, strict=True):
            record = await spool.get(record_id)
            assert record is not None
            assert b"".join(await spool.open_plaintext(record)) == body
    finally:
        await spool.close()
