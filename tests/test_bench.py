"""The bench harness: ratios and verdicts computed right, and a whole smoke run on SmolLM2 with tiny token
counts (real services, real llama.cpp). No timing is asserted: speed is what the bench prints, not a test."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gkt import netlab
from gkt.bench.overhead import process_cpu_s
from gkt.bench.report import Line, median, memory_bandwidth_gbs, ratio, render, tokens_per_second, write_json


def test_ratio_and_median() -> None:
    assert ratio(3.0, 4.0) == 0.75
    assert ratio(None, 4.0) is None and ratio(1.0, 0.0) is None and ratio(1.0, None) is None
    assert median([3.0, 1.0, 2.0]) == 2.0 and median([]) is None


def test_tokens_per_second_excludes_the_first_token() -> None:
    # 5 tokens, first at t=1 (after the prompt), last at t=3: 4 intervals in 2 s.
    assert tokens_per_second(5, 1.0, 3.0) == 2.0
    assert tokens_per_second(1, 1.0, 1.0) is None and tokens_per_second(3, None, 2.0) is None


@pytest.mark.parametrize("value,target,op,status", [
    (0.98, 0.97, ">=", "PASS"), (0.96, 0.97, ">=", "MISS"), (0.97, 0.97, ">=", "PASS"),
    (0.10, 0.15, "<=", "PASS"), (0.20, 0.15, "<=", "MISS"), (None, 0.15, "<=", "N/A"), (1.0, None, "<=", "INFO"),
])
def test_line_status(value: float | None, target: float | None, op: str, status: str) -> None:
    assert Line("x", value, target, op).status == status  # type: ignore[arg-type]


def test_render_and_json(tmp_path: Path) -> None:
    lines = [Line("edge overhead", 0.5, 0.97, ">=", measured={"http_tok_s": 10.0, "direct_tok_s": 20.0}),
             Line("rss", 0.7, 1.0, "<=", unit="GiB", note="why")]
    table = render(lines)
    assert "edge overhead" in table and "MISS" in table and "PASS" in table and "[why]" in table
    write_json(tmp_path / "r.json", {"load_average_before": [1.0, 1.0, 1.0]}, lines)
    data = json.loads((tmp_path / "r.json").read_text())
    assert [r["status"] for r in data["results"]] == ["MISS", "PASS"]
    assert data["results"][0]["measured"]["direct_tok_s"] == 20.0


def test_process_cpu_seconds_count_every_thread() -> None:
    code = "import threading\nfor _ in range(2): threading.Thread(target=lambda: sum(range(3 * 10**7))).start()"
    proc = subprocess.Popen([sys.executable, "-c", code + "\nimport time; time.sleep(30)"])
    try:
        deadline = time.monotonic() + 60
        while (used := process_cpu_s(proc.pid) or 0.0) < 0.5 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert used >= 0.5  # the work of its two threads, not of the main thread (asleep)
    finally:
        proc.kill()
        proc.wait()
    assert process_cpu_s(proc.pid) is None and process_cpu_s(None) is None


def test_memory_bandwidth_is_measured() -> None:
    assert memory_bandwidth_gbs(size_mib=16, repeats=2) > 0


def test_quick_bench_end_to_end(tmp_path: Path) -> None:
    """`gkt bench --quick`: every measurement runs on real processes and each line's figure is the ratio of
    the values it reports."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "gkt", "bench", "--quick", "--out", str(out), "--logs",
                           str(tmp_path / "logs")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    names = [r["name"] for r in data["results"]]
    for expected in ("prefix reuse (edge student)", "prefix reuse (cloud teacher)", "edge overhead", "cloud overhead",
                     "cloud batching llama.cpp, 1 concurrent", "cloud batching llama.cpp, 2 concurrent",
                     "cloud work per answer", "end-to-end latency gkt k=4 / teacher-only, 1 user",
                     "end-to-end latency gkt k=4 / teacher-only, 2 user", "time to first token", "handoff gap",
                     "handoff gap on cold prompts, edge core contended / quiet",
                     "cold prompts, one host: latency gkt k=", "cold prompts, one host, edge core contended",
                     "peak RSS of the edge"):
        assert any(n.startswith(expected) for n in names), expected
    links = [r for r in data["results"] if r["name"].startswith(("link RTT", "cold prompts, split"))]
    if netlab.unavailable() is None:  # the links section: two hosts in namespaces, a proxy per RTT
        for rtt in (0, 20, 50, 100):
            for way in ("fixed k=4", "reguide", "verify"):
                assert any(r["name"].startswith(f"link RTT {rtt} ms: latency {way} / teacher-only") for r in links)
        assert any(r["name"].startswith("cold prompts, split, RTT 50 ms: latency gkt k=4") for r in links)
    else:  # said, not measured
        assert [r["status"] for r in links] == ["N/A"] and "not run" in links[0]["note"]
        data["results"] = [r for r in data["results"] if r not in links]
    by = {r["name"].split(" (")[0] if r["name"].startswith(("edge overhead", "cloud overhead")) else r["name"]: r
          for r in data["results"]}
    edge = by["edge overhead"]
    assert edge["value"] == pytest.approx(edge["measured"]["http_tok_s"] / edge["measured"]["direct_tok_s"])
    for side in ("edge overhead", "cloud overhead"):  # the services' CPU per token, read from /proc
        assert by[side]["measured"]["cpu_s_per_token_direct_vs_http"] > 0
    work = next(r for r in data["results"] if r["name"].startswith("cloud work per answer"))
    assert work["value"] == pytest.approx(work["measured"]["gkt_teacher_s"] / work["measured"]["teacher_only_s"])
    for r in data["results"]:
        assert r["status"] in ("PASS", "MISS", "INFO"), r  # every figure was measured
    assert data["load_average_before"] and data["memory_bandwidth_gbs"] > 0
    assert 0 < by["peak RSS of the edge process (smollm2-135m-instruct)"]["value"] < 1.0
    assert "MISS" in proc.stdout or "PASS" in proc.stdout


def test_scheduler_bench_runs_on_the_real_engine() -> None:
    """`gkt bench scheduler` (the cloud's batch scheduler against one request at a time), tiny: it prints one
    row per concurrency and the engine's batch sizes; the figures are the bench's to print, not ours to assert."""
    proc = subprocess.run([sys.executable, "-m", "gkt", "bench", "scheduler", "--model", "smollm2-135m-instruct",
                           "--tokens", "4", "--threads", "1", "--sizes", "1,2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert [r[0] for r in rows] == ["1", "2"] and all(float(x) > 0 for r in rows for x in r[1:])
    assert "batch-size histogram" in proc.stdout
