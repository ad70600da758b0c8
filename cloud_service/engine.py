"""The teacher-engine seam: what the guidance service needs from any teacher, and the stream it returns.

``open`` validates a request (context length, upstream acceptance) and returns a ``Generation``: pieces
followed by exactly one ``GenerationResult``, and an ``aclose`` that stops the engine's work. Errors raised by
``open`` happen before any byte is sent, so they become an HTTP status; errors while iterating become an error
frame.

``on_result`` is called exactly once per opened generation with its final result, also when the consumer
stops early (finish reason ``cancelled``, counting what was generated) or the engine fails: the ledger
charges streamed and abandoned work from it.

The factory that picks an engine from the settings lives in ``cloud_service.engines`` (the engines import
this module, never the other way round).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, Concatenate, ParamSpec, Protocol

import anyio

from shared.generation import GenerationResult, OnResult, Piece
from shared.protocol import GuidanceRequest
from shared.tokenize import DetokenizeRequest, TokenizeRequest

__all__ = ["Generation", "Item", "OnResult", "Stream", "TeacherEngine"]

Item = Piece | GenerationResult
P = ParamSpec("P")


class Generation(Protocol):
    """Pieces, then one result; ``aclose`` stops the work behind them. Any async generator is one."""

    def __aiter__(self) -> AsyncIterator[Item]: ...

    def __anext__(self) -> Awaitable[Item]: ...

    def aclose(self) -> Awaitable[None]: ...


class Stream:
    """A generation passed through stages, and the one owner of its cleanup.

    Stages (``then``) are async generators over the items: a deadline, the metrics, the cache. None of them
    closes what it reads; ``aclose`` closes them all, outermost first and the engine's generation last, then
    runs the ``on_close`` callbacks in reverse order. It does so exactly once, shielded from cancellation
    (after a client disconnect Starlette cancels every await, and the engine must really be stopped), and
    also when the stream was never iterated: an async generator that never started ignores ``aclose()``, so
    whatever was taken for the request (an admission slot, an upstream connection) is freed here, not in a
    ``finally`` inside a generator.
    """

    def __init__(self, source: Generation) -> None:
        self._layers: list[Generation] = [source]
        self._cleanups: list[Callable[[], Any]] = []
        self._closed = False

    def then(
        self, stage: Callable[Concatenate[Generation, P], AsyncGenerator[Item, None]], *args: P.args,
        **kwargs: P.kwargs,
    ) -> Stream:
        """Pass the items through ``stage(items, *args, **kwargs)``, an async generator."""
        self._layers.append(stage(self._layers[-1], *args, **kwargs))
        return self

    def on_close(self, cleanup: Callable[[], Any]) -> Stream:
        """Run ``cleanup`` (a function or a coroutine function) when the stream is closed, after every stage."""
        self._cleanups.append(cleanup)
        return self

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Item:
        return await self._layers[-1].__anext__()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            for layer in reversed(self._layers):
                with contextlib.suppress(Exception):
                    await layer.aclose()
            for cleanup in reversed(self._cleanups):
                with contextlib.suppress(Exception):
                    if inspect.isawaitable(done := cleanup()):
                        await done


class TeacherEngine(Protocol):
    """A teacher model that writes guidance."""

    model_name: str

    @property
    def stats(self) -> dict[str, Any]:
        """Engine counters (e.g. the batch-size histogram), for the stats endpoint."""
        ...

    async def open(self, request: GuidanceRequest, on_result: OnResult | None = None) -> Generation: ...

    async def tokenize(self, request: TokenizeRequest) -> dict[str, Any]:
        """``/tokenize`` with the teacher's tokenizer (shared/tokenize.py)."""
        ...

    async def detokenize(self, request: DetokenizeRequest) -> dict[str, Any]:
        """``/detokenize`` with the teacher's tokenizer."""
        ...

    async def tokenizer_info(self) -> dict[str, Any]:
        """``/tokenizer_info``: the teacher's special tokens, template, sizes and vocabulary fingerprint
        (``not_found`` where the engine cannot say)."""
        ...

    async def aclose(self) -> None: ...
