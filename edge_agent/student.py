"""The edge's student: one GGUF model, one llama.cpp context, one generation at a time.

A llama.cpp context is not thread-safe, so a ``LlamaEngine`` runs each generation in its own worker thread
(``edge_agent/llama_context.py`` is what that thread does). Callers wait on an asyncio lock; the lock is
released when the worker has really returned (not when the awaiting coroutine is cancelled), so a cancelled
request can never let a second generation into a context that is still decoding. Cancellation is checked at
every token. Between generations the same lock lets prefills in (``edge_agent/prefill.py``: the fast path,
and few-shot prefixes kept warm); a generation never waits behind more than one prefill chunk.

A LoRA adapter is loaded with the model (``Llama(lora_path=...)``). ``swap`` puts a model loaded elsewhere (the
same base with another adapter, ``edge_agent/adapters.py``) in place between two generations, under the same
lock, so a request in flight finishes on the model it started on and the next one uses the new model.
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
from typing import Any

from edge_agent.llama_context import PREFILL_CHUNK, Emit, LlamaContext
from edge_agent.prefill import BACKGROUND_NICE, HOT_PREFIX_MIN, WarmCache
from shared.adapters import AdapterRef, sha256_file
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
        lora_path: str | Path | None = None,
        lora_scale: float = 1.0,
        adapter: AdapterRef | None = None,
    ) -> None:
        self.path = Path(model_path)
        self._options = {"n_ctx": n_ctx, "n_threads": n_threads, "n_batch": n_batch}
        llm = self.load(lora_path, lora_scale)
        if lora_path is not None and adapter is None:  # say which file serves, even when nobody named it
            adapter = AdapterRef(name=Path(lora_path).stem, sha256=sha256_file(Path(lora_path)), scale=lora_scale)
        self.adapter = adapter if lora_path is not None else None
        super().__init__(llm, name or self.path.stem, llm.n_ctx())
        self.max_waiting = max_waiting
        self._context = LlamaContext(llm, self)
        self._lock = asyncio.Lock()
        self._waiting = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{self.name}")
        self._warm = WarmCache(self._context, self._lock, lambda: self._waiting, self.name)
        self.consecutive_failures = 0
        self.max_failures = 3

    def load(self, lora_path: str | Path | None = None, lora_scale: float = 1.0) -> Any:
        """A new ``Llama`` of this engine's model and options, with a LoRA adapter when given (blocking: call
        it off the event loop). llama.cpp refuses an adapter whose architecture or tensor shapes do not fit."""
        import llama_cpp  # imported lazily: only an edge that serves a student needs it

        opts = self._options
        return llama_cpp.Llama(
            model_path=str(self.path),
            n_ctx=opts["n_ctx"],
            n_threads=opts["n_threads"],
            n_threads_batch=opts["n_threads"],
            n_batch=opts["n_batch"],
            lora_path=str(lora_path) if lora_path is not None else None,
            lora_scale=lora_scale,
            verbose=False,
        )

    async def swap(self, llm: Any, adapter: AdapterRef | None) -> None:
        """Serve ``llm`` (from ``load``) from the next generation on; the old model is freed once no thread
        uses it. Waits for the generation that holds the context (never interrupts it; a prefill stops at its next
        chunk)."""
        self._warm.interrupt()
        async with self._lock:
            old = self._llm
            self._bind(llm)
            self._context = self._warm.context = LlamaContext(llm, self)
            self.adapter = adapter
            # What was prefilled lives in the old context: the next generation starts cold (its tokens are
            # the same, the base's tokenizer is), and re-warming refills the new one.
        await asyncio.to_thread(old.close)

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
            if not isinstance(exc, GKTError) or exc.code is ErrorCode.engine_error:
                self.consecutive_failures += 1  # the request's own fault (a 4xx) says nothing of the engine
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
