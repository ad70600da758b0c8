"""The bench's ``cold`` section: whole answers to prompts neither side has seen, gkt against teacher-only.

The other answer lines time warm prompts: the few-shot prefix already sits in both KV caches. A new user's
prompt does not (5-shot prompts whose exemplars change per question, a new conversation, a retrieved
document): the teacher's cold prefill is then most of a teacher-only answer and also the wait before gkt's
first token, so what the split saves is only the teacher's decoding after k tokens (issue #22).

Each request carries a line of its own before the 8-shot block (``contention.cold_body``), so every mode and k
meets a cold cache on both sides. Lines: latency gkt k / teacher-only (target <= 1: the split must not cost the
user time), time to first token gkt k / teacher-only (INFO: both wait for the same prefill), with the handoff
gap and the teacher's prompt time beside them; quiet, and with a CPU-bound process on the edge's core. The
``links`` section calls :func:`cold_answers` for the split hosts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gkt.bench.client import edge_stream
from gkt.bench.contention import busy_core, cold_body
from gkt.bench.report import Line, median, ratio

if TYPE_CHECKING:
    from gkt.bench.suite import Bench

COLD_KS = (20, 40)


async def cold_answers(bench: Bench, edge_url: str, where: str, first: int = 70) -> None:
    """Lines for cold prompts answered by the edge at ``edge_url``; ``where`` names the setting in them."""
    ks = tuple(k for k in COLD_KS if k < bench.cfg.answer_tokens) or (bench.cfg.work_k,)
    modes: list[tuple[str, int | None]] = [("teacher", None), *(("gkt", k) for k in ks)]
    seen: dict[tuple[str, int | None], list[dict[str, Any]]] = {m: [] for m in modes}
    for q in range(max(2, bench.cfg.questions)):
        # The order rotates per question: the machine drifts, and no mode should always go first.
        for mode, k in modes[q % len(modes):] + modes[: q % len(modes)]:
            body = {**cold_body(bench, first + q, f"{where}-{mode}-{k}", k), "mode": mode}
            s = await edge_stream(bench.http, edge_url, body)
            t = s.final["timings"]
            seen[(mode, k)].append({"latency_s": s.latency, "ttft_s": s.ttft,
                                    "teacher_prompt_s": (t.get("teacher") or {}).get("prompt_s"),
                                    "handoff_gap_s": t.get("handoff_gap_s")})
    teacher = seen[("teacher", None)]
    t_lat, t_ttft = median([r["latency_s"] for r in teacher]), median([r["ttft_s"] for r in teacher])
    for mode, k in modes[1:]:
        rows = seen[(mode, k)]
        lat, ttft = median([r["latency_s"] for r in rows]), median([r["ttft_s"] for r in rows])
        measured = {"gkt_s": lat, "teacher_only_s": t_lat, "gkt_ttft_s": ttft, "teacher_only_ttft_s": t_ttft,
                    "teacher_prompt_s": median([r["teacher_prompt_s"] for r in rows]),
                    "handoff_gap_s": median([r["handoff_gap_s"] for r in rows]), "answers": len(rows)}
        bench.add(Line(f"cold prompts, {where}: latency gkt k={k} / teacher-only", ratio(lat, t_lat), 1.0, "<=",
                       measured=measured, note="prompts unseen by either cache; medians"))
        bench.add(Line(f"cold prompts, {where}: time to first token gkt k={k} / teacher-only", ratio(ttft, t_ttft),
                       None, measured={"gkt_ttft_s": ttft, "teacher_only_ttft_s": t_ttft}))


async def cold(bench: Bench) -> None:
    """One host: the loopback pair, quiet, then with a busy loop on the edge's core."""
    await cold_answers(bench, bench.edge.url, "one host")
    with busy_core(bench.edge_core):
        await cold_answers(bench, bench.edge.url, "one host, edge core contended", first=80)
