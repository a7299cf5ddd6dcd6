"""Channel requests bmid has taken from a PD but not answered yet, kept across a SIGKILL of bmid.

Why: a PD waiting for a reply (or blocked in accept) would otherwise wait
forever once the bmid that read its request is gone; the channel itself
survives (the fd keeper holds it).  After a restart bmid resumes what can
safely run again (reads, accept) and answers the rest with an error that
says the call was cut off (restore() has finished or rolled back what it
had begun).

Durable against a crash of bmid, not of the host (synchronous=OFF: the
rows reach the page cache at once, and a host that goes down takes the
PDs with it).  Its own file, so these small writes never wait for the
state store's fsync'd transactions.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Any

FILE = "inflight.sqlite3"


@dataclass(frozen=True)
class Pending:
    pd_id: int
    msg_id: Any
    method: str
    params: dict
    deadline: float | None          # accept only: wall-clock time it gives up, None = never


class Ledger:
    def __init__(self, state_dir: str):
        self._db = sqlite3.connect(os.path.join(state_dir, FILE), isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=OFF")
            self._db.execute("CREATE TABLE IF NOT EXISTS pending (pd_id INTEGER NOT NULL, msg_id TEXT NOT NULL, "
                             "method TEXT NOT NULL, params TEXT NOT NULL, deadline REAL, "
                             "PRIMARY KEY (pd_id, msg_id))")

    def add(self, pd_id: int, msg_id: Any, method: str, params: dict, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.time() + timeout
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO pending VALUES (?, ?, ?, ?, ?)",
                             (pd_id, json.dumps(msg_id), method, json.dumps(params), deadline))

    def remove(self, pd_id: int, msg_id: Any) -> None:
        with self._lock:
            self._db.execute("DELETE FROM pending WHERE pd_id = ? AND msg_id = ?", (pd_id, json.dumps(msg_id)))

    def forget(self, pd_id: int) -> None:
        """pd_id's channel ended: nobody waits for those replies any more."""
        with self._lock:
            self._db.execute("DELETE FROM pending WHERE pd_id = ?", (pd_id,))

    def take_all(self) -> list[Pending]:
        """Everything a previous bmid left unanswered (the ledger is empty afterwards)."""
        with self._lock:
            rows = self._db.execute("SELECT pd_id, msg_id, method, params, deadline FROM pending").fetchall()
            self._db.execute("DELETE FROM pending")
        return [Pending(pd_id, json.loads(msg_id), method, json.loads(params), deadline)
                for pd_id, msg_id, method, params, deadline in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
