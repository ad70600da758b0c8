"""Continuous batching for the llama.cpp teacher: concurrent guidance sequences share every decode step.

One worker thread owns a llama.cpp context with ``slots`` sequences, each with its own KV cache stream
(``kv_unified`` off, ``n_ctx`` positions per sequence). Each step builds one ``llama_batch``:

* the next token of every sequence that is generating (one row each, logits requested), then
* chunks of the prompts of newly admitted sequences in the room left up to ``n_batch`` (chunked prefill, so a
  long prompt never stalls the others for more than one step).

A sequence may end its prompt with a *draft* (tokens another model wrote): those positions get logits too, and the
teacher keeps the draft up to the first token it would not have chosen itself (greedy), drops the rest from its
cache, and generates from there: the token it chose instead is its first. Accepting a draft costs one prompt pass
over it instead of a decode step per token (speculative verification, over text).

One ``llama_decode`` evaluates the whole batch; each sequence then samples from its own row with its own sampler
chain (its own temperature, top_p and seed; under its grammar when it asks for structured output: one grammar check
per token, a masked redraw when the grammar refuses the first), feeds its UTF-8 decoder and stop matcher, and emits
text to its own asyncio queue (what a token does to its sequence: ``cloud_service/sequence.py``). New requests join
between steps; a cancelled request (client gone) leaves at the next step without disturbing the others. A finished
sequence's KV cache stays in its slot, so a later prompt that shares its prefix (few-shot exemplars) is placed in
that slot and only the new suffix is evaluated.

The counters in ``EngineStats`` (steps, batch-size histogram, tokens) are plain numbers for the stats endpoint and,
later, for metrics.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from time import perf_counter
from typing import Any

from cloud_service.sequence import Sequence, sampler_chain
from shared.errors import ErrorCode, GKTError
from shared.generation import GenerationParams, GenerationResult, OnResult, Piece, TokenChoice, common_prefix
from shared.llama import WorkerStream, model_pointer
from shared.logprobs import token_choice
from shared.logs import REQUEST_ID, request_context

log = logging.getLogger("gkt.scheduler")

FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}  # llama_flash_attn_type

@dataclass
class EngineStats:
    """What the batched engine has done since it started (read with ``snapshot``)."""

    steps: int = 0  # llama_decode calls
    sampling_steps: int = 0  # steps that sampled at least one sequence's next token
    sampled_tokens: int = 0  # tokens sampled (end-of-generation tokens included)
    prompt_tokens: int = 0  # prompt tokens evaluated
    cached_prompt_tokens: int = 0  # prompt tokens reused from a slot's KV cache instead
    batch_sizes: dict[int, int] = field(default_factory=dict)  # sequences sampled in one step -> steps
    max_batch: int = 0  # the most sequences ever sampled in one step
    started: int = 0
    finished: int = 0  # ended by a stop (end of turn, stop sequence) or the token budget
    cancelled: int = 0
    failed: int = 0
    active: int = 0  # sequences holding a slot
    queued: int = 0  # submitted, waiting for a free slot
    busy_s: float = 0.0  # seconds inside llama_decode

    def snapshot(self) -> dict[str, Any]:
        out = asdict(self)
        out["batch_sizes"] = {str(k): v for k, v in sorted(self.batch_sizes.items())}
        return out


class BatchScheduler:
    """Runs many generations on one llama.cpp model at once, one shared decode step at a time."""

    def __init__(
        self,
        llm: Any,
        *,
        slots: int,
        n_ctx: int,
        n_batch: int,
        n_threads: int,
        flash_attn: str = "off",
        detokenize: Callable[[int], bytes],
        is_eog: Callable[[int], bool],
        name: str = "teacher",
    ) -> None:
        import llama_cpp

        self._lc = llama_cpp
        self.slots = slots
        self.n_ctx = n_ctx
        self.n_batch = max(n_batch, slots)  # every generating sequence needs its row in each step
        self._detokenize = detokenize
        self._is_eog = is_eog
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx * slots
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_seq_max = slots
        params.kv_unified = False  # each sequence attends only to its own cache stream
        params.n_threads = params.n_threads_batch = n_threads
        params.flash_attn_type = FLASH_ATTN[flash_attn]
        params.no_perf = True
        # The model weights are shared with the high-level Llama object that tokenizes (same llama_model).
        model = model_pointer(llm)
        self._ctx = llama_cpp.llama_init_from_model(model, params)
        if not self._ctx:
            raise RuntimeError("llama.cpp could not create the batched context (out of memory?)")
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        # The one call that runs the model (``llama_decode(ctx, batch) -> rc``, 0 on success). A public seam:
        # fault-injection tests replace it, since llama.cpp does not fail on demand.
        self.decode: Callable[[Any, Any], int] = llama_cpp.llama_decode
        self._slot_tokens: list[list[int]] = [[] for _ in range(slots)]  # what each slot's KV cache holds
        self._free: set[int] = set(range(slots))
        self._last_used = [0] * slots  # admission counter: ties go to the least recently used slot
        self._admissions = 0
        self._active: list[Sequence] = []  # in admission order
        self._incoming: deque[Sequence] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self.stats = EngineStats()
        self._stats_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=f"batch-{name}", daemon=True)
        self._thread.start()

    # --- the event-loop side ---------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        with self._stats_lock:
            return self.stats.snapshot()

    async def stream(
        self, tokens: list[int], params: GenerationParams, on_result: OnResult | None = None, *, draft: int = 0
    ) -> AsyncIterator[Piece | GenerationResult]:
        """Pieces as this sequence decodes, then one ``GenerationResult``.

        ``draft``: the last ``draft`` of ``tokens`` are to be verified, not taken as given (see the module
        docstring); the result says how many were accepted and their text, and the pieces are the teacher's
        own tokens after them.

        ``on_result`` is called on the event loop with the final result exactly once, also when the consumer
        stopped early (cancelled) or the engine failed, so the work done is always accounted for.
        """
        bridge = WorkerStream()

        def report(result: GenerationResult) -> None:
            if on_result is not None:
                bridge.call(on_result, result)

        seq = Sequence(tokens=tokens, params=params, emit=bridge.emit, on_result=report, cancel=threading.Event(),
                   t_submit=perf_counter(), request_id=REQUEST_ID.get(), draft=draft, read=len(tokens))
        with self._cv:
            if self._closed:
                raise GKTError(ErrorCode.engine_error, "the teacher is shutting down")
            self._incoming.append(seq)
            with self._stats_lock:
                self.stats.queued = len(self._incoming)
            self._cv.notify()
        try:
            while True:
                item = await bridge.get()
                yield item
                if isinstance(item, GenerationResult):
                    return
        finally:
            seq.cancel.set()  # no-op when finished; otherwise the worker drops it at the next step

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()
        self._lc.llama_batch_free(self._batch)
        self._lc.llama_free(self._ctx)

    # --- the worker thread -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._active and not self._incoming:
                    self._cv.wait()
                if self._closed:
                    break
                admitted = [self._incoming.popleft() for _ in range(min(len(self._free), len(self._incoming)))]
                with self._stats_lock:
                    self.stats.queued = len(self._incoming)
            for seq in admitted:
                try:
                    self._admit(seq)
                except Exception as exc:  # the worker must survive anything one request brings
                    with request_context(seq.request_id):
                        log.exception("admitting a sequence failed")
                    self._fail(seq, exc)
            for seq in [s for s in self._active if s.cancel.is_set()]:
                self._finish(seq, "cancelled")
            if self._active:
                try:
                    self._step()
                except Exception as exc:  # never lose a sequence silently: each one gets the error
                    with request_context(",".join(s.request_id for s in self._active)):
                        log.exception("batched decode failed")
                    for seq in list(self._active):
                        self._fail(seq, exc)
        with self._cv:
            pending = list(self._incoming) + list(self._active)
            self._incoming.clear()
        for seq in pending:
            self._fail(seq, GKTError(ErrorCode.engine_error, "the teacher is shutting down"))

    def _admit(self, seq: Sequence) -> None:
        if seq.cancel.is_set():  # the client left while queued: it never reaches the engine
            seq.report(seq.result("cancelled"))
            with self._stats_lock:
                self.stats.cancelled += 1
            return
        # The free slot whose cache shares the longest prefix with this prompt; keep at least the last
        # prompt token to evaluate, since its logits give the first sampled token (or judge the draft's first).
        slot = max(self._free, key=lambda s: (common_prefix(self._slot_tokens[s], seq.tokens), -self._last_used[s]))
        self._admissions += 1
        self._last_used[slot] = self._admissions
        keep = min(common_prefix(self._slot_tokens[slot], seq.tokens), seq.base - 1)
        if not self._lc.llama_memory_seq_rm(self._mem, slot, keep, -1):
            keep = 0
            self._lc.llama_memory_seq_rm(self._mem, slot, -1, -1)
        self._free.discard(slot)
        self._slot_tokens[slot] = seq.tokens[:keep]
        seq.slot, seq.n_past, seq.cached = slot, keep, keep
        seq.t_admit = perf_counter()
        seq.sampler = sampler_chain(self._lc, seq.params)
        self._active.append(seq)
        with self._stats_lock:
            self.stats.started += 1
            self.stats.cached_prompt_tokens += keep
            self.stats.active = len(self._active)

    def _step(self) -> None:
        # (sequence, its first batch row, its first position, tokens fed, samples after this step)
        rows: list[tuple[Sequence, int, int, int, bool]] = []
        b = self._batch
        n = 0

        def add(tok: int, pos: int, slot: int, logits: bool) -> None:
            nonlocal n
            b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = tok, pos, 1, int(logits)
            b.seq_id[n][0] = slot
            n += 1

        for seq in self._active:
            if seq.generating:
                rows.append((seq, n, seq.n_past, 1, True))
                add(seq.next_token, seq.n_past, seq.slot, True)
        for seq in self._active:
            room = self.n_batch - n
            if room <= 0:
                break
            if not seq.generating:
                take = min(room, len(seq.tokens) - seq.n_past)
                rows.append((seq, n, seq.n_past, take, seq.n_past + take == len(seq.tokens)))
                judge_from = seq.base - 1 if seq.draft else len(seq.tokens) - 1  # rows whose logits are read
                for i in range(take):
                    pos = seq.n_past + i
                    add(seq.tokens[pos], pos, seq.slot, pos >= judge_from)
        b.n_tokens = n
        t0 = perf_counter()
        rc = self.decode(self._ctx, b)
        dt = perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        prompt_fed = 0
        for seq, _, _, fed, _ in rows:
            if seq.generating:
                self._slot_tokens[seq.slot].append(seq.next_token)
            else:
                self._slot_tokens[seq.slot].extend(seq.tokens[seq.n_past : seq.n_past + fed])
                prompt_fed += fed
            seq.n_past += fed
            seq.engine_s += dt * fed / n
        sampled = 0
        for seq, row, pos0, fed, samples in rows:
            if seq.draft and seq.accepted_text is None:  # a draft not judged yet: its rows are a prompt chunk
                if self._judge(seq, row, pos0, fed):
                    sampled += 1  # the teacher's own token replaced a draft token
                    continue
            if samples:
                # The last row of a sequence's rows holds its logits for the next token.
                last = row + fed - 1
                grammar = seq.params.grammar
                tok = (grammar.sample(seq.sampler, self._ctx, last) if grammar is not None
                       else self._lc.llama_sampler_sample(seq.sampler, self._ctx, last))
                sampled += 1
                self._on_token(seq, tok, last)
        with self._stats_lock:
            st = self.stats
            st.steps += 1
            st.busy_s += dt
            st.prompt_tokens += prompt_fed
            if sampled:
                st.sampling_steps += 1
                st.sampled_tokens += sampled
                st.batch_sizes[sampled] = st.batch_sizes.get(sampled, 0) + 1
                st.max_batch = max(st.max_batch, sampled)

    def _judge(self, seq: Sequence, row: int, pos0: int, fed: int) -> bool:
        """Check the draft tokens this step's logits predict (rows ``row``.. for positions ``pos0``..).

        At the first draft token the teacher would not have chosen (greedy), cut the draft there, forget the
        rest from the cache and take the teacher's choice as its first token: True. False while the draft
        holds (and when all of it held: the caller samples the token after it as usual)."""
        import numpy as np

        n_vocab = self._n_vocab
        for pos in range(max(pos0, seq.base - 1), pos0 + fed):
            if pos + 1 >= seq.read:  # the row after the whole draft: it held
                seq.accept_draft(self._detokenize)
                return False
            ptr = self._lc.llama_get_logits_ith(self._ctx, row + pos - pos0)
            choice = int(np.ctypeslib.as_array(ptr, shape=(n_vocab,)).argmax())
            if choice == seq.tokens[pos + 1]:
                seq.accepted += 1
                continue
            del seq.tokens[pos + 1 :]
            self._lc.llama_memory_seq_rm(self._mem, seq.slot, pos + 1, -1)
            del self._slot_tokens[seq.slot][pos + 1 :]
            seq.n_past = pos + 1
            seq.accept_draft(self._detokenize)
            self._on_token(seq, choice)
            return True
        return False

    def _on_token(self, seq: Sequence, tok: int, row: int | None = None) -> None:
        """The teacher chose ``tok`` for ``seq`` (from batch row ``row``: its logits give log-probabilities)."""
        if seq.t_first is None:
            seq.t_first = perf_counter()
        if self._is_eog(tok):
            self._finish(seq, "stop")
            return
        k = seq.params.top_logprobs
        choice = self._top(row, tok, k) if k is not None and row is not None else None
        if finish := seq.token(tok, self._detokenize(tok), choice):
            self._finish(seq, finish)

    def _top(self, row: int, tok: int, k: int) -> TokenChoice:
        """The sampled token's log-probability and the k most likely tokens, from the row's raw logits (the
        sampler works on a copy, so temperature and top-p have not touched them)."""
        import numpy as np

        logits = np.ctypeslib.as_array(self._lc.llama_get_logits_ith(self._ctx, row), shape=(self._n_vocab,))
        return token_choice(logits, tok, k)

    def _release(self, seq: Sequence) -> None:
        if seq.sampler is not None:
            self._lc.llama_sampler_free(seq.sampler)
            seq.sampler = None
        if seq in self._active:
            self._active.remove(seq)
        if seq.slot >= 0:
            self._free.add(seq.slot)  # its KV cache stays, for the next prompt with the same prefix
        with self._stats_lock:
            self.stats.active = len(self._active)

    def _finish(self, seq: Sequence, finish: str) -> None:
        seq.flush(finish)
        self._release(seq)
        with self._stats_lock:
            if finish == "cancelled":
                self.stats.cancelled += 1
            else:
                self.stats.finished += 1
        result = seq.result(finish)
        # Ledger first: both go through the loop in order, so the accounting is done before the client
        # can see the end of its answer (and ask for its usage).
        seq.report(result)
        seq.emit(result)

    def _fail(self, seq: Sequence, exc: BaseException) -> None:
        if seq.slot >= 0:  # the cache of a failed step is unknown: forget it
            self._lc.llama_memory_seq_rm(self._mem, seq.slot, -1, -1)
            self._slot_tokens[seq.slot] = []
        self._release(seq)
        with self._stats_lock:
            self.stats.failed += 1
        seq.report(seq.result("cancelled"))
        seq.emit(exc)

