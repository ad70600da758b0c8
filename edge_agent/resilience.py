"""How the edge treats a misbehaving cloud: one retry layer with jittered backoff, and a circuit breaker.

Retries happen only before the first frame of a guidance stream (after it, a retry could duplicate
text: F5), only for retryable errors, and only while the request's deadline leaves room (R1, R2). The
jitter keeps many edges from returning in lockstep after an outage (R6). The breaker (R3) stops calling a
cloud that keeps failing: while open, requests go straight to the student; after ``cooldown_s`` one probe
is let through (half-open), and its outcome closes or reopens the breaker.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Literal

State = Literal["closed", "open", "half_open"]


@dataclass
class CircuitBreaker:
    """Consecutive-failure breaker with a single half-open probe."""

    threshold: int = 5
    cooldown_s: float = 10.0
    clock: callable = field(default=time.monotonic)  # type: ignore[valid-type]
    failures: int = 0
    opened_at: float | None = None
    probing: bool = False

    @property
    def state(self) -> State:
        if self.opened_at is None:
            return "closed"
        if self.clock() - self.opened_at >= self.cooldown_s:
            return "half_open"
        return "open"

    def allow(self) -> bool:
        """May a call go to the cloud now? In half-open state only one probe at a time."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self.probing:
            self.probing = True
            return True
        return False

    def success(self) -> None:
        self.failures, self.opened_at, self.probing = 0, None, False

    def failure(self) -> None:
        self.failures += 1
        if self.probing or self.failures >= self.threshold:
            self.opened_at = self.clock()
        self.probing = False


@dataclass(frozen=True)
class RetryPolicy:
    """At most ``attempts`` tries; the n-th wait is uniform in [d/2, d] with d = min(cap, base * 2**n)."""

    attempts: int = 3
    base_s: float = 0.2
    cap_s: float = 2.0

    def delay(self, retry: int, retry_after: float | None = None, rng: random.Random | None = None) -> float:
        d = min(self.cap_s, self.base_s * (2**retry))
        wait = (rng or random).uniform(d / 2, d)
        return max(wait, retry_after or 0.0)
