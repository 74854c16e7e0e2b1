"""Durable lock state and audit history in SQLite (WAL, synchronous=FULL).

A command's new state and its events are written in one transaction; the IOC
publishes the change and completes the CA put only after :meth:`Store.commit`
returns, so a granted lock, its token and the history survive ``kill -9`` at any
moment.
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Iterable

from .machine import Event, LockState

SCHEMA = """
CREATE TABLE IF NOT EXISTS lock_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    state TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    who TEXT NOT NULL,
    session TEXT NOT NULL,
    token INTEGER NOT NULL,
    detail TEXT NOT NULL
);
"""


class StoreError(RuntimeError):
    """The state file cannot be opened or read; the IOC must not start."""


class StoreWriteError(RuntimeError):
    """A commit failed (disk full, I/O error); nothing was written. The IOC keeps serving."""


class Store:
    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), isolation_level=None,
                                      check_same_thread=False)
            mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"{self.path}: cannot use WAL journal (got {mode})")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"{self.path}: cannot open the lock state store: {exc}") from None

    def load(self) -> LockState | None:
        """The last committed state, or None for a new store."""
        try:
            row = self.db.execute("SELECT state FROM lock_state WHERE id = 1").fetchone()
            if row is None:
                return None
            return LockState.from_dict(json.loads(row[0]))
        except (sqlite3.Error, ValueError, TypeError) as exc:
            raise StoreError(f"{self.path}: cannot read the lock state: {exc}") from None

    def recent(self, n: int) -> list[Event]:
        rows = self.db.execute(
            "SELECT time, kind, who, session, token, detail FROM events "
            "ORDER BY id DESC LIMIT ?", (n,)).fetchall()
        return [Event(*row) for row in reversed(rows)]

    def commit(self, state: LockState, events: Iterable[Event]) -> None:
        """Write the new state and its events atomically and durably.

        Raises :class:`StoreWriteError` if that is not possible; then nothing is written.
        (SQLite may already have rolled the transaction back itself, e.g. after a COMMIT
        that found the disk full: a second ROLLBACK would fail and hide the cause.)
        """
        rows = [(e.time, e.kind, e.who, e.session, e.token, e.detail) for e in events]
        try:
            self._rollback()  # a transaction left open by an earlier failure
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute("INSERT OR REPLACE INTO lock_state (id, state) VALUES (1, ?)",
                                (json.dumps(state.to_dict()),))
                self.db.executemany(
                    "INSERT INTO events (time, kind, who, session, token, detail) "
                    "VALUES (?, ?, ?, ?, ?, ?)", rows)
                self.db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        except (sqlite3.Error, OSError) as exc:
            raise StoreWriteError(f"{self.path}: {exc}") from None

    def _rollback(self) -> None:
        if self.db.in_transaction:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # SQLite ended it on its own; the next BEGIN tells if it is usable

    def close(self) -> None:
        self.db.close()
