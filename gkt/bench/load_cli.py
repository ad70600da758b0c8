"""``gkt bench load``: L1 load at three times capacity and an L2/C4 connect/cancel soak, on real processes.

Starts a cloud (SmolLM2-135M, one thread, ``--slots`` engine slots, a small queue, the guidance cache off so
every request costs engine work, rate limits out of the way) and an edge; measures the cloud's capacity with
a closed loop at the admission limit, then offers ``--factor`` times that rate open loop for ``--load-s``;
then soaks the edge with ``--cycles`` abandoned streams. Prints the figures and writes them as JSON.

    nice -n 19 .venv/bin/gkt bench load [--slots 2] [--capacity-s 20] [--load-s 60] [--factor 3] \\
        [--cycles 300] [--out load-results.json]

Requests are counted sent / answered / refused (503 or 429 with Retry-After) / lost (anything else);
``goodput_ratio`` is answered-per-second under overload over the measured capacity.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path

from gkt.bench.load import Target, l1, soak
from gkt.launcher import cloud_service, edge_service, free_port
from shared.auth import key_entry, new_key


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("load", help="L1 overload at three times capacity and the L2/C4 connect/cancel soak",
                       description="L1 load at three times capacity and an L2/C4 connect/cancel soak, on real "
                       "processes on loopback.")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--slots", type=int, default=2, help="cloud engine slots (the admission limit)")
    p.add_argument("--waiting", type=int, default=2, help="cloud queue length")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--capacity-s", type=float, default=20.0)
    p.add_argument("--load-s", type=float, default=60.0, help="seconds of overload (0: no L1, only the soak)")
    p.add_argument("--factor", type=float, default=3.0)
    p.add_argument("--cycles", type=int, default=300, help="soak cycles (0: no soak)")
    p.add_argument("--out", type=Path, default=Path("load-results.json"))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    key = new_key()
    auth = {"Authorization": f"Bearer {key}"}
    env = {"GKT_CLOUD_MODEL": args.model, "GKT_CLOUD_N_THREADS": "1", "GKT_CLOUD_N_CTX": "1024",
           "GKT_CLOUD_MAX_IN_FLIGHT": str(args.slots), "GKT_CLOUD_MAX_WAITING": str(args.waiting),
           "GKT_CLOUD_QUEUE_TIMEOUT_S": "5", "GKT_CLOUD_CACHE_MAX_ENTRIES": "0",
           "GKT_CLOUD_RATE_LIMIT_PER_MIN": "1000000", "GKT_CLOUD_RATE_LIMIT_BURST": "100000",
           "GKT_CLOUD_API_KEYS": key_entry("load", key),
           "GKT_EDGE_MODEL": args.model, "GKT_EDGE_N_THREADS": "1", "GKT_EDGE_N_CTX": "1024",
           "GKT_EDGE_CLOUD_API_KEY": key, "GKT_EDGE_API_KEYS": key_entry("load", key),
           "GKT_EDGE_RATE_LIMIT_PER_MIN": "1000000", "GKT_EDGE_RATE_LIMIT_BURST": "100000"}
    logs = Path(tempfile.mkdtemp(prefix="gkt-load-"))
    cloud = cloud_service(free_port(), env, log_path=logs / "cloud.log").start()
    edge = edge_service(free_port(), cloud.url, env, log_path=logs / "edge.log").start()
    try:
        cloud.wait_ready()
        edge.wait_ready()
        target = Target(cloud.url, auth, max_tokens=args.max_tokens)
        options = ("model", "slots", "waiting", "max_tokens", "capacity_s", "load_s", "factor", "cycles")
        settings = {k: getattr(args, k) for k in options}  # this command's own (not `gkt bench`'s)
        results: dict = {"settings": settings | {"out": str(args.out)}, "logs": str(logs)}
        if args.load_s > 0:
            results["l1"] = asyncio.run(l1(target, {"cloud": cloud}, args.slots, args.capacity_s,
                                           args.load_s, args.factor))
        if args.cycles:
            results["soak"] = asyncio.run(soak(edge.url, auth, args.cycles,
                                               {"cloud": cloud, "edge": edge},
                                               path="/v1/completions",
                                               body={"prompt": "Once upon a time", "max_tokens": 60,
                                                     "guidance_tokens": 40}))
    finally:
        edge.stop()
        cloud.stop()
    print(json.dumps(results, indent=1))
    if "l1" in results:
        print_l1(results["l1"], args)
    if "soak" in results:
        s = results["soak"]
        print(f"soak: {s['cycles']} cycles {s['phases']} in {s['seconds']}s, then status {s['after_status']}; "
              f"RSS slope kB per 1000 cycles {s['rss_slope_kb_per_1000_cycles']} "
              f"(second half {s['rss_slope_second_half']})")
        for name, res in s["resources"]["baseline"].items():
            print(f"  {name}: baseline {res} -> settled {s['resources']['settled'][name]}")
    args.out.write_text(json.dumps(results, indent=1))
    return 0


def print_l1(r: dict, args: argparse.Namespace) -> None:
    cap, over = r["capacity"], r["overload"]
    print(f"\nL1: capacity {cap['answered_per_s']}/s at {args.slots} slots; offered {over['offered_per_s']}/s "
          f"({args.factor}x) for {args.load_s:.0f}s: sent {over['sent']}, answered {over['answered']}, "
          f"refused {over['refused']}, lost {over['lost']}; goodput {over['goodput_per_s']}/s = "
          f"{r['goodput_ratio']:.0%} of capacity; refusal p99 {over['refusal_latency_s']}; "
          f"answered latency {over['answered_latency_s']}")
    for name, res in r["resources"]["baseline"].items():
        print(f"  {name}: baseline {res} -> after load {r['resources']['after_load'][name]} "
              f"-> settled {r['resources']['settled'][name]}")

