"""Durable file writes, in one place: a file is either the old one or the new one.

Every file the gateway writes whole (keys, certificates, registries, manifests) goes
through :func:`write_atomic`: a temporary file created with its final mode, written,
fsynced, renamed over the target (or linked, when an existing file must never be
replaced), and the directory fsynced so the rename itself survives a power cut.

Every write the gateway makes to its state (a record file's create, write and fsync, a
rename, a directory fsync, an append to the audit log or the erasure ledger, the spool
index's commit) also passes one seam, :func:`fault_point`, naming the kind of file and
the operation. It does nothing in production; a fault-injection test installs a hook
with :func:`set_fault_hook` that raises the ``OSError`` a full or failing disk would
(cf. SQLite's I/O-error tests), so every write path is tried against ENOSPC and EIO
without mocking the gateway's logic.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from gateway.errors import SpoolError

FaultHook = Callable[[str, str], None]
"""Called as ``hook(kind, operation)`` before a write; raises OSError to fail it."""

_fault_hook: FaultHook | None = None


def set_fault_hook(hook: FaultHook | None) -> FaultHook | None:
    """Install the fault-injection hook (None removes it); returns the previous one."""
    global _fault_hook
    previous, _fault_hook = _fault_hook, hook
    return previous


def fault_point(kind: str, operation: str) -> None:
    """The seam every state write passes (kind: record, index, ledger, audit, ...;
    operation: create, write, fsync, rename, fsync-dir, commit)."""
    hook = _fault_hook
    if hook is not None:
        hook(kind, operation)


def create(path: Path, flags: int, mode: int, *, kind: str) -> int:
    """``os.open`` with O_CREAT, through the seam."""
    fault_point(kind, "create")
    return os.open(path, flags | os.O_CREAT, mode)


def write_all(fd: int, data: bytes | bytearray | memoryview, *, kind: str) -> None:
    """Write every byte of ``data`` to ``fd``, through the seam."""
    view = memoryview(data)
    while view:
        fault_point(kind, "write")
        view = view[os.write(fd, view) :]


def write_some(fd: int, data: bytes | bytearray | memoryview, *, kind: str) -> int:
    """One ``os.write``, through the seam (a file object's ``write``)."""
    fault_point(kind, "write")
    return os.write(fd, data)


def fsync(fd: int, *, kind: str) -> None:
    fault_point(kind, "fsync")
    os.fsync(fd)


def fsync_dir(path: Path, *, kind: str = "directory") -> None:
    """Make the directory's entries (creates, renames, unlinks) durable."""
    fault_point(kind, "fsync-dir")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def own_like_parent(fd: int, path: Path) -> None:
    """When root writes into a directory owned by someone else (``gatewayctl`` run as
    root in the daemon's state directory), give the new file to that directory's owner,
    so the daemon can still read a registry or append to a log that root replaced."""
    if os.geteuid() != 0:
        return
    st = os.stat(path.parent)
    if st.st_uid != 0 or st.st_gid != 0:
        os.fchown(fd, st.st_uid, st.st_gid)


def write_atomic(
    path: Path, data: bytes, *, mode: int = 0o600, replace: bool = True, kind: str = "file"
) -> None:
    """Write ``data`` to ``path`` with ``mode`` whatever the umask; all or nothing.

    With ``replace=False`` an existing ``path`` is never touched: FileExistsError.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = create(tmp, flags, mode, kind=kind)
    try:
        try:
            os.fchmod(fd, mode)  # the umask must neither loosen nor tighten the mode
            own_like_parent(fd, path)
            write_all(fd, data, kind=kind)
            fsync(fd, kind=kind)
        finally:
            os.close(fd)
        fault_point(kind, "rename")
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if path exists, unlike a rename
    finally:
        tmp.unlink(missing_ok=True)  # gone after a rename; the spare name after a link
    fsync_dir(path.parent, kind=kind)


def lock_directory(directory: Path) -> int:
    """Lock a spool's (or a node's staging) directory for this process: another one's
    start-up would delete the files it is writing. Returns the descriptor holding the
    lock; SpoolError if another process holds it."""
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpoolError(f"{directory} is in use by another gateway process") from None
    return fd
