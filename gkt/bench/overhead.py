"""The bench's ``prefix`` and ``overhead`` sections: what reusing a prompt saves, and what each service's HTTP
layer costs against the same model called directly (interleaved, paired rounds: the machine drifts)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gkt.bench import direct
from gkt.bench.client import Stream, cloud_guidance, edge_stream
from gkt.bench.direct import pinned
from gkt.bench.report import Line, median, ratio

if TYPE_CHECKING:
    from gkt.bench.suite import Bench


async def prefix_reuse(bench: Bench) -> None:
    """First requests to fresh services: the first few-shot prompt is cold, the next ones share it."""
    n = max(2, bench.cfg.questions + 1)
    edge_s, cloud_s = [], []
    for i in range(n):
        body = {**bench.task_body(i), "mode": "student", "max_tokens": 1}
        s = await edge_stream(bench.http, bench.edge.url, body)
        edge_s.append(s.final["timings"]["student_prompt_s"])
        c = await cloud_guidance(bench.http, bench.cloud.url,
                                 {"prompt": bench.prompt(i), "max_tokens": 1, "temperature": 0})
        cloud_s.append(c.final["timings"]["prompt_s"])
    for side, vals in (("edge student", edge_s), ("cloud teacher", cloud_s)):
        warm = median(vals[1:])
        bench.add(Line(f"prefix reuse ({side})", ratio(warm, vals[0]), 0.15, "<=",
                       measured={"cold_prompt_s": vals[0], "warm_prompt_s_median": warm, "requests": n}))


async def overhead(bench: Bench, side: str, llm: Any, core: int | None, url: str,
                   pid: int | None = None) -> tuple[float | None, int]:
    """Decode tokens/s through the service vs the same model called directly, interleaved rounds.

    Also the CPU seconds per token on each side (the service process's, every thread, from ``/proc``; the
    bench thread's for the direct call): time other processes take from the core is not in it, so it
    shows work a layer adds even when the wall-clock ratio drowns in the host's drift (memory contention
    still moves it by several per cent)."""
    cfg = bench.cfg
    text = bench.prompt(0)
    tokens = llm.tokenize(text.encode(), add_bos=True, special=False)

    async def via_http() -> Stream:
        if side == "edge":
            body = {"prompt": text, "mode": "student", "max_tokens": cfg.decode_tokens, "temperature": 0}
            return await edge_stream(bench.http, url, body)
        return await cloud_guidance(bench.http, url, {"prompt": text, "max_tokens": cfg.decode_tokens,
                                                      "temperature": 0})

    with pinned(core):
        direct.decode_speed(llm, tokens, cfg.decode_tokens)  # warm: prompt in the cache on both sides
    await via_http()
    def call_direct() -> tuple[float | None, int, float]:
        """(tok/s, tokens, CPU seconds of this thread)."""
        with pinned(core):
            t0 = time.thread_time()
            tps, n = direct.decode_speed(llm, tokens, cfg.decode_tokens)
            return tps, n, time.thread_time() - t0

    served, raw, engine, pairs, cpu, n_tok = [], [], [], [], [], 0
    for i in range(cfg.rounds):
        # Paired rounds: this machine's speed drifts by 10 % within minutes, so each round's ratio is
        # taken back to back (in alternating order) and the figure is the median of those ratios.
        if i % 2:
            tps, n_tok, direct_cpu = call_direct()
        c0 = process_cpu_s(pid)
        stream = await via_http()
        c1 = process_cpu_s(pid)
        if not i % 2:
            tps, n_tok, direct_cpu = call_direct()
        if c0 is not None and c1 is not None and n_tok and stream.tokens:
            cpu.append(ratio(direct_cpu / n_tok, (c1 - c0) / stream.tokens))
        served.append(stream.tok_s)
        raw.append(tps)
        pairs.append(ratio(stream.tok_s, tps))
        if side == "cloud":  # the engine's own decode speed, from the done frame: splits engine from serving
            usage, timings = stream.final["usage"], stream.final["timings"]
            engine.append(ratio(usage["completion_tokens"] - 1, timings["generation_s"]))
    s, r = median(served), median(raw)
    name = "edge overhead (student tok/s via HTTP / direct)" if side == "edge" else \
        "cloud overhead (guidance tok/s via HTTP / direct)"
    measured: dict[str, Any] = {"http_tok_s": s, "direct_tok_s": r, "tokens": n_tok, "rounds": cfg.rounds,
                                "paired_ratios": [round(x, 3) for x in pairs if x is not None]}
    if cpu:
        measured["cpu_s_per_token_direct_vs_http"] = median(cpu)
    if engine:
        e = median(engine)
        measured |= {"engine_tok_s": e, "engine_vs_direct": ratio(e, r), "http_vs_engine": ratio(s, e)}
    bench.add(Line(name, median(pairs), 0.97, ">=", measured=measured,
                   note="median of paired rounds" + ("; engine_tok_s is the scheduler's own speed" if engine
                                                     else "")))
    return r, n_tok


def process_cpu_s(pid: int | None) -> float | None:
    """CPU seconds (user + system, all threads) a process has used so far."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)
