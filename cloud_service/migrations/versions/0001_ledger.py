"""The ledger: one row per priced answer, unique per (tenant, request key).

Revision ID: 0001
Revises:
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ledger",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("request_key", sa.String(160), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("finish_reason", sa.String(16), nullable=False),
        sa.Column("cached", sa.Boolean(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        # Cached input tokens (KV prefix reuse): kept now so a cached-input price needs no migration.
        sa.Column("cached_tokens", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("engine_s", sa.Float(), nullable=False),
        sa.Column("currency", sa.String(8), nullable=False),
        sa.Column("cost", sa.Float(), nullable=False),
        sa.Column("counterfactual", sa.Float(), nullable=True),
        sa.Column("answer", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("tenant", "request_key", name="uq_ledger_tenant_key"),
    )
    op.create_index("ix_ledger_tenant", "ledger", ["tenant"])


def downgrade() -> None:
    op.drop_index("ix_ledger_tenant", table_name="ledger")
    op.drop_table("ledger")
