"""The owner of every long-lived task: restarted with backoff when it fails, given up
on (and the daemon stopped) when it keeps failing, cancelled and awaited at shutdown.

A task that raises is logged with its name and the exception's type (never its text),
counted in ``gateway_task_failures_total{task}``, and started again after a backoff
that doubles up to ``max_backoff``. If a task fails ``max_failures`` times within
``window`` seconds, or raises :class:`~gateway.errors.Unrecoverable` once, the
supervisor stops restarting it and says so: ``/readyz`` names the
task and the daemon stops with a non-zero exit, so that systemd restarts the whole
process (a fresh one may succeed where a wedged one cannot). No task is ever left
running unowned: :meth:`Supervisor.stop` cancels and awaits each one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import GatewayError, Unrecoverable
from gateway.ops.logs import get_logger

Sleep = Callable[[float], Awaitable[object]]

log = get_logger("gateway.supervisor")


class TaskGaveUp(GatewayError):
    """A supervised task kept failing; the daemon stops so that it is restarted."""

    def __init__(self, task: str) -> None:
        super().__init__(f"task {task} kept failing; stopping so that systemd restarts us")
        self.task = task


@dataclass
class _Watched:
    name: str
    task: asyncio.Task[None]
    failures: deque[float] = field(default_factory=deque)


class Supervisor:
    """Starts, restarts and stops the daemon's tasks; see the module docstring."""

    def __init__(
        self,
        *,
        on_failure: Callable[[str], None] = lambda _task: None,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float],
        initial_backoff: float = 1.0,
        max_backoff: float = 60.0,
        max_failures: int = 5,
        window: float = 600.0,
    ) -> None:
        self._on_failure = on_failure
        self._sleep = sleep
        self._clock = clock
        self._initial = initial_backoff
        self._max = max_backoff
        self._max_failures = max_failures
        self._window = window
        self._watched: dict[str, _Watched] = {}
        self._once: set[asyncio.Task[Any]] = set()
        self._gave_up = asyncio.Event()
        self.failed: str | None = None
        """The task given up on, if any (``/readyz`` reports it)."""

    def start(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Keep ``run()`` running as task ``name`` until :meth:`stop`."""
        if name in self._watched and not self._watched[name].task.done():
            raise RuntimeError(f"task {name} is already supervised")
        task = asyncio.create_task(self._keep(name, run), name=name)
        self._watched[name] = _Watched(name, task)

    def spawn(self, name: str, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``work`` once as an owned task (a reload): awaited or cancelled at stop."""
        task = asyncio.create_task(work, name=name)
        self._once.add(task)
        task.add_done_callback(self._done_once)
        return task

    def _done_once(self, task: asyncio.Task[Any]) -> None:
        self._once.discard(task)
        if task.cancelled():
            return
        error = task.exception()  # retrieved, so asyncio never logs it with its text
        if error is not None:
            log.error("task_failed", task=task.get_name(), error=type(error).__name__)
            self._on_failure(task.get_name())

    async def _keep(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        backoff = self._initial
        while True:
            try:
                await run()
                return  # a task that ends by itself has nothing left to do
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("task_failed", task=name, error=type(exc).__name__)
                self._on_failure(name)
                if isinstance(exc, Unrecoverable) or self._gives_up(name):
                    log.error("task_gave_up", task=name, count=self._max_failures)
                    self.failed = self.failed or name
                    self._gave_up.set()
                    return
            log.info("task_restarting", task=name, retry_in=backoff)
            await self._sleep(backoff)
            backoff = min(backoff * 2, self._max)

    def _gives_up(self, name: str) -> bool:
        failures = self._watched[name].failures
        now = self._clock()
        failures.append(now)
        while failures and failures[0] < now - self._window:
            failures.popleft()
        return len(failures) >= self._max_failures

    async def gave_up(self) -> str:
        """Wait until a task is given up on; returns its name."""
        await self._gave_up.wait()
        assert self.failed is not None
        return self.failed

    async def stop(self) -> None:
        """Cancel every task and wait for each to end."""
        tasks = [w.task for w in self._watched.values()] + list(self._once)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._watched.clear()
        self._once.clear()
