"""A private PostgreSQL for a test (``gkt.backing.Postgres`` in a temporary data directory), or a skip."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gkt.backing import Postgres


def private_postgres() -> Iterator[Postgres]:
    """Yields a started server on a loopback port; stops it and removes its data afterwards (for fixtures)."""
    if not Postgres.available():
        pytest.skip("PostgreSQL missing: make system-deps")
    data = Path(tempfile.mkdtemp(prefix="gkt-pg-"))
    server = Postgres(data).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(data, ignore_errors=True)
