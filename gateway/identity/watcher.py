"""The daemon's view of the registries: snapshots, read again when a file changes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from gateway.identity.registry import (
    DeviceRegistry,
    RegistryError,
    UserRegistry,
    load_devices,
    load_users,
)


class Registries(Protocol):
    """What the ingress and the control socket use of the registries: the snapshots, and
    ``refresh`` to bring them up to date (returning why one could not be used). Kept by
    :class:`RegistryWatcher` from files, or by
    :class:`~gateway.identity.pgfollower.FollowedRegistries` from PostgreSQL."""

    devices: DeviceRegistry
    users: UserRegistry

    def refresh(self, *, force: bool = False) -> list[str]: ...


class RegistryWatcher:
    """Holds the current snapshots and re-reads a file when it is replaced or changed.

    ``refresh`` costs two ``stat`` calls and runs at most once per ``interval`` seconds
    of the injected clock, so revocation takes effect within that interval.
    """

    def __init__(
        self,
        devices_file: Path,
        users_file: Path,
        *,
        clock: Callable[[], float],
        interval: float = 0.5,
        on_error: Callable[[str], None] | None = None,
        validate_users: Callable[[UserRegistry], list[str]] | None = None,
    ) -> None:
        self._files = (devices_file, users_file)
        self._validate_users = validate_users
        self._clock = clock
        self._interval = interval
        self._on_error = on_error
        self._checked_at = float("-inf")
        # Stamped before reading, as refresh does: a file replaced in between is read
        # again at the next refresh rather than missed until its next change.
        self._stamps = tuple(self._stamp(p) for p in self._files)
        self.devices = load_devices(devices_file)
        self.users = load_users(users_file)

    @staticmethod
    def _stamp(path: Path) -> tuple[int, ...] | None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        # The inode and ctime too: an atomic replace by a file of the same size within
        # the file system's mtime granularity (or with its mtime restored) still counts.
        return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)

    def refresh(self, *, force: bool = False) -> list[str]:
        """Read a registry file again if it changed (or ``force``); returns why a file
        could not be used (its last good snapshot is kept), empty when all went well.

        Each file on its own: a users file that cannot be used never holds back a device
        revocation."""
        now = self._clock()
        if not force and now - self._checked_at < self._interval:
            return []
        self._checked_at = now
        stamps = tuple(self._stamp(p) for p in self._files)
        if stamps == self._stamps and not force:
            return []
        devices_stamp, users_stamp = self._stamps
        problems: list[str] = []
        try:
            self.devices = load_devices(self._files[0])
            devices_stamp = stamps[0]
        except RegistryError as exc:
            # Keep the last good snapshot; a half-edited file must not open the door.
            problems.append(str(exc))
        try:
            users = load_users(self._files[1])
            invalid = self._validate_users(users) if self._validate_users else []
            if invalid:
                raise RegistryError("; ".join(invalid))
            self.users, users_stamp = users, stamps[1]
        except RegistryError as exc:
            problems.append(str(exc))
        self._stamps = (devices_stamp, users_stamp)
        for problem in problems:
            if self._on_error:
                self._on_error(problem)
        return problems
