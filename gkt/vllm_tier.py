"""The teacher tier scaled out the way vLLM does it: several vLLM replicas behind vLLM's router.

``gkt vllm-tier`` starts N vLLM replicas of a converted model (``make vllm-setup``), each with its model on
its own core, and ``vllm-router`` (vLLM's Rust router, the ``vllm-router`` wheel in ``.venv-vllm``) in front
of them, all on loopback. gkt's cloud then points its OpenAI backend at the router
(``GKT_CLOUD_BACKEND=openai``, ``GKT_CLOUD_UPSTREAM_URL=<router>/v1``) exactly as at a single vLLM.

What the router passes through (vllm-router 0.1.17, checked against real vLLM in ``tests/test_vllm_router.py``):
``/v1/completions`` and ``/v1/chat/completions`` are parsed into its own request type and re-serialized with
unknown fields kept (``prompt_logprobs``, ``add_special_tokens``, ``continue_final_message``, token-id prompts,
``stream_options``), with the client's headers; any other POST (``/tokenize``, ``/detokenize``) is forwarded
to one worker as is, but **without the client's headers**. vLLM checks its ``--api-key`` only on ``/v1``
routes, so ``verify`` (``/tokenize`` + ``prompt_logprobs``) works through the router with or without a key.
Each request is routed on its own: a verdict's ``/tokenize`` and completions may be served by different
replicas, which is correct because every replica serves the same model and tokenizer.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from gkt import vllm
from gkt.launcher import Service, free_port

ROUTER = vllm.VLLM_PYTHON.parent / "vllm-router"
GIB_PER_REPLICA = 4.5  # vLLM with SmolLM2-135M and a 2 GiB KV cache (MACHINE.md: RSS about 4.4 GiB)


def missing(replicas: int) -> str | None:
    """Why ``replicas`` vLLM replicas and the router cannot run here, or None."""
    if (why := vllm.missing()) is not None:
        return why
    if not ROUTER.exists():
        return f"{ROUTER} is missing: run `make vllm-setup` (it installs vllm-router)"
    need = replicas * GIB_PER_REPLICA + 3.5  # and room for the cloud, an edge and the rest of the machine
    if (gib := vllm.available_gib()) < need:
        return f"only {gib:.1f} GiB of memory available, {replicas} vLLM replicas need {need:.0f}"
    return None


def router_service(port: int, workers: list[str], *, policy: str = "cache_aware", metrics_port: int | None = None,
                   log_path: Path | None = None) -> Service:
    """vllm-router on loopback in front of ``workers`` (their root URLs); ready when its ``/health`` answers
    200, which it does once every worker's ``/health`` has (it waits for them at start).

    Its defaults are kept except where a loopback tier differs: its Prometheus exporter gets a port of its
    own (the default 29000 would collide between two tiers on one machine), and workers are health-checked
    every 5 s instead of 60 s so that a dead replica leaves the rotation quickly.
    """
    argv = [str(ROUTER), "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *workers,
            "--policy", policy, "--prometheus-host", "127.0.0.1",
            "--prometheus-port", str(metrics_port or free_port()), "--health-check-interval-secs", "5"]
    return Service("vllm-router", argv, port, ready_path="/health", log_path=log_path)


def replica_services(model: str, served_name: str, count: int, *, api_key: str | None = None,
                     logs: Path | None = None) -> list[Service]:
    """``count`` vLLM replicas of ``model``, replica i computing on core i modulo the machine's cores."""
    cores = os.cpu_count() or 1
    services = []
    for i in range(count):
        svc = vllm.vllm_service(free_port(), model, served_name, cores=str(i % cores),
                                log_path=logs / f"vllm-{i}.log" if logs else None)
        if api_key:
            svc.argv += ["--api-key", api_key]
            svc.ready_path = "/health"  # /v1/models wants the key; /health does not
        svc.name = f"vllm-{i}"
        services.append(svc)
    return services


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vllm-tier", help="vLLM replicas behind vLLM's router on loopback (the teacher tier)")
    p.add_argument("--replicas", type=int, default=2, help="vLLM replicas (each about 4.5 GiB with SmolLM2)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="a model converted by `make vllm-setup`")
    p.add_argument("--served-name", default="teacher", help="the model name the tier answers to")
    p.add_argument("--port", type=int, default=8000, help="the router's port (the cloud's upstream)")
    p.add_argument("--policy", default="cache_aware", help="the router's load-balancing policy")
    p.add_argument("--logs", type=Path, default=Path(".cache/vllm/logs"), help="one log file per process")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if why := missing(args.replicas):
        print(f"gkt vllm-tier: {why}", file=sys.stderr)
        return 2
    replicas = replica_services(args.model, args.served_name, args.replicas, logs=args.logs)
    services: list[Service] = []
    try:
        for r in replicas:  # one at a time: two loading at once on this CPU thrash
            services.append(r.start())
            r.wait_ready()
        router = router_service(args.port, [r.url for r in replicas], policy=args.policy,
                                log_path=args.logs / "vllm-router.log")
        services.append(router.start())
        router.wait_ready()
        print(f"vLLM tier is up: {len(replicas)} replicas ({', '.join(r.url for r in replicas)}) behind "
              f"vllm-router {router.url}. Ctrl-C stops it. Point the cloud at it:\n"
              f"  GKT_CLOUD_BACKEND=openai GKT_CLOUD_UPSTREAM_URL={router.url}/v1 .venv/bin/python -m cloud_service",
              flush=True)
        while all(s.proc and s.proc.poll() is None for s in services):
            time.sleep(0.5)
        print(f"{', '.join(s.name for s in services if s.proc and s.proc.poll() is not None)} exited; stopping",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for s in reversed(services):
            s.stop()
