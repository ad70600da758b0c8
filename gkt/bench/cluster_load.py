"""Load through the balancer: 1 cloud replica against 2 (``gkt.cluster``: haproxy, Redis limits, one ledger).

For each size, a cluster of SmolLM2-135M replicas (one thread each, ``--slots`` engine slots, the guidance cache
off so every request costs engine work, limits out of the way) is started behind haproxy, and ``--clients``
closed-loop clients send non-streamed guidance requests (a new prompt each) through it for ``--seconds``.
Every request ends as answered, refused (429/503 with Retry-After) or lost (anything else); the ledger must
hold one row per answered request. Prints both runs and the ratio of answered per second, 2 against 1.

    nice -n 5 .venv/bin/gkt bench cluster [--clients 8] [--seconds 60] [--slots 2] \\
        [--max-tokens 16] [--out cluster-load-results.json]

The replicas share the machine: on 2 cores, two one-thread replicas can at best double one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

import httpx

from gkt.bench.load import Target, closed_loop
from gkt.cluster import Cluster
from shared.auth import key_entry, new_key


def run(replicas: int, args: argparse.Namespace, key: str) -> dict[str, Any]:
    auth = {"Authorization": f"Bearer {key}"}
    env = {"GKT_CLOUD_MODEL": args.model, "GKT_CLOUD_N_THREADS": "1", "GKT_CLOUD_N_CTX": "1024",
           "GKT_CLOUD_MAX_IN_FLIGHT": str(args.slots), "GKT_CLOUD_MAX_WAITING": str(args.clients),
           "GKT_CLOUD_QUEUE_TIMEOUT_S": "30", "GKT_CLOUD_CACHE_MAX_ENTRIES": "0",
           "GKT_CLOUD_RATE_LIMIT_PER_MIN": "1000000", "GKT_CLOUD_RATE_LIMIT_BURST": "100000",
           "GKT_CLOUD_API_KEYS": key_entry("load", key)}
    data = Path(tempfile.mkdtemp(prefix=f"gkt-cluster-load-{replicas}-"))
    with Cluster(replicas, data, env) as cluster:
        target = Target(cluster.url, auth, max_tokens=args.max_tokens, timeout_s=120)
        asyncio.run(closed_loop(target, min(2, args.clients), min(5.0, args.seconds)))  # warm-up, not counted
        before = httpx.get(cluster.url + "/v1/usage", headers=auth, timeout=30).json()["requests"]
        tally = asyncio.run(closed_loop(target, args.clients, args.seconds))
        after = httpx.get(cluster.url + "/v1/usage", headers=auth, timeout=30).json()["requests"]
    tally["ledger_rows"] = after - before
    tally["replicas"] = replicas
    tally["logs"] = str(data)
    return tally


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster", help="load through the balancer: 1 cloud replica against 2 (haproxy, Redis, "
                       "one ledger)", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--clients", type=int, default=8, help="closed-loop clients")
    p.add_argument("--seconds", type=float, default=60.0, help="measured seconds per cluster size")
    p.add_argument("--slots", type=int, default=2, help="engine slots per replica")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path("cluster-load-results.json"))
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    key = new_key()
    runs = {str(n): run(n, args, key) for n in (1, 2)}
    one, two = runs["1"]["answered_per_s"], runs["2"]["answered_per_s"]
    options = ("model", "clients", "seconds", "slots", "max_tokens")
    results = {"settings": {k: getattr(args, k) for k in options} | {"out": str(args.out)}, "runs": runs,
               "speedup_2_over_1": round(two / one, 3) if one else None}
    args.out.write_text(json.dumps(results, indent=1))
    for n, r in runs.items():
        print(f"{n} replica(s): sent {r['sent']}, answered {r['answered']}, refused {r['refused']}, "
              f"lost {r['lost']} {r['lost_why'] or ''}; {r['answered_per_s']}/s; ledger rows {r['ledger_rows']}; "
              f"answered latency {r['answered_latency_s']}")
    print(f"2 replicas / 1 replica, answered per second: {results['speedup_2_over_1']}")
    return 0 if all(r["lost"] == 0 and r["ledger_rows"] == r["answered"] for r in runs.values()) else 1
