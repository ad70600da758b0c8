"""The edge's ``gkt_edge_*`` metrics and the wrapper that records one answer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from time import perf_counter

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from edge_agent.answer import Delta, Summary
from shared.adapters import REASONS, AdapterRef
from shared.errors import GKTError
from shared.metrics import (
    FALLBACK,
    OK,
    PARTIAL,
    TOKENS_PER_SECOND_BUCKETS,
    ServiceMetrics,
    outcome_of,
)


class EdgeMetrics(ServiceMetrics):
    """Every series the edge exports; label sets are fixed here."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__("edge", registry, requests="Answers by route, mode and outcome.", labels=["route", "mode"],
                         in_flight="Answers being produced.", queued="Answers waiting for the student's context.")
        r, lat = self.registry, self.latency
        self.ttft = Histogram("gkt_edge_time_to_first_token_seconds",
                              "Request start to the first answer token (teacher or student).", ["mode"], **lat)
        self.guidance_first = Histogram("gkt_edge_guidance_first_token_seconds",
                                        "Guidance request sent to its first token, seen by the edge.", **lat)
        self.guidance_last = Histogram("gkt_edge_guidance_last_token_seconds",
                                       "Guidance request sent to its last token, seen by the edge.", **lat)
        self.handoff_gap = Histogram("gkt_edge_handoff_gap_seconds",
                                     "Last guidance token to the student's first token.", **lat)
        self.student_prompt = Histogram("gkt_edge_student_prompt_seconds", "Student prompt processing.", **lat)
        self.student_generation = Histogram("gkt_edge_student_generation_seconds", "Student generation.", **lat)
        self.student_tps = Histogram("gkt_edge_student_tokens_per_second", "Student generation speed.",
                                     buckets=TOKENS_PER_SECOND_BUCKETS, registry=r)
        self.duration = Histogram("gkt_edge_request_duration_seconds", "End-to-end answer latency.", ["mode"], **lat)
        self.teacher_tokens = Counter("gkt_edge_teacher_tokens_total",
                                      "Guidance tokens written by the teacher (teacher tokenizer).", registry=r)
        self.student_tokens = Counter("gkt_edge_student_tokens_total",
                                      "Answer tokens written by the student (student tokenizer).", registry=r)
        self.cost = Counter("gkt_edge_cost_dollars_total",
                            "Cost of the answers by side (teacher: as the cloud stated it; student: the edge's own).",
                            ["side"], registry=r)
        self.teacher_only_cost = Counter("gkt_edge_teacher_only_cost_dollars_total",
                                         "What the same answers would have cost had the teacher written them all.",
                                         registry=r)
        for side in ("teacher", "student"):
            self.cost.labels(side)
        self.guidance_calls = Counter("gkt_edge_guidance_calls_total",
                                      "Guidance calls to the cloud: kind=first (one per gkt/teacher answer), "
                                      "reguide (the student's confidence dropped; see the reguide policy) or "
                                      "verify (the teacher checked a student draft; see the verify policy).",
                                      ["kind"], registry=r)
        self.guidance_ended_early = Counter("gkt_edge_guidance_ended_early_total",
                                            "First guidance ended by the edge at a step boundary (adaptive).",
                                            registry=r)
        self.student_discarded = Counter("gkt_edge_student_discarded_tokens_total",
                                         "Student tokens taken back when the teacher was called again, "
                                         "or drafted and not kept by the teacher (verify).", registry=r)
        self.answers_by_policy = Counter("gkt_edge_answers_by_policy_total", "gkt-mode answers by guidance policy.",
                                         ["policy"], registry=r)
        for kind in ("first", "reguide", "verify"):
            self.guidance_calls.labels(kind)
        for policy in ("fixed", "adaptive", "reguide", "verify"):
            self.answers_by_policy.labels(policy)
        self.fallbacks = Counter("gkt_edge_fallbacks_total",
                                 "Answers finished without full guidance: kind=fallback (none arrived) or "
                                 "partial (the stream broke); reason is the error code.",
                                 ["kind", "reason"], registry=r)
        # Fleet telemetry (edge_agent/telemetry.py): answer records pushed to the cloud.
        self.telemetry_sent = Counter("gkt_edge_telemetry_sent_total", "Answer records the cloud acknowledged.",
                                      registry=r)
        self.telemetry_dropped = Counter("gkt_edge_telemetry_dropped_total",
                                         "Answer records never delivered: reason=full (the outbox was full and "
                                         "they were the oldest) or refused (the cloud rejected the record).",
                                         ["reason"], registry=r)
        for reason in ("full", "refused"):
            self.telemetry_dropped.labels(reason)
        self.telemetry_buffered = Gauge("gkt_edge_telemetry_buffered", "Answer records waiting for the cloud.",
                                        registry=r)
        # An info gauge rather than an `adapter` label on every answer series: the adapter changes at run time,
        # and a label would split each counter into one series per version ever served. Join on `instance`.
        self.adapter_info = Gauge("gkt_edge_adapter_info",
                                  "1 for the LoRA adapter the student serves with (name, sha256); none: base.",
                                  ["name", "sha256"], registry=r)
        self.adapter_updates = Counter("gkt_edge_adapter_updates_total",
                                       "Followed-adapter updates: result=swapped, or why the current one stayed.",
                                       ["result"], registry=r)
        for result in ("swapped", *REASONS):
            self.adapter_updates.labels(result)

    def serving_adapter(self, adapter: AdapterRef | None) -> None:
        """The student serves with ``adapter`` from now on (None: the base model alone)."""
        self.adapter_info.clear()
        self.adapter_info.labels(adapter.name if adapter else "none", adapter.sha256 if adapter else "").set(1)

    def rejected(self, route: str, mode: str, err: GKTError) -> None:
        self.requests.labels(route, mode, outcome_of(err)).inc()

    async def observe(self, events: AsyncIterator[Delta | Summary], route: str, mode: str
                      ) -> AsyncIterator[Delta | Summary]:
        """Pass events through, recording the answer once it ends (or why it did not)."""
        t0 = perf_counter()
        first = False
        with self.counted(route, mode) as tally:
            async with aclosing(events) as it:
                async for ev in it:
                    if isinstance(ev, Delta) and not first:
                        first = True
                        self.ttft.labels(mode).observe(perf_counter() - t0)
                    if isinstance(ev, Summary):
                        tally.outcome = self._summary(ev, mode)
                        self.duration.labels(mode).observe(perf_counter() - t0)
                    yield ev

    def _summary(self, s: Summary, mode: str) -> str:
        info, t = s.info, s.info.timings
        self.teacher_tokens.inc(info.usage.teacher_tokens)
        self.cost.labels("teacher").inc(info.cost.teacher)
        self.cost.labels("student").inc(info.cost.student)
        if info.cost.teacher_only is not None:
            self.teacher_only_cost.inc(info.cost.teacher_only)
        self.student_tokens.inc(info.usage.student_tokens)
        for call in info.calls:
            self.guidance_calls.labels(call.kind).inc()
            if call.finish == "early":
                self.guidance_ended_early.inc()
        self.student_discarded.inc(info.usage.student_discarded_tokens)
        if info.policy is not None:
            self.answers_by_policy.labels(info.policy["name"]).inc()
        if t.cloud_ttft_s is not None:
            self.guidance_first.observe(t.cloud_ttft_s)
        if t.guidance_last_token_s is not None:
            self.guidance_last.observe(t.guidance_last_token_s)
        if t.handoff_gap_s is not None:
            self.handoff_gap.observe(t.handoff_gap_s)
        if t.student_prompt_s is not None:
            self.student_prompt.observe(t.student_prompt_s)
        if t.student_generation_s is not None:
            self.student_generation.observe(t.student_generation_s)
            if info.usage.student_tokens > 1 and t.student_generation_s > 0:
                # the first token's time is in prompt processing; the rest are generation steps
                self.student_tps.observe((info.usage.student_tokens - 1) / t.student_generation_s)
        if info.fallback:
            self.fallbacks.labels("fallback", info.fallback).inc()
            return FALLBACK
        if info.partial:
            self.fallbacks.labels("partial", info.partial_reason or "unknown").inc()
            return PARTIAL
        return OK
