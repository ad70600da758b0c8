"""The bench harness: its configuration, the services it starts, the helpers every section uses and the order the
sections run in. Each section lives in its own module (``overhead``, ``batching``, ``answers``, ``contention``,
``cold``, ``links``) and compares two things measured in the same run, on the same machine, interleaved where it
matters, because this machine is shared and absolute speeds drift (docs/BENCHMARKS.md).

Services run as real processes: the cloud pinned to one core and the edges to another (``taskset``), each
model on one thread. Direct references (llama-cpp-python, raw ``llama_batch`` decoding) run in this process,
pinned to the core of the service they are compared with, while that service is idle.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from gkt.bench import direct
from gkt.bench.answers import handoff, latency, ttft, warm_task_prefix, work_per_answer
from gkt.bench.batching import batching, batching_vllm
from gkt.bench.client import Stream
from gkt.bench.cold import cold
from gkt.bench.contention import handoff_under_contention
from gkt.bench.links import links
from gkt.bench.overhead import overhead, prefix_reuse
from gkt.bench.report import Line
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

    def pin(self, svc: Service, core: int | None) -> Service:
        """``svc`` to run on ``core`` (``taskset``; None: anywhere)."""
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
        self.cloud = self.pin(cloud_service(free_port(), cenv, log_path=logs / "cloud.log"), self.cloud_core)
        eenv = {"GKT_EDGE_MODEL": cfg.student, "GKT_EDGE_N_CTX": str(cfg.n_ctx), "GKT_EDGE_N_THREADS": t,
                "GKT_EDGE_MAX_WAITING": "64", "GKT_EDGE_LOG_LEVEL": "warning",
                "GKT_EDGE_AUTH": "false",  # private edges only this bench calls
                # Teacher-only answers for four users on one CPU core take minutes: this bench measures speed,
                # the deadlines are tested elsewhere (T1-T4).
                "GKT_EDGE_GUIDANCE_TIMEOUT_S": "1800"}
        self.cloud.start()
        self.services.append(self.cloud)
        self.edge = self.pin(edge_service(free_port(), self.cloud.url, eenv, log_path=logs / "edge.log"),
                              self.edge_core)
        self.edge_slow = self.pin(edge_service(free_port(), self.cloud.url, {**eenv, "GKT_EDGE_FAST_PATH": "false"},
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
            await prefix_reuse(self)
        if "overhead" in cfg.sections or "batching" in cfg.sections:
            student = direct.load(resolve(cfg.student), n_ctx=cfg.n_ctx, n_threads=cfg.threads)
            teacher = direct.load(resolve(cfg.teacher), n_ctx=cfg.n_ctx, n_threads=cfg.threads)
            try:
                if "overhead" in cfg.sections:
                    print("overheads", flush=True)
                    s_tps, _ = await overhead(self, "edge", student, self.edge_core, self.edge.url, self.edge.pid)
                    t_tps, _ = await overhead(self, "cloud", teacher, self.cloud_core, self.cloud.url,
                                               self.cloud.pid)
                    self.extra["direct_decode_tok_s"] = {"student": s_tps, "teacher": t_tps}
                if "batching" in cfg.sections:
                    print("batching", flush=True)
                    await batching(self, teacher)
            finally:
                student.close()
                teacher.close()
            if (cfg.vllm_url or cfg.vllm_local) and "batching" in cfg.sections:
                await batching_vllm(self)
        if "answers" in cfg.sections:
            print("whole answers", flush=True)
            await warm_task_prefix(self)
            await work_per_answer(self)
            await latency(self)
        if "ttft" in cfg.sections:
            await warm_task_prefix(self)
            await ttft(self)
        if "handoff" in cfg.sections:
            await warm_task_prefix(self)
            await handoff(self)
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
