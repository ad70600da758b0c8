"""The bench's ``links`` section: the cloud link with a round-trip time and a bandwidth cap (issue #22).

Edge and cloud run as two hosts in network namespaces joined by a veth pair (``gkt/netlab.py``, the hosts of
the network tests), each pinned to its core. The pair's link is capped with ``tc tbf`` (``LINK_RATE`` each
way); the round-trip time comes from ``gkt/netproxy.py`` in the edge's namespace, which releases every chunk
half the RTT after it arrived, in both directions (the kernel here has no ``tc netem``). The edge reaches the
cloud only through that proxy, so teacher-only answers cross the same link as guidance. A new connection's
handshake is not delayed (the proxy accepts locally); the edge keeps its connections to the cloud open, so
after the warm-up each call pays the RTT once, as on a kept-alive link.

For each RTT (0 is the proxy without delay) every question is answered four ways: teacher-only, fixed k,
``reguide`` and ``verify``, each after both caches were given the question's prompt (so no mode pays a
prefill another did not). Lines: latency of each way / teacher-only at that RTT (target <= 1 for fixed k; INFO
for the others), with time to first token, guidance calls and the link's share beside it. Then the cold
prompts of ``gkt/bench/cold.py`` once more, over the link at ``COLD_RTT_MS``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from gkt import netlab
from gkt.bench.client import cloud_guidance, edge_stream
from gkt.bench.cold import cold_answers
from gkt.bench.report import Line, median, ratio

if TYPE_CHECKING:
    from gkt.bench.suite import Bench

RTTS_MS = (0, 20, 50, 100)
COLD_RTT_MS = 50
LINK_RATE = "8mbit"  # a slow uplink: guidance is a few hundred bytes per token, prompts a few kB
CLOUD_PORT, EDGE_PORT, PROXY_PORT = 8001, 8002, 9001
WAYS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("teacher-only", {"mode": "teacher"}),
    ("fixed", {"mode": "gkt"}),
    ("reguide", {"mode": "gkt", "guidance_policy": "reguide"}),
    ("verify", {"mode": "gkt", "guidance_policy": "verify"}),
)


class Link:
    """The hosts, the services on them and the proxy that sets the RTT."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.hosts = netlab.Hosts()
        self.proxy: subprocess.Popen[bytes] | None = None
        self.services: list[netlab.NetnsService] = []

    def _argv(self, module: str, core: int | None) -> list[str]:
        pin = [] if core is None else ["taskset", "-c", str(core)]
        return [*pin, sys.executable, "-m", module]

    def up(self) -> Link:
        b, h, logs = self.bench, self.hosts.up(), self.bench.cfg.log_dir
        h.limit(LINK_RATE, burst="32kb", latency="1s")
        cenv = {**b.cloud.env, "GKT_CLOUD_HOST": "0.0.0.0", "GKT_CLOUD_PORT": str(CLOUD_PORT)}
        eenv = {**b.edge.env, "GKT_EDGE_HOST": "0.0.0.0", "GKT_EDGE_PORT": str(EDGE_PORT),
                "GKT_EDGE_CLOUD_URL": f"http://127.0.0.1:{PROXY_PORT}"}
        self.cloud = netlab.NetnsService("cloud", h.cloud_ns, self._argv("cloud_service", b.cloud_core),
                                         h.cloud_mgmt_addr, CLOUD_PORT, cenv, log_path=logs / "link-cloud.log")
        self.edge = netlab.NetnsService("edge", h.edge_ns, self._argv("edge_agent", b.edge_core),
                                        h.edge_addr, EDGE_PORT, eenv, log_path=logs / "link-edge.log")
        self.rtt(0)
        for svc in (self.cloud, self.edge):
            self.services.append(svc.start())
        for svc in self.services:
            svc.wait_ready()
        return self

    def rtt(self, ms: float) -> None:
        """(Re)start the proxy with ``ms`` of round-trip time: half of it on each direction."""
        self.stop_proxy()
        self.proxy = self.hosts.proxy(PROXY_PORT, CLOUD_PORT, self.bench.cfg.log_dir / f"link-proxy-{ms:g}ms.log",
                                      "--delay-ms", str(ms / 2))

    def stop_proxy(self) -> None:
        netlab.stop(self.proxy)
        self.proxy = None

    def down(self) -> None:
        for svc in reversed(self.services):
            svc.stop()
        self.stop_proxy()
        self.hosts.down()


@contextmanager
def link(bench: Bench) -> Iterator[Link]:
    lk = Link(bench)
    try:
        yield lk.up()
    finally:
        lk.down()


async def _warm(bench: Bench, lk: Link, i: int) -> None:
    """Put question ``i``'s prompt in both caches (the student's through the edge, the teacher's directly)."""
    await edge_stream(bench.http, lk.edge.url, bench.task_body(i, mode="student", max_tokens=1))
    await cloud_guidance(bench.http, lk.cloud.url, {"prompt": bench.prompt(i), "max_tokens": 1, "temperature": 0})


async def one_rtt(bench: Bench, lk: Link, ms: float) -> None:
    cfg = bench.cfg
    lk.rtt(ms)
    # Unmeasured: the proxy's first connection, and the few-shot prefix warm on both sides.
    await edge_stream(bench.http, lk.edge.url, bench.task_body(99, mode="gkt", guidance_tokens=2, max_tokens=4))
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in WAYS}
    for q in range(max(2, cfg.questions)):
        i = 50 + q
        for name, extra in WAYS[q % len(WAYS):] + WAYS[: q % len(WAYS)]:  # rotated: no way always goes first
            await _warm(bench, lk, i)
            s = await edge_stream(bench.http, lk.edge.url,
                                  bench.task_body(i, guidance_tokens=cfg.work_k, **extra))
            rows[name].append({"latency_s": s.latency, "ttft_s": s.ttft,
                               "calls": s.final.get("guidance_calls", 0)})
    t_lat = median([r["latency_s"] for r in rows["teacher-only"]])
    t_ttft = median([r["ttft_s"] for r in rows["teacher-only"]])
    for name, _ in WAYS[1:]:
        r = rows[name]
        lat, ttft = median([x["latency_s"] for x in r]), median([x["ttft_s"] for x in r])
        calls = median([x["calls"] for x in r])
        label = f"fixed k={cfg.work_k}" if name == "fixed" else name
        bench.add(Line(f"link RTT {ms:g} ms: latency {label} / teacher-only", ratio(lat, t_lat),
                       1.0 if name == "fixed" else None, "<=",
                       measured={"latency_s": lat, "teacher_only_s": t_lat, "ttft_s": ttft,
                                 "teacher_only_ttft_s": t_ttft, "ttft_ratio": ratio(ttft, t_ttft),
                                 "guidance_calls": calls, "rtt_cost_s": (calls or 0) * ms / 1000,
                                 "answers": len(r), "link_rate": LINK_RATE},
                       note="medians; each answer after both caches got its prompt"))


async def links(bench: Bench) -> None:
    """Every RTT of ``RTTS_MS`` in turn on one pair of hosts, then cold prompts at ``COLD_RTT_MS``."""
    reason = netlab.unavailable()
    if reason:
        bench.add(Line("link RTT: latency fixed k / teacher-only", None, 1.0, "<=", note=f"not run: {reason}"))
        return
    with link(bench) as lk:
        for ms in RTTS_MS:
            print(f"  link RTT {ms} ms", flush=True)
            await one_rtt(bench, lk, ms)
        lk.rtt(COLD_RTT_MS)
        await cold_answers(bench, lk.edge.url, f"split, RTT {COLD_RTT_MS} ms", first=90)

