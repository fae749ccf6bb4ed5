"""The epoch keystore: keys made durable before use, destroyed for good (overwritten,
unlinked, tombstoned), bound to their names and their master key, and a master-key
rotation that a SIGKILL at any step leaves with exactly one key in force."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.crypto.keystore import KeyStore, epoch_end, epoch_of, master_key_id
from gateway.errors import KeystoreError

EPOCHS = ("2026-12-01", "2026-12-02", "2026-12-08")
ROOT = Path(__file__).resolve().parents[2]


def made(directory: Path, master: bytes) -> dict[str, bytes]:
    """A keystore with three epochs; returns their keys."""
    store = KeyStore(directory, master)
    store.open()
    keys = {e: store.key_for(e) for e in EPOCHS} | {"idempotency": store.idempotency_key}
    store.close()
    return keys


def opened(directory: Path, master: bytes) -> dict[str, bytes]:
    store = KeyStore(directory, master)
    store.open()
    try:
        found = {e: k for e in store.live() if (k := store.get(e)) is not None}
        return found | {"idempotency": store.idempotency_key}
    finally:
        store.close()


def all_bytes(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in directory.rglob("*") if p.is_file())


def test_keys_are_durable_private_and_the_same_when_opened_again(tmp_path: Path) -> None:
    master = os.urandom(32)
    keys = made(tmp_path / "ks", master)
    assert opened(tmp_path / "ks", master) == keys
    assert (tmp_path / "ks" / "CURRENT").read_text().strip() == master_key_id(master)
    for path in (tmp_path / "ks").rglob("*"):
        assert os.stat(path).st_mode & 0o077 == 0, path
    # Wrapped, never in the clear; the master key's id says which key, not the key.
    stored = all_bytes(tmp_path / "ks")
    assert not any(key in stored for key in keys.values())
    assert master not in stored and master.hex().encode() not in stored


def test_the_epoch_of_a_deadline_is_its_japan_day() -> None:
    assert epoch_of(epoch_end("2026-12-01") - 1) == "2026-12-01"
    assert epoch_of(epoch_end("2026-12-01")) == "2026-12-02"
    # 2026-12-02 00:00 JST is 2026-12-01 15:00 UTC.
    assert epoch_end("2026-12-01") == datetime(2026, 12, 1, 15, tzinfo=UTC).timestamp()


def test_a_destroyed_epoch_is_gone_for_good(tmp_path: Path) -> None:
    master = os.urandom(32)
    directory = tmp_path / "ks"
    keys = made(directory, master)
    sealed = next(directory.glob("epoch-2026-12-01.*")).read_bytes()
    store = KeyStore(directory, master)
    store.open()
    assert store.destroy("2026-12-01") is True
    assert store.destroy("2026-12-01") is False
    assert store.get("2026-12-01") is None and store.is_destroyed("2026-12-01")
    with pytest.raises(KeystoreError, match="destroyed"):
        store.key_for("2026-12-01")
    store.close()
    assert (directory / "destroyed" / "2026-12-01").exists()
    assert not list(directory.glob("epoch-2026-12-01.*"))
    stored = all_bytes(directory)
    assert keys["2026-12-01"] not in stored and sealed not in stored
    assert set(opened(directory, master)) == {"2026-12-02", "2026-12-08", "idempotency"}


def test_a_destruction_cut_short_is_finished_at_open(tmp_path: Path) -> None:
    """Tombstone written, file not yet overwritten (a crash): open overwrites it."""
    master = os.urandom(32)
    directory = tmp_path / "ks"
    made(directory, master)
    (directory / "destroyed" / "2026-12-02").touch()
    left = next(directory.glob("epoch-2026-12-02.*"))
    assert "2026-12-02" not in opened(directory, master)
    assert not left.exists()


def test_the_wrong_master_key_a_missing_current_and_a_renamed_file_are_refused(
    tmp_path: Path,
) -> None:
    master, other = os.urandom(32), os.urandom(32)
    directory = tmp_path / "ks"
    made(directory, master)
    with pytest.raises(KeystoreError) as wrong:
        opened(directory, other)
    assert master_key_id(master) in str(wrong.value) and master_key_id(other) in str(wrong.value)
    # A file moved to another epoch's name does not open: the name is bound in.
    first = next(directory.glob("epoch-2026-12-01.*"))
    first.rename(first.with_name(first.name.replace("12-01", "12-03")))
    with pytest.raises(KeystoreError, match="does not open"):
        opened(directory, master)
    (directory / "CURRENT").unlink()
    with pytest.raises(KeystoreError, match="no CURRENT"):
        opened(directory, master)


def test_one_process_at_a_time(tmp_path: Path) -> None:
    master = os.urandom(32)
    first = KeyStore(tmp_path / "ks", master)
    first.open()
    with pytest.raises(KeystoreError, match="in use"):
        KeyStore(tmp_path / "ks", master).open()
    first.close()
    assert opened(tmp_path / "ks", master)


def test_rotation_wraps_every_key_by_the_new_master_and_retires_the_old(tmp_path: Path) -> None:
    old, new = os.urandom(32), os.urandom(32)
    directory = tmp_path / "ks"
    keys = made(directory, old)
    store = KeyStore(directory, old)
    store.open()
    steps: list[str] = []
    assert store.rotate(new, steps.append) == 3
    store.close()
    assert steps[:4] == [f"wrapped epoch-{e}" for e in EPOCHS] + ["wrapped idempotency"]
    assert steps[4] == "committed" and len(steps) == 2 * len(EPOCHS) + 3
    assert opened(directory, new) == keys
    with pytest.raises(KeystoreError, match="is under master key"):
        opened(directory, old)
    assert all(master_key_id(old) not in p.name for p in directory.iterdir())


ROTATE_AND_DIE = """
import os, signal, sys
from pathlib import Path
from gateway.crypto.keystore import KeyStore
directory, old, new, step = Path(sys.argv[1]), bytes.fromhex(sys.argv[2]), bytes.fromhex(
    sys.argv[3]), int(sys.argv[4])
store = KeyStore(directory, old)
store.open()
count = iter(range(10**6))
def on_step(name):
    if next(count) == step:
        os.kill(os.getpid(), signal.SIGKILL)
store.rotate(new, on_step)
"""


def test_a_rotation_killed_at_any_step_leaves_one_key_in_force(tmp_path: Path) -> None:
    old, new = os.urandom(32), os.urandom(32)
    original = tmp_path / "original"
    keys = made(original, old)
    steps = 2 * len(EPOCHS) + 3
    committed_at = len(EPOCHS) + 1  # the step index of "committed"
    for step in range(steps):
        directory = tmp_path / f"killed-at-{step}"
        shutil.copytree(original, directory)
        died = subprocess.run(
            [sys.executable, "-c", ROTATE_AND_DIE, str(directory), old.hex(), new.hex(), str(step)],
            cwd=ROOT,
            capture_output=True,
            check=False,
        )
        assert died.returncode == -signal.SIGKILL, died.stderr.decode()
        in_force, retired = (new, old) if step >= committed_at else (old, new)
        assert (directory / "CURRENT").read_text().strip() == master_key_id(in_force)
        with pytest.raises(KeystoreError):
            opened(directory, retired)
        assert opened(directory, in_force) == keys, step  # and the other key's files go
        assert all(master_key_id(retired) not in p.name for p in directory.iterdir()), step
        if in_force is old:  # cut short before the commit: simply run it again
            store = KeyStore(directory, old)
            store.open()
            store.rotate(new)
            store.close()
            assert opened(directory, new) == keys


def test_a_temporary_file_a_crash_left_is_shredded_at_open(tmp_path: Path) -> None:
    """A rotation cut short mid-write leaves ``.NAME.HEX.tmp`` holding a key: shredded."""
    master = os.urandom(32)
    directory = tmp_path / "ks"
    keys = made(directory, master)
    left = directory / f".epoch-2026-12-01.{'0' * 16}.key.0123456789ab.tmp"
    left.write_bytes(next(directory.glob("epoch-2026-12-01.*")).read_bytes())
    assert opened(directory, master) == keys
    assert not left.exists()
    assert not list(directory.rglob("*.tmp"))
