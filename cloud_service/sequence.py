"""One guidance sequence inside the batched teacher (``cloud_service/scheduler.py``): what happens to its tokens.

The scheduler owns the batch (slots, the shared decode step, the KV cache, a draft's verdict against the
logits); a ``Sequence`` owns what follows from each token it is given: its UTF-8 decoder, its stop matcher,
the whole-word cut, its top-k log-probabilities, the text it emits to its client's queue, and the result it
reports at the end. It also builds its own sampler chain (temperature, top-p, seed) from its parameters.

Everything here runs on the scheduler's worker thread; ``emit`` hands items to the event loop.
"""

from __future__ import annotations

import codecs
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, Literal

from shared.generation import GenerationParams, GenerationResult, OnResult, Piece, StopMatcher, TokenChoice
from shared.words import WordEnd

Emit = Callable[[Piece | GenerationResult | BaseException], None]
Finish = Literal["stop", "length"]


def sampler_chain(lc: Any, p: GenerationParams) -> Any:
    """A llama.cpp sampler chain for ``p`` (``lc``: the llama_cpp module); the caller frees it."""
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    if p.temperature == 0:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
    else:
        # OpenAI order: temperature reshapes the distribution, then nucleus, then a seeded draw.
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(p.temperature))
        if p.top_p < 1.0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(p.top_p, 1))
        seed = p.seed if p.seed is not None else random.getrandbits(32)
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed))
    return chain


@dataclass
class Sequence:
    tokens: list[int]
    params: GenerationParams
    emit: Emit
    on_result: OnResult | None
    cancel: threading.Event
    t_submit: float
    request_id: str = "-"  # for the worker thread's log lines
    slot: int = -1
    n_past: int = 0  # tokens of this sequence already in its slot's KV cache
    next_token: int = -1  # sampled, fed at the next step
    generated: int = 0
    pending: int = 0  # tokens whose text is held back (partial character or possible stop sequence)
    cached: int = 0
    engine_s: float = 0.0
    t_admit: float = 0.0
    t_first: float | None = None
    sampler: Any = None
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    stops: StopMatcher = field(init=False)
    word_end: WordEnd | None = field(default=None, init=False)
    draft: int = 0  # trailing tokens of ``tokens`` that are a draft to verify
    read: int = 0  # prompt + draft tokens as submitted (``tokens`` is cut back at a rejected draft token)
    accepted: int = 0  # draft tokens the teacher would have written itself
    accepted_text: str | None = None  # their text (None: no draft, or not verified yet)
    choices: list[TokenChoice] = field(default_factory=list)  # top_logprobs of tokens not emitted yet

    def __post_init__(self) -> None:
        self.stops = StopMatcher(self.params.stop)
        if self.params.word_end_after is not None:
            self.word_end = WordEnd(self.params.word_end_after)

    @property
    def base(self) -> int:
        """Where the draft starts in ``tokens``."""
        return self.read - self.draft

    @property
    def generating(self) -> bool:
        return self.n_past >= len(self.tokens)

    def accept_draft(self, detokenize: Callable[[int], bytes]) -> None:
        """The verdict is in: the accepted draft's text goes through this sequence's decoder (a character cut
        by the verdict is completed by the teacher's next token), and nothing of it is emitted."""
        accepted = self.tokens[self.base : self.base + self.accepted]
        self.accepted_text = self.decoder.decode(b"".join(detokenize(t) for t in accepted))

    def token(self, tok: int, raw: bytes, choice: TokenChoice | None) -> Finish | None:
        """The teacher generated ``tok`` (its bytes ``raw``; ``choice``: its log-probabilities when asked for):
        emit the text that is safe to send; how the sequence ends now, or None while it goes on."""
        self.generated += 1
        text = self.decoder.decode(raw)
        if self.word_end is not None and self.word_end.stop_before(text):
            return "length"  # this token opens the next word: generated, not sent
        if choice is not None:
            self.choices.append(choice)
        self.pending += 1
        safe, hit = self.stops.feed(text)
        if safe:
            self.emit(Piece(safe, self.pending, choices=self.take_choices()))
            self.pending = 0
        if hit:
            return "stop"
        if self.generated >= self.params.max_tokens:
            return "length"
        self.next_token = tok
        return None

    def flush(self, finish: str) -> None:
        """At the end: text a stop sequence could still have claimed goes out after a length cut."""
        if finish == "length" and (tail := self.stops.flush()):
            self.emit(Piece(tail, self.pending, choices=self.take_choices()))
        # An incomplete UTF-8 sequence left in the decoder is dropped: it is not a character yet.

    def take_choices(self) -> list[TokenChoice] | None:
        if self.params.top_logprobs is None:
            return None
        taken, self.choices = self.choices, []
        return taken

    def result(self, finish: str) -> GenerationResult:
        t_end = perf_counter()
        t_admit = self.t_admit or t_end
        t_first = self.t_first or t_end
        return GenerationResult(
            finish_reason=finish,  # type: ignore[arg-type]
            prompt_tokens=self.base,
            draft_tokens=self.draft,
            draft_accepted_tokens=self.accepted,
            draft_accepted_text=self.accepted_text if self.draft else None,
            completion_tokens=self.generated,
            queue_s=t_admit - self.t_submit,
            prompt_s=t_first - t_admit,
            generation_s=t_end - t_first,
            cached_prompt_tokens=self.cached,
            engine_s=self.engine_s,
        )

    def report(self, result: GenerationResult) -> None:
        if self.on_result is not None:
            self.on_result(result)
