"""Timed HTTP streams against the edge (OpenAI SSE) and the cloud (gkt guidance frames), as a client sees them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import httpx

from gkt.bench.report import tokens_per_second
from shared.protocol import SSEDecoder

TIMEOUT = httpx.Timeout(10.0, read=900.0)


@dataclass
class Stream:
    """One streamed answer: arrival times of the text events and what the server said at the end."""

    t_start: float
    t_first: float | None = None
    t_last: float | None = None
    t_end: float = 0.0
    events: int = 0
    tokens: int = 0
    text: str = ""
    final: dict[str, Any] = field(default_factory=dict)  # edge: the `gkt` object; cloud: the done frame

    @property
    def ttft(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_start

    @property
    def latency(self) -> float:
        return self.t_end - self.t_start

    @property
    def tok_s(self) -> float | None:
        return tokens_per_second(self.tokens, self.t_first, self.t_last)


def _mark(s: Stream, text: str) -> None:
    now = perf_counter()
    if s.t_first is None:
        s.t_first = now
    s.t_last = now
    s.events += 1
    s.text += text


async def sse_objects(http: httpx.AsyncClient, url: str, body: dict[str, Any], who: str) -> AsyncIterator[dict]:
    """The JSON objects of an OpenAI-style event stream POSTed to ``url`` (``[DONE]`` ends it); a status other
    than 200 is a RuntimeError naming ``who`` answered it."""
    dec = SSEDecoder()
    async with http.stream("POST", url, json=body, timeout=TIMEOUT) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{who} answered {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for chunk in r.aiter_bytes():
            for data in dec.feed(chunk):
                if data != "[DONE]":
                    yield json.loads(data)


async def edge_stream(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Stream:
    """Stream an answer from the edge (chat when ``messages`` is given, else a text completion);
    ``tokens`` = completion tokens from the usage chunk."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    s = Stream(perf_counter())
    async for obj in sse_objects(http, url + route, body, "edge"):
        for choice in obj.get("choices", []):
            if text := choice.get("delta", {}).get("content") or choice.get("text"):
                _mark(s, text)
        if "gkt" in obj and "mode" in obj["gkt"]:
            s.final = obj["gkt"]
        if obj.get("usage"):
            s.tokens = obj["usage"]["completion_tokens"]
    s.t_end = perf_counter()
    return s


async def cloud_guidance(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Stream:
    """Stream guidance straight from the cloud; ``tokens`` = teacher tokens from the token frames."""
    s = Stream(perf_counter())
    dec = SSEDecoder()
    async with http.stream("POST", url + "/v1/guidance", json={**body, "stream": True}, timeout=TIMEOUT) as r:
        if r.status_code != 200:
            raise RuntimeError(f"cloud answered {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for chunk in r.aiter_bytes():
            for data in dec.feed(chunk):
                frame = json.loads(data)
                if frame["type"] == "token":
                    _mark(s, frame["text"])
                    s.tokens += frame["tokens"]
                elif frame["type"] in ("done", "error"):
                    s.final = frame
    s.t_end = perf_counter()
    if s.final.get("type") != "done":
        raise RuntimeError(f"guidance stream ended with {s.final}")
    return s


async def openai_completion(http: httpx.AsyncClient, base_url: str, body: dict[str, Any]) -> Stream:
    """Stream a text completion from any OpenAI-compatible server (vLLM); ``tokens`` = completion tokens
    from the usage chunk (the count of text chunks where the server sends none)."""
    s = Stream(perf_counter())
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    usage: dict[str, Any] = {}
    async for obj in sse_objects(http, base_url + "/completions", body, "upstream"):
        usage = obj.get("usage") or usage
        for choice in obj.get("choices", []):
            if text := choice.get("text"):
                _mark(s, text)
                s.tokens += 1
    s.t_end = perf_counter()
    s.tokens = int(usage.get("completion_tokens") or s.tokens)
    return s
