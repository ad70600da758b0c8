"""llama.cpp behind a small async interface, used by the cloud teacher and the edge student alike.

A llama.cpp context is not thread-safe, so each ``LlamaEngine`` owns one context and runs one generation at
a time in its own worker thread. Callers wait on an asyncio lock; the lock is released when the worker has
really returned (not when the awaiting coroutine is cancelled), so a cancelled request can never let a
second generation into a context that is still decoding. Cancellation is checked at every token.
"""

from __future__ import annotations

import asyncio
import codecs
import random
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from time import perf_counter
from typing import Any

from shared.errors import ErrorCode, GKTError
from shared.generation import GenerationParams, GenerationResult, Piece, StopMatcher, context_error


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

    # --- generation ------------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    @property
    def waiting(self) -> int:
        return self._waiting

    async def stream(
        self, tokens: list[int], params: GenerationParams
    ) -> AsyncIterator[Piece | GenerationResult]:
        """Yield pieces of text as they are decoded, then one ``GenerationResult``."""
        if len(tokens) + params.max_tokens > self.n_ctx:
            raise context_error(self.n_ctx, len(tokens), params.max_tokens, "prompt")
        if self._lock.locked() and self._waiting >= self.max_waiting:
            raise GKTError(ErrorCode.overloaded, "the model is busy; try again shortly", retry_after=1.0)
        loop = asyncio.get_running_loop()
        t_enqueued = perf_counter()
        self._waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self._waiting -= 1
        queue_s = perf_counter() - t_enqueued
        queue: asyncio.Queue[Piece | GenerationResult | BaseException] = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: Piece | GenerationResult | BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        try:
            future = loop.run_in_executor(self._executor, self._run, tokens, params, cancel, emit)
        except BaseException:
            self._lock.release()
            raise
        # Release only when the worker has returned, whatever happens to this coroutine.
        future.add_done_callback(lambda _: self._lock.release())
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

    def _run(
        self,
        tokens: list[int],
        params: GenerationParams,
        cancel: threading.Event,
        emit: Callable[[Piece | GenerationResult | BaseException], None],
    ) -> None:
        try:
            emit(self._generate(tokens, params, cancel, emit))
        except BaseException as exc:  # reported to the awaiting coroutine, never lost in the thread
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
        cached = _common_prefix(llm._input_ids[: llm.n_tokens], tokens)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopMatcher(params.stop)
        finish: str = "length"
        n = pending = 0
        t0 = perf_counter()
        t_first: float | None = None
        gen = llm.generate(
            tokens, top_k=0, top_p=params.top_p, min_p=0.0, typical_p=1.0,
            temp=params.temperature, repeat_penalty=1.0,
        )
        try:
            for tok in gen:
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
                text, hit = stops.feed(decoder.decode(llm.detokenize([tok])))
                if text:
                    emit(Piece(text, pending))
                    pending = 0
                if hit:
                    finish = "stop"
                    break
                if n >= params.max_tokens:
                    break
        finally:
            gen.close()
        if finish == "length" and (tail := stops.flush()):
            emit(Piece(tail, pending))
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

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._llm.close()


def _common_prefix(a: Any, b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
