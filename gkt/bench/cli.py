"""``gkt bench``: start cloud and edges, run every measurement, print the table and write JSON; ``gkt bench
scheduler`` and ``gkt bench load`` run one benchmark on its own."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from gkt.bench import cluster_load, load_cli, scheduler
from gkt.bench.report import load_average, machine, memory_bandwidth_gbs, render, write_json
from gkt.bench.suite import SECTIONS, Bench, BenchConfig
from shared.models import REGISTRY, resolve


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: each gkt layer against what it wraps, printed as ratios")
    p.add_argument("--quick", action="store_true", help="SmolLM2 on both sides and tiny token counts (smoke run)")
    p.add_argument("--teacher", help="teacher model (registry name or GGUF path)")
    p.add_argument("--student", help="student model (registry name or GGUF path)")
    p.add_argument("--rounds", type=int, help="interleaved rounds of the overhead measurements")
    p.add_argument("--questions", type=int, help="questions per whole-answer measurement")
    p.add_argument("--vllm-url", default=os.environ.get("GKT_BENCH_VLLM_URL"),
                   help="an OpenAI-compatible vLLM base URL (…/v1): also measure gkt's cloud in front of it")
    p.add_argument("--vllm-model", help="model name at the vLLM server (default: its first)")
    p.add_argument("--vllm-local", metavar="MODEL",
                   help="start vLLM on this CPU for a model converted by `make vllm-setup VLLM_MODEL=MODEL` "
                        "and measure gkt's cloud in front of it")
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS),
                   help="run only these groups of measurements (default: all)")
    p.add_argument("--data", type=Path, default=os.environ.get("GKT_BENCH_DATA"),
                   help="a GSM8K jsonl file whose questions to ask (default: built-in GSM8K-style questions)")
    p.add_argument("--no-pin", action="store_true", help="do not pin cloud and edge to separate cores")
    p.add_argument("--out", type=Path, default=Path("bench-results.json"), help="where to write the JSON results")
    p.add_argument("--logs", type=Path, default=Path(".bench-logs"), help="service logs")
    p.set_defaults(func=run)
    # Without a tool name `gkt bench` runs the suite above; these measure one part on its own.
    tools = p.add_subparsers(dest="tool", title="single benchmarks", metavar="{scheduler,load,cluster}")
    scheduler.add_parser(tools)
    load_cli.add_parser(tools)
    cluster_load.add_parser(tools)


def config(args: argparse.Namespace) -> BenchConfig:
    kw = {k: v for k, v in {"teacher": args.teacher, "student": args.student, "rounds": args.rounds,
                            "questions": args.questions, "vllm_url": args.vllm_url,
                            "vllm_model": args.vllm_model, "vllm_local": args.vllm_local,
                            "data": args.data}.items() if v is not None}
    kw |= {"pin": not args.no_pin, "log_dir": args.logs, "sections": tuple(args.sections)}
    return BenchConfig.quick(**kw) if args.quick else BenchConfig(**kw)


def model_bytes(name: str) -> int:
    spec = REGISTRY.get(name)
    return spec.size if spec else resolve(name).stat().st_size


def run(args: argparse.Namespace) -> int:
    cfg = config(args)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_before = load_average()
    bandwidth = memory_bandwidth_gbs()
    print(f"gkt bench: teacher {cfg.teacher}, student {cfg.student}, {cfg.threads} thread(s) each; "
          f"load average {load_before}; memory bandwidth {bandwidth:.1f} GB/s", flush=True)
    bench = Bench(cfg)
    t0 = time.perf_counter()
    failed: str | None = None
    try:
        bench.start()
        print(f"services up: cloud {bench.cloud.url} (core {bench.cloud_core}), edge {bench.edge.url} and "
              f"edge without fast path {bench.edge_slow.url} (core {bench.edge_core})", flush=True)
        asyncio.run(bench.run())
    except Exception as exc:  # keep what was measured before the failure, and say what failed
        failed = f"{type(exc).__name__}: {exc}"
        print(f"gkt bench stopped early: {failed}", file=sys.stderr, flush=True)
    finally:
        bench.stop()
    # What limits decoding: every token reads all the weights once, so tok/s x bytes <= bandwidth.
    limits = {}
    for role, name in (("student", cfg.student), ("teacher", cfg.teacher)):
        tps = bench.extra.get("direct_decode_tok_s", {}).get(role)
        size = model_bytes(name)
        limits[role] = {"model": name, "weights_bytes": size, "direct_decode_tok_s": tps,
                        "weight_traffic_gbs": tps * size / 1e9 if tps else None,
                        "share_of_bandwidth": tps * size / 1e9 / bandwidth if tps else None}
    meta = {"started": started, "seconds": round(time.perf_counter() - t0, 1), "machine": machine(),
            "load_average_before": load_before, "load_average_after": load_average(),
            "memory_bandwidth_gbs": bandwidth, "config": json.loads(json.dumps(asdict(cfg), default=str)),
            "cores": {"cloud": bench.cloud_core, "edge": bench.edge_core}, "decode_limits": limits,
            "stopped_early": failed}
    write_json(args.out, meta, bench.lines)
    print()
    print(render(bench.lines))
    print()
    for role, lim in limits.items():
        if lim["weight_traffic_gbs"] is not None:
            print(f"{role} decoding: {lim['direct_decode_tok_s']:.1f} tok/s x {lim['weights_bytes'] / 2**20:.0f} MiB = "
                  f"{lim['weight_traffic_gbs']:.1f} GB/s of {bandwidth:.1f} GB/s measured "
                  f"({lim['share_of_bandwidth']:.0%})")
    print(f"load average before {load_before}, after {meta['load_average_after']}; results in {args.out}")
    return 1 if failed else 0
