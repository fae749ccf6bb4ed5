"""Fakes for the relay's seams: a clock, a sleep that returns at once, and a scriptable sender.

With them a real :class:`~gateway.relay.workers.Relay` over a real spool runs its retry,
hold, Retry-After and circuit-breaker rules without sockets, TLS or waiting::

    sleep = FakeSleep()
    upstream = FakeSender(clock=sleep.clock)
    relay = Relay(config, spool, Metrics(), sleep=sleep, clock=sleep.clock,
                  sender_factory=upstream.factory)
    upstream.answer(503, retry_after="7")  # then the default: 200 with a receipt
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.config import DestinationConfig
from gateway.relay.sender import Answer, Outgoing, Sender, SendFailed


@dataclass
class FakeClock:
    """A clock that stands still until moved: call it for the time, :meth:`advance` it."""

    now: float = field(default_factory=time.time)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class FakeSleep:
    """Records every requested delay and returns at once, moving its clock forward by it.

    Give :attr:`clock` to the code under test as its clock, so time passes exactly as it
    believes it slept: backoffs, Retry-After and circuit cool-downs without waiting.
    """

    calls: list[float] = field(default_factory=list)
    clock: FakeClock = field(default_factory=FakeClock)

    @property
    def now(self) -> float:
        return self.clock.now

    @now.setter
    def now(self, value: float) -> None:
        self.clock.now = value

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        self.clock.advance(seconds)
        await asyncio.sleep(0)


@dataclass(frozen=True)
class Sent:
    """One attempt the fake sender was asked to make."""

    destination: str
    url: str
    headers: dict[str, str]
    body: bytes | None
    """What was read of the body; None when it was not read (a scripted connection
    failure) or could not be read (the record's fault)."""
    at: float
    """The fake's clock when the attempt was made."""


@dataclass(frozen=True)
class _Step:
    answer: Answer | None = None
    error: str | None = None  # raise SendFailed(error) instead of answering


class FakeSender:
    """Every destination's upstream, scripted: answers from a queue, then 200 with a receipt.

    Pass :meth:`factory` to the relay as its ``sender_factory``. Script with
    :meth:`answer` and :meth:`fail_connection` (for one destination, or whichever asks
    first); :meth:`hold` keeps every attempt open until :meth:`release`. Every attempt is
    recorded in :attr:`sent`, with its headers and the body bytes it carried.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._script: dict[str | None, deque[_Step]] = {}
        self._gate: asyncio.Event | None = None
        self._changed = asyncio.Event()  # set (and replaced) whenever an attempt starts or ends
        self.sent: list[Sent] = []
        self.inside: Counter[str] = Counter()
        """Attempts under way, by destination."""
        self.peak: Counter[str] = Counter()
        """The most attempts ever under way at once, by destination."""
        self.built: list[str] = []
        """Destinations a sender was built for, in order (start, then each reload)."""
        self.closed: list[str] = []

    # ------------------------------------------------------------------ script

    def answer(
        self,
        status: int = 200,
        *,
        retry_after: str | None = None,
        receipt: str | None = None,
        destination: str | None = None,
        times: int = 1,
    ) -> None:
        """The next ``times`` attempts (to ``destination``, or any) get this answer."""
        self._push(destination, times, _Step(answer=Answer(status, retry_after, receipt)))

    def fail_connection(
        self, error: str = "ClientConnectorError", *, destination: str | None = None, times: int = 1
    ) -> None:
        """The next ``times`` attempts get no answer: SendFailed(``error``)."""
        self._push(destination, times, _Step(error=error))

    def _push(self, destination: str | None, times: int, step: _Step) -> None:
        self._script.setdefault(destination, deque()).extend([step] * times)

    def hold(self) -> None:
        """Keep every attempt open (after its body is read) until :meth:`release`."""
        self._gate = asyncio.Event()

    def release(self) -> None:
        if self._gate is not None:
            self._gate.set()
        self._gate = None

    def sent_to(self, destination: str) -> list[Sent]:
        return [s for s in self.sent if s.destination == destination]

    async def wait_sent(self, count: int) -> None:
        """Until at least ``count`` attempts were made."""
        await self._until(lambda: len(self.sent) >= count)

    async def wait_inside(self, destination: str, count: int) -> None:
        """Until at least ``count`` attempts to ``destination`` are under way at once."""
        await self._until(lambda: self.inside[destination] >= count)

    async def _until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # ------------------------------------------------------------------ sender

    def factory(self, name: str, dest: DestinationConfig) -> Sender:
        """The relay's ``sender_factory``: a sender for ``name`` answering from this script."""
        self.built.append(name)
        return _FakeDestinationSender(self, name)

    def _next(self, destination: str) -> _Step:
        for key in (destination, None):
            queue = self._script.get(key)
            if queue:
                return queue.popleft()
        return _Step(answer=Answer(200, receipt=f"fake-receipt-{len(self.sent) + 1}"))

    async def _send(self, destination: str, request: Outgoing) -> Answer:
        step = self._next(destination)
        body: bytes | None = None
        if step.error is None:
            try:
                body = b"".join(bytes(chunk) for chunk in request.body)
            except Exception as exc:  # as aiohttp does: the attempt failed, no answer
                step = _Step(error=type(exc).__name__)
        sent = Sent(destination, request.url, dict(request.headers), body, self._clock())
        self.sent.append(sent)
        self.inside[destination] += 1
        self.peak[destination] = max(self.peak[destination], self.inside[destination])
        self._notify()
        try:
            if self._gate is not None:
                await self._gate.wait()
        finally:
            self.inside[destination] -= 1
            self._notify()
        if step.error is not None:
            raise SendFailed(step.error)
        assert step.answer is not None
        return step.answer


class _FakeDestinationSender:
    """One destination's sender, built by :meth:`FakeSender.factory`."""

    def __init__(self, upstream: FakeSender, name: str) -> None:
        self._upstream = upstream
        self._name = name

    async def send(self, request: Outgoing) -> Answer:
        return await self._upstream._send(self._name, request)

    async def close(self) -> None:
        self._upstream.closed.append(self._name)
