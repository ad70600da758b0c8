"""The cloud's ``gkt_cloud_*`` metrics and the wrapper that records one guidance generation."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterator
from time import perf_counter

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from cloud_service.engine import Generation, Item
from shared.errors import GKTError
from shared.generation import GenerationResult, Piece
from shared.metrics import (
    BATCH_SIZE_BUCKETS,
    OK,
    TOKENS_PER_SECOND_BUCKETS,
    ServiceMetrics,
    outcome_of,
)


class CloudMetrics(ServiceMetrics):
    """Every series the cloud exports; label sets are fixed here."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__("cloud", registry, requests="Guidance requests by route and outcome.", labels=["route"],
                         in_flight="Guidance generations under way.",
                         queued="Guidance requests waiting for the teacher.")
        r, lat = self.registry, self.latency
        self.ttft = Histogram("gkt_cloud_time_to_first_token_seconds",
                              "Request accepted to the first guidance token.", **lat)
        self.queue_wait = Histogram("gkt_cloud_queue_wait_seconds", "Time waiting for the teacher engine.", **lat)
        self.prompt = Histogram("gkt_cloud_prompt_seconds", "Teacher prompt processing.", **lat)
        self.generation = Histogram("gkt_cloud_generation_seconds", "Teacher generation of the guidance.", **lat)
        self.duration = Histogram("gkt_cloud_request_duration_seconds", "Whole guidance request.", **lat)
        self.tps = Histogram("gkt_cloud_guidance_tokens_per_second", "Teacher generation speed per request.",
                             buckets=TOKENS_PER_SECOND_BUCKETS, registry=r)
        self.prompt_tokens = Counter("gkt_cloud_prompt_tokens_total", "Teacher prompt tokens.", registry=r)
        self.cached_prompt_tokens = Counter("gkt_cloud_cached_prompt_tokens_total", "Teacher prompt tokens found "
                                            "in its KV cache (billed at the cached-input price).", registry=r)
        self.guidance_tokens = Counter("gkt_cloud_guidance_tokens_total", "Guidance tokens written.", registry=r)
        self.draft_tokens = Counter("gkt_cloud_draft_tokens_total", "Draft tokens verified (the verify policy), "
                                    "by verdict: kept (the teacher would have written them) or cut.",
                                    ["verdict"], registry=r)
        for verdict in ("kept", "cut"):
            self.draft_tokens.labels(verdict)

    def bind_service(self, service: object) -> None:
        """Export the service's own counters (engine, admission, cache, ledger) at scrape time."""
        self.queued.set_function(lambda: service.admission.stats.waiting)  # type: ignore[attr-defined]
        self.registry.register(_ServiceCollector(service))

    def rejected(self, route: str, err: GKTError) -> None:
        self.requests.labels(route, outcome_of(err)).inc()

    async def observe(self, generation: Generation, route: str) -> AsyncGenerator[Item, None]:
        """A stage of a ``Stream``: pass a generation through, recording it once it ends (or why it did not)."""
        t0 = perf_counter()
        first = False
        with self.counted(route) as tally:
            async for item in generation:
                if isinstance(item, Piece) and not first:
                    first = True
                    self.ttft.observe(perf_counter() - t0)
                if isinstance(item, GenerationResult):
                    tally.outcome = OK
                    self._result(item)
                    self.duration.observe(perf_counter() - t0)
                yield item

    def _result(self, r: GenerationResult) -> None:
        self.queue_wait.observe(r.queue_s)
        self.prompt.observe(r.prompt_s)
        self.generation.observe(r.generation_s)
        self.prompt_tokens.inc(r.prompt_tokens)
        self.cached_prompt_tokens.inc(r.cached_prompt_tokens)
        self.guidance_tokens.inc(r.completion_tokens)
        if r.draft_tokens:
            self.draft_tokens.labels("kept").inc(r.draft_accepted_tokens)
            self.draft_tokens.labels("cut").inc(r.draft_tokens - r.draft_accepted_tokens)
        if r.completion_tokens > 1 and r.generation_s > 0:
            self.tps.observe((r.completion_tokens - 1) / r.generation_s)


class _ServiceCollector(Collector):
    """Series read from the guidance service's plain counters when Prometheus scrapes, so the engine's
    thread and the ledger never touch prometheus objects."""

    def __init__(self, service: object) -> None:
        self.service = service

    def describe(self) -> list:
        return []  # unchecked collector: the engine decides at run time which series it has

    def collect(self) -> Iterator:
        svc = self.service
        engine = getattr(svc.engine, "stats", None) or {}  # type: ignore[attr-defined]
        sizes = {int(k): v for k, v in (engine.get("batch_sizes") or {}).items()}
        if sizes or "steps" in engine:
            buckets, acc = [], 0
            for bound in BATCH_SIZE_BUCKETS:
                acc = sum(v for k, v in sizes.items() if k <= bound)
                buckets.append((str(float(bound)), acc))
            buckets.append(("+Inf", sum(sizes.values())))
            yield HistogramMetricFamily(
                "gkt_cloud_batch_size", "Sequences sampled together in one decode step (continuous batching).",
                buckets=buckets, sum_value=sum(k * v for k, v in sizes.items()))
            steps = CounterMetricFamily("gkt_cloud_decode_steps", "Batched decode steps (llama_decode calls).")
            steps.add_metric([], engine.get("steps", 0))
            yield steps
            active = GaugeMetricFamily("gkt_cloud_engine_sequences", "Sequences holding an engine slot.")
            active.add_metric([], engine.get("active", 0))
            yield active
        adm = svc.admission.stats  # type: ignore[attr-defined]
        refused = CounterMetricFamily("gkt_cloud_admission_refusals", "Requests refused before the engine.",
                                      labels=["reason"])
        refused.add_metric(["queue_full"], adm.refused_full)
        refused.add_metric(["queue_deadline"], adm.refused_deadline)
        refused.add_metric(["rate_limited"], sum(svc.limiter.limited.values()))  # type: ignore[attr-defined]
        yield refused
        cache = svc.cache.snapshot()  # type: ignore[attr-defined]
        lookups = CounterMetricFamily("gkt_cloud_cache_lookups", "Guidance cache lookups.", labels=["result"])
        lookups.add_metric(["hit"], cache["hits"])
        lookups.add_metric(["miss"], cache["misses"])
        yield lookups
        entries = GaugeMetricFamily("gkt_cloud_cache_bytes", "Guidance cache size.")
        entries.add_metric([], cache["bytes"])
        yield entries
        totals = svc.ledger.recorded  # type: ignore[attr-defined]  # this process's rows (counters per replica)
        cost = CounterMetricFamily("gkt_cloud_cost_dollars", "Teacher cost of all guidance, priced by the ledger.")
        cost.add_metric([], totals.cost)
        yield cost
        engine_s = CounterMetricFamily("gkt_cloud_engine_seconds", "Teacher engine time charged by the ledger.")
        engine_s.add_metric([], totals.engine_s)
        yield engine_s
