"""The event loop ``gatewayd`` runs on: asyncio's own, or uvloop when asked for.

``gatewayd --event-loop uvloop`` runs the same daemon on uvloop (libuv, compiled), which
must be installed (``pip install 'jp-mynumber-gateway[uvloop]'``; the development
install has it). Measured by ``make bench``'s yardstick (2,000 × 318 KB, 16 devices) on
this project's 2-core machine: its CPU per submission was 3–10 % lower in two runs and
higher in a fourth; over four runs the means are within the noise of asyncio's (14.6 vs
14.7 ms unsealed, 16.0 vs 16.6 ms with HPKE sealing).

asyncio stays the default because of memory: a hundred 7 MB uploads at once peaked at
250 MB of RSS on uvloop against 175 MB on asyncio; the gateway's bound is 200 MB. The
cause is not pinned down: the device listeners wrap each connection in asyncio's own TLS
protocol on either loop (its reads held to 64 KiB by :func:`gateway.ops.memory.
tune_tls_reads`), so it lies in uvloop's transports or its own TLS on the relay's client
side (256 KiB reads, a constant compiled into it). It stays on offer, tested like the
default, for a site to measure on its own machine: with more cores the loop's thread
carries a larger share of the work, and uvloop's saving may then show.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable

LOOPS = ("asyncio", "uvloop")
DEFAULT = "asyncio"

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


class LoopUnavailable(Exception):
    """The event loop asked for is not installed."""


def loop_factory(name: str = DEFAULT) -> LoopFactory:
    """What makes a new event loop of kind ``name`` (one of :data:`LOOPS`).

    Raises LoopUnavailable when ``name`` is uvloop and it is not installed, ValueError
    for a name not in :data:`LOOPS`."""
    if name == "asyncio":
        return asyncio.new_event_loop
    if name == "uvloop":
        try:
            uvloop = importlib.import_module("uvloop")
        except ImportError:
            raise LoopUnavailable(
                "--event-loop uvloop: uvloop is not installed "
                "(pip install 'jp-mynumber-gateway[uvloop]')"
            ) from None
        factory: LoopFactory = uvloop.new_event_loop
        return factory
    raise ValueError(f"event loop must be one of {', '.join(LOOPS)}, not {name!r}")


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop`` or ``asyncio``: which kind ``loop`` is (for the start line)."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
