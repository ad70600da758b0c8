"""The student's warm cache: prefills between generations, one owner at a time, few-shot prefixes kept warm.

A prefill (the edge's fast path) evaluates tokens into the KV cache ahead of a generation, e.g. the
student's prompt while the guidance is still streaming. It is opportunistic and always yields: it starts
only when the context is idle and nobody waits, evaluates in small chunks, and a generation that arrives
stops it at the next chunk boundary (``interrupt``). The context holds one warm sequence, so one owner at a
time may prefill (others are refused until it calls ``release``); a refused prefill costs nothing but speed.

Few-shot prefixes stay warm: a prefix of at least ``HOT_PREFIX_MIN`` tokens shared with one of the last few
prompts is remembered, and when a generation ends with the context idle, that prefix is prefilled again at
the lowest priority if another prompt evicted it (any prefill or generation that arrives stops it).

Two threads, two CPU priorities. A request's own prefill (its prompt, then its guidance as it streams) is on
that request's critical path: whatever it has not evaluated at the handoff, the generation evaluates, so it
runs at the generation's priority; at background priority a competing CPU-bound process starved it and the
handoff gap grew to the whole prefill (issue #22: 7.9 s with one core held by a training job). Only idle
re-warming, which nobody waits for, runs on a thread at ``BACKGROUND_NICE``. A thread's niceness cannot be
lowered again without privileges, hence a thread per priority rather than one thread switching. The lock
still admits one prefill or one generation at a time, whichever thread runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import copy_context

from edge_agent.llama_context import LlamaContext
from shared.generation import common_prefix

# A shared prompt prefix this long is worth keeping warm (a few-shot block, a long system prompt).
HOT_PREFIX_MIN = 64
BACKGROUND_NICE = 10  # added to the process's niceness for idle re-warming (Linux: per thread)
_IDLE = object()  # owner of the idle-time re-warming prefill: lowest priority


def _lower_priority() -> None:
    """Lower the calling thread's CPU priority; best effort (other systems set it for the whole process or not
    at all, so it is only done where a thread id names one thread)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICE)


class WarmCache:
    """Prefills into one context under the engine's lock, never in a generation's way."""

    def __init__(self, context: LlamaContext, lock: asyncio.Lock, waiting: Callable[[], int], name: str) -> None:
        self.context = context
        self.lock = lock  # the engine's: held by one generation or one prefill at a time
        self.waiting = waiting  # generations waiting for the lock
        # A request's prefill at normal priority (it is on the request's critical path); re-warming on its
        # own thread at a lower priority, so it never takes CPU from the event loop or a generation.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{name}-prefill")
        self._idle_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{name}-rewarm",
                                               initializer=_lower_priority)
        self._stop: threading.Event | None = None  # set while a prefill holds the lock
        self._running: object | None = None  # whose prefill holds the lock
        self.owner: object | None = None  # who holds the warm sequence
        self._recent: deque[list[int]] = deque(maxlen=4)
        self.hot_prefix: list[int] = []
        self._rewarm: asyncio.Task[int | None] | None = None

    async def prefill(self, tokens: list[int], owner: object) -> int | None:
        """See ``LlamaEngine.prefill``."""
        if self.waiting() or len(tokens) >= self.context.text.n_ctx or self.owner not in (None, owner):
            return None
        if self.lock.locked():
            if self._running is not _IDLE or owner is _IDLE or self._stop is None:
                return None  # a generation or a request's prefill has the context: never wait for it
            self._stop.set()  # a request's prefill outranks re-warming; wait one chunk for it
        await self.lock.acquire()
        if self.waiting() or self.owner not in (None, owner):  # a generation arrived meanwhile
            self.lock.release()
            return None
        if owner is not _IDLE:
            self.owner = owner
        self._running = owner
        stop = self._stop = threading.Event()

        def done(_: object) -> None:
            self._stop = self._running = None
            self.lock.release()

        loop = asyncio.get_running_loop()
        thread = self._idle_thread if owner is _IDLE else self._thread
        try:
            future = loop.run_in_executor(thread, copy_context().run, self.context.prefill, tokens, stop)
        except BaseException:
            done(None)
            raise
        future.add_done_callback(done)
        try:
            # shield: cancelling this coroutine must not cancel the future (its callback releases the lock)
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            stop.set()
            raise

    def release(self, owner: object) -> None:
        """``owner`` no longer needs its prefilled sequence; others may prefill."""
        if self.owner is owner:
            self.owner = None

    def interrupt(self) -> None:
        """A generation wants the context: a running prefill stops at its next chunk boundary."""
        if self._stop is not None:
            self._stop.set()

    def note_prompt(self, tokens: list[int]) -> None:
        """A generation starts from ``tokens``: a long prefix shared with a recent prompt becomes hot."""
        shared = max((common_prefix(p, tokens) for p in self._recent), default=0)
        if shared >= HOT_PREFIX_MIN:
            self.hot_prefix = tokens[:shared]
        self._recent.append(tokens)

    def rewarm(self) -> None:
        """The context fell idle: prefill the hot prefix again, at the lowest priority."""
        if not self.hot_prefix or self.lock.locked() or self.waiting() or self.owner is not None:
            return
        if self._rewarm is None or self._rewarm.done():
            self._rewarm = asyncio.ensure_future(self.prefill(self.hot_prefix, _IDLE))
            # Re-warming is best effort: a failure here surfaces in the next generation, not as a stray task.
            self._rewarm.add_done_callback(lambda t: t.cancelled() or t.exception())

    def forget(self) -> None:
        """No re-warming from now on, and no memory of recent prompts (a running prefill is interrupted)."""
        if self._rewarm is not None:
            self._rewarm.cancel()
        self.interrupt()
        self._recent.clear()
        self.hot_prefix = []

    def close(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)
        self._idle_thread.shutdown(wait=True, cancel_futures=True)
