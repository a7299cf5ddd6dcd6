"""bmid's persistent state: SQLite in WAL mode under /var/lib/bmi (configurable).

What is written here before bmid answers a call is what survives a crash:
every PD's record (description, status, measurement in every bank, config
params, priority, connection policies, parent), the live connections
between PDs (their fds are with the fd keeper), the pending operations
(an intent log: finished or rolled back at the next start), the event log
and a few counters.  An acknowledged change survives a power cut too, not
only a SIGKILL of bmid: every transaction a reply depends on is made
durable (fdatasync of the WAL, what synchronous=FULL does inside COMMIT)
before the reply.  The store does that sync itself, apart from COMMIT
(synchronous=NORMAL), so that bmid's client loop can run the next calls
while one sync makes several groups durable (Store.sync, clients.py).

Private to root: the directory is 0700 and the database (so its -wal and
-shm, which SQLite creates with the database's mode) 0600 whatever the
umask, because config values (/boot/env/...) are secrets.

A full disk never loses a change bmid has made: a reserve file
(bmid.reserve) holds RESERVE_BYTES; a commit that fails for want of space
releases it and is retried, and from then on (until the reserve can be
made again) every new change is refused before it begins.  A damaged
database is never repaired, moved or replaced: bmid refuses to start and
says what to do (StateError).
"""
from __future__ import annotations

import errno
import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

from .errors import ResourceError

DEFAULT_STATE_DIR = "/var/lib/bmi"
DB_FILE = "bmid.sqlite3"
RESERVE_FILE = "bmid.reserve"
RESERVE_BYTES = 4 << 20         # far more than one transaction (a record is a few KiB, at most ~1 MiB)
SCHEMA_VERSION = 1
T = TypeVar("T")
EVENTS_KEPT = 100_000           # older events are pruned
_RECORD_JSON = json.JSONEncoder(sort_keys=True)     # json.dumps(sort_keys=True) makes one per call
ROWS_PER_STATEMENT = 200        # PD records in one INSERT (4 values each; SQLite allows 32766)

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
    reason TEXT NOT NULL,
    name TEXT NOT NULL DEFAULT '');
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
    name: str = ""              # the PD's /name config param when it had one

    def to_wire(self) -> dict[str, Any]:
        return {"seq": self.seq, "time": self.time, "pd": self.pd_id, "status": self.status, "reason": self.reason,
                "name": self.name}


class _Member:
    """One commit() call in a group: what to run, and what came of it."""

    __slots__ = ("work", "committed", "after", "done", "result", "error", "wake", "seq")

    def __init__(self, work: Callable[[sqlite3.Connection], Any], after: Callable[[Any], None] | None,
                 committed: Callable[[Any], None] | None = None):
        self.work, self.committed, self.after = work, committed, after
        self.done, self.result, self.error = False, None, None
        self.seq = 0                        # the transaction that wrote it (Store._commits when it committed)
        self.wake = threading.Lock()        # released when its group is done, or when it is to lead the next
        self.wake.acquire()


class _Deferred:
    """The connection a group's work gets: BEGIN IMMEDIATE goes out before its first statement only.

    A group whose members only stage PD records (write_pd: a set_priority)
    then writes them in one statement outside BEGIN ... COMMIT: SQLite
    makes that statement a transaction of its own, as durable (once
    synced) and as atomic; a group that changed nothing runs
    none.  Each statement lets go of the GIL, and the leader, which holds
    the store's lock meanwhile, waits to get it back from the busy client
    threads: one hand-over a group instead of three.
    """

    __slots__ = ("_db", "begun")

    def __init__(self, db: sqlite3.Connection):
        self._db, self.begun = db, False

    def execute(self, sql: str, parameters: Any = ()) -> sqlite3.Cursor:
        if not self.begun:
            self._db.execute("BEGIN IMMEDIATE")
            self.begun = True
        return self._db.execute(sql, parameters)


class Commit:
    """What commit_all() committed: the members' outcomes, final once the store is durable up to `seq`."""

    __slots__ = ("seq", "_members")

    def __init__(self, members: list[_Member]):
        self._members = members
        self.seq = max((m.seq for m in members), default=0)

    def errors(self) -> list[BaseException | None]:
        """Each member's error (its work, its group's COMMIT, its after()), None where it is stored."""
        return [m.error for m in self._members]


class _MemberFailed(Exception):
    """A member's work raised: its group's transaction is rolled back and run again without it."""


class StateError(ResourceError):
    """bmid's state cannot be used: the message is `<what> <where>: <why>; <what to do>`."""


def private_dir(path: str) -> None:
    """Create path (0700) or make an existing one 0700, whatever the umask."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)


def state_failure(e: BaseException, what: str, where: str, *,
                  if_corrupt: str = "restore it from a backup, or remove it if nothing of that bmid's must be "
                                    "kept (bmid never replaces it)") -> StateError:
    """The one-line refusal for an OSError or SQLite error met while using the state in `where`."""
    text = str(e) if isinstance(e, sqlite3.Error) else (e.strerror or str(e))
    low = text.lower()
    code = getattr(e, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or "full" in low:
        return StateError(f"{what} in {where}: the state directory is full ({text}); free space there "
                          f"(bmid keeps {RESERVE_BYTES >> 20} MiB of it in reserve) and try again")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM) or "readonly" in low or "read-only" in low:
        return StateError(f"{what} in {where}: the state directory is read-only or not writable ({text}); "
                          f"bmid must write its state there: make it writable by root or choose another "
                          f"--state-dir")
    if isinstance(e, sqlite3.DatabaseError) and any(w in low for w in ("malformed", "not a database", "corrupt")):
        return StateError(f"{what} in {where}: it is corrupt ({text}); {if_corrupt}")
    return StateError(f"{what} in {where}: {text}; check the state directory")


def is_full(e: BaseException) -> bool:
    return getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (
        isinstance(e, sqlite3.Error) and "full" in str(e).lower())


class Store:
    """One SQLite database; every method is one transaction and is thread-safe."""

    def __init__(self, state_dir: str = DEFAULT_STATE_DIR):
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, DB_FILE)
        self._reserve = os.path.join(state_dir, RESERVE_FILE)
        #: the reserve was spent on a commit and not made again: new changes are refused
        self.short = False
        what = f"open the bmid state database {self.path}"
        try:
            private_dir(state_dir)
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(self.path + suffix):
                    os.chmod(self.path + suffix, 0o600)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise state_failure(e, what, state_dir) from None
        try:
            check = self._db.execute("PRAGMA quick_check").fetchall()
            if check != [("ok",)]:
                raise sqlite3.DatabaseError("database disk image is malformed: "
                                            + "; ".join(str(r[0]) for r in check[:3]))
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")      # synced by the store: see sync()
            self._db.executescript(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(events)")}
            if "name" not in columns:           # a state written before events carried names
                self._db.execute("ALTER TABLE events ADD COLUMN name TEXT NOT NULL DEFAULT ''")
            row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta(key, value) VALUES('schema', ?)", (str(SCHEMA_VERSION),))
            elif row[0] != str(SCHEMA_VERSION):
                raise StateError(f"{what}: schema {row[0]}, this bmid knows {SCHEMA_VERSION}; run the bmid that "
                                 f"wrote it, or restore a backup this one reads")
        except (OSError, sqlite3.Error) as e:
            self._db.close()
            raise state_failure(e, what, state_dir) from None
        except BaseException:
            self._db.close()
            raise
        self._lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queue: list[_Member] = []         # commit() calls waiting for the next group
        self._leading = False                   # a group is being committed, or its leader handed on
        #: scratch of the group being committed (see commit)
        self.staged: dict[Any, Any] = {}
        self._rows: dict[int, tuple[int, int, str, str] | None] = {}     # its PD records (write_pd, delete_pd)
        self._commits = 0                       # transactions committed by this store (under _lock)
        self._durable = 0                       # how many of them are known to be on disk
        self._awaiting: list[list[_Member]] = []    # committed groups whose after()s wait for the sync
        self._broken: StateError | None = None  # a sync failed: nothing committed since can be trusted
        try:
            self.flush()                        # what opening wrote (the schema)
        except BaseException:
            self._db.close()
            raise

    # -- space ----------------------------------------------------------------------------------
    def make_reserve(self) -> bool:
        """Hold RESERVE_BYTES of the state filesystem for commits of changes already made; False when full."""
        try:
            fd = os.open(self._reserve, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            if is_full(e):
                return False
            raise
        try:
            os.posix_fallocate(fd, 0, RESERVE_BYTES)
            os.fsync(fd)
        except OSError as e:
            if not is_full(e):
                raise
            return False
        finally:
            os.close(fd)
        self.short = False
        return True

    def _spend_reserve(self) -> bool:
        try:
            os.unlink(self._reserve)
        except FileNotFoundError:
            return False
        self.short = True
        return True

    def full_error(self, what: str) -> StateError:
        return StateError(f"{what} was refused: the state directory {self.state_dir} is full (bmid could not store "
                          f"it, or it has spent its reserve); free space there and try again")

    def commit(self, work: Callable[[sqlite3.Connection], T], after: Callable[[T], None] | None = None,
               committed: Callable[[T], None] | None = None) -> T:
        """work(db) in a write transaction, then after(result) under the store's lock once it is durable.

        committed(result), when given, runs under the store's lock as soon as
        the COMMIT returned, before the sync: for what must follow the
        database rather than the disk (bmid's record cache, which the next
        transaction's work compares with).

        Group commit (as PostgreSQL does): calls that arrive while a group
        is being committed queue up, and the first of them then commits all
        of them in one transaction -- one fsync for the group.
        A member whose work raises fails alone: the transaction is rolled
        back and run again without it (no savepoint per member: two
        statements each, for a case that does not happen in bmid); every
        after() runs only once the group's COMMIT succeeded, in arrival
        order; a COMMIT that fails fails every member with the same
        StateError and no after() runs.  A later member's work sees what
        earlier members of its group staged (self.staged: scratch of the
        group, empty at its start).  When the disk is full the reserve is
        released and the group runs again.  So work may run more than once:
        it must change nothing outside the database and self.staged.
        Returns once the group is durable (sync()).
        """
        member = _Member(work, after, committed)
        self._commit_members([member])
        if member.error is None:
            self.sync()
        if member.error is not None:
            raise member.error
        return member.result

    def commit_all(self, jobs: list[tuple[Callable[[sqlite3.Connection], Any], Callable[[Any], None] | None,
                                          Callable[[Any], None] | None]]) -> Commit:
        """commit() of several (work, after, committed) at once, all in one group, without raising and without
        waiting for the sync: bmid's client loop (server/clients.py) commits the calls of a round with it, and
        answers them once durable() reaches the Commit's seq."""
        members = [_Member(work, after, committed) for work, after, committed in jobs]
        if members:
            self._commit_members(members)
        return Commit(members)

    # -- durability: COMMIT writes the WAL; sync() puts it on disk, then runs the after()s ------------
    def committed(self) -> int:
        """How many transactions this store has committed (durable or not)."""
        return self._commits

    def durable(self) -> int:
        """How many of them are known to be on disk (their after()s have run)."""
        return self._durable

    def sync(self) -> None:
        """Make every transaction committed so far durable, then run their after()s."""
        upto = self._commits
        if upto > self._durable:
            self.flush()
        self.made_durable(upto)

    def flush(self) -> None:
        """fdatasync of the WAL (what synchronous=FULL does in each COMMIT), outside the store's lock, so
        commits go on meanwhile; everything COMMIT returned before this call is on disk after it.  Any thread;
        several at once are fine.  A failure breaks the store for good (Linux reports a lost write once)."""
        try:
            fd = os.open(self.path + "-wal", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return                      # no WAL: everything is in the database file, synced by its checkpoint
        except OSError as e:
            raise self.flush_failed(e) from None
        try:
            os.fdatasync(fd)
        except OSError as e:
            raise self.flush_failed(e) from None
        finally:
            os.close(fd)

    def flush_failed(self, e: OSError) -> StateError:
        """A flush (here, or bmid's WalSyncer) failed: the store is broken from now on."""
        with self._lock:
            if self._broken is None:
                self._broken = state_failure(e, "sync the bmid state database to disk", self.path)
            return self._broken

    def made_durable(self, upto: int) -> None:
        """flush() made the transactions up to `upto` durable: run their groups' after()s, in commit order."""
        with self._lock:
            if self._broken is not None:
                raise StateError(str(self._broken))
            self._durable = max(self._durable, upto)
            while self._awaiting and self._awaiting[0][0].seq <= self._durable:
                for m in self._awaiting.pop(0):
                    try:
                        m.after(m.result)   # type: ignore[misc]
                    except Exception as e:
                        m.error = e

    def _commit_members(self, members: list["_Member"]) -> None:
        """Queue members together (so one group takes them all) and wait until their group is done, leading it
        when this thread is the first or is handed the lead (through members[0])."""
        with self._queue_lock:
            self._queue.extend(members)
            follow, self._leading = self._leading, True
        self.before_group_test_hook()
        if follow:
            members[0].wake.acquire()
        if not members[0].done:                 # the first, or handed the lead: commit what is queued
            self._lead(members[0])

    def _lead(self, leader: "_Member") -> None:
        """Commit everything queued as one group; wake its members, then the first of the next group to lead it.

        Only one group forms at a time (self._leading): what arrives meanwhile
        queues, and its members sleep on their own locks until they are
        done, instead of each taking the store's lock in turn to find out.
        """
        group: list[_Member] = []
        try:
            with self._lock:
                with self._queue_lock:
                    group, self._queue = self._queue, []
                self._commit_group(group)
        finally:
            for m in group:
                if m is not leader:
                    m.wake.release()
            with self._queue_lock:
                if self._queue:
                    self._queue[0].wake.release()
                else:
                    self._leading = False

    def _commit_group(self, group: list["_Member"]) -> None:
        """One transaction for every member of group (the caller holds the lock); sets each one's outcome."""
        spent = False
        try:
            if self._broken is not None:
                for m in group:
                    m.error = StateError(str(self._broken))
                return
            while True:
                self.staged, self._rows = {}, {}
                try:
                    with self._deferred_transaction() as db:
                        for m in group:
                            if m.error is not None:     # failed in an earlier run of this group
                                continue
                            try:
                                m.result = m.work(db)
                            except (OSError, sqlite3.Error):
                                raise           # the whole group's
                            except Exception as e:
                                m.error = e
                                raise _MemberFailed from None
                        rows = self._row_statements()
                        self.group_test_hook(len(group))
                        # at most one statement and no BEGIN yet: it is a transaction of its own (one GIL
                        # hand-over, not three)
                        execute = db.execute if db.begun or len(rows) > 1 else self._db.execute
                        for sql, values in rows:
                            execute(sql, values)
                except _MemberFailed:
                    continue            # rolled back: the group again without it
                except (OSError, sqlite3.Error) as e:
                    if not spent and is_full(e) and self._spend_reserve():
                        spent = True
                        continue
                    failure = self._failure(e)
                    for m in group:
                        m.error = type(failure)(str(failure))
                    return
                if db.begun or rows:
                    self._commits += 1
                stored = [m for m in group if m.error is None]
                for m in stored:
                    m.seq = self._commits
                    if m.committed is not None:
                        try:
                            m.committed(m.result)
                        except Exception as e:
                            m.error = e
                waiting = [m for m in stored if m.error is None and m.after is not None]
                if waiting:
                    self._awaiting.append(waiting)
                return
        except BaseException:           # e.g. a KeyboardInterrupt in the leader: nobody's change is stored
            for m in group:
                m.error = ResourceError("storing a change: the group commit was interrupted")
            raise
        finally:
            self.staged, self._rows = {}, {}
            for m in group:
                m.done = True

    def queued(self) -> int:
        """How many commit() calls wait for the next group."""
        with self._queue_lock:
            return len(self._queue)

    def before_group_test_hook(self) -> None:
        """Called in commit() once the call is queued, before it waits for the lock (tests gather a group)."""

    def group_test_hook(self, members: int) -> None:
        """Called in a group's transaction before its COMMIT (tests pause there)."""

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT, rolled back on error), durable when it returns; no
        reserve."""
        with self._lock:
            try:
                with self._transaction() as db:
                    yield db
            except (OSError, sqlite3.Error) as e:
                raise self._failure(e) from None
        self.sync()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error (the caller holds the lock); not synced."""
        if self._broken is not None:
            raise StateError(str(self._broken))
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
            self._commits += 1
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    @contextmanager
    def _deferred_transaction(self) -> Iterator["_Deferred"]:
        """As _transaction, but BEGIN IMMEDIATE only before the first statement (the caller holds the lock)."""
        db = _Deferred(self._db)
        try:
            yield db
            if db.begun:
                self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def _failure(self, e: BaseException) -> StateError:
        if is_full(e):
            return self.full_error("storing a change")
        return state_failure(e, "write the bmid state database", self.path)

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

    def write_pd(self, record: dict[str, Any]) -> None:
        """In a commit()'s work: insert or replace one PD's record, written with the rest of its group."""
        self._rows[record["pd_id"]] = (record["pd_id"], record["parent"], record["status"],
                                       _RECORD_JSON.encode(record))

    def delete_pd(self, pd_id: int) -> None:
        """In a commit()'s work: delete one PD's record, with the rest of its group."""
        self._rows[pd_id] = None

    def _row_statements(self) -> list[tuple[str, list[Any]]]:
        """The statements that write the PD records the members of a group staged: one each way (not one per
        member: each statement lets go of the GIL, and under load getting it back is what a group's time
        goes to)."""
        rows = [row for row in self._rows.values() if row is not None]
        gone = [pd_id for pd_id, row in self._rows.items() if row is None]
        statements: list[tuple[str, list[Any]]] = []
        for i in range(0, len(rows), ROWS_PER_STATEMENT):
            part = rows[i:i + ROWS_PER_STATEMENT]
            statements.append(("INSERT OR REPLACE INTO pds(pd_id, parent, status, record) VALUES "
                               + ",".join(["(?, ?, ?, ?)"] * len(part)), [value for row in part for value in row]))
        for i in range(0, len(gone), ROWS_PER_STATEMENT):
            part = gone[i:i + ROWS_PER_STATEMENT]
            statements.append((f"DELETE FROM pds WHERE pd_id IN ({','.join(['?'] * len(part))})", part))
        return statements

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
        """Record an operation before it changes anything outside the database.

        Committed without a sync (in the WAL, so it survives a crash of
        bmid at once); the sync of the commit that ends the operation makes
        it durable with the result.  What an intent
        guards (processes, cgroups) does not outlive the host either, so a
        power cut that loses an unsynced intent loses what it was for too;
        one fsync per change instead of two.
        """
        with self._lock:
            try:
                with self._transaction() as db:
                    cur = db.execute("INSERT INTO ops(pd_id, method, detail, started) VALUES(?, ?, ?, ?)",
                                     (pd_id, method, json.dumps(detail), time.time()))
                    return int(cur.lastrowid)
            except (OSError, sqlite3.Error) as e:
                raise self._failure(e) from None

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
    def add_event(db: sqlite3.Connection, pd_id: int, status: str, reason: str, name: str = "") -> Event:
        now = time.time()
        cur = db.execute("INSERT INTO events(time, pd_id, status, reason, name) VALUES(?, ?, ?, ?, ?)",
                         (now, pd_id, status, reason, name))
        seq = int(cur.lastrowid)
        if seq % 1000 == 0:
            db.execute("DELETE FROM events WHERE seq <= ?", (seq - EVENTS_KEPT,))
        return Event(seq, now, pd_id, status, reason, name)

    def events_since(self, seq: int, limit: int = 1000) -> list[Event]:
        with self._lock:
            rows = self._db.execute("SELECT seq, time, pd_id, status, reason, name FROM events WHERE seq > ? "
                                    "ORDER BY seq LIMIT ?", (seq, limit)).fetchall()
        return [Event(*row) for row in rows]

    def last_event(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(seq) FROM events").fetchone()
        return int(row[0] or 0)
