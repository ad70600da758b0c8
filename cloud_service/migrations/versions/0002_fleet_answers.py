"""Fleet telemetry: one row per answer an edge reported, unique per (tenant, answer id).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fleet_answers",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("answer_id", sa.String(64), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("policy", sa.String(32), nullable=True),
        sa.Column("student_tokens", sa.Integer(), nullable=False),
        sa.Column("student_prompt_s", sa.Float(), nullable=False),
        sa.Column("student_generation_s", sa.Float(), nullable=False),
        sa.Column("student_cost", sa.Float(), nullable=False),
        sa.Column("teacher_cost", sa.Float(), nullable=False),
        sa.Column("teacher_only_cost", sa.Float(), nullable=True),
        sa.Column("currency", sa.String(8), nullable=False),
        sa.Column("fallback", sa.String(64), nullable=True),
        sa.Column("partial", sa.Boolean(), nullable=False),
        sa.Column("finish", sa.String(16), nullable=False),
        sa.Column("answered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        # The record's idempotency: an edge re-sending a batch (its acknowledgement was lost) adds nothing.
        sa.UniqueConstraint("tenant", "answer_id", name="uq_fleet_tenant_answer"),
    )


def downgrade() -> None:
    op.drop_table("fleet_answers")
