"""The state changes every spool backend offers, written once: each is a move of
:meth:`_move` (a backend's one way to change a live record's state, checked against
the table of :mod:`gateway.spool.records`), with the columns its backend's SQL dialect
writes for the new state (:class:`MoveSql`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.errors import SpoolError
from gateway.spool.records import Record, State


@dataclass(frozen=True)
class MoveSql:
    """What each transition writes besides the state, in one backend's parameter style."""

    delivered: str
    held: str
    requeued: str


class StateMoves:
    """mark_delivered, mark_held and requeue for a backend that has ``_move`` and ``get``."""

    MOVES: MoveSql

    async def _move(
        self, record_id: str, to: State, assignments: str, params: tuple[Any, ...]
    ) -> bool:
        raise NotImplementedError

    async def get(self, record_id: str) -> Record | None:
        raise NotImplementedError

    async def mark_delivered(self, record_id: str, *, at: float, receipt: str | None) -> None:
        await self._move(record_id, State.DELIVERED, self.MOVES.delivered, (at, receipt))

    async def mark_held(self, record_id: str, *, at: float, reason: str) -> None:
        await self._move(record_id, State.HELD, self.MOVES.held, (at, reason))

    async def requeue(self, record_id: str) -> Record:
        """Put a held record back in the queue (an operator's decision); returns it.

        Raises SpoolError when there is no such live record or it is not held.
        """
        changed = await self._move(record_id, State.QUEUED, self.MOVES.requeued, ())
        record = await self.get(record_id)
        if not changed or record is None:
            state = "unknown" if record is None else record.state
            raise SpoolError(f"{record_id} is {state}; only a held record can be requeued")
        return record
