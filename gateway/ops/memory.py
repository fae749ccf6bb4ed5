"""The daemon's memory stays near what it uses: malloc and TLS buffers tuned at start.

A daemon that briefly holds large buffers (a 7 MB record sealed for an upstream, a
16 MiB scrypt work area per password check, body chunks of many uploads at once) keeps
their pages for good under glibc's defaults: each thread may get an arena of its own,
and the threshold above which an allocation is its own ``mmap`` (returned to the system
when freed) rises to the size of the largest block freed, so later large blocks come
from the heap and stay there. Two settings (``mallopt``) keep the resident size bounded
by what is in use: at most two arenas, and a fixed mmap threshold of 1 MiB. Elsewhere
(another libc) nothing changes.

asyncio's TLS transport gives each connection a 256 KiB receive buffer and hands the
application everything it decrypted in one go (up to that much per read): with a
hundred uploads at once that is 25 MB of buffers and as much again in chunks.
:func:`tune_tls_reads` sets the per-read size to 64 KiB (four TLS records); a hundred
7 MB uploads then peak at about 150 MB instead of 200 (``make bench``).
"""

from __future__ import annotations

import asyncio.sslproto
import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
ARENAS = 2
MMAP_THRESHOLD = 1024 * 1024
TLS_READ_SIZE = 64 * 1024


def tune_malloc(arenas: int = ARENAS, mmap_threshold: int = MMAP_THRESHOLD) -> bool:
    """Apply both settings; False when this C library has no ``mallopt`` (not glibc)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_ARENA_MAX, arenas)) and bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold))


def tune_tls_reads(size: int = TLS_READ_SIZE) -> bool:
    """Bound what asyncio's TLS transport reads at once, per connection (its class
    attribute ``max_size``); False when this Python's transport has no such knob."""
    protocol = getattr(asyncio.sslproto, "SSLProtocol", None)
    if protocol is None or not isinstance(getattr(protocol, "max_size", None), int):
        return False
    protocol.max_size = size
    return True
