"""Fleet telemetry's storage: one row per answer an edge reported, beside the ledger (same database, same engine).

Schema (migration ``0002_fleet_answers``)::

    fleet_answers(id, tenant, answer_id, mode, policy, student_tokens, student_prompt_s, student_generation_s,
                  student_cost, teacher_cost, teacher_only_cost, currency, fallback, partial, finish,
                  answered_at, received_at)
    UNIQUE (tenant, answer_id)

``tenant`` is the edge's key name (each edge has its own key), so an edge cannot write another's rows and
a record sent twice (its acknowledgement was lost) is stored once: ``INSERT .. ON CONFLICT DO NOTHING
RETURNING`` says which records of a batch are new, and only those count in the metrics.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Integer,
    String,
    Table,
    UniqueConstraint,
    case,
    func,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite

from cloud_service.ledger_db import LedgerStore, metadata
from shared.telemetry import AnswerRecord

fleet_answers = Table(
    "fleet_answers",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("tenant", String(64), nullable=False),
    Column("answer_id", String(64), nullable=False),
    Column("mode", String(16), nullable=False),
    Column("policy", String(32), nullable=True),
    Column("student_tokens", Integer, nullable=False),
    Column("student_prompt_s", Float, nullable=False),
    Column("student_generation_s", Float, nullable=False),
    Column("student_cost", Float, nullable=False),
    Column("teacher_cost", Float, nullable=False),
    Column("teacher_only_cost", Float, nullable=True),
    Column("currency", String(8), nullable=False),
    Column("fallback", String(64), nullable=True),
    Column("partial", Boolean, nullable=False),
    Column("finish", String(16), nullable=False),
    Column("answered_at", DateTime(timezone=True), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("tenant", "answer_id", name="uq_fleet_tenant_answer"),
)


def _row(tenant: str, r: AnswerRecord, now: datetime) -> dict[str, Any]:
    return dict(tenant=tenant, answer_id=r.id, mode=r.mode, policy=r.policy, student_tokens=r.student_tokens,
                student_prompt_s=r.student_prompt_s, student_generation_s=r.student_generation_s,
                student_cost=r.student_cost, teacher_cost=r.teacher_cost, teacher_only_cost=r.teacher_only_cost,
                currency=r.currency, fallback=r.fallback, partial=r.partial, finish=r.finish, answered_at=r.at,
                received_at=now)


class FleetStore:
    """Writes and sums fleet records on the ledger's database (its engine, timeout and health)."""

    def __init__(self, ledger: LedgerStore) -> None:
        self.ledger = ledger

    async def add(self, tenant: str, records: list[AnswerRecord]) -> set[str]:
        """Store the records not stored yet; returns the ids that are new (one transaction for the batch)."""
        now = datetime.now(UTC)
        insert = postgresql.insert if self.ledger.dialect == "postgresql" else sqlite.insert
        stmt = (insert(fleet_answers).values([_row(tenant, r, now) for r in records])
                .on_conflict_do_nothing(index_elements=["tenant", "answer_id"])
                .returning(fleet_answers.c.answer_id))
        async with asyncio.timeout(self.ledger.timeout_s), self.ledger.engine.begin() as conn:
            return set((await conn.execute(stmt)).scalars())

    async def totals(self, tenant: str | None = None) -> dict[str, dict[str, Any]]:
        """Sums per edge (tenant), over every edge or only ``tenant``'s rows."""
        c = fleet_answers.c
        counterfactual = c.teacher_only_cost.is_not(None)
        q = select(
            c.tenant,
            func.count().label("answers"),
            func.sum(case((c.fallback.is_not(None), 1), else_=0)).label("fallbacks"),
            func.sum(case((c.partial, 1), else_=0)).label("partial"),
            func.sum(c.student_tokens).label("student_tokens"),
            func.sum(c.student_prompt_s + c.student_generation_s).label("student_s"),
            func.sum(c.student_cost).label("student_cost"),
            func.sum(c.teacher_cost).label("teacher_cost"),
            # Saved against teacher-only, over the answers whose counterfactual is known.
            func.coalesce(func.sum(c.teacher_only_cost), 0.0).label("teacher_only_cost"),
            func.coalesce(func.sum(case((counterfactual, c.teacher_only_cost - c.teacher_cost - c.student_cost),
                                        else_=0.0)), 0.0).label("saved"),
        ).group_by(c.tenant).order_by(c.tenant)
        if tenant is not None:
            q = q.where(c.tenant == tenant)
        async with asyncio.timeout(self.ledger.timeout_s), self.ledger.engine.connect() as conn:
            rows = (await conn.execute(q)).all()
        return {row.tenant: _typed(dict(row._mapping)) for row in rows}


INTS = ("answers", "fallbacks", "partial", "student_tokens")
SUMS = (*INTS, "student_s", "student_cost", "teacher_cost", "teacher_only_cost", "saved")


def _typed(row: dict[str, Any]) -> dict[str, Any]:
    row.pop("tenant", None)
    return {k: (int(row[k] or 0) if k in INTS else float(row[k] or 0.0)) for k in SUMS}


def zeros() -> dict[str, Any]:
    return {k: (0 if k in INTS else 0.0) for k in SUMS}


def fleet_total(edges: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The sums over every edge, with the saved fraction (saved / teacher-only)."""
    total = zeros()
    for e in edges.values():
        total = {k: total[k] + e[k] for k in SUMS}
    total["edges"] = len(edges)
    return with_fraction(total)


def with_fraction(sums: dict[str, Any]) -> dict[str, Any]:
    only = sums["teacher_only_cost"]
    return {**sums, "saved_fraction": sums["saved"] / only if only > 0 else None}
