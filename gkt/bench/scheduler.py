"""``gkt bench scheduler``: continuous batching on the llama.cpp teacher, aggregate guidance throughput at 1, 2,
4, 8 concurrent requests.

Runs the cloud's real engine in process (no HTTP) and compares it with the single-sequence engine that the
cloud used before batching (``edge_agent.student.LlamaEngine``: one request at a time). Prints tokens/s and ratios;
nothing is asserted (the machine is shared and noisy: compare ratios within one run).

    .venv/bin/gkt bench scheduler [--model qwen2.5-coder-0.5b-instruct] [--tokens 32] [--threads 2] \\
        [--sizes 1,2,4,8]
"""

from __future__ import annotations

import argparse
import asyncio
from time import perf_counter
from typing import TYPE_CHECKING

from shared.generation import GenerationParams, GenerationResult
from shared.protocol import GuidanceRequest

if TYPE_CHECKING:  # the engines load llama.cpp: imported when the benchmark runs, not with the `gkt` command
    from cloud_service.engines.llama_cpp import LlamaTeacher
    from edge_agent.student import LlamaEngine

QUESTIONS = ["What is 12 * 7?", "Name a prime number above 50.", "Why do cats purr?", "What is rust made of?",
             "Describe a rainbow.", "How do bees make honey?", "What is a verb?", "Why is ice slippery?"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scheduler", help="the cloud's batch scheduler in process against one request at a time",
                       description="Aggregate guidance throughput of the llama.cpp teacher's continuous batching "
                       "at several concurrencies, against one request at a time (in process, printed as ratios).")
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sizes", default="1,2,4,8", help="concurrency levels, comma-separated")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    asyncio.run(_main(args))
    return 0


async def batched(teacher: LlamaTeacher, n: int, tokens: int, tag: str) -> tuple[int, float]:
    async def one(i: int) -> int:
        req = GuidanceRequest(prompt=f"Q: {QUESTIONS[i % len(QUESTIONS)]}\nA:", max_tokens=tokens,
                              stop=[f"<<{tag}{i}>>"])
        generation = await teacher.open(req)
        try:
            async for item in generation:
                if isinstance(item, GenerationResult):
                    return item.completion_tokens
        finally:
            await generation.aclose()
        return 0

    t0 = perf_counter()
    done = await asyncio.gather(*(one(i) for i in range(n)))
    return sum(done), perf_counter() - t0


async def sequential(engine: LlamaEngine, n: int, tokens: int) -> tuple[int, float]:
    async def one(i: int) -> int:
        prompt = engine.tokenize(f"Q: {QUESTIONS[i % len(QUESTIONS)]}\nA:", special=False)
        async for item in engine.stream(prompt, GenerationParams(max_tokens=tokens)):
            if isinstance(item, GenerationResult):
                return item.completion_tokens
        return 0

    t0 = perf_counter()
    done = await asyncio.gather(*(one(i) for i in range(n)))  # the engine's lock runs them one by one
    return sum(done), perf_counter() - t0


async def _main(args: argparse.Namespace) -> None:
    from cloud_service.engines.llama_cpp import LlamaTeacher
    from cloud_service.settings import CloudSettings
    from edge_agent.student import LlamaEngine
    from shared.models import resolve

    sizes = [int(x) for x in args.sizes.split(",")]
    print(f"model {args.model}, {args.tokens} tokens per request, {args.threads} threads", flush=True)
    single = LlamaEngine(resolve(args.model), n_ctx=1024, n_threads=args.threads, name=args.model)
    teacher = await LlamaTeacher.load(CloudSettings(model=args.model, n_ctx=1024, n_threads=args.threads,
                                                    max_in_flight=max(sizes), auth=False))
    await sequential(single, 1, 4)  # warm both
    await batched(teacher, 1, 4, "warm")
    print(f"{'concurrent':>10} {'one-at-a-time tok/s':>20} {'batched tok/s':>14} {'batched/one-at-a-time':>22} "
          f"{'batched vs 1':>13}", flush=True)
    base = None
    for n in sizes:
        s_tok, s_sec = await sequential(single, n, args.tokens)
        b_tok, b_sec = await batched(teacher, n, args.tokens, f"r{n}-")
        s_rate, b_rate = s_tok / s_sec, b_tok / b_sec
        base = base or b_rate
        print(f"{n:>10} {s_rate:>20.1f} {b_rate:>14.1f} {b_rate / s_rate:>22.2f} {b_rate / base:>13.2f}", flush=True)
    stats = teacher.stats
    print(f"engine: batch-size histogram {stats['batch_sizes']}, max batch {stats['max_batch']}")
    single.close()
    await teacher.aclose()
