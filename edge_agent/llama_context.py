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

from shared.errors import ErrorCode, GKTError
from shared.generation import GenerationParams, GenerationResult, Piece, StopMatcher, TokenChoice, common_prefix
from shared.grammar import GrammarError, GrammarState
from shared.llama import LlamaText, cached_tokens, clear_cache, decode_rows, last_logits, row_logits
from shared.logprobs import token_choice

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

    def _decode_canonical(self, chunk: list[int], n_past: int, *, all_logits: bool = False) -> bool:
        """Decode ``chunk`` at ``n_past`` in a batch padded to a canonical size; returns whether it was one."""
        n = len(chunk)
        size = max(CANON_MIN, -(-n // CANON_MULTIPLE) * CANON_MULTIPLE)
        if n_past + size > self.text.n_ctx:
            size = n  # no room for the padding at the very end of the context: correct, if not canonical
        decode_rows(self.llm, chunk, n_past, size, all_logits=all_logits)
        return size % CANON_MULTIPLE == 0 and size >= CANON_MIN

    def score(self, tokens: list[int], k: int, stop: threading.Event) -> list[TokenChoice | None] | None:
        """Each of ``tokens``' log-probability after the ones before it, with the ``k`` most likely tokens there
        (None for the first token: nothing comes before it); None when ``stop`` was set first.

        The whole prompt is decoded again (a cached position has no logits left to read), in the same canonical
        chunks as ``evaluate``, so it stays in the cache for the generation that follows."""
        llm = self.llm
        llm.n_tokens = self.canon = 0
        out: list[TokenChoice | None] = [None]
        for a in range(0, len(tokens), self.chunk):
            if stop.is_set():
                return None
            chunk = tokens[a : a + self.chunk]
            if self._decode_canonical(chunk, a, all_logits=True):
                self.canon = llm.n_tokens
            for i in range(min(len(chunk), len(tokens) - 1 - a)):
                row = np.ctypeslib.as_array(row_logits(llm, i), shape=(self._n_vocab,))
                out.append(token_choice(row, tokens[a + i + 1], k))
            self.last_progress = time.monotonic()
        return out

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
        scored = None
        if params.prompt_logprobs is not None:
            scored = self.score(tokens, params.prompt_logprobs, cancel)
            cached = 0  # scoring decodes the whole prompt again
        cancelled = params.prompt_logprobs is not None and scored is None
        if not cancelled and params.max_tokens > 0:
            cancelled = self.evaluate(tokens, cancel, final=True) < len(tokens)
        if cancelled:  # while processing the prompt
            return GenerationResult(finish_reason="cancelled", prompt_tokens=len(tokens), completion_tokens=0,
                                    prompt_s=perf_counter() - t0, cached_prompt_tokens=cached)
        if params.max_tokens == 0:  # echo alone: the prompt scored, nothing generated
            return GenerationResult(finish_reason="length", prompt_tokens=len(tokens), completion_tokens=0,
                                    prompt_s=perf_counter() - t0, prompt_choices=scored)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopMatcher(params.stop)
        finish: str = "length"
        n = pending = 0
        logprobs: list[float] | None = [] if params.logprobs else None
        top = params.top_logprobs
        choices: list[TokenChoice] | None = [] if top is not None else None
        t_first: float | None = None
        grammar = self._grammar(params)
        # The prompt is fully evaluated with its last logits current, so ``generate`` samples at once.
        gen = llm.generate(
            tokens, top_k=0, top_p=params.top_p, min_p=0.0, typical_p=1.0,
            temp=params.temperature, repeat_penalty=1.0,
            logits_processor=None if grammar is None else [grammar.processor(
                temperature=params.temperature, top_p=params.top_p, seed=params.seed)],
        )
        try:
            for tok in gen:
                self.last_progress = time.monotonic()
                if t_first is None:
                    t_first = perf_counter()
                if cancel.is_set():
                    finish = "cancelled"
                    break
                if self.text.is_eog(tok) and not params.ignore_eos:
                    finish = "stop"
                    break
                n += 1
                pending += 1
                if grammar is not None:
                    grammar.accept(tok)  # the processor let only an allowed token through
                if logprobs is not None or choices is not None:
                    choice = self._choice(tok, top or 0)
                    if logprobs is not None:
                        logprobs.append(choice.logprob)
                    if choices is not None:
                        choices.append(choice)
                text, hit = stops.feed(decoder.decode(self.text.piece(tok)))
                if text:
                    emit(Piece(text, pending, logprobs, choices))
                    pending = 0
                    logprobs = [] if params.logprobs else None
                    choices = [] if top is not None else None
                if hit:
                    finish = "stop"
                    break
                if n >= params.max_tokens:
                    break
        finally:
            gen.close()
            if grammar is not None:
                grammar.close()
        if finish == "length" and (tail := stops.flush()):
            emit(Piece(tail, pending, logprobs, choices))
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
            prompt_choices=scored,
        )

    def _grammar(self, params: GenerationParams) -> GrammarState | None:
        """The response format's grammar after the answer so far, over this context's model (built here, in
        the worker: the model may have been swapped since the request was planned)."""
        if params.grammar_start is None:
            return None
        try:
            return params.grammar_start.state(self.llm)
        except GrammarError as exc:
            raise GKTError(ErrorCode.invalid_request, str(exc), param="response_format") from exc

    def _choice(self, token: int, k: int) -> TokenChoice:
        """``token``'s log-probability (and the ``k`` most likely tokens) under the logits it was just sampled
        from: read before the token is decoded, the context's last output row is still the one the sampler used."""
        return token_choice(np.ctypeslib.as_array(last_logits(self.llm), shape=(self._n_vocab,)), token, k)
