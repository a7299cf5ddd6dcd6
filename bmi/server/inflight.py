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
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..store import state_failure

FILE = "inflight.sqlite3"
log = logging.getLogger("bmi.bmid")


@dataclass(frozen=True)
class Pending:
    pd_id: int
    msg_id: Any
    method: str
    params: dict
    deadline: float | None          # accept only: wall-clock time it gives up, None = never


class Ledger:
    def __init__(self, state_dir: str):
        path = os.path.join(state_dir, FILE)
        try:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(path + suffix):
                    os.chmod(path + suffix, 0o600)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise state_failure(e, f"open the in-flight ledger {path}", state_dir) from None
        self._lock = threading.Lock()
        try:
            check = self._db.execute("PRAGMA quick_check").fetchall()
            if check != [("ok",)]:
                raise sqlite3.DatabaseError("database disk image is malformed")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=OFF")
            self._db.execute("CREATE TABLE IF NOT EXISTS pending (pd_id INTEGER NOT NULL, msg_id TEXT NOT NULL, "
                             "method TEXT NOT NULL, params TEXT NOT NULL, deadline REAL, "
                             "PRIMARY KEY (pd_id, msg_id))")
            self._db.execute("SELECT COUNT(*) FROM pending").fetchone()
        except (OSError, sqlite3.Error) as e:
            self._db.close()
            raise state_failure(e, f"open the in-flight ledger {path}", state_dir,
                                if_corrupt="remove it (and its -wal and -shm): the calls PDs had in flight when "
                                           "bmid stopped then get no reply") from None

    def add(self, pd_id: int, msg_id: Any, method: str, params: dict, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.time() + timeout
        self._write("INSERT OR REPLACE INTO pending VALUES (?, ?, ?, ?, ?)",
                    (pd_id, json.dumps(msg_id), method, json.dumps(params), deadline))

    def remove(self, pd_id: int, msg_id: Any) -> None:
        self._write("DELETE FROM pending WHERE pd_id = ? AND msg_id = ?", (pd_id, json.dumps(msg_id)))

    def forget(self, pd_id: int) -> None:
        """pd_id's channel ended: nobody waits for those replies any more."""
        self._write("DELETE FROM pending WHERE pd_id = ?", (pd_id,))

    def _write(self, sql: str, args: tuple) -> None:
        """Best effort (a full disk must not fail the PD's call): a row lost means only that a call cut off by
        a later crash of bmid gets no reply."""
        try:
            with self._lock:
                self._db.execute(sql, args)
        except sqlite3.Error as e:
            log.warning("the in-flight ledger: %s", e)

    def owed(self) -> list[Pending]:
        """Everything a previous bmid left unanswered."""
        with self._lock:
            rows = self._db.execute("SELECT pd_id, msg_id, method, params, deadline FROM pending").fetchall()
        return [Pending(pd_id, json.loads(msg_id), method, json.loads(params), deadline)
                for pd_id, msg_id, method, params, deadline in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
