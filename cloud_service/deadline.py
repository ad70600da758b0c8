"""The cloud stops at the caller's deadline (T2, T4) instead of generating guidance nobody will read."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator

import anyio

from cloud_service.engine import Generation, Item
from shared.errors import ErrorCode, GKTError


async def bounded(generation: Generation, deadline: float) -> AsyncGenerator[Item, None]:
    """Pass a generation through until ``deadline`` (``time.monotonic()``), then raise ``timeout``.

    A stage of a ``Stream``: waiting happens on a task, so a deadline that falls during prompt processing is
    noticed on time; the task is cancelled however this ends, and the stream's owner closes the generation
    (which cancels the engine's work).
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
        await cancel(pending)


async def cancel(pending: asyncio.Future | None) -> None:
    """Cancel a pending step and wait until it has really stopped.

    Shielded: after a client disconnect Starlette cancels the calling task's scope at every await, and the
    step (inside the engine, or reading the upstream HTTP stream) must really be stopped, not abandoned halfway.
    """
    if pending is None or pending.done():
        return
    with anyio.CancelScope(shield=True):
        pending.cancel()
        with contextlib.suppress(BaseException):
            await pending
