"""Durable file writes, in one place: a file is either the old one or the new one.

Every file the gateway writes whole (keys, certificates, registries, manifests) goes
through :func:`write_atomic`: a temporary file created with its final mode, written,
fsynced, renamed over the target (or linked, when an existing file must never be
replaced), and the directory fsynced so the rename itself survives a power cut.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (creates, renames, unlinks) durable."""
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


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600, replace: bool = True) -> None:
    """Write ``data`` to ``path`` with ``mode`` whatever the umask; all or nothing.

    With ``replace=False`` an existing ``path`` is never touched: FileExistsError.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(tmp, flags, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask must neither loosen nor tighten the mode
            own_like_parent(fd, path)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if path exists, unlike a rename
    finally:
        tmp.unlink(missing_ok=True)  # gone after a rename; the spare name after a link
    fsync_dir(path.parent)
