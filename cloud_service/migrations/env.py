"""Alembic environment of the ledger: run on the connection ``LedgerStore.migrate`` hands over (online only)."""

from __future__ import annotations

from alembic import context

from cloud_service import fleet_db  # noqa: F401  (its table joins the metadata)
from cloud_service.ledger_db import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("the ledger's migrations run from LedgerStore.migrate (the cloud does it at start-up)")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
