"""The epoch keystore: erasure that reaches backups (002: バックアップデータの完全消去).

A record's data key is wrapped by the key of its **epoch**: the Japan day of its erasure
deadline (``received_at + retention``). Epoch keys live here, apart from the spool, one
small file each, wrapped by the master key (AES-256-GCM, the file's name and the master
key's id bound in as associated data). Once an epoch's day has passed and its records
are erased, its key is destroyed: a tombstone is made, the file overwritten in place and
fsynced, unlinked, and the directory fsynced. From then on every copy of those records
— in a backup of the spool, in free blocks, in the index's write-ahead log — is
unreadable with any key that still exists, the master key included.

Layout (mode 0700, files 0600)::

    CURRENT                          the id of the master key that wraps the files
    epoch-2026-12-06.<kid>.key       one per live epoch
    idempotency.<kid>.key            the HMAC key of the index's idempotency tokens
    destroyed/2026-11-29             a tombstone per destroyed epoch (empty)
    lock                             held by the one process using the keystore

A master-key rotation (:meth:`KeyStore.rotate`) writes every file again under the new
key's id, then commits by replacing ``CURRENT``, then destroys the old files the same
way: a crash at any point leaves either the old key or the new one in force, and
:meth:`KeyStore.open` removes the other's files.

The only thing a backup policy must exclude is this directory (or keep its backups no
longer than the retention): with it, a backup of the spool is readable until the
epochs are destroyed; without it, never.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import os
import re
import threading
from collections.abc import Callable
from datetime import date, datetime, time, timedelta
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.errors import KeystoreError
from gateway.fsutil import fsync_dir, write_atomic
from gateway.japan import JST

KEY_SIZE = 32
MAGIC = b"GWKS1\0"
_NONCE = 12
_EPOCH = re.compile(r"epoch-(\d{4}-\d{2}-\d{2})\.([0-9a-f]{16})\.key")
_IDEMPOTENCY = re.compile(r"idempotency\.([0-9a-f]{16})\.key")
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
KIND = "keystore"


def master_key_id(master: bytes) -> str:
    """A short public id of a master key (HMAC of a constant): says which key, not it."""
    return hmac.new(master, b"gateway master key id v1", "sha256").hexdigest()[:16]


def epoch_of(deadline: float) -> str:
    """The epoch of an erasure deadline: its Japan date, ``YYYY-MM-DD``."""
    return datetime.fromtimestamp(deadline, JST).date().isoformat()


def epoch_end(epoch: str) -> float:
    """When an epoch's day ends (00:00 JST the day after), as epoch seconds."""
    after = date.fromisoformat(epoch) + timedelta(days=1)
    return datetime.combine(after, time(), JST).timestamp()


def check_epoch(epoch: str) -> str:
    """``epoch`` when it names a day (``YYYY-MM-DD``); else ValueError."""
    if not _DAY.fullmatch(epoch):
        raise ValueError(f"not an epoch: {epoch!r}")
    return epoch


def first_idempotency_key(master: bytes) -> bytes:
    """A new keystore's idempotency key: derived from the master key as the index's
    tokens always were, so a spool from before the keystore keeps its tokens."""
    return hmac.new(master, b"gateway idempotency v1", "sha256").digest()


def _aad(name: str, kid: str) -> bytes:
    return MAGIC + f"{name}\0{kid}".encode("ascii")


def seal_key(master: bytes, name: str, key: bytes) -> bytes:
    nonce = os.urandom(_NONCE)
    return MAGIC + nonce + AESGCM(master).encrypt(nonce, key, _aad(name, master_key_id(master)))


def open_key(master: bytes, name: str, blob: bytes) -> bytes:
    """The key sealed in ``blob``; KeystoreError when it does not open under ``master``."""
    body = blob.removeprefix(MAGIC)
    try:
        key = AESGCM(master).decrypt(
            body[:_NONCE], body[_NONCE:], _aad(name, master_key_id(master))
        )
    except (InvalidTag, ValueError):
        raise KeystoreError(f"keystore file {name} does not open with the master key") from None
    if len(key) != KEY_SIZE or not blob.startswith(MAGIC):
        raise KeystoreError(f"keystore file {name} is not a keystore key")
    return key


def shred(path: Path) -> None:
    """Overwrite a file in place with zeros, fsync it, unlink it (the caller fsyncs the
    directory). On a copy-on-write file system or an SSD the old blocks may survive the
    overwrite: the keys in them are still wrapped by the master key."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    try:
        size = os.fstat(fd).st_size
        os.pwrite(fd, bytes(size), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink(missing_ok=True)


class EpochSets:
    """What a keystore knows of its epochs: the live keys and the destroyed days, held in
    memory under the master key ``master``, and the idempotency key once opened."""

    def __init__(self, master: bytes) -> None:
        self._master = master
        self.kid = master_key_id(master)
        self._keys: dict[str, bytes] = {}
        self._destroyed: set[str] = set()
        self._idempotency: bytes | None = None
        self._lock = threading.Lock()

    @property
    def idempotency_key(self) -> bytes:
        assert self._idempotency is not None, "open the keystore first"
        return self._idempotency

    def idempotency_token(self, device_id: str, channel: str, key: str) -> str:
        """What a spool keeps of an Idempotency-Key: an HMAC under the idempotency key,
        bound to the device and the channel (never the key itself)."""
        material = f"{device_id}\0{channel}\0{key}".encode()
        return hmac.new(self.idempotency_key, material, hashlib.sha256).hexdigest()

    def refresh(self) -> None:
        """Learn the epochs other nodes made and destroyed: nothing to learn for a
        keystore one node owns (the shared one asks its database)."""

    def vacuum(self) -> None:
        """Clear the dead versions of destroyed keys: nothing to do for files, which
        are overwritten and unlinked (the shared one vacuums its tables)."""

    def live(self) -> list[str]:
        return sorted(self._keys)

    def holds(self, epoch: str) -> bool:
        """Whether the epoch's key is in memory (no I/O to answer :meth:`get`)."""
        return epoch in self._keys

    def destroyed(self) -> list[str]:
        return sorted(self._destroyed)

    def is_destroyed(self, epoch: str) -> bool:
        return epoch in self._destroyed


class KeyStore(EpochSets):
    """The epoch keys of one gateway, held in memory once opened (see the module doc)."""

    def __init__(self, directory: Path, master: bytes) -> None:
        super().__init__(master)
        self.directory = directory
        self._lock_fd: int | None = None

    # ---------------------------------------------------------------- lifecycle

    def open(self) -> None:
        """Lock, check the master key, finish what a crash interrupted, load the keys."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.directory / "destroyed").mkdir(exist_ok=True, mode=0o700)
        fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise KeystoreError(
                f"keystore {self.directory} is in use by another gateway process"
            ) from None
        self._lock_fd = fd
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _current(self) -> str | None:
        try:
            text = (self.directory / "CURRENT").read_text("ascii").strip()
        except FileNotFoundError:
            return None
        if not re.fullmatch(r"[0-9a-f]{16}", text):
            raise KeystoreError(f"{self.directory / 'CURRENT'} does not name a master key id")
        return text

    def _files(self) -> list[tuple[Path, str, str]]:
        """(path, name, kid) of every key file: name is ``epoch-DAY`` or ``idempotency``."""
        found = []
        for path in sorted(self.directory.iterdir()):
            if m := _EPOCH.fullmatch(path.name):
                found.append((path, f"epoch-{m[1]}", m[2]))
            elif m := _IDEMPOTENCY.fullmatch(path.name):
                found.append((path, "idempotency", m[1]))
        return found

    def _shred_temporaries(self) -> bool:
        """Shred what a write cut short left (``write_atomic``'s ``.NAME.HEX.tmp``): such
        a file may hold a key, wrapped by either master key, that nothing else tracks."""
        found = [
            path
            for folder in (self.directory, self.directory / "destroyed")
            for path in folder.glob(".*.tmp")
        ]
        for path in found:
            shred(path)
        return bool(found)

    def _load(self) -> None:
        leftovers = self._shred_temporaries()
        current = self._current()
        files = self._files()
        if current is None:
            if any(name.startswith("epoch-") for _, name, _ in files):
                raise KeystoreError(
                    f"keystore {self.directory} holds epoch keys but no CURRENT file "
                    "(it names the master key that wraps them): restore it"
                )
            self._create()
            files = self._files()
            current = self.kid
        if current != self.kid:
            raise KeystoreError(
                f"keystore {self.directory} is under master key {current}; the configured "
                f"master key is {self.kid}. If a rotation to this key was cut short, run "
                "gatewayctl keys rotate-master --new FILE again with the old key configured"
            )
        self._destroyed = {p.name for p in (self.directory / "destroyed").iterdir()}
        for path, name, kid in files:
            epoch = name.removeprefix("epoch-")
            if kid != current or epoch in self._destroyed:
                shred(path)  # another key's (a rotation's) or a destruction cut short
                leftovers = True
                continue
            key = open_key(self._master, name, path.read_bytes())
            if name == "idempotency":
                self._idempotency = key
            else:
                self._keys[epoch] = key
        if leftovers:
            fsync_dir(self.directory, kind=KIND)
        if self._idempotency is None:
            raise KeystoreError(f"keystore {self.directory} has no idempotency key")

    def _create(self) -> None:
        """A new keystore (its idempotency key: :func:`first_idempotency_key`)."""
        for path, _, _ in self._files():
            shred(path)  # a creation cut short before CURRENT was written
        self._write("idempotency", first_idempotency_key(self._master))
        write_atomic(self.directory / "CURRENT", f"{self.kid}\n".encode(), kind=KIND)

    def _write(self, name: str, key: bytes, master: bytes | None = None) -> None:
        master = master or self._master
        path = self.directory / f"{name}.{master_key_id(master)}.key"
        write_atomic(path, seal_key(master, name, key), kind=KIND)

    # ------------------------------------------------------------------- keys

    def get(self, epoch: str) -> bytes | None:
        """The epoch's key; None once destroyed (or never made)."""
        return self._keys.get(epoch)

    def key_for(self, epoch: str) -> bytes:
        """The epoch's key, made (durably, before it is used) if it is new."""
        key = self._keys.get(epoch)
        if key is not None:
            return key
        check_epoch(epoch)
        with self._lock:
            if epoch in self._destroyed:
                raise KeystoreError(f"key epoch {epoch} was destroyed; it is not made again")
            if epoch not in self._keys:
                key = os.urandom(KEY_SIZE)
                self._write(f"epoch-{epoch}", key)
                self._keys[epoch] = key
            return self._keys[epoch]

    def destroy(self, epoch: str) -> bool:
        """Destroy an epoch's key: tombstone, overwrite, fsync, unlink, fsync the
        directory. False if it was already gone."""
        with self._lock:
            if epoch in self._destroyed:
                return False
            tombstones = self.directory / "destroyed"
            write_atomic(tombstones / epoch, b"", kind=KIND)
            self._destroyed.add(epoch)
            self._keys.pop(epoch, None)
            for path, name, _ in self._files():
                if name == f"epoch-{epoch}":
                    shred(path)
            fsync_dir(self.directory, kind=KIND)
            return True

    # --------------------------------------------------------------- rotation

    def rotate(self, new_master: bytes, on_step: Callable[[str], None] = lambda _: None) -> int:
        """Wrap every live key under ``new_master``, commit, destroy the old files.

        ``on_step`` is called after each durable step (the crash tests stop there).
        Returns how many epoch keys were re-wrapped.
        """
        new_kid = master_key_id(new_master)
        if new_kid == self.kid:
            raise KeystoreError("the new master key is the one already in use")
        with self._lock:
            old = [(p, name) for p, name, kid in self._files() if kid == self.kid]
            for epoch in sorted(self._keys):
                self._write(f"epoch-{epoch}", self._keys[epoch], new_master)
                on_step(f"wrapped epoch-{epoch}")
            self._write("idempotency", self.idempotency_key, new_master)
            on_step("wrapped idempotency")
            write_atomic(self.directory / "CURRENT", f"{new_kid}\n".encode(), kind=KIND)
            self._master, self.kid = new_master, new_kid
            on_step("committed")
            for path, name in old:
                shred(path)
                on_step(f"destroyed old {name}")
            fsync_dir(self.directory, kind=KIND)
            return len(self._keys)
