"""The relay's rules, pure: what an upstream answer means, how long to wait, what is kept.

No I/O and no event loop: every function here is a plain function of its arguments
(time and randomness are passed in), so the rules are tested without a network.

- A 2xx answer delivers the record; 408, 429, 5xx and a failed connection are retried;
  every other answer (other 4xx, and 3xx: redirects are never followed) holds the
  record for an operator. A record that cannot be read is held at once and says
  nothing about the upstream (``local``: no circuit-breaker failure).
- The wait before the next attempt is exponential backoff with full jitter, or what
  ``Retry-After`` (or an open circuit) asks when that is longer, capped by
  ``max_retry_after``.
- An upstream receipt id is kept (logged, stored, shown) only when it looks like an id.
"""

from __future__ import annotations

import email.utils
import enum
import random
import re
from collections.abc import Callable

from gateway.config import RetryConfig
from gateway.errors import RelayError

RETRYABLE_STATUS = frozenset({408, 429})
RECEIPT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
"""An upstream receipt id is kept (logged, stored, shown) only when it looks like an id:
free text from an upstream could echo something personal."""

Uniform = Callable[[float, float], float]
"""A random number between its two arguments, like :func:`random.uniform`."""


class Verdict(enum.Enum):
    """What an upstream's HTTP status means for the record."""

    DELIVERED = "delivered"
    RETRY = "retry"
    HOLD = "hold"


class CircuitOpen(RelayError):
    """Not sent: the destination's circuit breaker is open."""


def classify(status: int) -> Verdict:
    """2xx delivers; 408, 429 and 5xx are retried; anything else holds the record."""
    if 200 <= status < 300:
        return Verdict.DELIVERED
    if status in RETRYABLE_STATUS or status >= 500:
        return Verdict.RETRY
    return Verdict.HOLD


def outcome_label(status: int) -> str:
    """The ``outcome`` label of ``gateway_relay_attempts_total`` for an answer."""
    return "delivered" if classify(status) is Verdict.DELIVERED else str(status)


def refused(status: int, retry_after: str | None, now: float) -> RelayError:
    """The error for an answer that did not deliver (retryable or not, per :func:`classify`)."""
    return RelayError(
        f"upstream answered {status}",
        retryable=classify(status) is Verdict.RETRY,
        status=status,
        retry_after=parse_retry_after(retry_after, now),
    )


def connection_failed(error: str) -> RelayError:
    """No answer (connection, TLS, timeout): retried, and a breaker failure."""
    return RelayError(f"connection failed: {error}", retryable=True)


def record_unreadable(error: str) -> RelayError:
    """The record itself could not be read: held, and no fault of the upstream's."""
    return RelayError(f"record unreadable: {error}", retryable=False, local=True)


def circuit_open(wait: float) -> CircuitOpen:
    """Held back without an attempt; asks to be tried again after ``wait`` seconds."""
    return CircuitOpen("circuit open: upstream failing", retryable=True, retry_after=wait)


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


def backoff_ceiling(attempt: int, retry: RetryConfig) -> float:
    """The upper bound of the jittered backoff after attempt number ``attempt`` (from 1):
    ``initial_backoff * 2**(attempt - 1)``, at most ``max_backoff``."""
    try:
        return min(retry.initial_backoff * 2.0 ** (attempt - 1), retry.max_backoff)
    except OverflowError:
        return retry.max_backoff


def retry_wait(
    attempt: int,
    asked: float | None,
    retry: RetryConfig,
    uniform: Uniform = random.uniform,
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (from 1).

    Full jitter (a uniform draw up to :func:`backoff_ceiling`), or what the upstream or
    the circuit breaker ``asked`` when that is longer, capped by ``max_retry_after``.
    """
    backoff = uniform(0.0, backoff_ceiling(attempt, retry))
    if asked is None:
        return backoff
    return max(backoff, min(asked, retry.max_retry_after))


def checked_receipt(value: object) -> str | None:
    """The upstream's receipt id when it is a string that looks like an id; else None."""
    if isinstance(value, str) and RECEIPT_ID.fullmatch(value):
        return value
    return None
