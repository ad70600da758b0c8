"""Fleet telemetry on the wire: the per-answer record an edge pushes to the cloud (``POST /v1/telemetry/answers``).

Edges behind NAT cannot be scraped; each answer's books (``edge_agent/accounting.py``) become one
``AnswerRecord`` that the edge buffers on disk and pushes in batches. Delivery is at least once: a batch whose
acknowledgement was lost is sent again, and the cloud stores each record once, by its ``id`` (unique per
tenant, i.e. per edge key). Bodies are strict (unknown fields, NaN and negative amounts are refused with a
400 envelope) so that one bad edge cannot poison the fleet's totals.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

TELEMETRY_PATH = "/v1/telemetry/answers"
MAX_BATCH = 500  # records per request: a day offline drains in a few hundred requests, each well under 1 MiB


class AnswerRecord(BaseModel):
    """One answer as its edge saw it (the student's side measured there, the teacher's cost as the cloud
    stated it in its done frames)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9._:-]{8,64}$", description="The answer's id, unique per edge: the "
                    "idempotency key of the record.")
    mode: Literal["gkt", "student", "teacher"]
    policy: str | None = Field(None, max_length=32, pattern=r"^[a-z_]+$", description="gkt mode: the policy name.")
    student_tokens: int = Field(ge=0, le=10**7, description="Answer tokens the student wrote.")
    student_prompt_s: float = Field(ge=0, le=86400, allow_inf_nan=False)
    student_generation_s: float = Field(ge=0, le=86400, allow_inf_nan=False)
    student_cost: float = Field(ge=0, le=1e6, allow_inf_nan=False)
    teacher_cost: float = Field(ge=0, le=1e6, allow_inf_nan=False, description="As the cloud stated it.")
    teacher_only_cost: float | None = Field(None, ge=0, le=1e6, allow_inf_nan=False,
                                            description="Had the teacher written it all (None: no teacher prices).")
    # Every string is a code from a closed alphabet: nothing a database could refuse (NUL, surrogates) gets in.
    currency: str = Field("USD", pattern=r"^[A-Z]{3,8}$")
    fallback: str | None = Field(None, pattern=r"^[a-z_]{1,64}$", description="Why no guidance arrived (the "
                                 "error code).")
    partial: bool = False
    finish: Literal["stop", "length"]
    at: datetime = Field(description="When the answer ended (UTC).")

    @field_validator("at")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        if v.tzinfo is None:
            raise ValueError("at must carry a time zone (UTC)")
        try:
            return v.astimezone(UTC)
        except OverflowError:  # year 1 at +01:00 is before the first UTC instant
            raise ValueError("at is out of range") from None


class AnswerBatch(BaseModel):
    """What the edge sends: up to ``MAX_BATCH`` records, oldest first."""

    model_config = ConfigDict(extra="forbid")

    records: list[AnswerRecord] = Field(min_length=1, max_length=MAX_BATCH)


class BatchReceipt(BaseModel):
    """The cloud's answer: every record of the batch is stored (``stored`` new, ``duplicates`` already were)."""

    accepted: int
    stored: int
    duplicates: int
