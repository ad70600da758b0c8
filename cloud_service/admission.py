"""Admission: bounded in-flight work and a bounded queue with a deadline (B1, B2).

At most ``max_in_flight`` guidance generations run at once (for the llama.cpp teacher that is its number of
batch slots); up to ``max_waiting`` more wait, first come first served. A request that finds the queue full
is refused at once with 503 and ``Retry-After``; one that waits longer than ``queue_timeout_s`` is refused
the same way and never reaches the engine. Waiting happens before the response starts, so both refusals are
HTTP statuses the edge can act on (it falls back to its student).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import asdict, dataclass
from time import perf_counter
from typing import Any

from shared.errors import ErrorCode, GKTError


@dataclass
class AdmissionStats:
    """Counters and gauges of the admission gate."""

    max_in_flight: int
    max_waiting: int
    in_flight: int = 0
    waiting: int = 0
    admitted: int = 0
    refused_full: int = 0  # the queue was full
    refused_deadline: int = 0  # waited past the queue deadline


class Admission:
    """A FIFO gate in front of the engine."""

    def __init__(self, max_in_flight: int, max_waiting: int, queue_timeout_s: float,
                 retry_after_s: float = 1.0) -> None:
        self.queue_timeout_s = queue_timeout_s
        self.retry_after_s = retry_after_s
        self.stats = AdmissionStats(max_in_flight=max_in_flight, max_waiting=max_waiting)
        self._waiters: deque[asyncio.Future[None]] = deque()

    def snapshot(self) -> dict[str, Any]:
        return asdict(self.stats)

    async def enter(self) -> float:
        """Wait for a slot; returns the seconds waited. Pair every successful call with ``release``."""
        st = self.stats
        if st.in_flight < st.max_in_flight and not self._waiters:
            st.in_flight += 1
            st.admitted += 1
            return 0.0
        if len(self._waiters) >= st.max_waiting:
            st.refused_full += 1
            raise GKTError(ErrorCode.overloaded, "the teacher is at capacity; try again shortly",
                           retry_after=self.retry_after_s)
        t0 = perf_counter()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        st.waiting = len(self._waiters)
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.queue_timeout_s)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed over just as we gave up: pass it on
            else:
                fut.cancel()
            if isinstance(exc, TimeoutError):
                st.refused_deadline += 1
                raise GKTError(ErrorCode.overloaded, "the teacher queue is too long; try again shortly",
                               retry_after=self.retry_after_s) from None
            raise
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)
            st.waiting = len(self._waiters)
        st.admitted += 1
        return perf_counter() - t0

    def release(self) -> None:
        """Give the slot to the longest waiter, or free it."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # in_flight is unchanged: the slot moves to the waiter
                self.stats.waiting = len(self._waiters)
                return
        self.stats.in_flight -= 1
