"""The edge's student: one GGUF model, one llama.cpp context, one generation at a time.

A llama.cpp context is not thread-safe, so a ``LlamaEngine`` runs each generation in its own worker thread
(``edge_agent/llama_context.py`` is what that thread does). Callers wait on an asyncio lock; the lock is
released when the worker has really returned (not when the awaiting coroutine is cancelled), so a cancelled
request can never let a second generation into a context that is still decoding. Cancellation is checked at
every token. Between generations the same lock lets prefills in (``edge_agent/prefill.py``: the fast path,
and few-shot prefixes kept warm); a generation never waits behind more than one prefill chunk.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextvars import copy_context
from pathlib import Path
from time import perf_counter

from edge_agent.llama_context import PREFILL_CHUNK, Emit, LlamaContext
from edge_agent.prefill import BACKGROUND_NICE, HOT_PREFIX_MIN, WarmCache
from shared.errors import ErrorCode, GKTError
from shared.generation import GenerationParams, GenerationResult, Piece
from shared.llama import LlamaText, WorkerStream

__all__ = ["BACKGROUND_NICE", "HOT_PREFIX_MIN", "PREFILL_CHUNK", "LlamaEngine"]


class LlamaEngine(LlamaText):
    """One GGUF model with one llama.cpp context; one generation at a time, prefix cache kept warm."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        n_ctx: int = 4096,
        n_threads: int = 1,
        n_batch: int = 512,
        max_waiting: int = 16,
        name: str | None = None,
    ) -> None:
        import llama_cpp  # imported lazily: only an edge that serves a student needs it

        self.path = Path(model_path)
        llm = llama_cpp.Llama(
            model_path=str(self.path),
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            n_batch=n_batch,
            verbose=False,
        )
        super().__init__(llm, name or self.path.stem, llm.n_ctx())
        self.max_waiting = max_waiting
        self._context = LlamaContext(llm, self)
        self._lock = asyncio.Lock()
        self._waiting = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{self.name}")
        self._warm = WarmCache(self._context, self._lock, lambda: self._waiting, self.name)
        self.consecutive_failures = 0
        self.max_failures = 3

    # --- state ------------------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def last_progress(self) -> float:
        """``time.monotonic()`` of the last token (or generation start)."""
        return self._context.last_progress

    def stalled(self, threshold_s: float) -> bool:
        """Busy, and no token for ``threshold_s`` (a hung decode looks exactly like this)."""
        return self.busy and time.monotonic() - self.last_progress > threshold_s

    @property
    def dead(self) -> str | None:
        """Why the engine is unusable, after ``max_failures`` failed generations in a row."""
        if self.consecutive_failures >= self.max_failures:
            return f"engine dead: {self.consecutive_failures} generations failed in a row"
        return None

    @property
    def hot_prefix(self) -> list[int]:
        """The few-shot prefix kept warm (empty: none yet)."""
        return self._warm.hot_prefix

    @property
    def warm_owner(self) -> object | None:
        """Who holds the prefilled (warm) sequence, if anyone: see ``prefill`` and ``release_warm``."""
        return self._warm.owner

    def cached_prefix(self, tokens: list[int]) -> int:
        """How many leading ``tokens`` the KV cache holds in a reusable form (a generation skips them)."""
        return self._context.reusable(tokens)

    async def reset_cache(self) -> None:
        """Forget everything cached: the KV cache, recent prompts and the warm few-shot prefix, so the next
        generation starts cold. Waits for a running generation or prefill to return first."""
        self._warm.forget()
        async with self._lock:
            self._context.reset()

    # --- generation ------------------------------------------------------------------------------------

    async def stream(
        self, tokens: list[int], params: GenerationParams, stop: threading.Event | None = None
    ) -> AsyncIterator[Piece | GenerationResult]:
        """Yield pieces of text as they are decoded, then one ``GenerationResult``.

        ``stop``: the caller's way to end the generation at the next token and still receive its result
        (``finish_reason`` "cancelled", exact token counts and timings), e.g. to hand over to the teacher."""
        self.check_fits(len(tokens), params.max_tokens, "prompt")
        if self._lock.locked() and self._waiting >= self.max_waiting:
            raise GKTError(ErrorCode.overloaded, "the model is busy; try again shortly", retry_after=1.0)
        t_enqueued = perf_counter()
        self._warm.interrupt()  # a generation never waits behind more than one prefill chunk
        self._waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self._waiting -= 1
        queue_s = perf_counter() - t_enqueued
        bridge = WorkerStream()
        cancel = stop if stop is not None else threading.Event()
        try:
            future = bridge.loop.run_in_executor(self._executor, copy_context().run, self._run, tokens, params,
                                                 cancel, bridge.emit)
        except BaseException:
            self._lock.release()
            raise
        self._warm.note_prompt(tokens)

        def done(_: object) -> None:
            # Release only when the worker has returned, whatever happens to this coroutine.
            self._lock.release()
            bridge.loop.call_soon(self._warm.rewarm)

        future.add_done_callback(done)
        try:
            while True:
                item = await bridge.get()
                if isinstance(item, GenerationResult):
                    item.queue_s = queue_s
                    yield item
                    return
                yield item
        finally:
            cancel.set()

    def _run(self, tokens: list[int], params: GenerationParams, cancel: threading.Event, emit: Emit) -> None:
        self._context.last_progress = time.monotonic()
        try:
            emit(self._context.generate(tokens, params, cancel, emit))
            self.consecutive_failures = 0
        except BaseException as exc:  # reported to the awaiting coroutine, never lost in the thread
            self.consecutive_failures += 1
            emit(exc)

    # --- prefill ---------------------------------------------------------------------------------------

    async def prefill(self, tokens: list[int], owner: object) -> int | None:
        """Evaluate ``tokens`` into the KV cache so that a later ``stream`` of a sequence starting with them
        decodes only the rest. Returns how many of ``tokens`` are cached now, or None when refused (the
        context is busy, someone waits for it, or another owner holds the warm sequence)."""
        return await self._warm.prefill(tokens, owner)

    def release_warm(self, owner: object) -> None:
        """``owner`` no longer needs its prefilled sequence; others may prefill."""
        self._warm.release(owner)

    def close(self) -> None:
        """Wait for the worker threads to return, then free the model."""
        self._warm.close()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._llm.close()
