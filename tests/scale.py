"""Helpers of the scale-out tests (test_scale_*.py): cloud settings for small fast replicas, a streamed guidance
call that reports how it ended, and per-replica counters."""

from __future__ import annotations

from typing import Any

import httpx

from gkt.launcher import Service
from shared.protocol import DoneFrame, ErrorFrame, SSEDecoder, parse_frame
from tests.conftest import AUTH, CLOUD_KEYS

REPLICA_ENV = {"GKT_CLOUD_MODEL": "smollm2-135m-instruct", "GKT_CLOUD_N_THREADS": "1", "GKT_CLOUD_N_CTX": "1024",
               "GKT_CLOUD_MAX_IN_FLIGHT": "4", "GKT_CLOUD_CACHE_MAX_ENTRIES": "0", "GKT_CLOUD_DRAIN_TIMEOUT_S": "60",
               # Limits out of the way (the limit test sets its own): probes send many small requests.
               "GKT_CLOUD_RATE_LIMIT_PER_MIN": "1000000", "GKT_CLOUD_RATE_LIMIT_BURST": "100000", **CLOUD_KEYS}


def body(i: int, max_tokens: int = 4, stream: bool = True) -> dict[str, Any]:
    return {"prompt": f"Question {i}: name a colour.\nAnswer:", "max_tokens": max_tokens, "stream": stream,
            "temperature": 0}


def stream(url: str, payload: dict[str, Any], headers: dict[str, str] | None = None,
           timeout: float = 120) -> tuple[int, DoneFrame | ErrorFrame | None, str]:
    """One streamed guidance call: (status, its terminal frame or None, the text)."""
    with httpx.stream("POST", url + "/v1/guidance", json=payload, headers={**AUTH, **(headers or {})},
                      timeout=timeout) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, None, r.text
        text, last, decoder = [], None, SSEDecoder()
        for chunk in r.iter_raw():
            for data in decoder.feed(chunk):
                frame = parse_frame(data)
                if frame.type == "token":
                    text.append(frame.text)
                elif frame.type in ("done", "error"):
                    last = frame
        return 200, last, "".join(text)


def admitted(replica: Service) -> int:
    """Requests this replica's admission gate let through so far."""
    stats = httpx.get(replica.url + "/v1/stats", headers=AUTH, timeout=30).json()
    return stats["admission"]["admitted"]


def usage(url: str) -> dict[str, Any]:
    return httpx.get(url + "/v1/usage", headers=AUTH, timeout=30).json()
