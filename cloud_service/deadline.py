"""The cloud stops at the caller's deadline (T2, T4) instead of generating guidance nobody will read."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import anyio

from cloud_service.engine import Generation
from shared.errors import ErrorCode, GKTError
from shared.generation import GenerationResult, Piece


async def bounded(generation: Generation, deadline: float) -> AsyncIterator[Piece | GenerationResult]:
    """Pass a generation through until ``deadline`` (``time.monotonic()``), then stop it and raise ``timeout``.

    Waiting happens on a task, so a deadline that falls during prompt processing is noticed on time; the
    generation is closed (which cancels the engine's work) whichever way this ends.
    """
    it = aiter(generation)
    pending: asyncio.Task | None = None
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GKTError(ErrorCode.timeout, "the request's deadline passed before the guidance was done")
            pending = pending or asyncio.ensure_future(anext(it))
            done, _ = await asyncio.wait({pending}, timeout=remaining)
            if not done:
                continue
            task, pending = pending, None
            try:
                item = task.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        await stop(pending, generation)


async def stop(pending: asyncio.Future | None, generation: Generation) -> None:
    """Cancel a pending step and close the generation, which stops the engine's work for it.

    Shielded: after a client disconnect Starlette cancels the calling task's scope at every await, and the
    engine (or the upstream HTTP stream) must really be stopped, not abandoned halfway.
    """
    with anyio.CancelScope(shield=True):
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        with contextlib.suppress(Exception):
            await generation.aclose()  # type: ignore[attr-defined]
