"""Start a cloud and an edge for an evaluation, optionally pinned to separate cores (split-machine mode).

Two models on two shared cores fight over them (docs/MACHINE.md: both slow down several-fold), which is not
what a cloud GPU plus an edge device look like. In split mode the cloud runs on CPU 0 and the edge on CPU 1
(``taskset``), one thread each, so each side's time is its own. Other processes on the machine can still
use those cores; the report records the load average before and after.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gkt.launcher import Service, cloud_service, edge_service, free_port

TIMING_MODES = {
    "split": "split machine: cloud pinned to CPU 0, edge to CPU 1 (taskset), one thread each",
    "shared": "shared machine: cloud and edge on the same cores, one thread each",
    "external": "an edge started elsewhere (placement not known to the harness)",
}


def split_possible() -> str | None:
    """None when split mode can run here, else why not."""
    if shutil.which("taskset") is None:
        return "taskset (util-linux) is not installed"
    cpus = os.sched_getaffinity(0)
    if not {0, 1} <= cpus:
        return f"split mode needs CPUs 0 and 1, this process may use {sorted(cpus)}"
    return None


def _pin(service: Service, cpu: int) -> Service:
    service.argv = ["taskset", "-c", str(cpu), *service.argv]
    return service


@dataclass
class Stack:
    cloud: Service
    edge: Service
    timing: str  # a key of TIMING_MODES


@contextmanager
def local_stack(teacher: str, student: str, split: bool, log_dir: Path, n_ctx: int = 2048) -> Iterator[Stack]:
    """Cloud + edge on loopback ports, pinned apart when ``split``; stops both on exit."""
    # A private pair on loopback that only this harness calls: auth is off on both, explicitly.
    one = {"GKT_CLOUD_N_THREADS": "1", "GKT_EDGE_N_THREADS": "1", "GKT_CLOUD_AUTH": "false",
           "GKT_EDGE_AUTH": "false"}
    cloud = cloud_service(free_port(), {**one, "GKT_CLOUD_MODEL": teacher, "GKT_CLOUD_N_CTX": str(n_ctx)},
                          log_path=log_dir / "cloud.log")
    edge = edge_service(free_port(), cloud.url, {**one, "GKT_EDGE_MODEL": student, "GKT_EDGE_N_CTX": str(n_ctx)},
                        log_path=log_dir / "edge.log")
    if split:
        _pin(cloud, 0)
        _pin(edge, 1)
    started: list[Service] = []
    try:
        for service in (cloud, edge):
            started.append(service.start())
        for service in started:
            service.wait_ready()
        yield Stack(cloud, edge, "split" if split else "shared")
    finally:
        for service in reversed(started):
            service.stop()
