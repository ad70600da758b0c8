"""The books of one answer: token usage on both sides, timings, cost, and the summary that ends the answer.

Runners write what happened as it happens (each student generation's result, the tokens each kept, each
guidance call as a ``GuidanceCall`` in ``info.calls``); ``summary`` adds it up once the answer is complete.
"""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter
from typing import Literal

from edge_agent.answer import GKTInfo, Summary
from edge_agent.plan import Plan
from edge_agent.settings import EdgeSettings
from shared.cost import AnswerCost, StudentRates, TeacherCost, answer_cost
from shared.generation import GenerationResult

Tokenize = Callable[[str], list[int]]  # the student's tokens of its prompt followed by the given answer text


class Books:
    """Usage, timings and cost of one answer, kept in the ``GKTInfo`` every response carries."""

    def __init__(self, plan: Plan, student_model: str, settings: EdgeSettings) -> None:
        self.t0 = perf_counter()
        self.plan = plan
        self.settings = settings
        self.info = GKTInfo(mode=plan.mode, student_model=student_model, task=plan.task.name if plan.task else None)
        self.info.usage.student_prompt_tokens = len(plan.student_tokens)
        if plan.mode == "gkt":
            self.info.policy = plan.policy.model_dump()
        self.student_ran = False  # a student generation started (else the teacher wrote the whole answer)
        self.generated = 0  # student tokens generated, those taken back or dropped included

    def first_token(self) -> None:
        """An answer token went out (teacher's or student's): the first one sets the time to first token."""
        if self.info.timings.ttft_s is None:
            self.info.timings.ttft_s = perf_counter() - self.t0

    def student_done(self, result: GenerationResult) -> None:
        """One student generation ended: its tokens and timings add up (an answer may take several)."""
        t = self.info.timings
        if t.student_queue_s is None:
            self.info.usage.student_cached_tokens = result.cached_prompt_tokens
        t.student_queue_s = (t.student_queue_s or 0.0) + result.queue_s
        t.student_prompt_s = (t.student_prompt_s or 0.0) + result.prompt_s
        t.student_generation_s = (t.student_generation_s or 0.0) + result.generation_s
        self.generated += result.completion_tokens

    def kept(self, tokens: int) -> None:
        """``tokens`` student tokens made it into the answer."""
        self.info.usage.student_tokens += tokens

    def reguided(self, seconds: float) -> None:
        """The student stood still for ``seconds`` while a re-guidance call ran."""
        self.info.timings.reguide_s = (self.info.timings.reguide_s or 0.0) + seconds

    def summary(self, finish: Literal["stop", "length"], answer: str, tokenize: Tokenize) -> Summary:
        """The answer is complete: totals, cost, the task's extracted answer, the OpenAI usage."""
        plan, info, u = self.plan, self.info, self.info.usage
        self._totals(answer, tokenize)
        u.student_discarded_tokens = self.generated - u.student_tokens
        completion_tokens = u.guidance_student_tokens + u.student_tokens if self.student_ran else u.teacher_tokens
        info.timings.total_s = perf_counter() - self.t0
        info.cost = self._cost(wrote_all=plan.mode == "teacher" or info.guidance_complete)
        if plan.task is not None:
            info.answer = plan.task.extract(answer)
        prompt_tokens = u.teacher_prompt_tokens if plan.mode == "teacher" else len(plan.student_tokens)
        return Summary(finish, info, prompt_tokens, completion_tokens)

    def _totals(self, answer: str, tokenize: Tokenize) -> None:
        """Usage summed over the guidance calls; each call's text counted in the student's tokens where it
        sits in the answer."""
        info, u = self.info, self.info.usage
        info.guidance_calls = len(info.calls)
        u.teacher_tokens = sum(c.teacher_tokens for c in info.calls)
        u.teacher_draft_tokens = sum(c.draft_teacher_tokens for c in info.calls)
        u.teacher_cached_tokens = sum(c.cached_tokens for c in info.calls)
        u.teacher_prompt_tokens = 0
        u.guidance_student_tokens = 0
        for c in info.calls:
            before = answer[: c.offset]
            if c.prompt_tokens is not None:
                u.teacher_prompt_tokens += c.prompt_tokens
            elif c.finish == "early":
                # Ended by the edge: no done frame. The same prompt, counted with the student's tokenizer.
                u.teacher_prompt_tokens += len(tokenize(before))
                u.teacher_prompt_tokens_estimated = True
            if self.plan.mode == "gkt" and c.text:
                u.guidance_student_tokens += len(tokenize(before + c.text)) - len(tokenize(before))

    def _cost(self, *, wrote_all: bool) -> AnswerCost:
        """This answer's cost on both sides and had the teacher written all of it (see shared/cost.py).

        The teacher's side is what the cloud stated for each call, summed; the counterfactual teacher reads
        the prompt once (the first call's prompt tokens) and finds cached what the first call found."""
        info, u, t = self.info, self.info.usage, self.info.timings
        rates = StudentRates(per_mtok=self.settings.price_student_per_mtok,
                             cpu_per_hour=self.settings.price_cpu_per_hour)
        # Core-seconds: the student's engine time times the threads it computes with.
        cpu_s = ((t.student_prompt_s or 0.0) + (t.student_generation_s or 0.0)) * self.settings.n_threads
        ran = u.student_tokens > 0 or t.student_generation_s is not None
        processed = u.student_prompt_tokens + u.guidance_student_tokens + u.student_tokens + u.student_discarded_tokens
        first = info.calls[0] if info.calls else None
        prompt_tokens = first.prompt_tokens if first is not None and first.prompt_tokens is not None else \
            u.teacher_prompt_tokens
        cached = first.cached_tokens if first is not None else 0
        return answer_cost(
            student=rates, student_tokens=processed if ran else 0, student_cpu_s=cpu_s,
            teacher=_sum_costs([c.cost for c in info.calls if c.cost is not None]),
            teacher_prompt_tokens=prompt_tokens, guidance_teacher_tokens=u.teacher_tokens,
            guidance_student_tokens=u.guidance_student_tokens,
            answer_student_tokens=u.guidance_student_tokens + u.student_tokens, teacher_wrote_all=wrote_all,
            teacher_cached_prompt_tokens=cached,
        )


def _sum_costs(costs: list[TeacherCost]) -> TeacherCost | None:
    """The teacher's cost over several calls (the rates of the first: one cloud serves them all)."""
    if not costs:
        return None
    return TeacherCost(
        rates=costs[0].rates, input_tokens=sum(c.input_tokens for c in costs),
        cached_input_tokens=sum(c.cached_input_tokens for c in costs),
        output_tokens=sum(c.output_tokens for c in costs), accelerator_s=sum(c.accelerator_s for c in costs),
        amount=sum(c.amount for c in costs),
    )
