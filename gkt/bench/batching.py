"""The bench's ``batching`` section: the llama.cpp cloud's continuous batching against llama.cpp's own batched
decoding, and (with vLLM) gkt's cloud in front of vLLM against vLLM called directly."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from gkt import vllm
from gkt.bench import direct
from gkt.bench.client import Stream, cloud_guidance, openai_completion
from gkt.bench.direct import pinned
from gkt.bench.report import Line, ratio
from gkt.launcher import cloud_service, free_port

if TYPE_CHECKING:
    from gkt.bench.suite import Bench


async def batching(bench: Bench, teacher_llm: Any) -> None:
    cfg = bench.cfg
    k = cfg.guidance_tokens
    prompts = [f"Q: List the even numbers from {2 * i} to {2 * i + 60}, one per line.\nA:" for i in range(64)]
    used = itertools.count()  # distinct prompts: no request can be answered from a cache

    def body() -> dict[str, Any]:
        return {"prompt": prompts[next(used) % 64], "max_tokens": k, "temperature": 0}

    def cloud_aggregate(c: int) -> Awaitable[float]:
        return aggregate(bench, c, lambda _: cloud_guidance(bench.http, bench.cloud.url, body()))

    raw = direct.RawBatch(teacher_llm, max_seqs=max(cfg.concurrency), n_ctx_per_seq=256, n_threads=cfg.threads)
    toks = [teacher_llm.tokenize(p.encode(), add_bos=True, special=False) for p in prompts]

    def reference(c: int) -> float:
        """The raw ceiling for ``c`` streams: best of two runs, pinned to the cloud's core (idle now)."""
        with pinned(bench.cloud_core):
            return max(raw.throughput(toks[64 - c :], k) for _ in range(2))

    try:
        with pinned(bench.cloud_core):
            raw.throughput(toks[: max(cfg.concurrency)], 2)  # warm-up: the first decodes allocate buffers
        serial: float | None = None
        for c in cfg.concurrency:
            # Reference and cloud measured back to back for each c: the machine's load drifts.
            ref = reference(c)
            agg = max([await cloud_aggregate(c) for _ in range(2)])  # best of two, as the reference
            serial = serial or agg
            bench.add(Line(f"cloud batching llama.cpp, {c} concurrent (aggregate / raw llama_batch)",
                           ratio(agg, ref), 0.9, ">=",
                           measured={"cloud_agg_tok_s": agg, "raw_batched_tok_s": ref,
                                     "cloud_vs_one_at_a_time": ratio(agg, serial), "k": k}))
    finally:
        raw.close()


async def batching_vllm(bench: Bench) -> None:
    """gkt's cloud in front of vLLM vs vLLM called directly, same requests and concurrency.

    With ``--vllm-local`` vLLM computes on the cloud core and gkt's cloud runs on the other one, as the
    engine and the serving process do on a GPU machine: on two cores, a model spread over both stalls
    whenever another process takes one of them, and that would charge gkt's front for a core it shares
    with the model rather than for the work it does."""
    cfg = bench.cfg
    url = (cfg.vllm_url or "").rstrip("/")
    if cfg.vllm_local:  # vLLM on this machine (``make vllm-setup VLLM_MODEL=...``), started for this section
        cores = "auto" if bench.cloud_core is None else str(bench.cloud_core)
        server = vllm.vllm_service(free_port(), cfg.vllm_local, cfg.vllm_local, cores=cores,
                                   log_path=cfg.log_dir / "vllm.log").start()
        bench.services.append(server)
        server.wait_ready(900)
        url = f"{server.url}/v1"
    env = {"GKT_CLOUD_BACKEND": "openai", "GKT_CLOUD_UPSTREAM_URL": url, "GKT_CLOUD_LOG_LEVEL": "warning",
           "GKT_CLOUD_MAX_WAITING": "64", "GKT_CLOUD_AUTH": "false",
           "GKT_CLOUD_MAX_IN_FLIGHT": str(max(cfg.concurrency)), "GKT_CLOUD_CACHE_MAX_ENTRIES": "0"}
    if cfg.vllm_model:
        env["GKT_CLOUD_UPSTREAM_MODEL"] = cfg.vllm_model
    front = bench.pin(cloud_service(free_port(), env, log_path=cfg.log_dir / "cloud_vllm.log"),
                      bench.edge_core).start()
    bench.services.append(front)
    front.wait_ready()
    model = cfg.vllm_model or (await bench.http.get(url + "/models")).json()["data"][0]["id"]
    k = cfg.guidance_tokens

    def via_gkt(p: str) -> Awaitable[Stream]:
        return cloud_guidance(bench.http, front.url, {"prompt": p, "max_tokens": k, "temperature": 0})

    def straight(p: str) -> Awaitable[Stream]:
        return openai_completion(bench.http, url, {"model": model, "prompt": p, "max_tokens": k,
                                                   "temperature": 0})

    await aggregate(bench, 2, lambda i: straight(f"Warm up {i}."))  # first requests compile and allocate
    used = itertools.count(1)  # a new prompt for every request: none is answered from vLLM's prefix cache

    def prompt(_: int) -> str:
        n = 2 * next(used) + 101  # same length in tokens for all of them
        return f"Q: List the odd numbers from {n} to {n + 60}.\nA:"

    serial: float | None = None
    for c in cfg.concurrency:
        # direct, gkt, gkt, direct: a drift of the machine's speed within the four cancels out in the means.
        raw1 = await aggregate(bench, c, lambda i: straight(prompt(i)))
        gkt1 = await aggregate(bench, c, lambda i: via_gkt(prompt(i)))
        gkt2 = await aggregate(bench, c, lambda i: via_gkt(prompt(i)))
        raw2 = await aggregate(bench, c, lambda i: straight(prompt(i)))
        gkt, raw = (gkt1 + gkt2) / 2, (raw1 + raw2) / 2
        serial = serial or gkt
        bench.add(Line(f"cloud batching vLLM, {c} concurrent (via gkt / direct)", ratio(gkt, raw), 0.9, ">=",
                       measured={"gkt_agg_tok_s": gkt, "vllm_agg_tok_s": raw,
                                 "gkt_vs_one_at_a_time": ratio(gkt, serial), "k": k}))


async def aggregate(bench: Bench, c: int, make: Callable[[int], Awaitable[Stream]]) -> float:
    """Total tokens / wall time of ``c`` concurrent streams."""
    streams = await bench.concurrent(c, make)
    return sum(s.tokens for s in streams) / (max(s.t_end for s in streams) - min(s.t_start for s in streams))
