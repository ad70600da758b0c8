"""The price table behind the cost figures: US dollars per million tokens, per side.

Defaults are illustrative, not a quote: the teacher is priced like a small hosted model (input cheaper than
output, every prompt token billed: the few-shot prompt is resent with each question), the edge student runs
on the user's own device and costs nothing per token. Override any field with ``--price name=value`` or the
environment (``GKT_EVAL_PRICE_TEACHER_OUTPUT=0.4``). The project's shared price table (``shared/cost.py``)
is being written separately; this one should merge into it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace

ENV_PREFIX = "GKT_EVAL_PRICE_"


@dataclass(frozen=True)
class PriceTable:
    """USD per 1,000,000 tokens."""

    teacher_input: float = 0.05
    teacher_output: float = 0.20
    student_input: float = 0.0
    student_output: float = 0.0

    def cost(self, teacher_prompt: int, teacher_out: int, student_prompt: int, student_out: int) -> float:
        """Dollars for one answer."""
        return (teacher_prompt * self.teacher_input + teacher_out * self.teacher_output
                + student_prompt * self.student_input + student_out * self.student_output) / 1e6

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def resolve(cls, overrides: list[str] | None = None, environ: dict[str, str] | None = None) -> PriceTable:
        """Defaults, then ``GKT_EVAL_PRICE_*`` variables, then ``name=value`` overrides (the CLI)."""
        env = os.environ if environ is None else environ
        names = {f.name for f in fields(cls)}
        values: dict[str, float] = {}
        for name in names:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None:
                values[name] = _price(name, raw)
        for item in overrides or []:
            name, sep, raw = item.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in names:
                raise ValueError(f"--price takes name=value with name one of {', '.join(sorted(names))}: {item!r}")
            values[name] = _price(name, raw)
        return replace(cls(), **values)


def _price(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"price {name} must be a number of dollars per million tokens, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"price {name} must not be negative, got {value}")
    return value
