"""The ledger's storage: one row per priced answer, in SQLite (default) or PostgreSQL, via SQLAlchemy 2 (async).

Schema (migrations in ``cloud_service/migrations``, applied by Alembic at start-up)::

    ledger(id, tenant, request_key, request_id, model, finish_reason, cached, prompt_tokens,
           completion_tokens, cached_tokens, engine_s, currency, cost, counterfactual, answer, created_at)
    UNIQUE (tenant, request_key)

``request_key`` is the caller's ``Idempotency-Key`` (or a fresh id when it sent none): one key is billed at
most once. A write for a key that already has a row replaces it only when that row is an abandoned attempt
(finish reason ``cancelled``): the retry that completes is what the caller pays for, and a completed answer is
never billed twice. ``answer`` keeps the frames of a completed answer so a retry with the same key is replayed
without the engine and without a second charge.

I/O never blocks the event loop: aiosqlite (a thread per connection) or asyncpg. SQLite runs in WAL mode with
``synchronous=FULL``: a committed row survives a ``kill -9`` of the process and a power cut.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    case,
    event,
    func,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

log = logging.getLogger("gkt.ledger")
MIGRATIONS = Path(__file__).parent / "migrations"
_MIGRATION_LOCK = 19_000_001  # a PostgreSQL advisory lock: replicas starting together migrate one at a time

metadata = MetaData()
ledger = Table(
    "ledger",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("tenant", String(64), nullable=False),
    Column("request_key", String(160), nullable=False),
    Column("request_id", String(128), nullable=False),
    Column("model", String(200), nullable=False),
    Column("finish_reason", String(16), nullable=False),
    Column("cached", Boolean, nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("cached_tokens", Integer, nullable=False, server_default="0"),
    Column("engine_s", Float, nullable=False),
    Column("currency", String(8), nullable=False),
    Column("cost", Float, nullable=False),
    Column("counterfactual", Float, nullable=True),
    Column("answer", JSON, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("tenant", "request_key", name="uq_ledger_tenant_key"),
)
Index("ix_ledger_tenant", ledger.c.tenant)
_REPLACEABLE = [c.name for c in ledger.columns if c.name not in ("id", "tenant", "request_key")]


def default_url() -> str:
    """``$XDG_CACHE_HOME/gkt/ledger.sqlite3`` (``~/.cache/gkt``), beside the models."""
    import os

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gkt"
    return f"sqlite:///{base / 'ledger.sqlite3'}"


def async_url(url: str) -> str:
    """The async driver's URL for a plain one: ``sqlite://`` -> aiosqlite, ``postgresql://`` -> asyncpg."""
    u = make_url(url)
    driver = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg", "postgres": "postgresql+asyncpg"}
    name = driver.get(u.drivername, u.drivername)
    return u.set(drivername=name).render_as_string(hide_password=False)


class LedgerStore:
    """The ledger table behind an async engine; ``healthy`` and ``reason`` feed readiness."""

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        self.url = async_url(url)
        self.timeout_s = timeout_s
        self.dialect = make_url(self.url).get_backend_name()
        self.healthy = False
        self.reason: str | None = "database: not connected yet"
        self._migrated = False
        self.engine = self._engine()

    def _engine(self) -> AsyncEngine:
        if self.dialect == "sqlite":
            database = make_url(self.url).database
            if database and database != ":memory:":
                Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            # One connection: SQLite has one writer at a time anyway, and a pool that grew under load would keep
            # its extra connections' file descriptors (database, WAL, shared memory) open for good (L1, C4).
            engine = create_async_engine(self.url, pool_size=1, max_overflow=0,
                                         connect_args={"timeout": self.timeout_s})

            @event.listens_for(engine.sync_engine, "connect")
            def _pragmas(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer; replicas share the file
                cur.execute("PRAGMA synchronous=FULL")
                cur.close()

            return engine
        # pool_pre_ping: a connection left over from before a database restart is replaced, not failed on.
        return create_async_engine(self.url, pool_pre_ping=True, pool_size=5, max_overflow=5,
                                   connect_args={"timeout": self.timeout_s, "command_timeout": self.timeout_s})

    async def check(self) -> bool:
        """Connect (and migrate, the first time); sets ``healthy``/``reason`` for readiness."""
        try:
            async with asyncio.timeout(self.timeout_s * 2):
                if not self._migrated:
                    await self.migrate()
                async with self.engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
        except Exception as exc:
            self.down(exc)
            return False
        if not self.healthy:
            log.info("ledger database is available (%s)", self.dialect)
        self.healthy, self.reason = True, None
        return True

    def down(self, exc: BaseException) -> None:
        reason = f"database unavailable ({type(exc).__name__})"
        if self.healthy or self.reason != reason:
            # The driver's message names the cause (refused, auth, migration); it never carries the password.
            log.error("ledger %s: %s; the cloud is not ready until it is back", reason, str(exc)[:300])
        self.healthy, self.reason = False, reason

    async def migrate(self, revision: str = "head") -> None:
        """Alembic ``upgrade`` to ``revision`` on this database (the cookbook's connection-sharing recipe, made
        async); the cloud always goes to ``head``, tests build older databases with an earlier revision."""
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))

        def upgrade(conn: Connection) -> None:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)

        async with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                await conn.execute(text(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})"))
            await conn.run_sync(upgrade)
        self._migrated = revision == "head"

    async def write(self, row: dict[str, Any]) -> None:
        """Insert the row; for a key already billed, replace only an abandoned (cancelled) attempt."""
        row = {**row, "created_at": datetime.now(UTC)}
        insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        stmt = insert(ledger).values(**row)
        stmt = stmt.on_conflict_do_update(
            index_elements=["tenant", "request_key"],
            set_={name: stmt.excluded[name] for name in _REPLACEABLE},
            where=ledger.c.finish_reason == "cancelled",
        )
        async with asyncio.timeout(self.timeout_s), self.engine.begin() as conn:
            await conn.execute(stmt)

    async def answered(self, tenant: str, key: str) -> dict[str, Any] | None:
        """The completed answer already billed under ``key``, if any."""
        q = select(ledger.c.answer, ledger.c.cost, ledger.c.currency).where(
            ledger.c.tenant == tenant, ledger.c.request_key == key, ledger.c.finish_reason != "cancelled")
        async with asyncio.timeout(self.timeout_s), self.engine.connect() as conn:
            found = (await conn.execute(q)).first()
        return None if found is None else dict(found._mapping)

    async def totals(self, tenant: str | None = None) -> dict[str, Any]:
        """Sums over one tenant's rows (or all rows)."""
        c = ledger.c
        q = select(
            func.count().label("requests"),
            func.coalesce(func.sum(case((c.cached, 1), else_=0)), 0).label("cache_hits"),
            func.coalesce(func.sum(case((c.finish_reason == "cancelled", 1), else_=0)), 0).label("cancelled"),
            func.coalesce(func.sum(c.prompt_tokens), 0).label("prompt_tokens"),
            func.coalesce(func.sum(c.completion_tokens), 0).label("completion_tokens"),
            func.coalesce(func.sum(c.cached_tokens), 0).label("cached_tokens"),
            func.coalesce(func.sum(c.engine_s), 0.0).label("engine_s"),
            func.coalesce(func.sum(c.cost), 0.0).label("cost"),
        )
        if tenant is not None:
            q = q.where(c.tenant == tenant)
        async with asyncio.timeout(self.timeout_s), self.engine.connect() as conn:
            found = (await conn.execute(q)).one()
        return {k: (float(v) if k in ("engine_s", "cost") else int(v)) for k, v in found._mapping.items()}

    async def aclose(self) -> None:
        await self.engine.dispose()
