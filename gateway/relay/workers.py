"""Relay workers: deliver each spooled record to its destination, retrying by the relay's policy.

Each destination has a queue and ``concurrency`` workers sharing the destination's
:class:`~gateway.relay.sender.Sender` (by default one aiohttp session over mutual TLS;
tests inject a fake). Every attempt carries ``Idempotency-Key: <submission_id>``.
tenacity runs the retry loop with the waits of :mod:`gateway.relay.policy` (exponential
backoff with full jitter, at least what ``Retry-After`` asks); a circuit breaker per
destination holds attempts back from a failing upstream; an answer the policy does not
retry puts the record on ``held`` for an operator. A worker that fails outside a
record's handling is logged, counted and restarted. The sleep and the clock are
injected, so tests retry without waiting. No outcome is dropped (:mod:`.outcomes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_never

from gateway.config import DestinationConfig, GatewayConfig
from gateway.errors import RecordCorrupt, RelayError, SpoolError, StorageFailed
from gateway.ops.logs import get_logger
from gateway.ops.metrics import Metrics
from gateway.relay import policy
from gateway.relay.breaker import CircuitBreaker
from gateway.relay.budget import MemoryBudget
from gateway.relay.destinations import (
    DestinationParts,
    RelayPlan,
    SenderLeases,
    build_parts,
    export_key_expiry,
    new_breaker,
    plan_reload,
)
from gateway.relay.outcomes import OutcomeWriter
from gateway.relay.queue import UniqueQueue
from gateway.relay.sender import Outgoing, Sender, SenderFactory, SendFailed, aiohttp_sender
from gateway.spool.backend import SpoolBackend as Spool
from gateway.spool.records import DELIVERING, Record, State

Sleep = Callable[[float], Awaitable[None]]
WORKER_RESTART = 1.0
"""Seconds before a failed worker is started again; doubled after each failure."""
WORKER_RESTART_MAX = 60.0

log = get_logger("gateway.relay")


@dataclass
class DestinationRelay:
    """One destination's parts, queue and workers.

    Workers read ``parts`` at each attempt, so a reload that replaces them takes effect
    from the next attempt on.
    """

    name: str
    parts: DestinationParts
    queue: UniqueQueue  # ids loaded at start-up or found by a rescan, records as accepted
    tasks: list[asyncio.Task[None]]
    breaker: CircuitBreaker

    @property
    def config(self) -> DestinationConfig:
        return self.parts.config


class Relay:
    """Owns the relay workers; :meth:`enqueue` is called after a record is committed."""

    def __init__(
        self,
        config: GatewayConfig,
        spool: Spool,
        metrics: Metrics,
        *,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.time,
        sender_factory: SenderFactory = aiohttp_sender,
    ) -> None:
        self._config = config
        self._spool = spool
        self._metrics = metrics
        self._sleep = sleep
        self._clock = clock
        self._sender_factory = sender_factory
        self._destinations: dict[str, DestinationRelay] = {}
        self.on_delivered: Callable[[Record], Awaitable[None]] | None = None
        """Called once a record is marked delivered (erase-on-delivery hooks in here)."""
        self._busy: set[asyncio.Task[Any]] = set()  # workers inside an attempt, not a sleep
        self._stopping = False
        self._drained = asyncio.Event()  # set once stopping and no attempt is under way
        self._senders = SenderLeases()
        self._outcomes = OutcomeWriter(metrics, sleep)
        self._memory = MemoryBudget()  # sealed bodies in memory, all destinations

    async def start(self) -> None:
        for name, dest in self._config.destinations.items():
            await self._add_destination(name, await build_parts(name, dest, self._sender_factory))

    async def _add_destination(self, name: str, parts: DestinationParts) -> None:
        relay = DestinationRelay(name, parts, UniqueQueue(), [], new_breaker(parts.config))
        export_key_expiry(self._metrics, name, parts.sealer)
        self._destinations[name] = relay
        for record_id in await self._spool.queued_ids(name):
            relay.queue.offer(record_id)
        self._resize(relay, parts.config.concurrency)

    def _resize(self, relay: DestinationRelay, workers: int) -> None:
        """Start workers up to ``workers``; extra ones end after their current delivery."""
        relay.tasks = [t for t in relay.tasks if not t.done()]
        while len(relay.tasks) < workers:
            index = len(relay.tasks)
            relay.tasks.append(
                asyncio.create_task(self._supervised(relay), name=f"relay-{relay.name}-{index}")
            )

    # ------------------------------------------------------------------ reload

    async def prepare(self, config: GatewayConfig) -> RelayPlan:
        """Build what ``config`` changes, without touching the running relay.

        Raises GatewayError (or OSError, ssl.SSLError, ValueError) when a destination
        cannot be built, or when a removed destination still has records waiting.
        """
        return await plan_reload(self._destinations, config, self._spool, self._sender_factory)

    async def apply(self, plan: RelayPlan) -> None:
        """Swap a prepared plan in. The swap itself does not yield to the event loop;
        the old senders close once the attempts still using them are done."""
        retired: list[Sender] = []
        added: list[tuple[str, DestinationParts]] = []
        for name, parts in plan.build.items():
            relay = self._destinations.get(name)
            if relay is None:
                added.append((name, parts))
                continue
            retired.append(relay.parts.sender)
            if relay.config.retry != parts.config.retry:
                relay.breaker = new_breaker(parts.config)
            relay.parts = parts
            export_key_expiry(self._metrics, name, parts.sealer)
            self._resize(relay, parts.config.concurrency)
        gone = [self._destinations.pop(name) for name in plan.remove]
        self._config = plan.config
        for name, parts in added:
            await self._add_destination(name, parts)
        for relay in gone:
            export_key_expiry(self._metrics, relay.name, None)
            for task in relay.tasks:
                task.cancel()
            retired.append(relay.parts.sender)
        for sender in retired:
            self._senders.retire(sender)

    async def stop(self, *, drain_timeout: float = 10.0) -> None:
        """Let attempts under way finish and record their outcome (within
        ``drain_timeout``), then stop every worker; backoff sleeps end at once."""
        self._stopping = True
        tasks = [t for relay in self._destinations.values() for t in relay.tasks]
        for task in tasks:
            if task not in self._busy:
                task.cancel()
        if self._busy:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain_timeout):
                    await self._drained.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._senders.close(r.parts.sender for r in self._destinations.values())
        self._destinations.clear()

    def enqueue(self, record: Record) -> None:
        relay = self._destinations.get(record.destination)
        if relay is not None:
            relay.queue.offer(record)

    def queues(self) -> dict[str, UniqueQueue]:
        return {name: relay.queue for name, relay in self._destinations.items()}

    # ----------------------------------------------------------------- workers

    async def _supervised(self, relay: DestinationRelay) -> None:
        """A worker, started again after a backoff whenever it fails outside a record's
        handling (logged by name and exception type, counted in task_failures)."""
        task = asyncio.current_task()
        assert task is not None
        backoff = WORKER_RESTART
        while True:
            try:
                await self._worker(relay)
                return
            except Exception as exc:
                self._not_busy(task)  # never left holding up a drain
                log.error(
                    "task_failed",
                    task=task.get_name(),
                    destination=relay.name,  # a safe key: shown even where task is redacted
                    error=type(exc).__name__,
                )
                self._metrics.task_failures.labels(task=f"relay-{relay.name}").inc()
            if self._stopping:
                return
            log.info(
                "task_restarting", task=task.get_name(), destination=relay.name, retry_in=backoff
            )
            await self._sleep(backoff)
            backoff = min(backoff * 2, WORKER_RESTART_MAX)

    async def _worker(self, relay: DestinationRelay) -> None:
        while not self._stopping:
            if self._surplus(relay):
                return
            item = await relay.queue.get()
            record_id = item.id if isinstance(item, Record) else item
            try:
                claimed = await self._spool.claim(record_id)
            except BaseException:
                relay.queue.offer(item)  # not lost: taken again after the restart
                raise
            if not claimed:
                continue
            try:
                record = item if isinstance(item, Record) else await self._spool.get(item)
                if record is None or record.state not in (State.QUEUED, DELIVERING):
                    continue
                self._metrics.relay_in_flight.labels(destination=relay.name).inc()
                task = asyncio.current_task()
                assert task is not None
                self._busy.add(task)
                try:
                    await self._deliver(relay, record)
                finally:
                    self._not_busy(task)
                    self._metrics.relay_in_flight.labels(destination=relay.name).dec()
            except SpoolError as exc:
                # Erased or unreadable meanwhile: nothing left to deliver.
                log.warning(
                    "skipped",
                    submission_id=record_id,
                    destination=relay.name,
                    error=type(exc).__name__,
                )
            except Exception as exc:
                # A bug, not a retry: hold the record for an operator rather than leave a
                # queued row that no worker will pick up again until a restart.
                log.error(
                    "relay_failed",
                    submission_id=record_id,
                    destination=relay.name,
                    error=type(exc).__name__,
                )
                with contextlib.suppress(Exception):
                    await self._spool.mark_held(
                        record_id, at=self._clock(), reason=f"relay error: {type(exc).__name__}"
                    )
            finally:
                await self._spool.release(record_id)

    @staticmethod
    def _surplus(relay: DestinationRelay) -> bool:
        """True (and off the list) when this worker is beyond the configured concurrency."""
        task = asyncio.current_task()
        if len(relay.tasks) > relay.config.concurrency and task in relay.tasks:
            relay.tasks.remove(task)
            return True
        return False

    def _not_busy(self, task: asyncio.Task[Any]) -> None:
        self._busy.discard(task)
        if self._stopping and not self._busy:
            self._drained.set()

    async def _backoff(self, seconds: float) -> None:
        """The injected sleep, during which this worker does not hold up a drain."""
        task = asyncio.current_task()
        assert task is not None
        self._not_busy(task)
        try:
            await self._sleep(seconds)
        finally:
            if self._stopping:
                raise asyncio.CancelledError  # no new attempt once the drain began
            self._busy.add(task)

    async def _deliver(self, relay: DestinationRelay, record: Record) -> None:
        retry = relay.config.retry  # as configured when this record's delivery began

        def wait(state: RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            asked = error.retry_after if isinstance(error, RelayError) else None
            return policy.retry_wait(state.attempt_number, asked, retry)

        retrying = AsyncRetrying(
            sleep=self._backoff,
            stop=stop_never,
            wait=wait,
            retry=retry_if_exception(lambda e: isinstance(e, RelayError) and e.retryable),
            before_sleep=functools.partial(self._before_sleep, relay, record),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    receipt = await self._attempt(relay, record)
        except (RelayError, RecordCorrupt) as exc:
            relayed = isinstance(exc, RelayError)
            reason = exc.reason if isinstance(exc, RelayError) else "record corrupt"
            at = self._clock()
            await self._outcomes.persist(
                relay.name,
                record.id,
                "held",
                lambda: self._spool.mark_held(record.id, at=at, reason=reason),
            )
            (log.warning if relayed else log.error)(
                "held",
                submission_id=record.id,
                destination=relay.name,
                channel=record.channel,
                status=exc.status if isinstance(exc, RelayError) else None,
                reason=reason,
            )
            return
        at = self._clock()
        await self._outcomes.persist(
            relay.name,
            record.id,
            "delivered",
            lambda: self._spool.mark_delivered(record.id, at=at, receipt=receipt),
        )
        self._metrics.deliveries.labels(channel=record.channel).inc()
        log.info(
            "delivered",
            submission_id=record.id,
            destination=relay.name,
            channel=record.channel,
            receipt=receipt,
        )
        on_delivered = self.on_delivered
        if on_delivered is not None:
            await self._outcomes.persist(
                relay.name, record.id, "erased", lambda: on_delivered(record)
            )

    async def _before_sleep(
        self, relay: DestinationRelay, record: Record, state: RetryCallState
    ) -> None:
        error = state.outcome.exception() if state.outcome else None
        reason = error.reason if isinstance(error, RelayError) else type(error).__name__
        if not isinstance(error, policy.CircuitOpen):  # held back, not an attempt
            self._metrics.relay_retries.labels(destination=relay.name).inc()
            try:
                await self._spool.note_failed_attempt(record.id, reason)
            except (StorageFailed, OSError) as exc:  # a note, not an outcome: retry anyway
                log.warning("attempt_unrecorded", submission_id=record.id, error=type(exc).__name__)
        log.info(
            "retry",
            submission_id=record.id,
            destination=relay.name,
            attempt=state.attempt_number,
            reason=reason,
            retry_in=round(state.upcoming_sleep, 3),
        )

    async def _attempt(self, relay: DestinationRelay, record: Record) -> str | None:
        wait = relay.breaker.wait_before(self._clock())
        if wait is not None:
            raise policy.circuit_open(wait)
        try:
            async with self._memory.hold(relay.parts.memory_for(record)):
                receipt = await self._send(relay, record)
        except RelayError as exc:
            if exc.local:
                relay.breaker.abandon_probe()  # says nothing about the upstream
            elif exc.retryable:
                was_open = relay.breaker.is_open
                relay.breaker.record_failure(self._clock())
                if relay.breaker.is_open and not was_open:
                    log.warning("circuit_open", destination=relay.name, reason=exc.reason)
            else:
                relay.breaker.record_success()  # the upstream answered: it is alive
            self._metrics.relay_circuit_open.labels(destination=relay.name).set(
                relay.breaker.is_open
            )
            raise
        except BaseException:
            relay.breaker.abandon_probe()
            raise
        if relay.breaker.is_open:
            log.info("circuit_closed", destination=relay.name)
        relay.breaker.record_success()
        self._metrics.relay_circuit_open.labels(destination=relay.name).set(0)
        return receipt

    async def _send(self, relay: DestinationRelay, record: Record) -> str | None:
        """One attempt through the destination's sender; RelayError unless delivered."""
        parts = relay.parts
        headers = {"Idempotency-Key": record.id, "Gateway-Channel": record.channel}
        if parts.authorization:
            headers["Authorization"] = parts.authorization
        chunks = await self._spool.open_plaintext(record)
        try:
            body = await parts.body(record, chunks, self._clock)
        except RelayError:  # sealing could not read the record: no attempt was made
            self._metrics.relay_attempts.labels(
                destination=relay.name, outcome="record_unreadable"
            ).inc()
            raise
        started = time.perf_counter()
        outcome = "error"
        try:
            with self._senders.lease(parts.sender) as sender:
                try:
                    answer = await sender.send(Outgoing(parts.config.url, headers, body))
                except Exception as exc:
                    if body.unreadable:  # the record's fault, whatever the sender made of it
                        outcome = "record_unreadable"
                        raise policy.record_unreadable(body.unreadable) from None
                    if not isinstance(exc, SendFailed):
                        raise
                    outcome = "connection_error"
                    raise policy.connection_failed(exc.error) from None
            outcome = policy.outcome_label(answer.status)
            if policy.classify(answer.status) is not policy.Verdict.DELIVERED:
                raise policy.refused(answer.status, answer.retry_after, self._clock())
            return policy.checked_receipt(answer.receipt)
        finally:
            self._metrics.relay_attempts.labels(destination=relay.name, outcome=outcome).inc()
            self._metrics.relay_duration.labels(destination=relay.name).observe(
                time.perf_counter() - started
            )
