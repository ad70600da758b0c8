"""The student's llama.cpp context as its worker thread drives it: prompts in canonical batches, then sampling.

Everything here runs in one thread at a time (``edge_agent/student.py`` holds the lock and owns the threads).

Canonical batches: llama.cpp's CPU kernels for repacked K-quants (Q4_K_M, our default models) compute a
batch's rows in groups of 4 and the remaining rows (and batches under 8 rows) on another code path, so a
token's KV entries differ in the last bits depending on how the prompt was split, and greedy decoding then
diverges now and then (seen on the 0.5B student and the 1.5B teacher). Measured here: in batches whose size is
a multiple of 4 and at least 8, each row's result is bit-identical wherever the batch starts. Prompt chunks are
padded to such a size and only such positions are reused, so the KV cache and the logits are a function of the
tokens alone: greedy output is the same with or without prefix reuse and the fast path.
"""

from __future__ import annotations

import codecs
import random
import threading
import time
from collections.abc import Callable
from time import perf_counter
from typing import Any

import numpy as np

from shared.generation import GenerationParams, GenerationResult, Piece, StopMatcher, common_prefix
from shared.llama import LlamaText, cached_tokens, clear_cache, decode_rows, last_logits

# Tokens per prefill decode: small enough that a generation which arrives waits at most one chunk
# (about 0.1-0.3 s for the 0.5B student on one thread), large enough to keep prompt processing batched.
PREFILL_CHUNK = 32
CANON_MULTIPLE = 4
CANON_MIN = 8

Emit = Callable[[Piece | GenerationResult | BaseException], None]


class LlamaContext:
    """One ``Llama`` and what its KV cache holds; ``evaluate`` and ``generate`` run in a worker thread."""

    def __init__(self, llm: Any, text: LlamaText) -> None:
        self.llm = llm
        self.text = text
        self.canon = 0  # leading cached positions computed in canonical chunks (the only ones reused)
        # Prompt chunk: a multiple of 4, so a full chunk needs no padding, within the batch and the ubatch.
        self.chunk = max(CANON_MIN, min(llm.n_batch, 512) // CANON_MULTIPLE * CANON_MULTIPLE)
        self.last_progress = time.monotonic()
        self._n_vocab = llm.n_vocab()

    def reset(self) -> None:
        """An empty KV cache (only while no thread uses the context)."""
        clear_cache(self.llm)
        self.canon = 0

    def reusable(self, tokens: list[int]) -> int:
        """Leading ``tokens`` the cache holds in canonical positions (what a generation would reuse)."""
        return min(common_prefix(cached_tokens(self.llm), tokens), self.canon)

    def evaluate(self, tokens: list[int], stop: threading.Event, *, final: bool) -> int:
        """Bring the KV cache to ``tokens``; ``final``: with the last token's logits fresh, ready to sample.
        Returns how many of ``tokens`` are cached (fewer when ``stop`` was set).

        Every prompt position is computed in a canonical batch and only such positions are reused, whatever
        was cached, prefilled or interrupted before."""
        llm = self.llm
        reuse = self.reusable(tokens)
        if final:
            reuse = min(reuse, len(tokens) - 1)
        elif reuse >= len(tokens):
            return len(tokens)
        llm.n_tokens = self.canon = reuse
        limit = self.chunk if final else min(PREFILL_CHUNK, self.chunk)
        for a in range(reuse, len(tokens), limit):
            if stop.is_set():
                break
            if self._decode_canonical(tokens[a : a + limit], a):
                self.canon = llm.n_tokens
        return llm.n_tokens

    def _decode_canonical(self, chunk: list[int], n_past: int) -> bool:
        """Decode ``chunk`` at ``n_past`` in a batch padded to a canonical size; returns whether it was one."""
        n = len(chunk)
        size = max(CANON_MIN, -(-n // CANON_MULTIPLE) * CANON_MULTIPLE)
        if n_past + size > self.text.n_ctx:
            size = n  # no room for the padding at the very end of the context: correct, if not canonical
        decode_rows(self.llm, chunk, n_past, size)
        return size % CANON_MULTIPLE == 0 and size >= CANON_MIN

    def prefill(self, tokens: list[int], stop: threading.Event) -> int:
        """``evaluate`` without sampling, in ``PREFILL_CHUNK``s so that ``stop`` is heard soon."""
        return self.evaluate(tokens, stop, final=False)

    def generate(self, tokens: list[int], params: GenerationParams, cancel: threading.Event,
                 emit: Emit) -> GenerationResult:
        """Evaluate the prompt, then sample and ``emit`` pieces until a stop, the budget or ``cancel``."""
        llm = self.llm
        llm.set_seed(params.seed if params.seed is not None else random.getrandbits(32))
        t0 = perf_counter()
        cached = min(self.reusable(tokens), len(tokens) - 1)
        if self.evaluate(tokens, cancel, final=True) < len(tokens):  # cancelled while processing the prompt
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
                if self.text.is_eog(tok):
                    finish = "stop"
                    break
                n += 1
                pending += 1
                if logprobs is not None:
                    logprobs.append(self._logprob(tok))
                text, hit = stops.feed(decoder.decode(self.text.piece(tok)))
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
        row = np.ctypeslib.as_array(last_logits(self.llm), shape=(self._n_vocab,))
        top = float(row.max())
        return float(row[token]) - top - float(np.log(np.exp(row - top).sum()))
