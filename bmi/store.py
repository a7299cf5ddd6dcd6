"""bmid's persistent state: SQLite in WAL mode under /var/lib/bmi (configurable).

What is written here before bmid answers a call is what survives a crash:
every PD's record (description, status, measurement in every bank, config
params, priority, connection policies, parent), the live connections
between PDs (their fds are with the fd keeper), the pending operations
(an intent log: finished or rolled back at the next start), the event log
and a few counters.  synchronous=FULL: an acknowledged change survives a
power cut too, not only a SIGKILL of bmid.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from .errors import ResourceError

DEFAULT_STATE_DIR = "/var/lib/bmi"
SCHEMA_VERSION = 1
EVENTS_KEPT = 100_000           # older events are pruned

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pds(
    pd_id INTEGER PRIMARY KEY,
    parent INTEGER NOT NULL,
    status TEXT NOT NULL,
    record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ops(
    op_id INTEGER PRIMARY KEY AUTOINCREMENT,
    pd_id INTEGER,
    method TEXT NOT NULL,
    detail TEXT NOT NULL,
    started REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events(
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    pd_id INTEGER NOT NULL,
    status TEXT NOT NULL,
    reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS conns(
    conn_id INTEGER PRIMARY KEY,
    source INTEGER NOT NULL,
    dest INTEGER NOT NULL,
    con_type TEXT NOT NULL,
    mode INTEGER NOT NULL,
    size INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class Op:
    """An operation begun but not acknowledged when bmid stopped."""

    op_id: int
    pd_id: int | None
    method: str
    detail: dict[str, Any]


@dataclass(frozen=True)
class Event:
    """One status change of a PD (like a libvirt domain event)."""

    seq: int
    time: float
    pd_id: int
    status: str
    reason: str

    def to_wire(self) -> dict[str, Any]:
        return {"seq": self.seq, "time": self.time, "pd": self.pd_id, "status": self.status, "reason": self.reason}


class Store:
    """One SQLite database; every method is one transaction and is thread-safe."""

    def __init__(self, state_dir: str = DEFAULT_STATE_DIR):
        self.state_dir = state_dir
        try:
            os.makedirs(state_dir, mode=0o700, exist_ok=True)
            self._db = sqlite3.connect(os.path.join(state_dir, "bmid.sqlite3"), isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise ResourceError(f"open the bmid state in {state_dir}: {e}") from None
        self._lock = threading.Lock()
        version = self.meta("schema")
        if version is None:
            self.set_meta("schema", str(SCHEMA_VERSION))
        elif version != str(SCHEMA_VERSION):
            raise ResourceError(f"open the bmid state in {state_dir}: schema {version}, this bmid knows "
                                f"{SCHEMA_VERSION}")

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT, rolled back on error)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- meta ---------------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", (key, value))

    # -- PDs ----------------------------------------------------------------------------------
    def pds(self) -> dict[int, dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT pd_id, record FROM pds ORDER BY pd_id").fetchall()
        return {pd_id: json.loads(record) for pd_id, record in rows}

    @staticmethod
    def write_pd(db: sqlite3.Connection, record: dict[str, Any]) -> None:
        """Inside tx(): insert or replace one PD's record."""
        db.execute("INSERT OR REPLACE INTO pds(pd_id, parent, status, record) VALUES(?, ?, ?, ?)",
                   (record["pd_id"], record["parent"], record["status"], json.dumps(record, sort_keys=True)))

    @staticmethod
    def delete_pd(db: sqlite3.Connection, pd_id: int) -> None:
        db.execute("DELETE FROM pds WHERE pd_id=?", (pd_id,))

    def destroyed(self) -> set[int]:
        """The ids of PDs destroyed (their DESTROYED events), so a lookup can say so after a restart."""
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT pd_id FROM events WHERE status='DESTROYED'").fetchall()
        return {pd_id for (pd_id,) in rows}

    # -- connections --------------------------------------------------------------------------
    def add_connection(self, conn: dict[str, Any]) -> None:
        """Record a live connection (a describe() dict) and that its id is taken for good."""
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO conns(conn_id, source, dest, con_type, mode, size) "
                       "VALUES(:conn, :source, :dest, :con_type, :mode, :size)", conn)
            # concurrent connects may commit out of order: the counter only ever grows
            db.execute("INSERT INTO meta(key, value) VALUES('next_conn', ?) ON CONFLICT(key) DO UPDATE "
                       "SET value = MAX(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))",
                       (str(conn["conn"] + 1),))

    def delete_connection(self, conn_id: int) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM conns WHERE conn_id=?", (conn_id,))

    def connections(self) -> list[dict[str, Any]]:
        """Every recorded connection as its describe() dict, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT conn_id, source, dest, con_type, mode, size FROM conns "
                                    "ORDER BY conn_id").fetchall()
        return [dict(zip(("conn", "source", "dest", "con_type", "mode", "size"), row)) for row in rows]

    # -- the intent log -----------------------------------------------------------------------
    def begin(self, method: str, pd_id: int | None, **detail: Any) -> int:
        """Record an operation before it changes anything outside the database."""
        with self.tx() as db:
            cur = db.execute("INSERT INTO ops(pd_id, method, detail, started) VALUES(?, ?, ?, ?)",
                             (pd_id, method, json.dumps(detail), time.time()))
            return int(cur.lastrowid)

    @staticmethod
    def end(db: sqlite3.Connection, op_id: int) -> None:
        """Inside tx(), with the records the operation changed."""
        db.execute("DELETE FROM ops WHERE op_id=?", (op_id,))

    def pending(self) -> list[Op]:
        with self._lock:
            rows = self._db.execute("SELECT op_id, pd_id, method, detail FROM ops ORDER BY op_id").fetchall()
        return [Op(op_id, pd_id, method, json.loads(detail)) for op_id, pd_id, method, detail in rows]

    # -- events -------------------------------------------------------------------------------
    @staticmethod
    def add_event(db: sqlite3.Connection, pd_id: int, status: str, reason: str) -> Event:
        now = time.time()
        cur = db.execute("INSERT INTO events(time, pd_id, status, reason) VALUES(?, ?, ?, ?)",
                         (now, pd_id, status, reason))
        seq = int(cur.lastrowid)
        if seq % 1000 == 0:
            db.execute("DELETE FROM events WHERE seq <= ?", (seq - EVENTS_KEPT,))
        return Event(seq, now, pd_id, status, reason)

    def events_since(self, seq: int, limit: int = 1000) -> list[Event]:
        with self._lock:
            rows = self._db.execute("SELECT seq, time, pd_id, status, reason FROM events WHERE seq > ? "
                                    "ORDER BY seq LIMIT ?", (seq, limit)).fetchall()
        return [Event(*row) for row in rows]

    def last_event(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(seq) FROM events").fetchone()
        return int(row[0] or 0)
