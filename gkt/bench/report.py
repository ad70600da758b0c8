"""Bench results: one line per measurement with its values, the figure compared, the target and PASS/MISS."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

Op = Literal[">=", "<="]


@dataclass
class Line:
    """One measurement. ``value`` is a ratio unless ``unit`` says otherwise; ``target`` is what it must meet."""

    name: str
    value: float | None
    target: float | None
    op: Op = ">="
    unit: str = "ratio"
    measured: dict[str, float | int | str | None] = field(default_factory=dict)
    note: str = ""

    @property
    def status(self) -> str:
        if self.value is None:
            return "N/A"
        if self.target is None:
            return "INFO"
        ok = self.value >= self.target if self.op == ">=" else self.value <= self.target
        return "PASS" if ok else "MISS"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is not positive."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def median(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def tokens_per_second(n_tokens: int, t_first: float | None, t_last: float | None) -> float | None:
    """Decode speed from token arrival times: the first token's latency is prompt processing, so it
    is excluded (n - 1 intervals between the first and the last token)."""
    if n_tokens < 2 or t_first is None or t_last is None or t_last <= t_first:
        return None
    return (n_tokens - 1) / (t_last - t_first)


def memory_bandwidth_gbs(size_mib: int = 256, repeats: int = 5) -> float:
    """Best-of-N numpy copy: bytes read plus bytes written per second (GB/s), the ceiling for decoding."""
    import numpy as np

    src = np.ones(size_mib * 2**20 // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def machine() -> dict[str, object]:
    cpu = ""
    try:
        for row in Path("/proc/cpuinfo").read_text().splitlines():
            if row.startswith("model name"):
                cpu = row.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1),
            "python": platform.python_version(), "kernel": platform.release()}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def fmt(value: float | int | str | list | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return "[" + " ".join(fmt(v) for v in value) + "]"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def render(lines: list[Line]) -> str:
    """A plain table: name, measured values, figure, target, status."""
    rows = []
    for ln in lines:
        measured = ", ".join(f"{k}={fmt(v)}" for k, v in ln.measured.items())
        target = f"{ln.op} {fmt(ln.target)}" if ln.target is not None else "-"
        note = f"  [{ln.note}]" if ln.note else ""
        rows.append((ln.name, f"{fmt(ln.value)} {ln.unit}", target, ln.status, measured + note))
    w0 = max([len(r[0]) for r in rows] + [4])
    w1 = max([len(r[1]) for r in rows] + [5])
    out = [f"{'measurement':{w0}}  {'value':{w1}}  {'target':9}  {'status':6}  measured"]
    out += [f"{a:{w0}}  {b:{w1}}  {c:9}  {d:6}  {e}" for a, b, c, d, e in rows]
    return "\n".join(out)


def write_json(path: Path, meta: dict[str, object], lines: list[Line]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {**meta, "results": [{**asdict(ln), "status": ln.status} for ln in lines]}
    path.write_text(json.dumps(data, indent=2) + "\n")
