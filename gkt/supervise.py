"""Keep ``gkt up``'s services running: restart one that exits, with backoff, while the others keep serving.

The edge is built to answer alone while the cloud is away (R4), so a crashed cloud must not take the edge
down with it: the supervisor restarts only what exited, says so, and waits 1, 2, 4 ... up to ``cap_s``
seconds between restarts of a service that keeps failing (the delay resets once it has stayed up for
``reset_after_s``). Only the operator's signal ends ``gkt up``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TextIO


class Supervised(Protocol):
    """What the supervisor needs of a service (``gkt.launcher.Service``)."""

    name: str
    url: str

    def start(self) -> object: ...

    def exit_code(self) -> int | None: ...

    def is_ready(self) -> bool: ...


@dataclass
class Backoff:
    """Restart delays for one service: ``initial_s`` doubling to ``cap_s``; reset after a good long run."""

    initial_s: float = 1.0
    cap_s: float = 30.0
    reset_after_s: float = 60.0
    failures: int = 0

    def next_delay(self, uptime_s: float) -> float:
        if uptime_s >= self.reset_after_s:
            self.failures = 0
        delay = min(self.cap_s, self.initial_s * 2**self.failures)
        self.failures += 1
        return delay


@dataclass
class _Watch:
    service: Supervised
    backoff: Backoff
    started_at: float
    restart_at: float | None = None  # set while the service is down and waiting for its restart
    restarts: int = 0
    awaiting_ready: bool = False


class Supervisor:
    """Polls its services (``poll`` once every ``interval``) and restarts any that exited."""

    def __init__(self, services: list[Supervised], backoff: Callable[[], Backoff] = Backoff,
                 out: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.out = out or sys.stderr
        self._watches = [_Watch(s, backoff(), clock()) for s in services]

    @property
    def restarts(self) -> dict[str, int]:
        return {w.service.name: w.restarts for w in self._watches}

    def _say(self, text: str) -> None:
        print(f"gkt up: {text}", file=self.out, flush=True)

    def poll(self) -> None:
        now = self.clock()
        for w in self._watches:
            if w.restart_at is None:
                code = w.service.exit_code()
                if code is not None:
                    delay = w.backoff.next_delay(now - w.started_at)
                    w.restart_at = now + delay
                    self._say(f"{w.service.name} exited with {code}; restarting it in {delay:.0f} s "
                              f"(the other services keep serving)")
                elif w.awaiting_ready and w.service.is_ready():
                    w.awaiting_ready = False
                    self._say(f"{w.service.name} is ready again ({w.service.url})")
            elif now >= w.restart_at:
                w.restart_at, w.started_at = None, now
                w.restarts += 1
                w.awaiting_ready = True
                w.service.start()
                self._say(f"{w.service.name} restarted (restart {w.restarts})")

    def run(self, interval_s: float = 0.5) -> None:
        """Supervise until interrupted (KeyboardInterrupt: the operator's signal)."""
        while True:
            self.poll()
            time.sleep(interval_s)

