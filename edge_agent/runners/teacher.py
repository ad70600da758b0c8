"""``teacher`` mode: the teacher writes the whole answer through the guidance stream; no student runs.

Cloud trouble is the client's error here (there is nobody to fall back to): before the first token it is an
HTTP status, after it an error event (``edge_agent/responses.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from edge_agent.answer import Delta, GKTInfo
from edge_agent.guidance import Guidance
from edge_agent.plan import Plan
from edge_agent.runners import Finish


@dataclass
class TeacherRunner:
    """The teacher's text, token frame by token frame, as the answer."""

    plan: Plan
    guidance: Guidance
    info: GKTInfo
    finish: Finish | None = None

    async def run(self) -> AsyncIterator[Delta]:
        info = self.info
        info.guidance_tokens = self.plan.k
        call = self.guidance.call("first", self.plan.k)
        parts: list[str] = []
        async with aclosing(self.guidance.text(self.guidance.request, call)) as texts:
            async for text in texts:
                parts.append(text)
                yield Delta(text, "teacher")
        call.text = info.guidance = "".join(parts)
        info.guidance_complete = call.finish == "stop"
        self.finish = "stop" if info.guidance_complete else "length"
