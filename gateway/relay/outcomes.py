"""Outcomes are never dropped: a delivery's outcome is written until the disk takes it.

Once an upstream has a record, the relay must record so (delivered, then erased), or
that it refused it for good (held). When the disk refuses the write (full, failing),
:class:`OutcomeWriter` keeps the outcome, counts the failure in
``gateway_relay_outcome_write_failures_total{destination,outcome}`` and writes it again
with backoff (the injected sleep) until it is taken; the worker holds the record
meanwhile, so nobody sends it again. Only an outcome still unwritten when the daemon
stops is lost: that record is delivered again, under the same ``Idempotency-Key``,
after the restart (logged as ``outcome_lost_at_stop``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from gateway.errors import StorageFailed
from gateway.ops.logs import get_logger
from gateway.ops.metrics import Metrics

OUTCOME_RETRY = 0.25
"""Seconds before an outcome the disk refused is written again; doubled each time."""
OUTCOME_RETRY_MAX = 5.0

log = get_logger("gateway.relay")


class OutcomeWriter:
    """Writes outcomes with backoff until the disk takes them."""

    def __init__(self, metrics: Metrics, sleep: Callable[[float], Awaitable[None]]) -> None:
        self._metrics = metrics
        self._sleep = sleep

    async def persist(
        self,
        destination: str,
        record_id: str,
        outcome: str,
        write: Callable[[], Awaitable[object]],
    ) -> None:
        """Run ``write`` until it succeeds; only a failed write of the disk (StorageFailed,
        OSError) is tried again, anything else is raised. Cancellation gives up."""
        wait = OUTCOME_RETRY
        failed = False
        try:
            while True:
                try:
                    await write()
                except (StorageFailed, OSError) as exc:
                    if not failed:
                        self._metrics.outcomes_unrecorded.inc()
                        failed = True
                    self._metrics.outcome_write_failures.labels(
                        destination=destination, outcome=outcome
                    ).inc()
                    log.error(
                        "outcome_unrecorded",
                        submission_id=record_id,
                        destination=destination,
                        outcome=outcome,
                        error=type(exc).__name__,
                        retry_in=wait,
                    )
                    await self._sleep(wait)
                    wait = min(wait * 2, OUTCOME_RETRY_MAX)
                    continue
                if failed:
                    log.info(
                        "outcome_recorded",
                        submission_id=record_id,
                        destination=destination,
                        outcome=outcome,
                    )
                return
        except asyncio.CancelledError:
            if failed:  # stopped before the disk took it: delivered again after a restart
                log.error(
                    "outcome_lost_at_stop",
                    submission_id=record_id,
                    destination=destination,
                    outcome=outcome,
                )
            raise
        finally:
            if failed:
                self._metrics.outcomes_unrecorded.dec()
