"""OpenAI response shapes for chat and text completions, streamed or whole, with the ``gkt`` extension."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Literal

import anyio

from edge_agent.answer import Delta, Summary
from shared.errors import ErrorCode, GKTError

Kind = Literal["chat", "completion"]


@dataclass
class Envelope:
    """Identity shared by every chunk of one response."""

    kind: Kind
    model: str
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        prefix = "chatcmpl" if self.kind == "chat" else "cmpl"
        self.id = self.id or f"{prefix}-{uuid.uuid4().hex}"
        self.created = self.created or int(time.time())

    def _base(self, chunk: bool) -> dict[str, Any]:
        if self.kind == "chat":
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def choice(self, text: str | None, finish: str | None, *, chunk: bool, first: bool = False) -> dict[str, Any]:
        if self.kind == "completion":
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if chunk:
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if first:
                delta["role"] = "assistant"
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text or ""}, "logprobs": None,
                "finish_reason": finish}

    def chunk(self, delta: Delta, *, first: bool) -> dict[str, Any]:
        return {**self._base(True), "choices": [self.choice(delta.text, None, chunk=True, first=first)],
                "gkt": {"source": delta.source}}

    def final_chunk(self, summary: Summary) -> dict[str, Any]:
        return {**self._base(True), "choices": [self.choice(None, summary.finish_reason, chunk=True)],
                "gkt": summary.info.model_dump()}

    def usage_chunk(self, summary: Summary) -> dict[str, Any]:
        return {**self._base(True), "choices": [], "usage": usage(summary)}

    def whole(self, text: str, summary: Summary) -> dict[str, Any]:
        return {**self._base(False), "choices": [self.choice(text, summary.finish_reason, chunk=False)],
                "usage": usage(summary), "gkt": summary.info.model_dump()}


def usage(summary: Summary) -> dict[str, int]:
    return {"prompt_tokens": summary.prompt_tokens, "completion_tokens": summary.completion_tokens,
            "total_tokens": summary.prompt_tokens + summary.completion_tokens}


async def collect(events: AsyncIterator[Delta | Summary]) -> tuple[str, Summary]:
    parts: list[str] = []
    async with aclosing(events) as it:
        async for ev in it:
            if isinstance(ev, Delta):
                parts.append(ev.text)
            else:
                return "".join(parts), ev
    raise GKTError(ErrorCode.internal_error, "the answer ended without a summary")


def _sse(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def stream(
    env: Envelope,
    first: Delta | Summary,
    events: AsyncIterator[Delta | Summary],
    include_usage: bool,
    drain_deadline: asyncio.Event | None = None,
) -> AsyncIterator[bytes]:
    """OpenAI SSE: content chunks marked with their source, a final chunk with the gkt summary, [DONE].

    Errors after the first byte travel as an OpenAI error event (the ``openai`` client raises on it); so
    does the end of a drain (G2), instead of a silent cut.
    """
    is_first = True
    drained = asyncio.ensure_future((drain_deadline or asyncio.Event()).wait())
    step: asyncio.Future | None = None
    try:
        async with aclosing(events) as it:
            try:
                ev: Delta | Summary | None = first
                while ev is not None:
                    if isinstance(ev, Delta):
                        yield _sse(env.chunk(ev, first=is_first))
                        is_first = False
                    else:
                        yield _sse(env.final_chunk(ev))
                        if include_usage:
                            yield _sse(env.usage_chunk(ev))
                        break
                    step = asyncio.ensure_future(anext(it, None))
                    done, _ = await asyncio.wait({step, drained}, return_when=asyncio.FIRST_COMPLETED)
                    if step not in done:
                        raise GKTError(ErrorCode.draining, "the edge is shutting down; the answer was cut short")
                    ev, step = step.result(), None
            finally:
                if step is not None and not step.done():
                    # The client left (or the drain ended): stop the answer's work, which closes the cloud
                    # stream. Shielded: Starlette cancels this task's scope again at every await, and the
                    # cleanup must run to its end (and before aclosing closes the events) or the HTTP
                    # stream to the cloud is left open with the teacher still generating.
                    step.cancel()
                    with anyio.CancelScope(shield=True), contextlib.suppress(BaseException):
                        await step
    except GKTError as err:
        yield _sse(err.body())
    finally:
        drained.cancel()
    yield b"data: [DONE]\n\n"
