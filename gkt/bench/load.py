"""Load and soak drivers (L1, L2, C4): counts every request as answered, refused or lost.

L1: capacity is measured first in the same run (a closed loop at the cloud's admission limit: as many
clients as engine slots, each sending its next request when the last one is answered), then an open loop
offers ``factor`` times that rate for a bounded time. Every request ends as exactly one of:

- answered: 200 with a whole answer (the guidance text and its usage);
- refused: 503 or 429 with ``Retry-After`` (refused without it counts as lost);
- lost: anything else (a transport error, a timeout, another status, a malformed body).

Soak (L2/C4): many streamed requests, each abandoned at a different phase (before the headers, after the
headers, after the first frames), then one normal request; service resources must stay flat.

Resources come from ``/proc/PID`` (fds, threads, RSS). The driver is used by ``gkt bench load`` (prints
the figures and writes JSON) and by ``tests/test_load.py`` (short runs that assert the invariants).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from gkt.launcher import Service


def resources(svc: Service) -> dict[str, int]:
    """Open file descriptors, OS threads, resident memory (kB) and asyncio tasks (its /metrics) of a service."""
    pid = svc.proc.pid  # type: ignore[union-attr]
    status = Path(f"/proc/{pid}/status").read_text()
    out = {"fds": len(list(Path(f"/proc/{pid}/fd").iterdir())),  # before the scrape opens a connection
           "threads": int(re.search(r"Threads:\s+(\d+)", status).group(1)),  # type: ignore[union-attr]
           "rss_kb": _rss_kb(status)}
    scrape = httpx.get(svc.url + "/metrics", timeout=10, verify=svc.tls or True).text
    tasks = re.search(r"^gkt_\w+_event_loop_tasks (\S+)$", scrape, re.M)
    # Counted while serving the scrape, so the scrape's own task is in every count alike.
    return out | {"tasks": int(float(tasks.group(1))) if tasks else -1}


def rss_kb(pid: int) -> int:
    return _rss_kb(Path(f"/proc/{pid}/status").read_text())


def _rss_kb(status: str) -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]


@dataclass
class Tally:
    sent: int = 0
    answered: int = 0
    refused: int = 0
    lost: int = 0
    refused_without_retry_after: int = 0
    answered_s: list[float] = field(default_factory=list)
    refused_s: list[float] = field(default_factory=list)
    lost_why: Counter = field(default_factory=Counter)

    def summary(self, seconds: float) -> dict[str, Any]:
        return {"sent": self.sent, "answered": self.answered, "refused": self.refused, "lost": self.lost,
                "refused_without_retry_after": self.refused_without_retry_after,
                "lost_why": dict(self.lost_why), "seconds": round(seconds, 2),
                "answered_per_s": round(self.answered / seconds, 3) if seconds else 0.0,
                "answered_latency_s": quantiles(self.answered_s), "refusal_latency_s": quantiles(self.refused_s)}


def quantiles(xs: list[float]) -> dict[str, float] | None:
    if not xs:
        return None
    s = sorted(xs)
    pick = lambda q: round(s[min(len(s) - 1, int(q * len(s)))], 4)  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": round(s[-1], 4),
            "mean": round(statistics.fmean(s), 4)}


@dataclass
class Target:
    """The cloud's non-streamed guidance endpoint with a unique prompt per request (so no cache hits)."""

    url: str
    headers: dict[str, str]
    max_tokens: int = 16
    timeout_s: float = 60.0
    counter: itertools.count = field(default_factory=itertools.count)

    def body(self) -> dict[str, Any]:
        i = next(self.counter)
        return {"prompt": f"Request {i}. Q: What is {i % 97} + {i % 89}?\nA:", "max_tokens": self.max_tokens,
                "stream": False, "temperature": 0}

    async def call(self, client: httpx.AsyncClient, tally: Tally) -> None:
        tally.sent += 1
        t0 = time.monotonic()
        try:
            r = await client.post(self.url + "/v1/guidance", json=self.body(), headers=self.headers,
                                  timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            tally.lost += 1
            tally.lost_why[type(exc).__name__] += 1
            return
        took = time.monotonic() - t0
        if r.status_code == 200:
            try:
                body = r.json()
                whole = isinstance(body["text"], str) and body["usage"]["completion_tokens"] > 0
            except (ValueError, KeyError, TypeError):
                whole = False
            if whole:
                tally.answered += 1
                tally.answered_s.append(took)
            else:
                tally.lost += 1
                tally.lost_why["malformed 200"] += 1
        elif r.status_code in (429, 503):
            tally.refused += 1
            tally.refused_s.append(took)
            if "retry-after" not in r.headers:
                tally.refused_without_retry_after += 1
                tally.lost += 1
                tally.lost_why[f"{r.status_code} without Retry-After"] += 1
        else:
            tally.lost += 1
            tally.lost_why[f"http {r.status_code}"] += 1


def _client() -> httpx.AsyncClient:
    return httpx.AsyncClient(limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100),
                             trust_env=False)


async def closed_loop(target: Target, clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` clients, each sending its next request as soon as the last one ended, for ``seconds``."""
    tally = Tally()
    stop = time.monotonic() + seconds

    async def worker(client: httpx.AsyncClient) -> None:
        while time.monotonic() < stop:
            await target.call(client, tally)

    t0 = time.monotonic()
    async with _client() as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    return tally.summary(time.monotonic() - t0)


async def open_loop(target: Target, rate: float, seconds: float) -> dict[str, Any]:
    """Send at ``rate`` per second for ``seconds`` regardless of answers (arrivals evenly spaced); wait for all."""
    tally = Tally()
    tasks: list[asyncio.Task] = []
    t0 = time.monotonic()
    async with _client() as client:
        n = int(rate * seconds)
        for i in range(n):
            await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            tasks.append(asyncio.ensure_future(target.call(client, tally)))
        sending = time.monotonic() - t0
        await asyncio.gather(*tasks)
    out = tally.summary(time.monotonic() - t0)
    out["offered_per_s"] = round(n / sending, 3) if sending else 0.0
    # Goodput: answers over the whole phase, the tail of queued work included (a conservative figure).
    out["goodput_per_s"] = out["answered_per_s"]
    return out


def snapshot(services: dict[str, Service]) -> dict[str, dict[str, int]]:
    return {name: resources(svc) for name, svc in services.items()}


async def settle(services: dict[str, Service], baseline: dict[str, dict[str, int]], seconds: float = 20.0) -> dict:
    """Resources after the load, waiting up to ``seconds`` for idle threads, sockets and tasks to be reaped."""
    deadline = time.monotonic() + seconds
    while True:
        now = snapshot(services)
        flat = all(now[n][k] <= baseline[n][k] for n in services for k in ("fds", "threads", "tasks"))
        if flat or time.monotonic() > deadline:
            return now
        await asyncio.sleep(0.5)


async def l1(target: Target, services: dict[str, Service], slots: int, capacity_s: float, load_s: float,
             factor: float = 3.0) -> dict[str, Any]:
    """L1: capacity (closed loop at ``slots``), then ``factor`` x capacity open loop; resources around both."""
    await closed_loop(target, slots, min(5.0, capacity_s))  # warm-up: threads, pools, KV caches exist
    baseline = snapshot(services)
    capacity = await closed_loop(target, slots, capacity_s)
    cap_rps = capacity["answered_per_s"]
    overload = await open_loop(target, max(cap_rps * factor, 0.5), load_s)
    after = snapshot(services)
    settled = await settle(services, baseline)
    return {"capacity": capacity, "overload": overload, "factor": factor,
            "goodput_ratio": round(overload["goodput_per_s"] / cap_rps, 3) if cap_rps else 0.0,
            "resources": {"baseline": baseline, "after_load": after, "settled": settled}}


async def soak(url: str, headers: dict[str, str], cycles: int, services: dict[str, Service],
               path: str = "/v1/guidance", body: dict | None = None) -> dict[str, Any]:
    """C4/L2: ``cycles`` streamed requests abandoned in turn before the headers, after the headers and after
    a few frames; returns counts and resources before and after (settled)."""
    body = body or {"prompt": "Once upon a time", "max_tokens": 200}
    phases = Counter()
    async with _client() as client:
        async def one(i: int) -> None:
            phase = ("before_headers", "after_headers", "after_frames")[i % 3]
            req = client.build_request("POST", url + path, json={**body, "stream": True}, headers=headers,
                                       timeout=60)
            if phase == "before_headers":
                task = asyncio.ensure_future(client.send(req, stream=True))
                await asyncio.sleep(0.01 * (i % 5))
                task.cancel()
                try:
                    r = await task
                    await r.aclose()
                except (asyncio.CancelledError, httpx.HTTPError):
                    pass
            else:
                r = await client.send(req, stream=True)
                try:
                    if phase == "after_frames":
                        n = 0
                        async for line in r.aiter_lines():
                            n += line.startswith("data: ")
                            if line.startswith("data: {") and _is_error(json.loads(line[6:])):
                                phases["error_frames"] += 1  # L2: none expected
                            if n >= 3:
                                break
                finally:
                    await r.aclose()
            phases[phase] += 1

        warm = max(10, cycles // 5)
        for i in range(warm):  # warm-up: the thread pools and the edge's connection pool reach their size
            await one(i)
        baseline = snapshot(services)
        samples: dict[str, list[tuple[int, int]]] = {name: [] for name in services}
        every = max(1, cycles // 20)
        t0 = time.monotonic()
        for i in range(warm, warm + cycles):
            await one(i)
            if (i - warm + 1) % every == 0:  # RSS along the way: a leak is a slope, not one difference
                for name, svc in services.items():
                    samples[name].append((i - warm + 1, rss_kb(svc.proc.pid)))  # type: ignore[union-attr]
        took = time.monotonic() - t0
        r = await client.post(url + path, json={**body, "max_tokens": 4, "stream": False}, headers=headers,
                              timeout=120)
    settled = await settle(services, baseline)
    return {"cycles": cycles, "warm_up_cycles": warm, "phases": dict(phases), "seconds": round(took, 2),
            "after_status": r.status_code,
            "resources": {"baseline": baseline, "settled": settled},
            "rss_slope_kb_per_1000_cycles": {name: rss_slope(xs) for name, xs in samples.items()},
            # Growth that levels off (allocator arenas, caches reaching their size) has a flat second half;
            # a leak keeps its slope.
            "rss_slope_second_half": {name: rss_slope(xs[len(xs) // 2:]) for name, xs in samples.items()},
            "rss_kb_samples": samples}


def _is_error(event: dict[str, Any]) -> bool:
    """An error event: the cloud's error frame or the edge's OpenAI error object."""
    return event.get("type") == "error" or "error" in event


def rss_slope(samples: list[tuple[int, int]]) -> float | None:
    """Least-squares slope of resident memory over cycles, in kB per 1,000 cycles (None: too few samples)."""
    if len(samples) < 3:
        return None
    slope, _ = statistics.linear_regression([c for c, _ in samples], [kb for _, kb in samples])
    return round(slope * 1000, 1)


def as_dict(x: Any) -> Any:
    return asdict(x) if hasattr(x, "__dataclass_fields__") else x
