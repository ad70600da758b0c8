"""The cost ledger's arithmetic: what an answer cost on each side, and what GKT saved.

Price table (configurable on each service; defaults are illustrative, not quotes):

| side | price | setting | default |
|---|---|---|---|
| teacher | per million prompt tokens | `GKT_CLOUD_PRICE_INPUT_PER_MTOK` | 0.50 |
| teacher | per million prompt tokens found in its KV cache | `GKT_CLOUD_PRICE_CACHED_INPUT_PER_MTOK` | 0.05 |
| teacher | per million generated (guidance) tokens | `GKT_CLOUD_PRICE_OUTPUT_PER_MTOK` | 1.50 |
| teacher | per accelerator hour of engine time | `GKT_CLOUD_PRICE_ACCELERATOR_PER_HOUR` | 0 |
| student | per million tokens it processes | `GKT_EDGE_PRICE_STUDENT_PER_MTOK` | 0 |
| student | per CPU-core hour of engine time | `GKT_EDGE_PRICE_CPU_PER_HOUR` | 0.01 |

Cached input is priced as providers bill prompt caching: a prompt token whose KV the teacher's engine
reused (counted per call by the llama.cpp scheduler; from ``usage.prompt_tokens_details.cached_tokens`` on an
OpenAI-compatible upstream such as vLLM, where it reports them) costs the cached-input price instead of the
input price. The default is a tenth of the default input price, the ratio Anthropic (cache reads) and
OpenAI's current models bill at, and the price model issue #22 publishes with; set it equal to the input
price to bill every prompt token alike.

Engine time on the batched llama.cpp teacher is the request's share of each decode step (the step's time
split by the tokens each sequence had in it); on an OpenAI-compatible upstream it is the request's wall time,
an upper bound when the upstream batches. The cloud states its cost, with the rates it used, in every
``done`` frame and JSON result; the edge adds its own side and the counterfactual: the same answer written by
the teacher alone (the teacher's prompt plus the whole answer as teacher output, converted to teacher tokens
with the ratio observed on the guidance, which both sides counted).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from pydantic import BaseModel, Field

_MTOK = 1_000_000
_HOUR = 3600.0


class TeacherRates(BaseModel):
    """The cloud's prices."""

    currency: str = "USD"
    input_per_mtok: float = 0.50
    cached_input_per_mtok: float = 0.05  # a tenth of the input price (see the module's docstring)
    output_per_mtok: float = 1.50
    accelerator_per_hour: float = 0.0

    def amount(self, input_tokens: int | float, output_tokens: int | float, accelerator_s: float,
               cached_tokens: int | float = 0) -> float:
        """``cached_tokens`` of the ``input_tokens`` were found in the KV cache: billed at the cached price."""
        cached = min(max(cached_tokens, 0), input_tokens)
        return ((input_tokens - cached) * self.input_per_mtok + cached * self.cached_input_per_mtok
                + output_tokens * self.output_per_mtok) / _MTOK + accelerator_s * self.accelerator_per_hour / _HOUR


class StudentRates(BaseModel):
    """The edge's prices."""

    per_mtok: float = 0.0
    cpu_per_hour: float = 0.01

    def amount(self, tokens: int, cpu_s: float) -> float:
        return tokens * self.per_mtok / _MTOK + cpu_s * self.cpu_per_hour / _HOUR


# Every price by the name reports accept (``gkt eval --price name=value``), with the environment variable the
# services read it from and where it lives, so a report prices answers exactly as the running services do.
PRICE_NAMES: dict[str, tuple[str, str, str]] = {
    "teacher_input": ("GKT_CLOUD_PRICE_INPUT_PER_MTOK", "teacher", "input_per_mtok"),
    "teacher_cached_input": ("GKT_CLOUD_PRICE_CACHED_INPUT_PER_MTOK", "teacher", "cached_input_per_mtok"),
    "teacher_output": ("GKT_CLOUD_PRICE_OUTPUT_PER_MTOK", "teacher", "output_per_mtok"),
    "teacher_accelerator_hour": ("GKT_CLOUD_PRICE_ACCELERATOR_PER_HOUR", "teacher", "accelerator_per_hour"),
    "student_token": ("GKT_EDGE_PRICE_STUDENT_PER_MTOK", "student", "per_mtok"),
    "student_cpu_hour": ("GKT_EDGE_PRICE_CPU_PER_HOUR", "student", "cpu_per_hour"),
}


class PriceTable(BaseModel):
    """Both sides' rates, for pricing recorded answers again (the evaluation's cost columns)."""

    teacher: TeacherRates = Field(default_factory=TeacherRates)
    student: StudentRates = Field(default_factory=StudentRates)

    def answer(self, *, teacher_prompt_tokens: int, teacher_tokens: int, teacher_engine_s: float,
               student_tokens: int, student_cpu_s: float, teacher_cached_tokens: int = 0) -> float:
        """One answer's cost on both sides, as the services compute it."""
        return (self.teacher.amount(teacher_prompt_tokens, teacher_tokens, teacher_engine_s, teacher_cached_tokens)
                + self.student.amount(student_tokens, student_cpu_s))

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(getattr(self, side), attr) for name, (_, side, attr) in PRICE_NAMES.items()}

    @classmethod
    def resolve(cls, overrides: list[str] | None = None, environ: Mapping[str, str] | None = None) -> PriceTable:
        """Defaults, then the services' ``GKT_*_PRICE_*`` variables, then ``name=value`` overrides."""
        env = os.environ if environ is None else environ
        values: dict[str, float] = {}
        for name, (var, _, _) in PRICE_NAMES.items():
            if (raw := env.get(var)) is not None:
                values[name] = _price(var, raw)
        for item in overrides or []:
            name, sep, raw = item.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in PRICE_NAMES:
                raise ValueError(f"a price is name=value with name one of {', '.join(PRICE_NAMES)}: {item!r}")
            values[name] = _price(name, raw)
        sides: dict[str, dict[str, float]] = {"teacher": {}, "student": {}}
        for name, value in values.items():
            _, side, attr = PRICE_NAMES[name]
            sides[side][attr] = value
        return cls(teacher=TeacherRates(**sides["teacher"]), student=StudentRates(**sides["student"]))


def _price(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"price {name} must be a number, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"price {name} must not be negative, got {value}")
    return value


class TeacherCost(BaseModel):
    """What one guidance answer cost the cloud (zero for a cache hit), with the rates used."""

    rates: TeacherRates
    input_tokens: int = 0
    cached_input_tokens: int = 0  # of ``input_tokens``, found in the teacher's KV cache (the cached price)
    output_tokens: int = 0
    accelerator_s: float = 0.0
    amount: float = 0.0


def teacher_cost(rates: TeacherRates, prompt_tokens: int, completion_tokens: int, engine_s: float,
                 cached_tokens: int = 0) -> TeacherCost:
    cached = min(max(cached_tokens, 0), prompt_tokens)
    return TeacherCost(
        rates=rates, input_tokens=prompt_tokens, cached_input_tokens=cached, output_tokens=completion_tokens,
        accelerator_s=engine_s, amount=rates.amount(prompt_tokens, completion_tokens, engine_s, cached),
    )


class AnswerCost(BaseModel):
    """One answer's cost on both sides and against the teacher writing it all (``gkt.cost`` at the edge)."""

    currency: str = "USD"
    teacher: float = 0.0  # what the cloud stated for the guidance
    student: float = 0.0  # the edge's own side
    total: float = 0.0
    teacher_only: float | None = None  # the counterfactual; None when no teacher prices are known
    saved: float | None = None  # teacher_only - total
    saved_fraction: float | None = None  # saved / teacher_only


def answer_cost(
    *,
    student: StudentRates,
    student_tokens: int,
    student_cpu_s: float,
    teacher: TeacherCost | None,
    teacher_prompt_tokens: int,
    guidance_teacher_tokens: int,
    guidance_student_tokens: int,
    answer_student_tokens: int,
    teacher_wrote_all: bool = False,
    teacher_cached_prompt_tokens: int = 0,
) -> AnswerCost:
    """The answer's cost and the counterfactual.

    ``answer_student_tokens`` is the whole answer in student tokens (guidance included). When the teacher
    already wrote the whole answer (teacher mode, or it finished within k) the counterfactual is its own cost.
    The counterfactual teacher reads the prompt once and finds cached what the first guidance call found
    (``teacher_cached_prompt_tokens``): the same prompt, the same cache.
    """
    student_amount = student.amount(student_tokens, student_cpu_s)
    teacher_amount = teacher.amount if teacher is not None else 0.0
    total = teacher_amount + student_amount
    if teacher is None:
        return AnswerCost(teacher=0.0, student=student_amount, total=total)
    rates = teacher.rates
    if teacher_wrote_all:
        only = rates.amount(teacher_prompt_tokens, guidance_teacher_tokens, teacher.accelerator_s,
                            teacher_cached_prompt_tokens)
    else:
        ratio = guidance_teacher_tokens / guidance_student_tokens if guidance_teacher_tokens and \
            guidance_student_tokens else 1.0
        output = max(answer_student_tokens * ratio, guidance_teacher_tokens)
        # Engine time grows with the tokens written; scale the time the guidance took.
        per_token = teacher.accelerator_s / guidance_teacher_tokens if guidance_teacher_tokens else 0.0
        only = rates.amount(teacher_prompt_tokens, output, per_token * output, teacher_cached_prompt_tokens)
    saved = only - total
    return AnswerCost(
        currency=rates.currency, teacher=teacher_amount, student=student_amount, total=total, teacher_only=only,
        saved=saved, saved_fraction=saved / only if only > 0 else None,
    )
