"""``teacher`` mode: the teacher writes the whole answer through the guidance stream; no student runs.

With ``logprobs`` the cloud sends the teacher's own for every token, named here with the student's vocabulary,
which the teacher must share (checked first). Cloud trouble is the client's error here (there is nobody to
fall back to): before the first token it is an HTTP status, after it an error event
(``edge_agent/responses.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from edge_agent.answer import Delta, GKTInfo
from edge_agent.guidance import Guidance
from edge_agent.plan import Plan
from edge_agent.runners import Finish
from shared.generation import TokenChoice
from shared.llama import LlamaText
from shared.tokenize import vocabulary_sha256


@dataclass
class TeacherRunner:
    """The teacher's text, token frame by token frame, as the answer."""

    plan: Plan
    guidance: Guidance
    info: GKTInfo
    finish: Finish | None = None

    student: LlamaText | None = None  # whose vocabulary names the teacher's tokens (log-probabilities asked)

    async def run(self) -> AsyncIterator[Delta]:
        info = self.info
        if self.student is not None:  # computed once per model, off the loop (a pass over the vocabulary)
            await self.guidance.names_teacher_tokens(await asyncio.to_thread(vocabulary_sha256, self.student))
        info.guidance_tokens = self.plan.k
        call = self.guidance.call("first", self.plan.k)
        parts: list[str] = []
        async with aclosing(self.guidance.tokens(self.guidance.request, call)) as items:
            async for text, logprobs in items:
                parts.append(text)
                choices = None if logprobs is None else [TokenChoice(t.id, t.logprob, t.top) for t in logprobs]
                yield Delta(text, "teacher", choices)
        call.text = info.guidance = "".join(parts)
        info.guidance_complete = call.finish == "stop"
        self.finish = "stop" if info.guidance_complete else "length"
