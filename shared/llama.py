"""llama.cpp behind a small async interface, used by the cloud teacher and the edge student alike.

A llama.cpp context is not thread-safe, so each ``LlamaEngine`` owns one context and runs one generation at
a time in its own worker thread. Callers wait on an asyncio lock; the lock is released when the worker has
really returned (not when the awaiting coroutine is cancelled), so a cancelled request can never let a
second generation into a context that is still decoding. Cancellation is checked at every token.

``prefill`` (the edge's fast path) evaluates tokens into the KV cache ahead of a generation, e.g. the
student's prompt while the guidance is still streaming. It is opportunistic and always yields: it starts
only when the context is idle and nobody waits, evaluates in small chunks, and a ``stream`` that arrives
stops it at the next chunk boundary. The context holds one warm sequence, so one owner at a time may
prefill (others are refused until it calls ``release_warm``); a refused prefill costs nothing but speed.

Few-shot prefixes stay warm: a prefix of at least ``HOT_PREFIX_MIN`` tokens shared with one of the last few
prompts is remembered, and when a generation ends with the context idle, that prefix is prefilled again at
the lowest priority if another prompt evicted it (any prefill or generation that arrives stops it).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import random
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import copy_context
from pathlib import Path
from time import perf_counter
from typing import Any

import numpy as np

from shared.errors import ErrorCode, GKTError
from shared.generation import GenerationParams, GenerationResult, Piece, StopMatcher, common_prefix, context_error

# Tokens per prefill decode: small enough that a generation which arrives waits at most one chunk
# (about 0.1-0.3 s for the 0.5B student on one thread), large enough to keep prompt processing batched.
PREFILL_CHUNK = 32
# Canonical batches. llama.cpp's CPU kernels for repacked K-quants (Q4_K_M, our default models) compute a
# batch's rows in groups of 4 and the remaining rows (and batches under 8 rows) on another code path, so a
# token's KV entries differ in the last bits depending on how the prompt was split, and greedy decoding
# then diverges now and then (seen on the 0.5B student and the 1.5B teacher). Measured here: in batches
# whose size is a multiple of 4 and at least 8, each row's result is bit-identical wherever the batch
# starts. Prompt chunks are padded to such a size; single-token decoding is left to generated tokens.
CANON_MULTIPLE = 4
CANON_MIN = 8
# A shared prompt prefix this long is worth keeping warm (a few-shot block, a long system prompt).
HOT_PREFIX_MIN = 64
_IDLE = object()  # owner of the idle-time re-warming prefill: lowest priority



BACKGROUND_NICE = 10  # added to the process's niceness for background prefills (Linux: per thread)


def _lower_priority() -> None:
    """Lower the calling thread's CPU priority; best effort (other systems set it for the whole process or not
    at all, so it is only done where a thread id names one thread)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICE)

class LlamaText:
    """The prompt side of a loaded model: chat template, tokenizer, token counts, context check.

    Shared by ``LlamaEngine`` (one sequence at a time) and the cloud's batched scheduler; tokenizing only
    reads the vocabulary, so it is safe while another thread decodes.
    """

    def __init__(self, llm: Any, name: str, n_ctx: int) -> None:
        import llama_cpp

        self._llama_cpp = llama_cpp
        self._llm = llm
        self.name = name
        self.n_ctx = n_ctx
        self._vocab = llm._model.vocab
        self._bos = llm.token_bos()
        self._formatter = self._make_formatter()

    # --- prompts ---------------------------------------------------------------------------------------

    def _make_formatter(self) -> Any:
        template = self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            return None
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        def text(tok: int) -> str:
            return self._llm.detokenize([tok], special=True).decode("utf-8", "ignore") if tok >= 0 else ""

        return Jinja2ChatFormatter(
            template=template, eos_token=text(self._llm.token_eos()), bos_token=text(self._bos)
        )

    @property
    def has_chat_template(self) -> bool:
        return self._formatter is not None

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The model's own chat template with the assistant turn open."""
        if self._formatter is None:
            # A base model: a plain transcript is the most natural text it can continue.
            turns = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
            return f"{turns}Assistant:"
        return self._formatter(messages=messages).prompt

    def tokenize(self, text: str, *, special: bool, add_bos: bool = True) -> list[int]:
        """Tokens of ``text``; ``special`` parses template markers such as ``<|im_start|>``."""
        tokens = self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)
        if len(tokens) >= 2 and tokens[0] == tokens[1] == self._bos:
            tokens = tokens[1:]  # the template wrote BOS and the tokenizer added another
        return tokens

    def count(self, text: str) -> int:
        """How many tokens ``text`` is, as a continuation (no BOS, no special markers)."""
        return len(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)) if text else 0

    def check_fits(self, prompt_tokens: int, max_tokens: int, param: str) -> None:
        """The prompt is not empty and prompt + ``max_tokens`` fits the context (V4)."""
        if prompt_tokens == 0:
            raise GKTError(ErrorCode.invalid_request, f"{param} is empty (this model has no start token to "
                           "continue from)", param=param)
        if prompt_tokens + max_tokens > self.n_ctx:
            raise context_error(self.n_ctx, prompt_tokens, max_tokens, param)

    def is_eog(self, token: int) -> bool:
        return bool(self._llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def piece(self, token: int) -> bytes:
        """The bytes of one generated token (may be part of a UTF-8 character)."""
        return self._llm.detokenize([token])


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
        import llama_cpp  # imported lazily: the OpenAI-upstream cloud does not need it

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
        self._lock = asyncio.Lock()
        self._waiting = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{self.name}")
        # Prefills (the fast path's speculative work, re-warming) run on their own thread at a lower CPU
        # priority: on a one-core edge they would otherwise delay the event loop's wake-ups, i.e. the user's
        # first token. The lock keeps them from ever overlapping a generation.
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{self.name}-prefill",
                                              initializer=_lower_priority)
        self._prefill_stop: threading.Event | None = None  # set while a prefill holds the lock
        self._warm_owner: object | None = None
        self._canon = 0  # leading cached positions computed in canonical chunks (the only ones reused)
        # Prompt chunk: a multiple of 4, so a full chunk needs no padding, within the batch and the ubatch.
        self._chunk = max(CANON_MIN, min(self._llm.n_batch, 512) // CANON_MULTIPLE * CANON_MULTIPLE)
        self._prefill_owner: object | None = None
        self._recent: deque[list[int]] = deque(maxlen=4)
        self.hot_prefix: list[int] = []
        self._rewarm: asyncio.Task[int | None] | None = None
        self.last_progress = time.monotonic()
        self.consecutive_failures = 0
        self.max_failures = 3
        self._n_vocab = self._llm.n_vocab()

    # --- generation ------------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    @property
    def waiting(self) -> int:
        return self._waiting

    def stalled(self, threshold_s: float) -> bool:
        """Busy, and no token for ``threshold_s`` (a hung decode looks exactly like this)."""
        return self.busy and time.monotonic() - self.last_progress > threshold_s

    @property
    def dead(self) -> str | None:
        """Why the engine is unusable, after ``max_failures`` failed generations in a row."""
        if self.consecutive_failures >= self.max_failures:
            return f"engine dead: {self.consecutive_failures} generations failed in a row"
        return None

    async def stream(
        self, tokens: list[int], params: GenerationParams, stop: threading.Event | None = None
    ) -> AsyncIterator[Piece | GenerationResult]:
        """Yield pieces of text as they are decoded, then one ``GenerationResult``.

        ``stop``: the caller's way to end the generation at the next token and still receive its result
        (``finish_reason`` "cancelled", exact token counts and timings), e.g. to hand over to the teacher."""
        self.check_fits(len(tokens), params.max_tokens, "prompt")
        if self._lock.locked() and self._waiting >= self.max_waiting:
            raise GKTError(ErrorCode.overloaded, "the model is busy; try again shortly", retry_after=1.0)
        loop = asyncio.get_running_loop()
        t_enqueued = perf_counter()
        if self._prefill_stop is not None:
            self._prefill_stop.set()  # a generation never waits behind more than one prefill chunk
        self._waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self._waiting -= 1
        queue_s = perf_counter() - t_enqueued
        queue: asyncio.Queue[Piece | GenerationResult | BaseException] = asyncio.Queue()
        cancel = stop if stop is not None else threading.Event()

        def emit(item: Piece | GenerationResult | BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        try:
            future = loop.run_in_executor(self._executor, copy_context().run, self._run, tokens, params, cancel, emit)
        except BaseException:
            self._lock.release()
            raise
        self._note_prompt(tokens)

        def done(_: object) -> None:
            # Release only when the worker has returned, whatever happens to this coroutine.
            self._lock.release()
            loop.call_soon(self._rewarm_hot_prefix)

        future.add_done_callback(done)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise GKTError(ErrorCode.engine_error, "the model failed while generating") from item
                if isinstance(item, GenerationResult):
                    item.queue_s = queue_s
                    yield item
                    return
                yield item
        finally:
            cancel.set()

    async def prefill(self, tokens: list[int], owner: object) -> int | None:
        """Evaluate ``tokens`` into the KV cache so that a later ``stream`` of a sequence starting with them
        decodes only the rest. Returns how many of ``tokens`` are cached now, or None when refused (the
        context is busy, someone waits for it, or another owner holds the warm sequence)."""
        return await self._prefill_as(tokens, owner)

    async def _prefill_as(self, tokens: list[int], owner: object) -> int | None:
        if self._waiting or len(tokens) >= self.n_ctx or self._warm_owner not in (None, owner):
            return None
        if self._lock.locked():
            if self._prefill_owner is not _IDLE or owner is _IDLE or self._prefill_stop is None:
                return None  # a generation or a request's prefill has the context: never wait for it
            self._prefill_stop.set()  # a request's prefill outranks re-warming; wait one chunk for it
        await self._lock.acquire()
        if self._waiting or self._warm_owner not in (None, owner):  # a generation arrived meanwhile
            self._lock.release()
            return None
        if owner is not _IDLE:
            self._warm_owner = owner
        self._prefill_owner = owner
        stop = self._prefill_stop = threading.Event()

        def done(_: object) -> None:
            self._prefill_stop = self._prefill_owner = None
            self._lock.release()

        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._background, copy_context().run, self._prefill, tokens, stop)
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

    def _note_prompt(self, tokens: list[int]) -> None:
        shared = max((common_prefix(p, tokens) for p in self._recent), default=0)
        if shared >= HOT_PREFIX_MIN:
            self.hot_prefix = tokens[:shared]
        self._recent.append(tokens)

    def _rewarm_hot_prefix(self) -> None:
        if not self.hot_prefix or self._lock.locked() or self._waiting or self._warm_owner is not None:
            return
        if self._rewarm is None or self._rewarm.done():
            self._rewarm = asyncio.ensure_future(self._prefill_as(self.hot_prefix, _IDLE))
            # Re-warming is best effort: a failure here surfaces in the next generation, not as a stray task.
            self._rewarm.add_done_callback(lambda t: t.cancelled() or t.exception())

    def release_warm(self, owner: object) -> None:
        """``owner`` no longer needs its prefilled sequence; others may prefill."""
        if self._warm_owner is owner:
            self._warm_owner = None

    def _prefill(self, tokens: list[int], stop: threading.Event) -> int:
        return self._eval(tokens, stop, final=False)

    def _eval(self, tokens: list[int], stop: threading.Event, *, final: bool) -> int:
        """Bring the KV cache to ``tokens``; ``final``: with the last token's logits fresh, ready to sample.
        Returns how many of ``tokens`` are cached (fewer when ``stop`` was set).

        Every prompt position is computed in a canonical batch (``_decode_canonical``) and only such positions
        are reused, so the KV cache and the logits are a function of the tokens alone, whatever was cached,
        prefilled or interrupted before: greedy output is the same with or without prefix reuse and the
        fast path."""
        llm = self._llm
        reuse = min(common_prefix(llm._input_ids[: llm.n_tokens], tokens), self._canon)
        if final:
            reuse = min(reuse, len(tokens) - 1)
        elif reuse >= len(tokens):
            return len(tokens)
        llm.n_tokens = self._canon = reuse
        limit = self._chunk if final else min(PREFILL_CHUNK, self._chunk)
        for a in range(reuse, len(tokens), limit):
            if stop.is_set():
                break
            if self._decode_canonical(tokens[a : a + limit], a):
                self._canon = llm.n_tokens
        return llm.n_tokens

    def _decode_canonical(self, chunk: list[int], n_past: int) -> bool:
        """Decode ``chunk`` at ``n_past`` in a batch of a canonical size: padded with filler tokens at later
        positions (causal attention hides them from the real rows) whose KV cells are dropped afterwards.
        Returns whether the batch was canonical."""
        llm = self._llm
        n = len(chunk)
        size = max(CANON_MIN, -(-n // CANON_MULTIPLE) * CANON_MULTIPLE)
        if n_past + size > self.n_ctx:
            size = n  # no room for the padding at the very end of the context: correct, if not canonical
        llm._ctx.kv_cache_seq_rm(-1, n_past, -1)
        b = llm._batch.batch
        b.n_tokens = size
        for i in range(size):
            b.token[i] = chunk[min(i, n - 1)]
            b.pos[i] = n_past + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = i == n - 1
        llm._ctx.decode(llm._batch)
        llm._ctx.kv_cache_seq_rm(-1, n_past + n, -1)
        llm.input_ids[n_past : n_past + n] = chunk
        llm.n_tokens = n_past + n
        llm._requires_eval = False
        return size % CANON_MULTIPLE == 0 and size >= CANON_MIN

    def _run(
        self,
        tokens: list[int],
        params: GenerationParams,
        cancel: threading.Event,
        emit: Callable[[Piece | GenerationResult | BaseException], None],
    ) -> None:
        self.last_progress = time.monotonic()
        try:
            emit(self._generate(tokens, params, cancel, emit))
            self.consecutive_failures = 0
        except BaseException as exc:  # reported to the awaiting coroutine, never lost in the thread
            self.consecutive_failures += 1
            emit(exc)

    def _generate(
        self,
        tokens: list[int],
        params: GenerationParams,
        cancel: threading.Event,
        emit: Callable[[Piece | GenerationResult | BaseException], None],
    ) -> GenerationResult:
        llm = self._llm
        llm.set_seed(params.seed if params.seed is not None else random.getrandbits(32))
        t0 = perf_counter()
        cached = min(common_prefix(llm._input_ids[: llm.n_tokens], tokens), self._canon, len(tokens) - 1)
        if self._eval(tokens, cancel, final=True) < len(tokens):  # cancelled while processing the prompt
            return GenerationResult(finish_reason="cancelled", prompt_tokens=len(tokens), completion_tokens=0,
                                    prompt_s=perf_counter() - t0, cached_prompt_tokens=cached)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopMatcher(params.stop)
        finish: str = "length"
        n = pending = 0
        logprobs: list[float] | None = [] if params.logprobs else None
        t_first: float | None = None
        # The prompt is fully evaluated with its last logits current, so ``generate`` samples at once.
        gen = llm.generate(
            tokens, top_k=0, top_p=params.top_p, min_p=0.0, typical_p=1.0,
            temp=params.temperature, repeat_penalty=1.0,
        )
        try:
            for tok in gen:
                self.last_progress = time.monotonic()
                if t_first is None:
                    t_first = perf_counter()
                if cancel.is_set():
                    finish = "cancelled"
                    break
                if self.is_eog(tok):
                    finish = "stop"
                    break
                n += 1
                pending += 1
                if logprobs is not None:
                    logprobs.append(self._logprob(tok))
                text, hit = stops.feed(decoder.decode(llm.detokenize([tok])))
                if text:
                    emit(Piece(text, pending, logprobs))
                    pending = 0
                    logprobs = [] if params.logprobs else None
                if hit:
                    finish = "stop"
                    break
                if n >= params.max_tokens:
                    break
        finally:
            gen.close()
        if finish == "length" and (tail := stops.flush()):
            emit(Piece(tail, pending, logprobs))
        # An incomplete UTF-8 sequence left in the decoder is dropped: it is not a character yet.
        t_end = perf_counter()
        t_first = t_first or t_end
        return GenerationResult(
            finish_reason=finish,  # type: ignore[arg-type]
            prompt_tokens=len(tokens),
            completion_tokens=n,
            prompt_s=t_first - t0,
            generation_s=t_end - t_first,
            cached_prompt_tokens=cached,
        )

    def _logprob(self, token: int) -> float:
        """log p(token) under the logits it was just sampled from (the last output row of the context).

        Read before the token is decoded, so the row is still the one the sampler used; a log-softmax over
        the vocabulary: 0.14 ms for Qwen's 152k entries measured here (a decode step of the 0.5B student
        takes 20-37 ms)."""
        row = np.ctypeslib.as_array(self._llm._ctx.get_logits_ith(-1), shape=(self._n_vocab,))
        top = float(row.max())
        return float(row[token]) - top - float(np.log(np.exp(row - top).sum()))

    def close(self) -> None:
        self._background.shutdown(wait=True, cancel_futures=True)
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._llm.close()

