"""Engine-neutral generation types: parameters, streamed pieces, the final result, stop matching."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from shared.errors import ErrorCode, GKTError

if TYPE_CHECKING:
    from shared.grammar import GrammarStart, GrammarState


@dataclass
class GenerationParams:
    """What to generate: a token budget plus OpenAI-style sampling."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # Whole words (shared/words.py): after this many tokens, stop at the next word boundary; ``max_tokens``
    # stays the hard cap.
    word_end_after: int | None = None
    # Report each sampled token's log-probability (one pass over the vocabulary per token; off by default,
    # so the normal path does not pay for it).
    logprobs: bool = False
    # Structured output: the grammar at the point where this generation starts (a document the guidance or a
    # continued message began). The engine samples under it and advances it over every token it generates;
    # the caller owns it (and may go on using it after the generation).
    grammar: GrammarState | None = None
    # The same for an engine that builds the state in its own worker thread (the edge's student): the grammar
    # and the text written so far, which it advances over first.
    grammar_start: GrammarStart | None = None
    # Report each sent token's id, log-probability and the ``top_logprobs`` most likely tokens with theirs
    # (``TokenChoice``); None is off, 0 gives the sent tokens' own only. What a distillation's transfer set keeps
    # of the teacher's distribution.
    top_logprobs: int | None = None
    # Echo: score the prompt first, each token's log-probability after the ones before it and the
    # ``prompt_logprobs`` most likely tokens (``GenerationResult.prompt_choices``). ``max_tokens`` 0 then scores
    # and generates nothing.
    prompt_logprobs: int | None = None
    # vLLM's ``ignore_eos``: an end-of-generation token does not end the generation (it is counted, writes no
    # text), only the budget or a stop sequence does.
    ignore_eos: bool = False


class TokenChoice(NamedTuple):
    """One generated token in the engine's vocabulary: its id, its natural-log probability under the model
    (before temperature and top-p) and the most likely tokens at that step as (id, log-probability), best first."""

    id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Piece:
    """Text produced by ``tokens`` tokens (text may be held back while it could start a stop sequence)."""

    text: str
    tokens: int = 1
    # Natural-log probability of each of the ``tokens`` sampled tokens under the model (before temperature and
    # top-p), when ``GenerationParams.logprobs`` asked for them.
    logprobs: list[float] | None = None
    # The tokens behind ``text`` with their top alternatives, when ``GenerationParams.top_logprobs`` asked for
    # them. When a stop sequence ends the generation, the last piece may list tokens whose text the stop removed.
    choices: list[TokenChoice] | None = None


@dataclass
class GenerationResult:
    """The end of a generation: why it stopped, token counts in the engine's tokenizer, and timings."""

    finish_reason: Literal["stop", "length", "cancelled"]
    prompt_tokens: int
    completion_tokens: int
    queue_s: float = 0.0
    prompt_s: float = 0.0
    generation_s: float = 0.0
    cached_prompt_tokens: int = 0
    # This sequence's share of the engine's busy time (a batched step's time split by tokens); what an
    # accelerator-second price is charged on. Engines without a share report their wall time.
    engine_s: float = 0.0
    # A draft verified ahead of the generation (the scheduler's ``draft``): its tokens, how many the teacher
    # accepted and their text (None: no draft). ``prompt_tokens`` excludes the draft; the teacher read both.
    draft_tokens: int = 0
    draft_accepted_tokens: int = 0
    draft_accepted_text: str | None = None
    # With ``prompt_logprobs``: one entry per prompt token, None for the first (nothing comes before it).
    prompt_choices: list[TokenChoice | None] | None = None


# Called exactly once per generation with its final result, also when it was cancelled or failed, so the work
# done is always accounted for (the cloud's ledger).
OnResult = Callable[[GenerationResult], None]


class StopMatcher:
    """Finds stop sequences in streamed text, holding back only what could still become one."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop sequence was reached)."""
        if not self._stops:
            return text, False
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._held = ""
            return buf[: min(hits)], True
        keep = 0
        for s in self._stops:
            for n in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


class TrailingWhitespace:
    """Continuing a text that ends in whitespace: the whitespace is cut from the prompt and from the output.

    Tokenizers fold a space into the next word (" Paris"), so a prompt ending in a bare space is unnatural
    text for the model, and vLLM refuses to continue an assistant message that ends in whitespace. The
    prompt is sent without it, and the same amount of leading whitespace is dropped from the continuation,
    so the caller receives text that continues its original string.
    """

    def __init__(self, text: str) -> None:
        self.prompt = text.rstrip()
        self._owed = len(text) - len(self.prompt)

    def feed(self, piece: str) -> str:
        while self._owed and piece and piece[0].isspace():
            piece, self._owed = piece[1:], self._owed - 1
        if piece:
            self._owed = 0  # the model went on without (more) whitespace: nothing more to drop
        return piece


def context_error(n_ctx: int, prompt_tokens: int, max_tokens: int, param: str) -> GKTError:
    """The V4 error: states the counts so the caller can fix the request."""
    return GKTError(
        ErrorCode.context_length_exceeded,
        f"This model's maximum context length is {n_ctx} tokens. The prompt has {prompt_tokens} tokens and "
        f"{max_tokens} more were requested ({prompt_tokens + max_tokens} in total).",
        param=param,
    )


def common_prefix(a: Any, b: list[int]) -> int:
    """Length of the common leading run of two token sequences (what a KV cache can keep)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
