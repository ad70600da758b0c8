"""The cloud's guidance stream (cloud_service/engine.py ``Stream``): one owner of cleanup.

Pure units on scripted generations (no model): every stage and the engine's generation are closed, and the
cleanups run, exactly once, in order, also when the stream was never iterated or its consumer was cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from cloud_service.engine import Generation, Item, Stream
from shared.generation import GenerationResult, Piece


def _engine(log: list[str], *, hang: bool = False) -> AsyncGenerator[Item, None]:
    async def gen() -> AsyncGenerator[Item, None]:
        try:
            yield Piece("a")
            if hang:
                await asyncio.Event().wait()
            yield GenerationResult("length", 1, 1)
        finally:
            log.append("engine closed")

    return gen()


async def _stage(items: Generation, name: str, log: list[str]) -> AsyncGenerator[Item, None]:
    try:
        async for item in items:
            yield item
    finally:
        log.append(f"{name} closed")


def _stream(log: list[str], *, hang: bool = False) -> Stream:
    async def release() -> None:
        log.append("released")

    return (Stream(_engine(log, hang=hang)).on_close(lambda: log.append("slot freed")).on_close(release)
            .then(_stage, "inner", log).then(_stage, "outer", log))


async def test_closes_every_stage_outermost_first_then_the_cleanups_once() -> None:
    log: list[str] = []
    stream = _stream(log)
    assert isinstance(await anext(stream), Piece)
    await stream.aclose()
    await stream.aclose()
    assert log == ["outer closed", "inner closed", "engine closed", "released", "slot freed"]


async def test_a_stream_never_iterated_still_runs_its_cleanups() -> None:
    log: list[str] = []
    await _stream(log).aclose()
    assert log == ["released", "slot freed"]  # the generators never started: nothing of theirs to close


async def test_a_cancelled_consumer_leaves_everything_closed() -> None:
    log: list[str] = []
    stream = _stream(log, hang=True)

    async def consume() -> None:
        try:
            async for _ in stream:
                pass
        finally:
            await stream.aclose()

    task = asyncio.ensure_future(consume())
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert log == ["engine closed", "inner closed", "outer closed", "released", "slot freed"]
