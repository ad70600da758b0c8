"""The bench's ``answers``, ``ttft`` and ``handoff`` sections: whole answers on warm prompts (the teacher's work
and the user's latency, gkt against teacher-only), what the edge adds to the cloud's time to first token, and
the handoff gap with and without the fast path."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from gkt.bench.client import Stream, cloud_guidance, edge_stream
from gkt.bench.report import Line, median, ratio
from shared.tasks import GSM8K

if TYPE_CHECKING:
    from gkt.bench.suite import Bench


async def warm_task_prefix(bench: Bench) -> None:
    """One unmeasured task request, so the few-shot prefix is warm on both sides before whole answers are
    timed (other measurements used other prompts in between)."""
    for url in (bench.edge.url, bench.edge_slow.url):
        await edge_stream(bench.http, url, bench.task_body(99, mode="gkt", guidance_tokens=2, max_tokens=4))


async def work_per_answer(bench: Bench) -> None:
    cfg = bench.cfg
    gkt_s, teacher_s = [], []
    for i in range(cfg.questions):
        # Both modes must find the teacher's cache in the same state: put this prompt there first.
        await cloud_guidance(bench.http, bench.cloud.url, {"prompt": bench.prompt(10 + i), "max_tokens": 1,
                                                           "temperature": 0})
        for mode, out in (("gkt", gkt_s), ("teacher", teacher_s)):
            s = await edge_stream(bench.http, bench.edge.url,
                                  bench.task_body(10 + i, mode=mode, guidance_tokens=cfg.work_k))
            t = s.final["timings"]["teacher"]
            out.append(t["prompt_s"] + t["generation_s"])
    g, t = statistics.mean(gkt_s), statistics.mean(teacher_s)
    bench.add(Line(f"cloud work per answer (gkt k={cfg.work_k} / teacher-only)", ratio(g, t), 0.35, "<=",
                   measured={"gkt_teacher_s": g, "teacher_only_s": t, "answers": cfg.questions}))


async def latency(bench: Bench) -> None:
    cfg = bench.cfg
    for users in cfg.users:
        teacher = await latency_of(bench, users, "teacher", None)
        for k in cfg.ks:
            g = await latency_of(bench, users, "gkt", k)
            bench.add(Line(f"end-to-end latency gkt k={k} / teacher-only, {users} user(s)", ratio(g, teacher),
                           1.0, "<=", measured={"gkt_s": g, "teacher_only_s": teacher,
                                                "answer_tokens": cfg.answer_tokens}))


async def latency_of(bench: Bench, users: int, mode: str, k: int | None) -> float:
    """Median latency of whole answers with ``users`` concurrent users, ``questions`` rounds of them (one
    round of four answers was too few: one long answer moved the median by half)."""
    extra = {"mode": mode, **({"guidance_tokens": k} if k else {})}
    lat: list[float] = []
    for r in range(bench.cfg.questions):
        streams = await bench.concurrent(users, lambda i, r=r: edge_stream(
            bench.http, bench.edge.url, bench.task_body(20 + i + r * users, **extra)))
        lat += [s.latency for s in streams]
    return statistics.median(lat)


async def ttft(bench: Bench) -> None:
    """Within one request: the user's first token (client-side) minus the cloud's own time to first token
    (its queue + prompt time from the done frame)."""
    work_k = bench.cfg.work_k
    vs_client, vs_engine = [], []
    parts: dict[str, list[float]] = {"client_to_edge_and_back_s": [], "edge_to_cloud_and_back_s": [],
                                     "edge_until_guidance_sent_and_seam_s": []}
    for i in range(max(4, bench.cfg.questions)):
        # The cloud's own TTFT: a client calling it directly with the request the edge would send. The
        # prompt is put in the teacher's cache first, so both requests find it there, and the order of
        # the pair alternates (the machine drifts).
        direct_body = {"prompt": bench.prompt(30 + i), "max_tokens": work_k, "temperature": 0,
                       "stop": list(GSM8K.stop), "whole_words": True}
        await cloud_guidance(bench.http, bench.cloud.url, {**direct_body, "max_tokens": 1})
        edge_body = bench.task_body(30 + i, guidance_tokens=work_k)
        pair: dict[str, Stream] = {}
        for who in (("cloud", "edge") if i % 2 == 0 else ("edge", "cloud")):
            pair[who] = await (cloud_guidance(bench.http, bench.cloud.url, direct_body) if who == "cloud" else
                               edge_stream(bench.http, bench.edge.url, edge_body))
        s, t = pair["edge"], pair["edge"].final["timings"]
        engine_own = t["teacher"]["queue_s"] + t["teacher"]["prompt_s"]
        c = pair["cloud"].final["timings"]
        # Each request's own engine time (queue + prompt) is taken out before comparing: it varies by a
        # decode step (20 ms and more) between two requests, which is noise here, not overhead.
        vs_client.append((s.ttft - engine_own) - (pair["cloud"].ttft - c["queue_s"] - c["prompt_s"]))
        vs_engine.append(s.ttft - engine_own)
        # The difference to the engine's own queue + prompt time, in three parts that add up to it: the
        # client's request into the edge's pipeline and the first chunk back out; the edge's own work
        # from the start of the answer to the guidance request, plus what the seam holds; the hop to the
        # cloud and back (the cloud's HTTP, tokenizing and framing included).
        parts["client_to_edge_and_back_s"].append(s.ttft - t["ttft_s"])
        parts["edge_until_guidance_sent_and_seam_s"].append(t["ttft_s"] - t["cloud_ttft_s"])
        parts["edge_to_cloud_and_back_s"].append(t["cloud_ttft_s"] - engine_own)
    d = median(vs_client)
    bench.add(Line("time to first token: edge (gkt) minus cloud's own (direct client)", d, 0.020, "<=",
                   unit="s", measured={"edge_added_ttft_s": d,
                                       "edge_minus_engine_queue_and_prompt_s": median(vs_engine),
                                       **{k: median(v) for k, v in parts.items()}},
                   note="both TTFTs net of their engine queue + prompt time; parts: of the edge's"))


async def handoff(bench: Bench) -> None:
    cfg = bench.cfg
    fast, slow, cached, total = [], [], [], []
    for i in range(max(2, cfg.questions)):
        # Each edge sees each question once (a repeat would find prompt and guidance cached); the teacher
        # writes the same guidance for both (canonical batches make it independent of its cache).
        body = bench.task_body(40 + i, guidance_tokens=cfg.work_k)
        for url, out in ((bench.edge.url, fast), (bench.edge_slow.url, slow)):
            s = await edge_stream(bench.http, url, body)
            out.append(s.final["timings"]["handoff_gap_s"])
            if url == bench.edge.url:
                u = s.final["usage"]
                cached.append(u["student_cached_tokens"])
                total.append(u["student_prompt_tokens"] + u["guidance_student_tokens"])
    f, s_ = median(fast), median(slow)
    bench.add(Line("handoff gap, fast path / without", ratio(f, s_), 0.5, "<=",
                   measured={"fast_s": f, "without_s": s_, "uncached_tokens_at_handoff":
                             median([t - c for t, c in zip(total, cached, strict=True)])}))
