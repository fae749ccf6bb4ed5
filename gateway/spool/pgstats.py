"""The oldest undelivered record of a shared spool, as one node can know it between
reloads of its statistics (for ``gateway_spool_oldest_undelivered_age_seconds``).

At each reload the node reads the :data:`WINDOW` oldest undelivered records of the
whole spool; in between it adds its own new records and drops those it delivers or
erases. When the window runs empty while more records lay beyond it, the oldest is
reported as the newest of the window as loaded: a lower bound of the truth (the age is
over-reported, never hidden) until the next reload.
"""

from __future__ import annotations

WINDOW = 1000


class OldestUndelivered:
    """The oldest undelivered records by id (see the module's docstring)."""

    def __init__(self) -> None:
        self._known: dict[str, float] = {}
        self._beyond: float | None = None  # None: every undelivered record is known

    def load(self, rows: list[tuple[str, float]], limit: int = WINDOW) -> None:
        """The ``limit`` oldest (id, received_at), oldest first, as the database has them."""
        self._known = dict(rows)
        self._beyond = rows[-1][1] if len(rows) >= limit else None

    def add(self, record_id: str, received_at: float) -> None:
        if self._beyond is None or received_at <= self._beyond:
            self._known[record_id] = received_at

    def remove(self, record_id: str) -> None:
        self._known.pop(record_id, None)

    @property
    def oldest(self) -> float | None:
        if self._known:
            return min(self._known.values())
        return self._beyond
