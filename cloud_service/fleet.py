"""The fleet's answers as their edges reported them: stored once each (``fleet_db``), counted for Prometheus.

Edges behind NAT push their per-answer records (``shared/telemetry.py``) on the channel they already have.
The cloud stores a batch in one transaction and acknowledges it only once committed, so an edge deletes
nothing the cloud has not stored. Metrics carry one label, ``edge`` (the edge's key name: as many values as
configured keys), and count only records stored for the first time, so a re-sent batch leaves them unchanged.
While the ledger's database is down the cloud refuses telemetry with 503 ``store_unavailable`` (the edge keeps
the batch on disk and tries again).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter

from cloud_service.fleet_db import FleetStore, fleet_total, with_fraction, zeros
from cloud_service.ledger_db import LedgerStore
from shared.errors import ErrorCode, GKTError
from shared.telemetry import AnswerBatch, BatchReceipt


class FleetMetrics:
    """``gkt_cloud_fleet_*``: the edges' answers as reported to this replica, by edge."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"gkt_cloud_fleet_{name}", doc, ["edge"], registry=registry)

        self.answers = counter("answers_total", "Answers the edges reported (each record counted once).")
        self.fallbacks = counter("fallbacks_total", "Reported answers that got no guidance (the student alone).")
        self.student_tokens = counter("student_tokens_total", "Answer tokens the edges' students wrote.")
        self.student_seconds = counter("student_seconds_total", "Student prompt and generation time at the edges.")
        self.student_cost = counter("student_cost_dollars_total", "The edges' own cost of their answers.")
        self.teacher_cost = counter("teacher_cost_dollars_total", "Teacher cost of the answers, as the cloud "
                                    "stated it to the edge.")
        self.teacher_only_cost = counter("teacher_only_cost_dollars_total", "What the same answers would have "
                                         "cost had the teacher written them all.")
        self.received = Counter("gkt_cloud_fleet_records_received_total", "Telemetry records received, by "
                                "result: stored (new) or duplicate (sent again after a lost acknowledgement).",
                                ["result"], registry=registry)
        for result in ("stored", "duplicate"):
            self.received.labels(result)


class Fleet:
    """Receives the edges' batches and sums them for ``/v1/usage``."""

    def __init__(self, store: LedgerStore, metrics: FleetMetrics, viewers: str = "") -> None:
        self.ledger = store
        self.store = FleetStore(store)
        self.metrics = metrics
        self.viewers = {v.strip() for v in viewers.split(",") if v.strip()}

    async def receive(self, tenant: str, batch: AnswerBatch) -> BatchReceipt:
        """Store the batch (committed when this returns) and count its new records."""
        if not self.ledger.healthy:
            raise GKTError(ErrorCode.store_unavailable, "the ledger is unavailable; send the batch again later",
                           retry_after=5.0)
        try:
            new = await self.store.add(tenant, batch.records)
        except Exception as exc:
            self.ledger.down(exc)
            raise GKTError(ErrorCode.store_unavailable, "the ledger is unavailable; the batch was not stored",
                           retry_after=5.0) from None
        m = self.metrics
        for r in batch.records:
            if r.id not in new:
                continue
            m.answers.labels(tenant).inc()
            m.fallbacks.labels(tenant).inc(int(r.fallback is not None))
            m.student_tokens.labels(tenant).inc(r.student_tokens)
            m.student_seconds.labels(tenant).inc(r.student_prompt_s + r.student_generation_s)
            m.student_cost.labels(tenant).inc(r.student_cost)
            m.teacher_cost.labels(tenant).inc(r.teacher_cost)
            m.teacher_only_cost.labels(tenant).inc(r.teacher_only_cost or 0.0)
        dup = len(batch.records) - len(new)
        m.received.labels("stored").inc(len(new))
        m.received.labels("duplicate").inc(dup)
        return BatchReceipt(accepted=len(batch.records), stored=len(new), duplicates=dup)

    async def usage(self, tenant: str) -> dict[str, Any]:
        """The caller's own edge totals; for a fleet viewer (``GKT_CLOUD_FLEET_VIEWERS``) every edge's and the
        fleet's too."""
        try:
            everyone = "*" in self.viewers or tenant in self.viewers
            edges = await self.store.totals(None if everyone else tenant)
        except Exception as exc:
            self.ledger.down(exc)
            raise GKTError(ErrorCode.store_unavailable, "the ledger is unavailable; try again shortly",
                           retry_after=1.0) from None
        out: dict[str, Any] = {"edge": with_fraction(edges.get(tenant) or zeros())}  # zeros: nothing reported yet
        if everyone:
            out["fleet"] = {**fleet_total(edges), "by_edge": {name: with_fraction(e) for name, e in edges.items()}}
        return out
