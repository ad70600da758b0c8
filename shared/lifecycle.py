"""Process lifecycle both services share: readiness with reasons, graceful drain, fatal engine failure.

Phases: ``starting`` (loading the model) -> ``ready`` -> ``draining`` (SIGTERM: readiness is 503 at once,
new work gets 503 ``draining``, running work may finish until the drain deadline, then streams still open
end with an error frame) -> exit. ``fatal`` marks the engine dead: readiness says so and the process exits
non-zero so that a supervisor restarts it (H3). Liveness (``/health``) never depends on any of this (H1).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from starlette.types import ASGIApp, Receive, Scope, Send

from shared.auth import PUBLIC_PATHS
from shared.errors import ErrorCode, GKTError
from shared.http import error_response

log = logging.getLogger("gkt.lifecycle")

Phase = Literal["starting", "ready", "draining", "dead"]
# Routes that stay open while draining or dead: the probes and metrics, the same paths auth leaves open.
EXEMPT = PUBLIC_PATHS


@dataclass
class Lifecycle:
    """Where the process is in its life, and what readiness should say about it."""

    phase: Phase = "starting"
    reasons: list[str] = field(default_factory=lambda: ["loading"])
    in_flight: int = 0
    exit_code: int = 0
    drain_deadline: asyncio.Event = field(default_factory=asyncio.Event)
    on_fatal: Callable[[], None] | None = None
    checks: list[Callable[[], str | None]] = field(default_factory=list)

    def ready(self) -> None:
        self.phase, self.reasons = "ready", []

    def begin_drain(self) -> None:
        if self.phase in ("ready", "starting"):
            self.phase, self.reasons = "draining", ["draining"]
            log.info("draining: %d request(s) in flight", self.in_flight)

    def fatal(self, reason: str) -> None:
        """The engine is unusable: report it and make the process exit non-zero."""
        if self.phase == "dead":
            return
        log.error("fatal: %s; exiting so that a supervisor restarts the process", reason)
        self.phase, self.reasons, self.exit_code = "dead", [reason], 1
        if self.on_fatal is not None:
            self.on_fatal()

    def readiness(self) -> tuple[bool, list[str]]:
        """Ready only in phase ``ready`` with every registered check passing (each returns a reason or None)."""
        if self.phase != "ready":
            return False, list(self.reasons)
        failing = [r for check in self.checks if (r := check())]
        return not failing, failing


class LifecycleMiddleware:
    """Counts work in flight and refuses new work (503 ``draining``) once the process is going away."""

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle) -> None:
        self.app = app
        self.lifecycle = lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT:
            await self.app(scope, receive, send)
            return
        if self.lifecycle.phase in ("draining", "dead"):
            code = ErrorCode.draining if self.lifecycle.phase == "draining" else ErrorCode.engine_error
            err = GKTError(code, f"the service is {self.lifecycle.phase}; try another instance", retry_after=1.0)
            await error_response(err)(scope, receive, send)
            return
        self.lifecycle.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.lifecycle.in_flight -= 1


async def drain(lifecycle: Lifecycle, timeout_s: float, grace_s: float = 0.5) -> None:
    """Wait for work in flight to finish, at most ``timeout_s``; then tell open streams to end (G2)."""
    deadline = time.monotonic() + timeout_s
    while lifecycle.in_flight > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if lifecycle.in_flight:
        log.warning("drain deadline: ending %d open request(s) with an error", lifecycle.in_flight)
        lifecycle.drain_deadline.set()
        end = time.monotonic() + grace_s
        while lifecycle.in_flight > 0 and time.monotonic() < end:
            await asyncio.sleep(0.05)


async def watchdog(lifecycle: Lifecycle, dead: Callable[[], str | None], interval_s: float = 1.0) -> None:
    """Turn a dead engine into a process exit (H3): a supervisor restarts what cannot recover."""
    while lifecycle.phase != "dead":
        if reason := dead():
            lifecycle.fatal(reason)
            return
        await asyncio.sleep(interval_s)
