"""A small, dependency-free client for systemd's notify protocol (``sd_notify(3)``).

With ``Type=notify`` systemd passes ``$NOTIFY_SOCKET`` (a Unix datagram socket: an
absolute path, or ``@name`` for an abstract one) and waits for ``READY=1`` before it
counts the service as started. ``STOPPING=1`` says a drain has begun, ``RELOADING=1``
that a reload is in progress (followed by ``READY=1`` when done), ``WATCHDOG=1`` is the
keep-alive ping ``WatchdogSec=`` expects, and ``STATUS=`` a one-line text for
``systemctl status``.

Sending never raises and never blocks: each message is one datagram from a fresh
non-blocking, close-on-exec socket (as libsystemd does), and every failure is reported
only as ``False``. Nothing is logged: the daemon decides what a failed send means.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping

__all__ = ["Notifier", "watchdog_loop"]

_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def _parse_positive_int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = int(value, 10)
    except ValueError:
        return None
    return number if number > 0 else None


def _socket_address(notify_socket: str) -> bytes | None:
    """The ``sockaddr_un`` path for ``$NOTIFY_SOCKET``; None when unusable here."""
    if notify_socket.startswith("/"):
        return os.fsencode(notify_socket)
    if notify_socket.startswith("@") and len(notify_socket) > 1:
        return b"\0" + os.fsencode(notify_socket[1:])
    # Relative paths are invalid for sd_notify; "vsock:CID:PORT" (systemd >= 254, for
    # virtual machines) is not supported by this client.
    return None


def _clean_value(value: str | int) -> str:
    """One line: the protocol separates assignments by newlines."""
    return " ".join(str(value).splitlines())


class Notifier:
    """Sends notifications to the socket systemd named in ``$NOTIFY_SOCKET``."""

    __slots__ = ("_address", "notify_socket", "watchdog_pid", "watchdog_usec")

    def __init__(
        self,
        notify_socket: str,
        *,
        watchdog_usec: int | None = None,
        watchdog_pid: int | None = None,
    ) -> None:
        address = _socket_address(notify_socket)
        if address is None:
            raise ValueError("NOTIFY_SOCKET must be an absolute path or an @abstract name")
        self._address = address
        self.notify_socket = notify_socket
        self.watchdog_usec = watchdog_usec
        self.watchdog_pid = watchdog_pid

    def __repr__(self) -> str:
        return (
            f"Notifier({self.notify_socket!r}, watchdog_usec={self.watchdog_usec!r}, "
            f"watchdog_pid={self.watchdog_pid!r})"
        )

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier | None:
        """The notifier systemd asked for, or None when not run as a notify service.

        None too when ``$NOTIFY_SOCKET`` is empty or not a form this client supports
        (relative path, ``vsock:``). ``$WATCHDOG_USEC``/``$WATCHDOG_PID`` are read now;
        an invalid value means no watchdog.
        """
        notify_socket = environ.get("NOTIFY_SOCKET", "")
        if _socket_address(notify_socket) is None:
            return None
        return cls(
            notify_socket,
            watchdog_usec=_parse_positive_int(environ.get("WATCHDOG_USEC")),
            watchdog_pid=_parse_positive_int(environ.get("WATCHDOG_PID")),
        )

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of ``WatchdogSec=``), or None if off.

        None as well when ``$WATCHDOG_PID`` names another process: the watchdog is then
        that process's business (as in ``sd_watchdog_enabled(3)``).
        """
        if self.watchdog_usec is None:
            return None
        if self.watchdog_pid is not None and self.watchdog_pid != os.getpid():
            return None
        return self.watchdog_usec / 2 / 1_000_000

    def send(self, message: str) -> bool:
        """Send one raw message (newline-separated ``KEY=value`` lines); True if sent."""
        try:
            data = message.encode("utf-8")
            with socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            ) as sock:
                sent = sock.sendto(data, self._address)
        except (OSError, ValueError):
            # No listener, socket gone, queue full (EAGAIN), name too long, a value
            # that cannot be encoded: the daemon carries on either way.
            return False
        return sent == len(data)

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` assignments in the given order: ``notify(READY=1)``.

        Keys must be upper-case letters, digits and ``_``; a value's line breaks become
        spaces. Returns False (sends nothing) for an empty call or an invalid key.
        """
        if not fields or not all(key and set(key) <= _KEY_CHARS for key in fields):
            return False
        return self.send("".join(f"{key}={_clean_value(value)}\n" for key, value in fields.items()))

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) is complete: ``READY=1``, with an optional status."""
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status)

    def reloading(self) -> bool:
        """A reload has begun; send :meth:`ready` when it is done.

        systemd >= 253 (``Type=notify-reload``) needs ``MONOTONIC_USEC`` with it, the
        ``CLOCK_MONOTONIC`` time of the request; older versions ignore the extra field.
        """
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(RELOADING=1, MONOTONIC_USEC=now_usec)

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown (the drain) has begun: ``STOPPING=1``."""
        if status is None:
            return self.notify(STOPPING=1)
        return self.notify(STOPPING=1, STATUS=status)

    def watchdog(self) -> bool:
        """The keep-alive ping: ``WATCHDOG=1``."""
        return self.notify(WATCHDOG=1)

    def status(self, text: str) -> bool:
        """A one-line status for ``systemctl status``: ``STATUS=text``."""
        return self.notify(STATUS=text)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before the start/stop timeout (``EXTEND_TIMEOUT_USEC``)."""
        return self.notify(EXTEND_TIMEOUT_USEC=max(0, int(seconds * 1_000_000)))


async def watchdog_loop(
    notifier: Notifier | None,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    interval: float | None = None,
) -> None:
    """Ping the watchdog every ``interval`` seconds until cancelled.

    ``interval`` defaults to :meth:`Notifier.watchdog_interval`. Returns at once when
    there is nothing to do (no notifier, or no watchdog asked for). The first ping is
    sent immediately. A failed ping is not an error here: if pings stop arriving,
    systemd's watchdog is what notices.
    """
    if notifier is None:
        return
    if interval is None:
        interval = notifier.watchdog_interval()
    if interval is None or interval <= 0:
        return
    while True:
        notifier.watchdog()
        await sleep(interval)
