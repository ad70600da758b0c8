"""The student's confidence signal: per-token log-probabilities from ``LlamaEngine`` (real SmolLM2).

They must be the model's own numbers (checked against llama-cpp-python's reference implementation, which
keeps the logits of every position), cost nothing when not asked for, and a caller's stop must end a
generation at the next token while its result (exact counts) still arrives (re-guidance relies on it).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from edge_agent.student import LlamaEngine
from shared.generation import GenerationParams, GenerationResult, Piece
from shared.models import resolve

MODEL = "smollm2-135m-instruct"
PROMPT = "Q: Tom has 3 boxes of 4 pens. How many pens does he have?\nA: Tom has"


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaEngine]:
    e = LlamaEngine(resolve(MODEL), n_ctx=1024, n_threads=1, name=MODEL)
    yield e
    e.close()


async def collect(engine: LlamaEngine, params: GenerationParams, stop: threading.Event | None = None,
                  stop_after: int | None = None) -> tuple[list[Piece], GenerationResult]:
    pieces: list[Piece] = []
    result = None
    async for item in engine.stream(engine.tokenize(PROMPT, special=False), params, stop):
        if isinstance(item, Piece):
            pieces.append(item)
            if stop is not None and stop_after is not None and len(pieces) == stop_after:
                stop.set()
        else:
            result = item
    assert result is not None
    for _ in range(6000):  # the worker releases the context just after the result
        if not engine.busy:
            break
        await asyncio.sleep(0.005)
    return pieces, result


def test_logprobs_match_llama_cpp_reference(engine: LlamaEngine) -> None:
    import llama_cpp

    pieces, result = asyncio.run(collect(engine, GenerationParams(max_tokens=12, logprobs=True)))
    ours = [lp for p in pieces for lp in (p.logprobs or [])]
    assert len(ours) == result.completion_tokens == sum(p.tokens for p in pieces) > 0
    ref_model = llama_cpp.Llama(model_path=str(resolve(MODEL)), n_ctx=1024, n_threads=1, n_threads_batch=1,
                                logits_all=True, verbose=False)
    try:
        ref = ref_model.create_completion(PROMPT, max_tokens=12, temperature=0.0, logprobs=1, top_k=0,
                                          top_p=1.0, min_p=0.0, repeat_penalty=1.0)
    finally:
        ref_model.close()
    choice = ref["choices"][0]
    assert choice["text"].startswith("".join(p.text for p in pieces)[:8])  # same greedy path
    expected = choice["logprobs"]["token_logprobs"][: len(ours)]
    # Same model and tokens; the batch shapes differ (canonical padding here), so allow float noise.
    assert ours == pytest.approx(expected, abs=0.05)
    assert all(lp <= 0.0 for lp in ours)


def test_no_logprobs_unless_asked(engine: LlamaEngine) -> None:
    pieces, _ = asyncio.run(collect(engine, GenerationParams(max_tokens=6)))
    assert pieces and all(p.logprobs is None for p in pieces)


def test_a_callers_stop_ends_the_generation_and_the_result_still_arrives(engine: LlamaEngine) -> None:
    stop = threading.Event()
    pieces, result = asyncio.run(collect(engine, GenerationParams(max_tokens=40, logprobs=True), stop, 3))
    assert result.finish_reason == "cancelled"
    # The worker may decode a token or so before it sees the stop; the count says exactly how many.
    assert 3 <= result.completion_tokens < 40 and result.completion_tokens == sum(p.tokens for p in pieces)


def test_top_alternatives_and_a_scored_prompt_leave_the_answer_unchanged(engine: LlamaEngine) -> None:
    """Echo scores the prompt first (all positions decoded again, with their logits): the generation that
    follows continues from that cache and writes exactly what it writes without it."""
    asyncio.run(engine.reset_cache())
    plain, _ = asyncio.run(collect(engine, GenerationParams(max_tokens=10)))
    pieces, result = asyncio.run(collect(engine, GenerationParams(max_tokens=10, top_logprobs=3, prompt_logprobs=2)))
    assert "".join(p.text for p in pieces) == "".join(p.text for p in plain)
    n = len(engine.tokenize(PROMPT, special=False))
    assert result.prompt_choices is not None and len(result.prompt_choices) == n and result.prompt_choices[0] is None
    assert all(c is not None and len(c.top) == 2 for c in result.prompt_choices[1:])
    choices = [c for p in pieces for c in (p.choices or [])]
    assert len(choices) == result.completion_tokens
    for c in choices:  # greedy: the chosen token is the most likely, and its number is the first alternative's
        assert len(c.top) == 3 and c.top[0] == (c.id, c.logprob)
    _, only = asyncio.run(collect(engine, GenerationParams(max_tokens=0, prompt_logprobs=0)))
    assert only.completion_tokens == 0 and only.prompt_choices is not None
    assert [c.logprob for c in only.prompt_choices[1:]] == [c.logprob for c in result.prompt_choices[1:]]
