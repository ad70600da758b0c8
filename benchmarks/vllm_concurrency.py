"""vLLM on CPU behind the gkt cloud: aggregate guidance throughput with 1 and 8 concurrent streams.

Starts vLLM (``.venv-vllm``, ``make vllm-setup``) and a cloud with the OpenAI backend in front of it, then
sends 40-token guidance streams through the cloud and directly to vLLM. Prints tokens/s and ratios (nothing
is asserted; compare ratios within one run on this shared machine).

    .venv/bin/python benchmarks/vllm_concurrency.py [--model smollm2-135m-instruct] [--tokens 40]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from time import perf_counter

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gkt import vllm  # noqa: E402
from gkt.launcher import cloud_service, free_port  # noqa: E402
from shared.auth import key_entry, new_key  # noqa: E402

TIMEOUT = httpx.Timeout(10.0, read=600.0)


async def run(client: httpx.AsyncClient, path: str, bodies: list[dict]) -> tuple[int, float]:
    """Generated tokens (as each server counted them) and the seconds for all bodies at once."""

    async def one(body: dict) -> int:
        r = await client.post(path, json=body)
        r.raise_for_status()
        return int(r.json()["usage"]["completion_tokens"])

    t0 = perf_counter()
    tokens = await asyncio.gather(*(one(b) for b in bodies))
    return sum(tokens), perf_counter() - t0


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tokens", type=int, default=40)
    p.add_argument("--concurrency", type=int, default=8)
    args = p.parse_args()
    if reason := vllm.missing():
        print(f"vLLM benchmark not run: {reason}")
        return 1
    key = new_key()
    server = vllm.vllm_service(free_port(), args.model, "teacher").start()
    cloud = None
    try:
        t0 = perf_counter()
        server.wait_ready(600)
        print(f"vLLM ready in {perf_counter() - t0:.0f}s ({args.model})")
        cloud = cloud_service(free_port(), {"GKT_CLOUD_BACKEND": "openai", "GKT_CLOUD_API_KEYS": key_entry("b", key),
                                            "GKT_CLOUD_UPSTREAM_URL": f"{server.url}/v1",
                                            "GKT_CLOUD_CACHE_MAX_ENTRIES": "0",
                                            "GKT_CLOUD_MAX_IN_FLIGHT": str(args.concurrency)}).start().wait_ready()

        def prompts(n: int, tag: str) -> list[str]:
            return [f"Q: Tell me about the number {i} ({tag}).\nA:" for i in range(n)]

        rows = []
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as direct, httpx.AsyncClient(
            base_url=cloud.url, timeout=TIMEOUT, headers={"Authorization": f"Bearer {key}"}
        ) as front:
            await run(direct, "/v1/completions", [{"model": "teacher", "prompt": "warm up", "max_tokens": 4}])
            for n in (1, args.concurrency):
                body = {"max_tokens": args.tokens, "temperature": 0.7}  # the same sampling both ways
                d = await run(direct, "/v1/completions",
                              [{"model": "teacher", "prompt": q, **body} for q in prompts(n, "d")])
                c = await run(front, "/v1/guidance",
                              [{"prompt": q, "max_tokens": args.tokens, "temperature": 0.7, "stream": False}
                               for q in prompts(n, "c")])
                rows.append((n, d[0] / d[1], c[0] / c[1]))
        print(f"{'concurrent':>10} {'vLLM direct tok/s':>18} {'through cloud tok/s':>20} {'cloud/direct':>13}")
        for n, d_rate, c_rate in rows:
            print(f"{n:>10} {d_rate:>18.1f} {c_rate:>20.1f} {c_rate / d_rate:>13.2f}")
        print(f"aggregate speed-up at {args.concurrency} vs 1: direct {rows[1][1] / rows[0][1]:.2f}x, "
              f"through the cloud {rows[1][2] / rows[0][2]:.2f}x")
    finally:
        if cloud is not None:
            cloud.stop()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
