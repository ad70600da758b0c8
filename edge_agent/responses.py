"""OpenAI response shapes for chat and text completions, streamed or whole, with the ``gkt`` extension."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio

from edge_agent import logprobs
from edge_agent.answer import Delta, Echo, Summary
from shared.errors import ErrorCode, GKTError

Kind = Literal["chat", "completion"]


Event = Echo | Delta | Summary


@dataclass
class Envelope:
    """Identity shared by every chunk of one response, and how its tokens are named when it carries
    log-probabilities (``top``: alternatives per token; None: no log-probabilities)."""

    kind: Kind
    model: str
    id: str = ""
    created: int = 0
    namer: logprobs.Namer | None = None
    top: int | None = None
    _offset: int = field(default=0, init=False)  # characters of the completion's text so far (text_offset)

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

    def _logprobs(self, parts: list[Echo | Delta]) -> dict[str, Any] | None:
        """The log-probabilities of ``parts`` (the text of one chunk, or of the whole response)."""
        if self.top is None or self.namer is None:
            return None
        items = [e for part in parts for e in logprobs.entries(self.namer, part)]
        if self.kind == "chat":
            return logprobs.chat(items, self.top)
        out = logprobs.completion(items, self.top, self._offset)
        self._offset += sum(len(p.text) for p in parts)
        return out

    def choice(self, text: str | None, finish: str | None, *, chunk: bool, first: bool = False,
               lp: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.kind == "completion":
            return {"index": 0, "text": text or "", "logprobs": lp, "finish_reason": finish}
        if chunk:
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if first:
                delta["role"] = "assistant"
            return {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text or ""}, "logprobs": lp,
                "finish_reason": finish}

    def chunk(self, part: Echo | Delta, *, first: bool) -> dict[str, Any]:
        source = part.source if isinstance(part, Delta) else "prompt"
        return {**self._base(True), "gkt": {"source": source},
                "choices": [self.choice(part.text, None, chunk=True, first=first, lp=self._logprobs([part]))]}

    def final_chunk(self, summary: Summary) -> dict[str, Any]:
        return {**self._base(True), "choices": [self.choice(None, summary.finish_reason, chunk=True)],
                "gkt": summary.info.model_dump()}

    def usage_chunk(self, summary: Summary) -> dict[str, Any]:
        return {**self._base(True), "choices": [], "usage": usage(summary)}

    def whole(self, parts: list[Echo | Delta], summary: Summary) -> dict[str, Any]:
        text = "".join(p.text for p in parts)
        choice = self.choice(text, summary.finish_reason, chunk=False, lp=self._logprobs(parts))
        return {**self._base(False), "choices": [choice], "usage": usage(summary), "gkt": summary.info.model_dump()}


def usage(summary: Summary) -> dict[str, int]:
    return {"prompt_tokens": summary.prompt_tokens, "completion_tokens": summary.completion_tokens,
            "total_tokens": summary.prompt_tokens + summary.completion_tokens}


async def collect(events: AsyncIterator[Event]) -> tuple[list[Echo | Delta], Summary]:
    """The whole answer: its parts (the echoed prompt first, if any) and its summary."""
    parts: list[Echo | Delta] = []
    async with aclosing(events) as it:
        async for ev in it:
            if isinstance(ev, Summary):
                return parts, ev
            parts.append(ev)
    raise GKTError(ErrorCode.internal_error, "the answer ended without a summary")


def _sse(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def stream(
    env: Envelope,
    first: Event,
    events: AsyncIterator[Event],
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
                ev: Event | None = first
                while ev is not None:
                    if not isinstance(ev, Summary):
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
