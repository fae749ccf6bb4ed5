"""The per-destination circuit breaker, driven by an explicit clock."""

from __future__ import annotations

from gateway.relay.breaker import CircuitBreaker


def test_closed_until_threshold_consecutive_failures() -> None:
    """Requests pass until `threshold` consecutive failures; a success resets the count."""
    breaker = CircuitBreaker(threshold=3, cooldown=10)
    for _ in range(2):
        breaker.record_failure(now=0)
    breaker.record_success()
    breaker.record_failure(now=0)
    breaker.record_failure(now=0)
    assert breaker.wait_before(now=0) is None
    breaker.record_failure(now=0)
    assert breaker.is_open
    assert breaker.wait_before(now=4) == 6


def test_half_open_lets_exactly_one_probe_through() -> None:
    """After the cool-down one probe goes; others wait while it is under way."""
    breaker = CircuitBreaker(threshold=1, cooldown=10)
    breaker.record_failure(now=100)
    assert breaker.wait_before(now=110) is None
    assert breaker.wait_before(now=110) == 10
    breaker.record_success()
    assert not breaker.is_open
    assert breaker.wait_before(now=111) is None


def test_failed_probe_doubles_the_cooldown_up_to_the_cap() -> None:
    """Each failed probe reopens the circuit for twice as long, never beyond max_cooldown."""
    breaker = CircuitBreaker(threshold=1, cooldown=10, max_cooldown=25)
    now = 0.0
    breaker.record_failure(now)
    waits = []
    for _ in range(4):
        now = breaker.open_until
        assert breaker.wait_before(now) is None
        breaker.record_failure(now)
        waits.append(breaker.open_until - now)
    assert waits == [20, 25, 25, 25]


def test_success_after_reopening_restores_the_first_cooldown() -> None:
    """Once closed again, the next opening starts from the configured cool-down."""
    breaker = CircuitBreaker(threshold=1, cooldown=10)
    breaker.record_failure(0)
    breaker.wait_before(10)
    breaker.record_failure(10)
    breaker.record_success()
    breaker.record_failure(50)
    assert breaker.open_until == 60


def test_failures_of_requests_sent_before_opening_do_not_extend_the_cooldown() -> None:
    """Only a failed probe reopens and doubles; in-flight failures after opening do not."""
    breaker = CircuitBreaker(threshold=2, cooldown=10)
    breaker.record_failure(now=0)
    breaker.record_failure(now=0)
    assert breaker.open_until == 10
    breaker.record_failure(now=1)  # a request that was already under way
    breaker.record_failure(now=2)
    assert breaker.open_until == 10
    assert breaker.wait_before(now=10) is None  # the probe
    breaker.record_failure(now=10)
    assert breaker.open_until == 30


def test_an_abandoned_probe_lets_the_next_worker_probe() -> None:
    """A probe that ended without an answer (a local error) does not block the circuit."""
    breaker = CircuitBreaker(threshold=1, cooldown=10)
    breaker.record_failure(now=0)
    assert breaker.wait_before(now=10) is None
    assert breaker.wait_before(now=10) == 10
    breaker.abandon_probe()
    assert breaker.wait_before(now=10) is None
