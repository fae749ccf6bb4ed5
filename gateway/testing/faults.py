"""A failing disk for tests: the hook of the file layer's fault seam.

:class:`DiskFaults` is installed with :func:`gateway.fsutil.set_fault_hook` (or as a
context manager) and sees every write the gateway makes to its state, as
``(kind, operation)``: record create, write, fsync and directory fsync, the index's
commit, the ledger's and the audit log's appends, each anchor's create, write, fsync,
rename and directory fsync. It counts them and, once armed, fails the Nth one (of all,
or of those of one kind and operation) with the ``OSError`` a full or failing disk
raises: once, ``times`` times, or every one until :meth:`clear` (a disk that stays full).
"""

from __future__ import annotations

import os
from types import TracebackType

from gateway import fsutil

Point = tuple[str, str]
"""(kind, operation), as :func:`gateway.fsutil.fault_point` names a write."""


class DiskFaults:
    """Counts the gateway's writes; fails the chosen ones once armed."""

    def __init__(self, *, ignore: frozenset[str] = frozenset()) -> None:
        self.ignore = ignore
        """Kinds of file whose writes pass uncounted and never fail (a background
        writer whose timing would make the path's numbering vary)."""
        self.step = ""
        """A label the test sets; each call is recorded with the step it happened in."""
        self.calls: list[tuple[str, str, str]] = []
        """(step, kind, operation) of every write since the last :meth:`arm`."""
        self.failed: list[tuple[str, str, str]] = []
        self._fail_at: int | None = None
        self._errno = 0
        self._times: int | None = None
        self._only: Point | None = None
        self._matched = 0
        self._previous: fsutil.FaultHook | None = None

    def __call__(self, kind: str, operation: str) -> None:
        if kind in self.ignore:
            return
        self.calls.append((self.step, kind, operation))
        if self._fail_at is None or (self._only is not None and self._only != (kind, operation)):
            return
        self._matched += 1
        if self._matched < self._fail_at:
            return
        if self._times is not None and len(self.failed) >= self._times:
            return
        self.failed.append((self.step, kind, operation))
        raise OSError(self._errno, os.strerror(self._errno))

    def arm(self, n: int, code: int, *, times: int | None = 1, only: Point | None = None) -> None:
        """Fail the ``n``-th write from now (of ``only``'s kind and operation, if given)
        with ``code``, and the ``times - 1`` after it; ``times=None``: every one from
        then on until :meth:`clear`."""
        if n < 1:
            raise ValueError("n counts from 1")
        self.calls.clear()
        self.failed.clear()
        self._fail_at, self._errno, self._times, self._only = n, code, times, only
        self._matched = 0

    def clear(self) -> None:
        """The disk works again."""
        self._fail_at = None

    @property
    def active(self) -> bool:
        """True while the next matching write would fail."""
        if self._fail_at is None or self._matched < self._fail_at:
            return False
        return self._times is None or len(self.failed) < self._times

    def __enter__(self) -> DiskFaults:
        self._previous = fsutil.set_fault_hook(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        fsutil.set_fault_hook(self._previous)
