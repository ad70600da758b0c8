"""The measurements. Each compares two things measured in the same run, on the same machine, interleaved where
it matters, because this machine is shared and absolute speeds drift (docs/BENCHMARKS.md).

Services run as real processes: the cloud pinned to one core and the edges to another (``taskset``), each
model on one thread. Direct references (llama-cpp-python, raw ``llama_batch`` decoding) run in this process,
pinned to the core of the service they are compared with, while that service is idle.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from gkt import vllm
from gkt.bench import direct
from gkt.bench.client import Stream, cloud_guidance, edge_stream, openai_completion
from gkt.bench.cold import cold
from gkt.bench.contention import handoff_under_contention
from gkt.bench.links import links
from gkt.bench.report import Line, median, ratio
from gkt.launcher import Service, cloud_service, edge_service, free_port
from shared.models import DEFAULT_STUDENT, DEFAULT_TEACHER, resolve
from shared.tasks import GSM8K

# GSM8K-style questions written for the bench (not from the dataset): short, distinct, all arithmetic.
QUESTIONS = [
    "A baker makes 24 rolls and sells 3 bags of 6 rolls. How many rolls are left?",
    "Tom reads 12 pages a day for 5 days, then 20 pages on the sixth day. How many pages did he read?",
    "A farmer has 7 cows and buys twice as many goats. How many animals does he have now?",
    "Mia saves $15 a week. How many weeks does she need to save $90 for a bike?",
    "A train travels 60 miles per hour for 3 hours and then 40 miles per hour for 2 hours. How far did it go?",
    "There are 32 students in a class and a quarter of them wear glasses. How many do not wear glasses?",
    "Sam buys 4 notebooks at $3 each and a pen for $2. He pays with a $20 bill. How much change does he get?",
    "A garden has 5 rows of 8 tulips. Rabbits eat 9 tulips. How many tulips are left?",
]


# Groups of measurements, in the order they run ("prefix" needs fresh services, so it comes first). Three have
# their own modules: "contention" (the handoff gap on cold prompts with the edge's core taken), "cold" (whole
# answers to cold prompts, quiet and contended) and "links" (edge and cloud on two hosts, a link with an RTT).
SECTIONS = ("prefix", "overhead", "batching", "answers", "ttft", "handoff", "contention", "cold", "links")


@dataclass
class BenchConfig:
    """What to run. ``quick`` shrinks everything for a smoke run (tests); the defaults are the real bench."""

    teacher: str = DEFAULT_TEACHER
    student: str = DEFAULT_STUDENT
    threads: int = 1
    n_ctx: int = 2048
    decode_tokens: int = 64  # overhead benches: tokens per answer
    rounds: int = 5  # overhead benches: paired rounds (median of their ratios)
    guidance_tokens: int = 32  # batching bench: k per request
    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    ks: tuple[int, ...] = (10, 20, 40)
    users: tuple[int, ...] = (1, 4)
    work_k: int = 40
    answer_tokens: int = 160  # max_tokens of whole answers (work, latency, handoff)
    questions: int = 2  # per measurement of whole answers
    vllm_url: str | None = None
    vllm_model: str | None = None
    vllm_local: str | None = None  # a model converted by ``make vllm-setup``: start vLLM here on the CPU
    pin: bool = True
    data: Path | None = None  # a GSM8K jsonl file: its first questions replace the built-in ones
    sections: tuple[str, ...] = SECTIONS
    log_dir: Path = field(default_factory=lambda: Path(".bench-logs"))

    @classmethod
    def quick(cls, **kw: Any) -> BenchConfig:
        small = dict(teacher="smollm2-135m-instruct", student="smollm2-135m-instruct", decode_tokens=8, rounds=1,
                     guidance_tokens=4, concurrency=(1, 2), ks=(4,), users=(1, 2), work_k=4, answer_tokens=12,
                     questions=1)
        return cls(**{**small, **kw})


@contextmanager
def pinned(core: int | None) -> Iterator[None]:
    """Run this thread on one core (llama.cpp with one thread computes on the calling thread)."""
    if core is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


class Bench:
    """Starts the services, runs every measurement, stops everything it started."""

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        cores = sorted(os.sched_getaffinity(0))
        can_pin = cfg.pin and len(cores) >= 2 and shutil.which("taskset") is not None
        self.cloud_core, self.edge_core = (cores[0], cores[1]) if can_pin else (None, None)
        self.services: list[Service] = []
        self.lines: list[Line] = []
        self.extra: dict[str, Any] = {}
        self.http = httpx.AsyncClient()
        self.questions = questions(cfg.data)

    # --- services ------------------------------------------------------------------------------------------

    def _pin(self, svc: Service, core: int | None) -> Service:
        if core is not None:
            svc.argv = ["taskset", "-c", str(core), *svc.argv]
        return svc

    def start(self) -> None:
        cfg = self.cfg
        logs = cfg.log_dir
        t = str(cfg.threads)
        cenv = {"GKT_CLOUD_MODEL": cfg.teacher, "GKT_CLOUD_N_CTX": str(cfg.n_ctx), "GKT_CLOUD_N_THREADS": t,
                "GKT_CLOUD_MAX_WAITING": "64", "GKT_CLOUD_LOG_LEVEL": "warning",
                "GKT_CLOUD_AUTH": "false",  # a private pair on loopback
                # Every measurement here is of the teacher's work: a repeated prompt (the overhead rounds, the
                # two edges of the handoff line) must not be answered from the guidance cache.
                "GKT_CLOUD_CACHE_MAX_ENTRIES": "0"}
        self.cloud = self._pin(cloud_service(free_port(), cenv, log_path=logs / "cloud.log"), self.cloud_core)
        eenv = {"GKT_EDGE_MODEL": cfg.student, "GKT_EDGE_N_CTX": str(cfg.n_ctx), "GKT_EDGE_N_THREADS": t,
                "GKT_EDGE_MAX_WAITING": "64", "GKT_EDGE_LOG_LEVEL": "warning",
                "GKT_EDGE_AUTH": "false",  # private edges only this bench calls
                # Teacher-only answers for four users on one CPU core take minutes: this bench measures speed,
                # the deadlines are tested elsewhere (T1-T4).
                "GKT_EDGE_GUIDANCE_TIMEOUT_S": "1800"}
        self.cloud.start()
        self.services.append(self.cloud)
        self.edge = self._pin(edge_service(free_port(), self.cloud.url, eenv, log_path=logs / "edge.log"),
                              self.edge_core)
        self.edge_slow = self._pin(edge_service(free_port(), self.cloud.url, {**eenv, "GKT_EDGE_FAST_PATH": "false"},
                                                log_path=logs / "edge_slow.log"), self.edge_core)
        for svc in (self.edge, self.edge_slow):
            svc.start()
            self.services.append(svc)
        for svc in self.services:
            svc.wait_ready()

    def stop(self) -> None:
        for svc in reversed(self.services):
            svc.stop()

    # --- helpers -------------------------------------------------------------------------------------------

    def question(self, i: int) -> str:
        return self.questions[i % len(self.questions)]

    def prompt(self, i: int) -> str:
        return GSM8K.build_prompt(self.question(i))

    def task_body(self, i: int, **kw: Any) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": self.question(i)}], "task": "gsm8k",
                "temperature": 0, "max_tokens": self.cfg.answer_tokens, **kw}

    async def concurrent(self, n: int, make: Callable[[int], Awaitable[Stream]]) -> list[Stream]:
        return list(await asyncio.gather(*(make(i) for i in range(n))))

    def add(self, line: Line) -> None:
        self.lines.append(line)
        print(f"  {line.name}: {line.value if line.value is None else round(line.value, 4)} {line.unit} "
              f"({line.status})", flush=True)

    # --- measurements --------------------------------------------------------------------------------------

    async def prefix_reuse(self) -> None:
        """First requests to fresh services: the first few-shot prompt is cold, the next ones share it."""
        n = max(2, self.cfg.questions + 1)
        edge_s, cloud_s = [], []
        for i in range(n):
            body = {**self.task_body(i), "mode": "student", "max_tokens": 1}
            s = await edge_stream(self.http, self.edge.url, body)
            edge_s.append(s.final["timings"]["student_prompt_s"])
            c = await cloud_guidance(self.http, self.cloud.url,
                                     {"prompt": self.prompt(i), "max_tokens": 1, "temperature": 0})
            cloud_s.append(c.final["timings"]["prompt_s"])
        for side, vals in (("edge student", edge_s), ("cloud teacher", cloud_s)):
            warm = median(vals[1:])
            self.add(Line(f"prefix reuse ({side})", ratio(warm, vals[0]), 0.15, "<=",
                          measured={"cold_prompt_s": vals[0], "warm_prompt_s_median": warm, "requests": n}))

    async def overhead(self, side: str, llm: Any, core: int | None, url: str,
                       pid: int | None = None) -> tuple[float | None, int]:
        """Decode tokens/s through the service vs the same model called directly, interleaved rounds.

        Also the CPU seconds per token on each side (the service process's, every thread, from ``/proc``; the
        bench thread's for the direct call): time other processes take from the core is not in it, so it
        shows work a layer adds even when the wall-clock ratio drowns in the host's drift (memory contention
        still moves it by several per cent)."""
        cfg = self.cfg
        text = self.prompt(0)
        tokens = llm.tokenize(text.encode(), add_bos=True, special=False)

        async def via_http() -> Stream:
            if side == "edge":
                body = {"prompt": text, "mode": "student", "max_tokens": cfg.decode_tokens, "temperature": 0}
                return await edge_stream(self.http, url, body)
            return await cloud_guidance(self.http, url, {"prompt": text, "max_tokens": cfg.decode_tokens,
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
        self.add(Line(name, median(pairs), 0.97, ">=", measured=measured,
                      note="median of paired rounds" + ("; engine_tok_s is the scheduler's own speed" if engine
                                                         else "")))
        return r, n_tok

    async def batching(self, teacher_llm: Any) -> None:
        cfg = self.cfg
        k = cfg.guidance_tokens
        prompts = [f"Q: List the even numbers from {2 * i} to {2 * i + 60}, one per line.\nA:" for i in range(64)]
        used = itertools.count()  # distinct prompts: no request can be answered from a cache

        def body() -> dict[str, Any]:
            return {"prompt": prompts[next(used) % 64], "max_tokens": k, "temperature": 0}

        def aggregate(c: int) -> Awaitable[float]:
            return self._aggregate(c, lambda _: cloud_guidance(self.http, self.cloud.url, body()))

        raw = direct.RawBatch(teacher_llm, max_seqs=max(cfg.concurrency), n_ctx_per_seq=256, n_threads=cfg.threads)
        toks = [teacher_llm.tokenize(p.encode(), add_bos=True, special=False) for p in prompts]

        def reference(c: int) -> float:
            """The raw ceiling for ``c`` streams: best of two runs, pinned to the cloud's core (idle now)."""
            with pinned(self.cloud_core):
                return max(raw.throughput(toks[64 - c :], k) for _ in range(2))

        try:
            with pinned(self.cloud_core):
                raw.throughput(toks[: max(cfg.concurrency)], 2)  # warm-up: the first decodes allocate buffers
            serial: float | None = None
            for c in cfg.concurrency:
                # Reference and cloud measured back to back for each c: the machine's load drifts.
                ref = reference(c)
                agg = max([await aggregate(c) for _ in range(2)])  # best of two, as the reference
                serial = serial or agg
                self.add(Line(f"cloud batching llama.cpp, {c} concurrent (aggregate / raw llama_batch)",
                              ratio(agg, ref), 0.9, ">=",
                              measured={"cloud_agg_tok_s": agg, "raw_batched_tok_s": ref,
                                        "cloud_vs_one_at_a_time": ratio(agg, serial), "k": k}))
        finally:
            raw.close()

    async def batching_vllm(self) -> None:
        """gkt's cloud in front of vLLM vs vLLM called directly, same requests and concurrency.

        With ``--vllm-local`` vLLM computes on the cloud core and gkt's cloud runs on the other one, as the
        engine and the serving process do on a GPU machine: on two cores, a model spread over both stalls
        whenever another process takes one of them, and that would charge gkt's front for a core it shares
        with the model rather than for the work it does."""
        cfg = self.cfg
        url = (cfg.vllm_url or "").rstrip("/")
        if cfg.vllm_local:  # vLLM on this machine (``make vllm-setup VLLM_MODEL=...``), started for this section
            cores = "auto" if self.cloud_core is None else str(self.cloud_core)
            server = vllm.vllm_service(free_port(), cfg.vllm_local, cfg.vllm_local, cores=cores,
                                       log_path=cfg.log_dir / "vllm.log").start()
            self.services.append(server)
            server.wait_ready(900)
            url = f"{server.url}/v1"
        env = {"GKT_CLOUD_BACKEND": "openai", "GKT_CLOUD_UPSTREAM_URL": url, "GKT_CLOUD_LOG_LEVEL": "warning",
               "GKT_CLOUD_MAX_WAITING": "64", "GKT_CLOUD_AUTH": "false",
               "GKT_CLOUD_MAX_IN_FLIGHT": str(max(cfg.concurrency)), "GKT_CLOUD_CACHE_MAX_ENTRIES": "0"}
        if cfg.vllm_model:
            env["GKT_CLOUD_UPSTREAM_MODEL"] = cfg.vllm_model
        front = self._pin(cloud_service(free_port(), env, log_path=cfg.log_dir / "cloud_vllm.log"),
                          self.edge_core).start()
        self.services.append(front)
        front.wait_ready()
        model = cfg.vllm_model or (await self.http.get(url + "/models")).json()["data"][0]["id"]
        k = cfg.guidance_tokens

        def via_gkt(p: str) -> Awaitable[Stream]:
            return cloud_guidance(self.http, front.url, {"prompt": p, "max_tokens": k, "temperature": 0})

        def straight(p: str) -> Awaitable[Stream]:
            return openai_completion(self.http, url, {"model": model, "prompt": p, "max_tokens": k,
                                                      "temperature": 0})

        await self._aggregate(2, lambda i: straight(f"Warm up {i}."))  # first requests compile and allocate
        used = itertools.count(1)  # a new prompt for every request: none is answered from vLLM's prefix cache

        def prompt(_: int) -> str:
            n = 2 * next(used) + 101  # same length in tokens for all of them
            return f"Q: List the odd numbers from {n} to {n + 60}.\nA:"

        serial: float | None = None
        for c in cfg.concurrency:
            # direct, gkt, gkt, direct: a drift of the machine's speed within the four cancels out in the means.
            raw1 = await self._aggregate(c, lambda i: straight(prompt(i)))
            gkt1 = await self._aggregate(c, lambda i: via_gkt(prompt(i)))
            gkt2 = await self._aggregate(c, lambda i: via_gkt(prompt(i)))
            raw2 = await self._aggregate(c, lambda i: straight(prompt(i)))
            gkt, raw = (gkt1 + gkt2) / 2, (raw1 + raw2) / 2
            serial = serial or gkt
            self.add(Line(f"cloud batching vLLM, {c} concurrent (via gkt / direct)", ratio(gkt, raw), 0.9, ">=",
                          measured={"gkt_agg_tok_s": gkt, "vllm_agg_tok_s": raw,
                                    "gkt_vs_one_at_a_time": ratio(gkt, serial), "k": k}))

    async def _aggregate(self, c: int, make: Callable[[int], Awaitable[Stream]]) -> float:
        """Total tokens / wall time of ``c`` concurrent streams."""
        streams = await self.concurrent(c, make)
        return sum(s.tokens for s in streams) / (max(s.t_end for s in streams) - min(s.t_start for s in streams))

    async def warm_task_prefix(self) -> None:
        """One unmeasured task request, so the few-shot prefix is warm on both sides before whole answers are
        timed (other measurements used other prompts in between)."""
        for url in (self.edge.url, self.edge_slow.url):
            await edge_stream(self.http, url, self.task_body(99, mode="gkt", guidance_tokens=2, max_tokens=4))

    async def work_per_answer(self) -> None:
        cfg = self.cfg
        gkt_s, teacher_s = [], []
        for i in range(cfg.questions):
            # Both modes must find the teacher's cache in the same state: put this prompt there first.
            await cloud_guidance(self.http, self.cloud.url, {"prompt": self.prompt(10 + i), "max_tokens": 1,
                                                             "temperature": 0})
            for mode, out in (("gkt", gkt_s), ("teacher", teacher_s)):
                s = await edge_stream(self.http, self.edge.url,
                                      self.task_body(10 + i, mode=mode, guidance_tokens=cfg.work_k))
                t = s.final["timings"]["teacher"]
                out.append(t["prompt_s"] + t["generation_s"])
        g, t = statistics.mean(gkt_s), statistics.mean(teacher_s)
        self.add(Line(f"cloud work per answer (gkt k={cfg.work_k} / teacher-only)", ratio(g, t), 0.35, "<=",
                      measured={"gkt_teacher_s": g, "teacher_only_s": t, "answers": cfg.questions}))

    async def latency(self) -> None:
        cfg = self.cfg
        for users in cfg.users:
            teacher = await self._latency(users, "teacher", None)
            for k in cfg.ks:
                g = await self._latency(users, "gkt", k)
                self.add(Line(f"end-to-end latency gkt k={k} / teacher-only, {users} user(s)", ratio(g, teacher),
                              1.0, "<=", measured={"gkt_s": g, "teacher_only_s": teacher,
                                                   "answer_tokens": cfg.answer_tokens}))

    async def _latency(self, users: int, mode: str, k: int | None) -> float:
        """Median latency of whole answers with ``users`` concurrent users, ``questions`` rounds of them (one
        round of four answers was too few: one long answer moved the median by half)."""
        extra = {"mode": mode, **({"guidance_tokens": k} if k else {})}
        lat: list[float] = []
        for r in range(self.cfg.questions):
            streams = await self.concurrent(users, lambda i, r=r: edge_stream(
                self.http, self.edge.url, self.task_body(20 + i + r * users, **extra)))
            lat += [s.latency for s in streams]
        return statistics.median(lat)

    async def ttft(self) -> None:
        """Within one request: the user's first token (client-side) minus the cloud's own time to first token
        (its queue + prompt time from the done frame)."""
        work_k = self.cfg.work_k
        vs_client, vs_engine = [], []
        parts: dict[str, list[float]] = {"client_to_edge_and_back_s": [], "edge_to_cloud_and_back_s": [],
                                         "edge_until_guidance_sent_and_seam_s": []}
        for i in range(max(4, self.cfg.questions)):
            # The cloud's own TTFT: a client calling it directly with the request the edge would send. The
            # prompt is put in the teacher's cache first, so both requests find it there, and the order of
            # the pair alternates (the machine drifts).
            direct_body = {"prompt": self.prompt(30 + i), "max_tokens": work_k, "temperature": 0,
                           "stop": list(GSM8K.stop), "whole_words": True}
            await cloud_guidance(self.http, self.cloud.url, {**direct_body, "max_tokens": 1})
            edge_body = self.task_body(30 + i, guidance_tokens=work_k)
            pair: dict[str, Stream] = {}
            for who in (("cloud", "edge") if i % 2 == 0 else ("edge", "cloud")):
                pair[who] = await (cloud_guidance(self.http, self.cloud.url, direct_body) if who == "cloud" else
                                   edge_stream(self.http, self.edge.url, edge_body))
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
        self.add(Line("time to first token: edge (gkt) minus cloud's own (direct client)", d, 0.020, "<=",
                      unit="s", measured={"edge_added_ttft_s": d,
                                          "edge_minus_engine_queue_and_prompt_s": median(vs_engine),
                                          **{k: median(v) for k, v in parts.items()}},
                      note="both TTFTs net of their engine queue + prompt time; parts: of the edge's"))

    async def handoff(self) -> None:
        cfg = self.cfg
        fast, slow, cached, total = [], [], [], []
        for i in range(max(2, cfg.questions)):
            # Each edge sees each question once (a repeat would find prompt and guidance cached); the teacher
            # writes the same guidance for both (canonical batches make it independent of its cache).
            body = self.task_body(40 + i, guidance_tokens=cfg.work_k)
            for url, out in ((self.edge.url, fast), (self.edge_slow.url, slow)):
                s = await edge_stream(self.http, url, body)
                out.append(s.final["timings"]["handoff_gap_s"])
                if url == self.edge.url:
                    u = s.final["usage"]
                    cached.append(u["student_cached_tokens"])
                    total.append(u["student_prompt_tokens"] + u["guidance_student_tokens"])
        f, s_ = median(fast), median(slow)
        self.add(Line("handoff gap, fast path / without", ratio(f, s_), 0.5, "<=",
                      measured={"fast_s": f, "without_s": s_, "uncached_tokens_at_handoff":
                                median([t - c for t, c in zip(total, cached, strict=True)])}))

    def memory(self) -> None:
        for svc, name, target in ((self.edge, "edge", 1.0), (self.cloud, "cloud", None)):
            hwm = peak_rss_gib(svc.pid)
            model = svc.env.get("GKT_EDGE_MODEL") or svc.env.get("GKT_CLOUD_MODEL")
            self.add(Line(f"peak RSS of the {name} process ({model})", hwm, target, "<=", unit="GiB",
                          measured={"vm_hwm_gib": hwm}))

    # --- the run -------------------------------------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.cfg
        if "prefix" in cfg.sections:
            print("prefix reuse (fresh services)", flush=True)
            await self.prefix_reuse()
        if "overhead" in cfg.sections or "batching" in cfg.sections:
            student = direct.load(resolve(cfg.student), n_ctx=cfg.n_ctx, n_threads=cfg.threads)
            teacher = direct.load(resolve(cfg.teacher), n_ctx=cfg.n_ctx, n_threads=cfg.threads)
            try:
                if "overhead" in cfg.sections:
                    print("overheads", flush=True)
                    s_tps, _ = await self.overhead("edge", student, self.edge_core, self.edge.url, self.edge.pid)
                    t_tps, _ = await self.overhead("cloud", teacher, self.cloud_core, self.cloud.url, self.cloud.pid)
                    self.extra["direct_decode_tok_s"] = {"student": s_tps, "teacher": t_tps}
                if "batching" in cfg.sections:
                    print("batching", flush=True)
                    await self.batching(teacher)
            finally:
                student.close()
                teacher.close()
            if (cfg.vllm_url or cfg.vllm_local) and "batching" in cfg.sections:
                await self.batching_vllm()
        if "answers" in cfg.sections:
            print("whole answers", flush=True)
            await self.warm_task_prefix()
            await self.work_per_answer()
            await self.latency()
        if "ttft" in cfg.sections:
            await self.warm_task_prefix()
            await self.ttft()
        if "handoff" in cfg.sections:
            await self.warm_task_prefix()
            await self.handoff()
        if "contention" in cfg.sections:
            print("handoff under contention (cold prompts)", flush=True)
            await handoff_under_contention(self)
        if "cold" in cfg.sections:
            print("whole answers to cold prompts, one host", flush=True)
            await cold(self)
        if "links" in cfg.sections:
            print("the cloud link: RTTs and a bandwidth cap, two hosts", flush=True)
            await links(self)
        self.memory()
        await self.http.aclose()


def questions(path: Path | None) -> list[str]:
    """The first GSM8K questions of ``path`` (answers of realistic length), else the built-in ones."""
    if path is not None and path.is_file():
        found = [ex.question for ex, _ in zip(GSM8K.load(path), range(64), strict=False)]
        if found:
            return found
    return QUESTIONS


def process_cpu_s(pid: int | None) -> float | None:
    """CPU seconds (user + system, all threads) a process has used so far."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def peak_rss_gib(pid: int | None) -> float | None:
    """VmHWM (peak resident set) of a process, in GiB."""
    if pid is None:
        return None
    try:
        for row in Path(f"/proc/{pid}/status").read_text().splitlines():
            if row.startswith("VmHWM:"):
                return int(row.split()[1]) * 1024 / 2**30
    except OSError:
        return None
    return None
