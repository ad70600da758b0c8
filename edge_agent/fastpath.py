"""The edge's fast path: the student works while the guidance is still in flight.

Without it the student starts only when the guidance has ended: it then processes the whole prompt plus
the guidance (hundreds of tokens for a few-shot prompt) before its first token, and that is the handoff
gap. With it, a ``Prefetcher`` prefills the student's prompt into the KV cache as soon as the request is
planned, and each piece of guidance the seam releases as it streams in, so at the handoff only the last
few tokens remain to be decoded.

Correctness does not depend on the prefetcher: the student always generates from
``tokenize(prompt + guidance)`` computed at the end, and llama.cpp keeps only the longest common token
prefix of what was prefilled. What is prefilled is the tokenization of the text so far minus its last
token, because a word's last token may merge with text that has not arrived yet; anything that still
differs at the end is simply decoded again. Prefills go through ``LlamaEngine.prefill``, which never
delays or disturbs another request's generation (see ``edge_agent/student.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from edge_agent.student import LlamaEngine

log = logging.getLogger(__name__)

# How long to wait before asking again when the student context is busy with another request.
RETRY_S = 0.05


class Prefetcher:
    """Keeps one request's token sequence warm in the student's KV cache, in the background."""

    def __init__(self, engine: LlamaEngine, prefix: str, special: bool) -> None:
        self.engine = engine
        self.prefix = prefix
        self.special = special
        self.cached = 0  # tokens of the latest target known to be in the KV cache
        self._target: list[int] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self, prompt_tokens: list[int]) -> None:
        self._offer(prompt_tokens[:-1])
        self._task = asyncio.create_task(self._loop(), name="gkt-prefetch")

    def guidance(self, released: str) -> None:
        """The guidance released so far (the seam's ``kept``)."""
        tokens = self.engine.tokenize(self.prefix + released, special=self.special)
        self._offer(tokens[:-1])

    def _offer(self, tokens: list[int]) -> None:
        self._target = tokens
        self._wake.set()

    async def _loop(self) -> None:
        try:
            await self._prefetch()
        except Exception:  # the answer never depends on the prefetch: log it and let the handoff do the work
            log.exception("prefetch failed; the student processes the prompt at the handoff")

    async def _prefetch(self) -> None:
        # ``_closed`` ends the loop even if a cancellation were lost; no ``asyncio.wait_for`` here, because on
        # Python 3.11 it can swallow a cancellation that arrives as its inner wait completes.
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            target = self._target
            if not target or self._closed:
                continue
            done = await self.engine.prefill(target, owner=self)
            if done is None or done < len(target):
                # Busy with another request, or stopped early by a generation: ask again shortly.
                await asyncio.sleep(RETRY_S)
                self._wake.set()
            if done is not None:
                self.cached = done

    async def close(self) -> None:
        """Stop prefetching (an in-flight chunk is abandoned at its boundary) and free the warm slot."""
        self._closed = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.engine.release_warm(self)
