"""Relay workers: deliver spooled records to their destination over mutual TLS.

Each destination has a queue and ``concurrency`` workers sharing one aiohttp session
whose connector verifies the upstream's CA and hostname (and SPKI pin when configured),
presents the destination's own client certificate, and binds the destination's source
address when it has one. Every attempt carries
``Idempotency-Key: <submission_id>``. tenacity retries 408, 429, 5xx and connection
errors with exponential backoff and full jitter, waiting at least what ``Retry-After``
asks; any other 4xx puts the record on ``held`` for an operator. The sleep and the
clock are injected, so tests retry without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import json
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.payload import Payload
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_never
from tenacity.wait import wait_random_exponential

from gateway.config import DestinationConfig, GatewayConfig
from gateway.crypto.keys import load_upstream_credential, resolve_secret_path
from gateway.crypto.pki import spki_sha256_b64
from gateway.crypto.sealed.keys import Recipient, SigningKey, load_recipient, load_signing_key
from gateway.crypto.sealed.seal import Sealed, Sealer
from gateway.crypto.tls import client_context, peer_cert_der
from gateway.errors import RecordCorrupt, RelayError, SpoolError
from gateway.identity.auth import basic_authorization
from gateway.ops.logs import get_logger
from gateway.ops.metrics import Metrics
from gateway.relay.breaker import CircuitBreaker
from gateway.spool.records import Record
from gateway.spool.store import Spool

Sleep = Callable[[float], Awaitable[None]]
RETRYABLE_STATUS = frozenset({408, 429})
MAX_RECEIPT_BYTES = 4096
RECEIPT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
"""An upstream receipt id is kept (logged, stored, shown) only when it looks like an id:
free text from an upstream could echo something personal."""
ROOT = Path("/")  # secret paths in a loaded configuration are already absolute

log = get_logger("gateway.relay")


class SpoolPayload(Payload):
    """A record's plaintext streamed from its encrypted file (or a sealed payload's
    parts), with a known length."""

    def __init__(self, chunks: Iterator[bytes | memoryview], size: int, content_type: str) -> None:
        super().__init__(chunks, content_type=content_type)
        self._chunks = chunks
        self._size_hint = size
        self.unreadable: str | None = None

    @property
    def size(self) -> int:
        return self._size_hint

    async def write(self, writer: Any) -> None:
        # aiohttp turns anything raised here into a retryable connection error; a record
        # that cannot be read is no network problem, so remember why for the caller.
        try:
            for chunk in self._chunks:
                await writer.write(chunk)
        except (RecordCorrupt, OSError) as exc:
            if isinstance(exc, RecordCorrupt) or not isinstance(exc, ConnectionError):
                self.unreadable = type(exc).__name__
            raise

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a spooled record is not decoded as text")


class CircuitOpen(RelayError):
    """Not sent: the destination's circuit breaker is open."""


class SpkiPinMismatch(aiohttp.ClientConnectionError):
    """The upstream's certificate key is not among the destination's SPKI pins."""


class PinningConnector(aiohttp.TCPConnector):
    """Refuses an upstream whose certificate's SPKI hash is not pinned (when pins are set)."""

    def __init__(self, *, pins: frozenset[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pins = pins

    async def _create_direct_connection(self, *args: Any, **kwargs: Any) -> Any:
        transport, proto = await super()._create_direct_connection(*args, **kwargs)
        if self._pins:
            der = peer_cert_der(transport.get_extra_info("ssl_object"))
            if der is None or spki_sha256_b64(der) not in self._pins:
                transport.close()
                raise SpkiPinMismatch("upstream certificate does not match the SPKI pins")
        return transport, proto


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


@dataclass
class DestinationParts:
    """What a destination's configuration builds: made before anything is swapped in, so
    a reload that cannot build one (a bad key, an unreadable credential) changes nothing."""

    config: DestinationConfig
    session: aiohttp.ClientSession
    authorization: str | None = field(repr=False)  # the upstream's Basic credential
    sealer: Sealer | None = None
    """Seals each payload for the recipient when the destination has payload encryption."""


@dataclass
class DestinationRelay:
    """One destination's parts, queue and workers.

    Workers read ``parts`` at each attempt, so a reload that replaces them takes effect
    from the next attempt on.
    """

    name: str
    parts: DestinationParts
    queue: asyncio.Queue[str | Record]  # ids loaded at start-up, records as accepted
    tasks: list[asyncio.Task[None]]
    breaker: CircuitBreaker

    @property
    def config(self) -> DestinationConfig:
        return self.parts.config

    @property
    def session(self) -> aiohttp.ClientSession:
        return self.parts.session


def _breaker(dest: DestinationConfig) -> CircuitBreaker:
    return CircuitBreaker(dest.retry.circuit_threshold, dest.retry.circuit_cooldown)


@dataclass
class RelayPlan:
    """A prepared reload of the relay: applied whole by :meth:`Relay.apply`."""

    config: GatewayConfig
    build: dict[str, DestinationParts]
    """Every configured destination, rebuilt (its files read again)."""
    remove: tuple[str, ...]


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
    ) -> None:
        self._config = config
        self._spool = spool
        self._metrics = metrics
        self._sleep = sleep
        self._clock = clock
        self._destinations: dict[str, DestinationRelay] = {}
        self.on_delivered: Callable[[Record], Awaitable[None]] | None = None
        """Called once a record is marked delivered (erase-on-delivery hooks in here)."""
        self._busy: set[asyncio.Task[Any]] = set()  # workers inside an attempt, not a sleep
        self._stopping = False
        self._drained = asyncio.Event()  # set once stopping and no attempt is under way
        self._sessions_in_use: dict[aiohttp.ClientSession, int] = {}
        self._retired: set[aiohttp.ClientSession] = set()
        self._closing: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        for name, dest in self._config.destinations.items():
            await self._add_destination(name, self._parts(dest))

    async def _add_destination(self, name: str, parts: DestinationParts) -> None:
        relay = DestinationRelay(name, parts, asyncio.Queue(), [], _breaker(parts.config))
        self._export_key_expiry(name, parts.sealer)
        self._destinations[name] = relay
        for record_id in await self._spool.queued_ids(name):
            relay.queue.put_nowait(record_id)
        self._resize(relay, parts.config.concurrency)

    def _resize(self, relay: DestinationRelay, workers: int) -> None:
        """Start workers up to ``workers``; extra ones end after their current delivery."""
        relay.tasks = [t for t in relay.tasks if not t.done()]
        while len(relay.tasks) < workers:
            index = len(relay.tasks)
            relay.tasks.append(
                asyncio.create_task(self._worker(relay), name=f"relay-{relay.name}-{index}")
            )

    def _parts(self, dest: DestinationConfig) -> DestinationParts:
        sealer = payload_sealer(dest)  # first: it may refuse a key, and owns nothing
        return DestinationParts(dest, self._session(dest), self._authorization(dest), sealer)

    def _export_key_expiry(self, name: str, sealer: Sealer | None) -> None:
        gauge = self._metrics.payload_key_expiry
        for key in ("recipient", "signing"):
            with contextlib.suppress(KeyError):
                gauge.remove(name, key)
        if sealer is None:
            return
        gauge.labels(destination=name, key="recipient").set(sealer.recipient.not_after.timestamp())
        signing_until = sealer.signing_key.not_after
        if signing_until is not None:
            gauge.labels(destination=name, key="signing").set(signing_until.timestamp())

    # ------------------------------------------------------------------ reload

    async def prepare(self, config: GatewayConfig) -> RelayPlan:
        """Build what ``config`` changes, without touching the running relay.

        Raises GatewayError (or OSError, ssl.SSLError, ValueError) when a destination
        cannot be built, or when a removed destination still has records waiting.
        """
        remove = tuple(n for n in self._destinations if n not in config.destinations)
        for name in remove:
            waiting = await self._spool.queued_ids(name)
            if waiting:
                raise RelayError(
                    f"destinations.{name}: removed while {len(waiting)} record(s) wait for it",
                    retryable=False,
                )
        # Every destination is rebuilt, changed or not: a rotated client certificate or
        # credential usually keeps its path, and a reload is when it is read again.
        build: dict[str, DestinationParts] = {}
        try:
            for name, dest in config.destinations.items():
                build[name] = self._parts(dest)
        except BaseException:
            await asyncio.gather(*(p.session.close() for p in build.values()))
            raise
        return RelayPlan(config, build, remove)

    async def apply(self, plan: RelayPlan) -> None:
        """Swap a prepared plan in. The swap itself does not yield to the event loop;
        the old sessions close once the attempts still using them are done."""
        retired: list[aiohttp.ClientSession] = []
        added: list[tuple[str, DestinationParts]] = []
        for name, parts in plan.build.items():
            relay = self._destinations.get(name)
            if relay is None:
                added.append((name, parts))
                continue
            retired.append(relay.session)
            if relay.config.retry != parts.config.retry:
                relay.breaker = _breaker(parts.config)
            relay.parts = parts
            self._export_key_expiry(name, parts.sealer)
            self._resize(relay, parts.config.concurrency)
        gone = [self._destinations.pop(name) for name in plan.remove]
        self._config = plan.config
        for name, parts in added:
            await self._add_destination(name, parts)
        for relay in gone:
            self._export_key_expiry(relay.name, None)
            for task in relay.tasks:
                task.cancel()
            retired.append(relay.session)
        for session in retired:
            self._retire(session)

    def _retire(self, session: aiohttp.ClientSession) -> None:
        if self._sessions_in_use.get(session, 0) == 0:
            self._close_later(session)
        else:
            self._retired.add(session)  # closed by the last attempt using it

    def _close_later(self, session: aiohttp.ClientSession) -> None:
        task = asyncio.get_running_loop().create_task(session.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

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
        for relay in self._destinations.values():
            await relay.session.close()
        for session in self._retired:
            await session.close()
        await asyncio.gather(*self._closing, return_exceptions=True)
        self._destinations.clear()

    def enqueue(self, record: Record) -> None:
        relay = self._destinations.get(record.destination)
        if relay is not None:
            relay.queue.put_nowait(record)

    # ------------------------------------------------------------------ set-up

    def _session(self, dest: DestinationConfig) -> aiohttp.ClientSession:
        context = client_context(
            ca=dest.ca,
            cert=dest.client_certificate,
            key=resolve_secret_path(dest.client_key, ROOT),
            profile=dest.tls_profile,
        )
        connector = PinningConnector(
            pins=frozenset(dest.spki_pins),
            ssl=context,
            limit=dest.concurrency,
            enable_cleanup_closed=False,
            # Out by the network this upstream is on, when the host sits on several.
            local_addr=(dest.source_address, 0) if dest.source_address else None,
        )
        timeout = aiohttp.ClientTimeout(
            total=dest.request_timeout, sock_connect=dest.connect_timeout
        )
        return aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False, raise_for_status=False
        )

    def _authorization(self, dest: DestinationConfig) -> str | None:
        if dest.credential is None:
            return None
        return basic_authorization(
            *load_upstream_credential(resolve_secret_path(dest.credential, ROOT))
        )

    async def _seal(
        self, destination: str, sealer: Sealer, record: Record, chunks: Iterator[bytes]
    ) -> Sealed:
        """Read the whole record and seal it for the recipient, off the event loop.

        A fresh seal per attempt (a new HPKE ephemeral key each time): the upstream
        deduplicates by Idempotency-Key, not by bytes.
        """

        def seal() -> Sealed:
            plaintext = b"".join(chunks)
            return sealer.seal(
                plaintext,
                channel=record.channel,
                submission_id=record.id,
                destination=destination,
                content_type=record.content_type,
                created=self._clock(),
            )

        try:
            return await asyncio.to_thread(seal)
        except (RecordCorrupt, OSError) as exc:
            self._metrics.relay_attempts.labels(
                destination=destination, outcome="record_unreadable"
            ).inc()
            raise RelayError(
                f"record unreadable: {type(exc).__name__}", retryable=False, local=True
            ) from None

    def _release_session(self, session: aiohttp.ClientSession) -> None:
        left = self._sessions_in_use[session] - 1
        if left:
            self._sessions_in_use[session] = left
            return
        del self._sessions_in_use[session]
        if session in self._retired:
            self._retired.discard(session)
            self._close_later(session)

    # ----------------------------------------------------------------- workers

    async def _worker(self, relay: DestinationRelay) -> None:
        while not self._stopping:
            if self._surplus(relay):
                return
            item = await relay.queue.get()
            record_id = item.id if isinstance(item, Record) else item
            if not self._spool.claim(record_id):
                continue
            try:
                record = item if isinstance(item, Record) else await self._spool.get(item)
                if record is None or record.state not in ("queued", "delivering"):
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
                self._spool.release(record_id)

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

    def _wait(self, dest: DestinationConfig) -> Callable[[RetryCallState], float]:
        jitter = wait_random_exponential(
            multiplier=dest.retry.initial_backoff, max=dest.retry.max_backoff
        )

        def wait(state: RetryCallState) -> float:
            backoff = float(jitter(state))
            error = state.outcome.exception() if state.outcome else None
            asked = error.retry_after if isinstance(error, RelayError) else None
            if asked is not None:
                return max(backoff, min(asked, dest.retry.max_retry_after))
            return backoff

        return wait

    async def _deliver(self, relay: DestinationRelay, record: Record) -> None:
        retrying = AsyncRetrying(
            sleep=self._backoff,
            stop=stop_never,
            wait=self._wait(relay.config),
            retry=retry_if_exception(lambda e: isinstance(e, RelayError) and e.retryable),
            before_sleep=functools.partial(self._before_sleep, relay, record),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    receipt = await self._attempt(relay, record)
        except RelayError as exc:
            await self._spool.mark_held(record.id, at=self._clock(), reason=exc.reason)
            log.warning(
                "held",
                submission_id=record.id,
                destination=relay.name,
                channel=record.channel,
                status=exc.status,
                reason=exc.reason,
            )
            return
        except RecordCorrupt:
            await self._spool.mark_held(record.id, at=self._clock(), reason="record corrupt")
            log.error(
                "held",
                submission_id=record.id,
                destination=relay.name,
                channel=record.channel,
                reason="record corrupt",
            )
            return
        await self._spool.mark_delivered(record.id, at=self._clock(), receipt=receipt)
        self._metrics.deliveries.labels(channel=record.channel).inc()
        log.info(
            "delivered",
            submission_id=record.id,
            destination=relay.name,
            channel=record.channel,
            receipt=receipt,
        )
        if self.on_delivered is not None:
            await self.on_delivered(record)

    async def _before_sleep(
        self, relay: DestinationRelay, record: Record, state: RetryCallState
    ) -> None:
        error = state.outcome.exception() if state.outcome else None
        reason = error.reason if isinstance(error, RelayError) else type(error).__name__
        if not isinstance(error, CircuitOpen):  # held back, not an attempt
            self._metrics.relay_retries.labels(destination=relay.name).inc()
            await self._spool.note_failed_attempt(record.id, reason)
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
            raise CircuitOpen("circuit open: upstream failing", retryable=True, retry_after=wait)
        try:
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
        headers = {
            "Idempotency-Key": record.id,
            "Gateway-Channel": record.channel,
        }
        if relay.parts.authorization:
            headers["Authorization"] = relay.parts.authorization
        chunks = await self._spool.open_plaintext(record)
        sealer = relay.parts.sealer
        if sealer is None:
            payload = SpoolPayload(chunks, record.plaintext_size, record.content_type)
        else:  # its parts as they are: the ciphertext is not copied once more to join them
            sealed = await self._seal(relay.name, sealer, record, chunks)
            payload = SpoolPayload(iter(sealed.parts), sealed.size, sealed.media_type)
        started = time.perf_counter()
        outcome = "error"
        session = relay.session
        self._sessions_in_use[session] = self._sessions_in_use.get(session, 0) + 1
        try:
            async with session.post(
                relay.config.url, data=payload, headers=headers, allow_redirects=False
            ) as response:
                outcome = str(response.status)
                if 200 <= response.status < 300:
                    outcome = "delivered"
                    return await _upstream_receipt(response)
                retry_after = parse_retry_after(response.headers.get("Retry-After"), self._clock())
                retryable = response.status in RETRYABLE_STATUS or response.status >= 500
                raise RelayError(
                    f"upstream answered {response.status}",
                    retryable=retryable,
                    status=response.status,
                    retry_after=retry_after,
                )
        except (aiohttp.ClientError, ssl.SSLError, OSError, TimeoutError) as exc:
            if payload.unreadable:
                outcome = "record_unreadable"
                raise RelayError(
                    f"record unreadable: {payload.unreadable}", retryable=False, local=True
                ) from None
            outcome = "connection_error"
            raise RelayError(f"connection failed: {type(exc).__name__}", retryable=True) from None
        finally:
            self._release_session(session)
            self._metrics.relay_attempts.labels(destination=relay.name, outcome=outcome).inc()
            self._metrics.relay_duration.labels(destination=relay.name).observe(
                time.perf_counter() - started
            )


def payload_recipient(dest: DestinationConfig) -> Recipient:
    """The destination's recipient key, checked (kind, size, expiry); SealKeyError if not.
    Only for a destination with payload encryption."""
    assert dest.payload_encryption != "none" and dest.recipient_key is not None
    return load_recipient(
        dest.recipient_key,
        suite=dest.payload_encryption,
        kem=dest.payload_kem,
        not_after=dest.recipient_key_not_after,
    )


def payload_signing_key(dest: DestinationConfig) -> SigningKey:
    """The gateway's signing key for the destination, checked (algorithm, expiry, not
    readable by others); SealKeyError or SecretFileError if not."""
    assert dest.signing_key is not None
    return load_signing_key(
        resolve_secret_path(dest.signing_key, ROOT), not_after=dest.signing_key_not_after
    )


def payload_sealer(dest: DestinationConfig) -> Sealer | None:
    """The destination's sealer, its keys loaded and checked; None without encryption."""
    if dest.payload_encryption == "none":
        return None
    return Sealer(payload_recipient(dest), payload_signing_key(dest))


async def _upstream_receipt(response: aiohttp.ClientResponse) -> str | None:
    """The upstream's own receipt id, when it sends one as JSON ``receipt_id``."""
    try:
        raw = await response.content.read(MAX_RECEIPT_BYTES)
        doc = json.loads(raw)
    except (ValueError, aiohttp.ClientError):
        return None
    value = doc.get("receipt_id") if isinstance(doc, dict) else None
    if isinstance(value, str) and RECEIPT_ID.fullmatch(value):
        return value
    return None
