"""The student's side of one answer: every generation, tokenization and prefill of ``prompt + answer so far``.

However an answer is produced (the student alone, after guidance, in rounds between re-guidance calls, in
drafts the teacher checks), the student always continues the same text: its own prompt followed by the
answer as it stands. A ``StudentSession`` holds that prompt and the user's sampling settings, so a runner
says only *from where* (the answer so far) and *how much* (tokens).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import aclosing

from edge_agent.accounting import Books
from edge_agent.fastpath import Prefetcher
from edge_agent.plan import Plan
from edge_agent.student import LlamaEngine
from shared.generation import GenerationParams, GenerationResult, Piece, TokenChoice
from shared.grammar import GrammarStart


class StudentSession:
    """The student engine for one answer: continues ``prompt + answer``, writes its results into the books."""

    def __init__(self, engine: LlamaEngine, plan: Plan, books: Books, *, fast_path: bool) -> None:
        self.engine = engine
        self.plan = plan
        self.books = books
        self.fast_path = fast_path
        # The last tokenization, kept: a runner asks for the room left and then generates from the same text.
        self._last: tuple[str, list[int]] = ("", plan.student_tokens)

    def tokens(self, answer: str) -> list[int]:
        """The student's tokens of its prompt followed by ``answer`` (tokenized as one text, so the seam
        between them tokenizes naturally)."""
        if self._last[0] != answer:
            tokens = self.engine.tokenize(self.plan.student_prefix + answer, special=self.plan.special)
            self._last = (answer, tokens)
        return self._last[1]

    def room(self, answer: str) -> int:
        """Student tokens the answer may still grow by after ``answer`` (``max_tokens`` bounds all of it)."""
        return self.plan.max_tokens - (len(self.tokens(answer)) - len(self.plan.student_tokens))

    async def stream(
        self, answer: str, max_tokens: int, *, logprobs: bool = False, halt: threading.Event | None = None
    ) -> AsyncIterator[Piece | GenerationResult]:
        """Up to ``max_tokens`` student tokens after ``answer`` with the user's sampling settings, then the
        result (already in the books). ``halt`` ends it at the next token; the result still arrives."""
        plan = self.plan
        # Under a response format the student continues the document from where the answer so far left it.
        grammar = GrammarStart(plan.grammar, answer) if plan.grammar is not None else None
        params = GenerationParams(max_tokens=max_tokens, temperature=plan.temperature, top_p=plan.top_p,
                                  seed=plan.seed, stop=plan.stop, logprobs=logprobs, top_logprobs=plan.logprobs,
                                  grammar_start=grammar, ignore_eos=plan.ignore_eos)
        self.books.student_ran = True
        async with aclosing(self.engine.stream(self.tokens(answer), params, halt)) as gen:
            async for item in gen:
                if isinstance(item, GenerationResult):
                    self.books.student_done(item)
                yield item

    async def score_prompt(self) -> list[TokenChoice | None] | None:
        """The student's log-probabilities of its prompt's tokens (echo; None unless the plan asks for
        log-probabilities). The prompt stays in the KV cache for the generation that follows, and its tokens
        are counted once, by that generation (or, with nothing generated, by the books)."""
        if self.plan.logprobs is None:
            return None
        params = GenerationParams(max_tokens=0, prompt_logprobs=self.plan.logprobs)
        result = None
        async with aclosing(self.engine.stream(self.plan.student_tokens, params)) as gen:
            async for item in gen:
                if isinstance(item, GenerationResult):
                    result = item
        return result.prompt_choices if result is not None else None

    def prefetcher(self, answer: str) -> Prefetcher | None:
        """The fast path (``edge_agent/fastpath.py``): a prefetcher that starts prefilling ``prompt + answer``
        now, fed the guidance as it streams; None when the fast path is off. The caller closes it."""
        if not self.fast_path:
            return None
        prefetch = Prefetcher(self.engine, self.plan.student_prefix, self.plan.special)
        prefetch.start(self.tokens(answer))
        return prefetch
