"""Building a destination's parts (sender, upstream credential, payload sealer) and the reload plan.

Everything a destination's configuration names is read here: the files are read again
at each reload (a rotated certificate or credential usually keeps its path), and a
plan is built whole before the relay swaps anything in, so a reload that cannot build
one destination changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from gateway.config import DestinationConfig, GatewayConfig
from gateway.crypto.keys import load_upstream_credential, resolve_secret_path
from gateway.crypto.sealed.keys import Recipient, SigningKey, load_recipient, load_signing_key
from gateway.crypto.sealed.seal import Sealed, Sealer
from gateway.errors import RecordCorrupt, RelayError
from gateway.identity.auth import basic_authorization
from gateway.ops.metrics import Metrics
from gateway.relay import policy
from gateway.relay.breaker import CircuitBreaker
from gateway.relay.sender import ROOT, Body, Sender, SenderFactory
from gateway.spool.backend import SpoolBackend as Spool
from gateway.spool.records import Record


@dataclass
class DestinationParts:
    """What a destination's configuration builds: made before anything is swapped in, so
    a reload that cannot build one (a bad key, an unreadable credential) changes nothing."""

    name: str
    config: DestinationConfig
    sender: Sender
    authorization: str | None = field(repr=False)  # the upstream's Basic credential
    sealer: Sealer | None = None
    """Seals each payload for the recipient when the destination has payload encryption."""

    def memory_for(self, record: Record) -> int:
        """What an attempt's body holds in memory: a sealed one is built whole (the
        plaintext, then about as much ciphertext); a plain one is streamed."""
        return 2 * record.plaintext_size if self.sealer is not None else 0

    async def body(
        self, record: Record, chunks: Iterator[bytes], clock: Callable[[], float]
    ) -> Body:
        """What an attempt sends: the record's plaintext as it is read or, with payload
        encryption, its sealed parts as they are (the ciphertext is not copied once more
        to join them). Raises policy.record_unreadable's error when sealing cannot read
        the record.

        A fresh seal per attempt (a new HPKE ephemeral key each time): the upstream
        deduplicates by Idempotency-Key, not by bytes. The payload is bound to the
        destination's agreed ``recipient_id``, never to its name in this configuration.
        """
        sealer = self.sealer
        if sealer is None:
            return Body(chunks, record.plaintext_size, record.content_type)
        recipient_id = self.config.recipient_id
        assert recipient_id is not None  # DestinationConfig requires it with encryption

        def seal() -> Sealed:  # reads the whole record, off the event loop
            return sealer.seal(
                b"".join(chunks),
                channel=record.channel,
                submission_id=record.id,
                destination=recipient_id,
                content_type=record.content_type,
                created=clock(),
            )

        try:
            sealed = await asyncio.to_thread(seal)
        except (RecordCorrupt, OSError) as exc:
            raise policy.record_unreadable(type(exc).__name__) from None
        return Body(sealed.parts, sealed.size, sealed.media_type)


@dataclass
class RelayPlan:
    """A prepared reload of the relay: applied whole by :meth:`Relay.apply`."""

    config: GatewayConfig
    build: dict[str, DestinationParts]
    """Every configured destination, rebuilt (its files read again)."""
    remove: tuple[str, ...]


async def build_parts(
    name: str, dest: DestinationConfig, sender_factory: SenderFactory
) -> DestinationParts:
    """The destination's sealer, sender and credential, each checked; raises when one
    cannot be built (GatewayError, OSError, ssl.SSLError, ValueError), owning nothing."""
    sealer = payload_sealer(dest)  # first: it may refuse a key, and owns nothing
    sender = sender_factory(name, dest)
    try:
        authorization = upstream_authorization(dest)
    except BaseException:
        await sender.close()
        raise
    return DestinationParts(name, dest, sender, authorization, sealer)


async def plan_reload(
    running: Iterable[str],
    config: GatewayConfig,
    spool: Spool,
    sender_factory: SenderFactory,
) -> RelayPlan:
    """Build every destination of ``config``; ``running`` are the destinations now served.

    Raises RelayError when a removed destination still has records waiting, or what
    :func:`build_parts` raises; whatever was built by then is closed again.
    """
    remove = tuple(n for n in running if n not in config.destinations)
    for name in remove:
        waiting = await spool.queued_ids(name)
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
            build[name] = await build_parts(name, dest, sender_factory)
    except BaseException:
        await asyncio.gather(*(p.sender.close() for p in build.values()))
        raise
    return RelayPlan(config, build, remove)


class SenderLeases:
    """The senders attempts are using: one a reload replaced is closed once the last
    attempt using it is done, never under it."""

    def __init__(self) -> None:
        self._in_use: dict[Sender, int] = {}
        self._retired: set[Sender] = set()
        self._closing: set[asyncio.Task[None]] = set()

    @contextlib.contextmanager
    def lease(self, sender: Sender) -> Iterator[Sender]:
        """Hold ``sender`` open for the duration of one attempt."""
        self._in_use[sender] = self._in_use.get(sender, 0) + 1
        try:
            yield sender
        finally:
            left = self._in_use.pop(sender) - 1
            if left:
                self._in_use[sender] = left
            elif sender in self._retired:
                self._retired.discard(sender)
                self._close_later(sender)

    def retire(self, sender: Sender) -> None:
        """Close ``sender`` now if no attempt uses it, else after the last one."""
        if sender in self._in_use:
            self._retired.add(sender)
        else:
            self._close_later(sender)

    def _close_later(self, sender: Sender) -> None:
        task = asyncio.get_running_loop().create_task(sender.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self, current: Iterable[Sender]) -> None:
        """At stop: close the ``current`` senders, the retired ones, and wait for all."""
        for sender in [*current, *self._retired]:
            await sender.close()
        self._retired.clear()
        await asyncio.gather(*self._closing, return_exceptions=True)


def new_breaker(dest: DestinationConfig) -> CircuitBreaker:
    """A closed circuit breaker with the destination's threshold and cool-down."""
    return CircuitBreaker(dest.retry.circuit_threshold, dest.retry.circuit_cooldown)


def export_key_expiry(metrics: Metrics, name: str, sealer: Sealer | None) -> None:
    """Set (or, without a sealer, remove) the destination's payload-key expiry gauges."""
    gauge = metrics.payload_key_expiry
    for key in ("recipient", "signing"):
        with contextlib.suppress(KeyError):
            gauge.remove(name, key)
    if sealer is None:
        return
    gauge.labels(destination=name, key="recipient").set(sealer.recipient.not_after.timestamp())
    signing_until = sealer.signing_key.not_after
    if signing_until is not None:
        gauge.labels(destination=name, key="signing").set(signing_until.timestamp())


def upstream_authorization(dest: DestinationConfig) -> str | None:
    """The ``Authorization`` header for the destination's Basic credential, if it has one."""
    if dest.credential is None:
        return None
    return basic_authorization(
        *load_upstream_credential(resolve_secret_path(dest.credential, ROOT))
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
