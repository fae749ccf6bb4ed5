"""A per-destination circuit breaker (pure: time is passed in).

After ``threshold`` consecutive retryable failures the circuit opens: no request goes
upstream until ``cooldown`` has passed, then one probe is let through (half-open). A
successful probe closes the circuit; a failed one opens it again for twice as long, up
to ``max_cooldown``. A dead upstream therefore costs one probe per cool-down, not one
request per waiting record.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CircuitBreaker:
    threshold: int = 5
    cooldown: float = 30.0
    max_cooldown: float = 600.0
    failures: int = 0
    open_until: float = 0.0
    probing: bool = False
    _next_cooldown: float = field(default=0.0, repr=False)

    @property
    def is_open(self) -> bool:
        return self.failures >= self.threshold

    def wait_before(self, now: float) -> float | None:
        """None when a request may go now; else how long to wait before asking again."""
        if not self.is_open:
            return None
        if now < self.open_until:
            return self.open_until - now
        if self.probing:
            return self.cooldown  # another worker's probe is under way
        self.probing = True
        return None

    def record_success(self) -> None:
        self.failures = 0
        self.probing = False
        self._next_cooldown = 0.0

    def abandon_probe(self) -> None:
        """The probe ended without telling whether the upstream is back."""
        self.probing = False

    def record_failure(self, now: float) -> None:
        was_open, was_probe = self.is_open, self.probing
        self.failures += 1
        self.probing = False
        if not self.is_open or (was_open and not was_probe):
            return  # closed still, or a request sent before the circuit opened
        cooldown = self._next_cooldown or self.cooldown
        self.open_until = now + cooldown
        self._next_cooldown = min(cooldown * 2, self.max_cooldown)
