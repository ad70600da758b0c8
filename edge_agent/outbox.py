"""The edge's telemetry outbox: answer records on disk until the cloud has stored them (SQLite, bounded).

SQLite rather than a JSONL file: appending, reading the oldest batch and deleting exactly the records the
cloud acknowledged are each one statement and atomic, so a ``kill -9`` at any moment leaves every record
either still queued or acknowledged, never half-written. WAL with ``synchronous=NORMAL``: a crash of the
process loses nothing committed; a power cut may lose the last few records (telemetry, not billing: the
cloud's ledger bills the guidance on its own side).

The outbox holds at most ``max_records``; when a new record would pass the bound the OLDEST are deleted and
counted (``dropped``): after a long outage the recent answers are the ones worth having. Records are
identified by their answer id, so a record re-queued after a crash between "sent" and "acknowledged" is the
same record at the cloud (stored once).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

_SCHEMA = "CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, " \
          "body TEXT NOT NULL)"


class Outbox:
    """Append, peek the oldest, acknowledge; blocking calls (the telemetry task runs them in a thread)."""

    def __init__(self, path: Path, max_records: int) -> None:
        self.path = path
        self.max_records = max_records
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # one connection, used from worker threads one at a time
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        self.size = self._count()

    def _count(self) -> int:
        return self._db.execute("SELECT count(*) FROM outbox").fetchone()[0]

    def add(self, records: list[tuple[str, str]]) -> int:
        """Append ``(id, json)`` records (an id already queued is kept once); returns how many of the oldest
        were dropped to stay within the bound."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR IGNORE INTO outbox (id, body) VALUES (?, ?)", records)
                over = self._count() - self.max_records
                if over > 0:
                    self._db.execute("DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?)",
                                     (over,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self.size = self._count()
            return max(over, 0)

    def oldest(self, n: int) -> list[tuple[str, str]]:
        """Up to ``n`` queued records, oldest first."""
        with self._lock:
            return self._db.execute("SELECT id, body FROM outbox ORDER BY seq LIMIT ?", (n,)).fetchall()

    def remove(self, ids: list[str]) -> None:
        """The cloud stored these (or refused them for good): forget them."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])
            self._db.execute("COMMIT")
            self.size = self._count()

    def close(self) -> None:
        with self._lock:
            self._db.close()
