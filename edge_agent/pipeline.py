"""One request = one plan, run by one runner as a stream of deltas that say who wrote them, then a summary.

The route (``edge_agent/api.py``) calls ``Pipeline.plan`` (``edge_agent/plan.py``: every refusal happens
there, before any work) and then ``Pipeline.run``, which opens the answer's books (``accounting.py``), its
student session (``session.py``) and its guidance calls (``guidance.py``), picks the runner for the mode and
policy (``runners/``), passes its deltas on, and ends with the summary the books add up.

gkt mode: the cloud streams the teacher's first k tokens, finishing the last word; the seam releases them as
they arrive (the user sees them at once); the student's own prompt plus the released guidance becomes the
start of the student's answer, and the student finishes it with the user's settings. If the cloud cannot be
reached or refuses, the student answers alone (``fallback``); if the guidance stream breaks, the student
continues from what arrived (``partial``). Either way the answer is not lost.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import assert_never

from edge_agent.accounting import Books
from edge_agent.answer import Delta, Echo, Summary
from edge_agent.cloud import CloudClient
from edge_agent.guidance import Guidance
from edge_agent.plan import Plan, make_plan
from edge_agent.policies import AdaptivePolicy, FixedPolicy, ReguidePolicy, VerifyPolicy, first_stop
from edge_agent.protocol import ChatCompletionRequest, CompletionRequest
from edge_agent.runners import Echoed, Runner
from edge_agent.runners.guided import GuidedRunner
from edge_agent.runners.teacher import TeacherRunner
from edge_agent.runners.verify import VerifyRunner
from edge_agent.session import StudentSession
from edge_agent.settings import EdgeSettings
from edge_agent.student import LlamaEngine


class Pipeline:
    """Plans and runs edge requests against the student engine and the cloud."""

    def __init__(self, student: LlamaEngine, cloud: CloudClient, settings: EdgeSettings,
                 on_answer: Callable[[Summary], None] | None = None) -> None:
        self.student = student
        self.cloud = cloud
        self.settings = settings
        self.on_answer = on_answer  # fleet telemetry: told of every completed answer (must not block)

    def plan(self, req: ChatCompletionRequest | CompletionRequest) -> Plan:
        return make_plan(req, self.student, self.settings)

    async def run(self, plan: Plan) -> AsyncIterator[Echo | Delta | Summary]:
        books = Books(plan, self.student.name, self.settings)
        books.info.adapter = self.student.adapter
        session = StudentSession(self.student, plan, books, fast_path=self.settings.fast_path)
        if plan.echo:  # the prompt first, scored by the student before anyone writes
            yield Echo(plan.student_prefix, plan.student_tokens, await session.score_prompt())
        runner = self._runner(plan, books, session)
        parts: list[str] = []
        async with aclosing(runner.run()) as deltas:
            async for delta in deltas:
                books.first_token()
                parts.append(delta.text)
                yield delta
        assert runner.finish is not None  # every runner decides how its answer ended
        summary = books.summary(runner.finish, "".join(parts), session.tokens)
        if self.on_answer is not None:
            self.on_answer(summary)
        yield summary

    def _runner(self, plan: Plan, books: Books, session: StudentSession) -> Runner:
        """The one place that maps a mode and a policy to the way of answering."""
        if plan.max_tokens == 0:
            return Echoed()
        if plan.mode == "student":
            return GuidedRunner(plan, session, books)
        guidance = Guidance(self.cloud, plan, books.info, self.settings.guidance_timeout_s)
        if plan.mode == "teacher":
            namer = self.student if plan.logprobs is not None else None  # names the teacher's tokens
            return TeacherRunner(plan, guidance, books.info, student=namer)
        match plan.policy:
            case FixedPolicy() | AdaptivePolicy():
                return GuidedRunner(plan, session, books, guidance, stopper=first_stop(plan.policy))
            case ReguidePolicy():
                return GuidedRunner(plan, session, books, guidance, reguide=plan.policy)
            case VerifyPolicy():
                return VerifyRunner(session, guidance, books, plan.policy)
            case _:
                assert_never(plan.policy)

