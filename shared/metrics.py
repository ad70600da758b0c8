"""Prometheus plumbing both services share: bucket layouts, outcome labels, the series every service exports
(``ServiceMetrics``) and the /metrics response.

Each app owns its own ``CollectorRegistry`` (no process-global metrics), so two apps can live in one test
process. Buckets span GPU latencies (milliseconds) and CPU ones (tens of seconds).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from shared.errors import ErrorCode, GKTError

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)
TOKENS_PER_SECOND_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 35.0, 50.0, 75.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)


# Outcome label values of the request counters on both services.
OK, FALLBACK, PARTIAL, REJECTED, REFUSED, ERROR, CANCELLED = (
    "ok", "fallback", "partial", "rejected", "refused", "error", "cancelled")
_REFUSALS = frozenset({ErrorCode.overloaded, ErrorCode.rate_limited, ErrorCode.draining, ErrorCode.circuit_open})


def outcome_of(err: GKTError) -> str:
    """refused (come back later), rejected (the request is wrong) or error (our fault)."""
    if err.code in _REFUSALS:
        return REFUSED
    return REJECTED if err.status < 500 else ERROR


@dataclass
class Tally:
    """How one request ended, for ``ServiceMetrics.counted``."""

    outcome: str = CANCELLED


class ServiceMetrics:
    """What each service's metrics start from: the app's own registry and the series both services export,
    ``gkt_<service>_requests_total`` (labelled ``labels`` + ``outcome``), ``..._requests_in_flight``,
    ``..._requests_queued`` and ``..._event_loop_tasks``. ``latency`` holds the keyword arguments of a latency
    histogram on this registry."""

    def __init__(self, service: str, registry: CollectorRegistry | None, *, requests: str, labels: list[str],
                 in_flight: str, queued: str) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.latency: dict[str, Any] = {"buckets": LATENCY_BUCKETS, "registry": r}
        self.requests = Counter(f"gkt_{service}_requests_total", requests, [*labels, "outcome"], registry=r)
        self.in_flight = Gauge(f"gkt_{service}_requests_in_flight", in_flight, registry=r)
        # L1/L2: a task leaked per request shows as growth here.
        self.loop_tasks = Gauge(f"gkt_{service}_event_loop_tasks", "Asyncio tasks alive in the server's event loop.",
                                registry=r)
        self.queued = Gauge(f"gkt_{service}_requests_queued", queued, registry=r)

    @contextmanager
    def counted(self, *labels: str) -> Iterator[Tally]:
        """One request in flight; when it ends, counted under ``labels`` and its outcome: what the block set on
        the tally, else the failure's (``outcome_of``), else ``cancelled`` (the consumer stopped reading)."""
        tally = Tally()
        self.in_flight.inc()
        try:
            yield tally
        except GKTError as err:
            tally.outcome = outcome_of(err)
            raise
        except Exception:
            tally.outcome = ERROR
            raise
        finally:
            self.in_flight.dec()
            self.requests.labels(*labels, tally.outcome).inc()

    def bind_queue(self, waiting: Callable[[], float]) -> None:
        """Read the queue length from ``waiting`` at scrape time."""
        self.queued.set_function(waiting)

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Count ``loop``'s tasks at scrape time (the /metrics route runs on that loop)."""
        self.loop_tasks.set_function(lambda: len(asyncio.all_tasks(loop)))


def metrics_response(registry: CollectorRegistry) -> Response:
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
