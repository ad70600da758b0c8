"""llama.cpp without gkt: the references every gkt figure is compared with, measured in the bench process."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from time import perf_counter
from typing import Any

import numpy as np

from gkt.bench.report import tokens_per_second


@contextmanager
def pinned(core: int | None) -> Iterator[None]:
    """Run this thread on one core (llama.cpp with one thread computes on the calling thread)."""
    if core is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def load(path: str | Path, *, n_ctx: int, n_threads: int, n_batch: int = 512) -> Any:
    """A high-level ``Llama`` with the same settings ``edge_agent.student.LlamaEngine`` uses."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                           n_batch=n_batch, verbose=False)


def decode_speed(llm: Any, tokens: list[int], max_tokens: int) -> tuple[float | None, int]:
    """Greedy generation from ``tokens`` with the engine's sampler settings; (decode tokens/s, tokens)."""
    import llama_cpp

    vocab = llm._model.vocab
    n, t_first, t_last = 0, None, None
    gen = llm.generate(tokens, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, temp=0.0, repeat_penalty=1.0)
    try:
        for tok in gen:
            now = perf_counter()
            if llama_cpp.llama_vocab_is_eog(vocab, tok):
                break
            llm.detokenize([tok])  # the engine turns every token into text too
            n += 1
            t_first = t_first or now
            t_last = now
            if n >= max_tokens:
                break
    finally:
        gen.close()
    return tokens_per_second(n, t_first, t_last), n


def prompt_seconds(llm: Any, tokens: list[int]) -> float:
    """Time to process ``tokens`` from an empty cache (cold prompt processing)."""
    llm.reset()
    llm._ctx.kv_cache_clear()
    t0 = perf_counter()
    llm.eval(tokens)
    return perf_counter() - t0


class RawBatch:
    """llama.cpp's own batched decoding (``llama_batch`` with one sequence id per stream, greedy argmax):
    the ceiling a batching cloud can reach on this model and these threads."""

    def __init__(self, llm: Any, *, max_seqs: int, n_ctx_per_seq: int, n_threads: int) -> None:
        import llama_cpp

        self._lib = llama_cpp
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = max_seqs * n_ctx_per_seq
        params.n_batch = params.n_ubatch = max(512, max_seqs * n_ctx_per_seq // 4)
        params.n_seq_max = max_seqs
        params.n_threads = params.n_threads_batch = n_threads
        params.flash_attn_type = 0  # off, as the cloud's batched context by default (GKT_CLOUD_FLASH_ATTN)
        self.ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
        if not self.ctx:
            raise RuntimeError("llama_init_from_model failed")
        self.max_seqs = max_seqs
        self.n_vocab = llm.n_vocab()
        self.batch = llama_cpp.llama_batch_init(params.n_batch, 0, max_seqs)

    def _fill(self, items: list[tuple[int, int, int, bool]]) -> None:
        b = self.batch
        b.n_tokens = len(items)
        for i, (tok, pos, seq, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq

    def _decode(self) -> None:
        rc = self._lib.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _argmax(self, i: int) -> int:
        ptr = self._lib.llama_get_logits_ith(self.ctx, i)
        return int(np.argmax(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                                   shape=(self.n_vocab,))))

    def throughput(self, prompts: list[list[int]], steps: int) -> float:
        """Aggregate tokens/s for ``len(prompts)`` sequences: their prompts processed in one batch, then
        ``steps`` tokens each decoded together (the same work a cloud does for as many guidance requests)."""
        n = len(prompts)
        assert 0 < n <= self.max_seqs
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self.ctx), True)
        t0 = perf_counter()
        items, last = [], []
        for s, p in enumerate(prompts):
            items += [(t, j, s, j == len(p) - 1) for j, t in enumerate(p)]
        self._fill(items)
        self._decode()
        idx = 0
        for p in prompts:
            idx += len(p)
            last.append(self._argmax(idx - 1))
        pos = [len(p) for p in prompts]
        for _ in range(steps - 1):  # the first token of each came from the prompt batch
            self._fill([(last[s], pos[s], s, True) for s in range(n)])
            self._decode()
            last = [self._argmax(s) for s in range(n)]
            pos = [q + 1 for q in pos]
        return n * steps / (perf_counter() - t0)

    def close(self) -> None:
        self._lib.llama_batch_free(self.batch)
        self._lib.llama_free(self.ctx)
