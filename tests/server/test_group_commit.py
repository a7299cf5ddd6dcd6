"""The store's group commit (bmi/store.py Store.commit): concurrent changes share one transaction and one fsync.

In-process, on a real SQLite database in tmp_path: what a member sees and
when, and what a failure of one member or of the whole group does.  The
full-disk case through a real bmid is tests/server/test_state.py.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import closing

from bmi.store import StateError, Store

MEMBERS = 4


def _gathering(store: Store, members: int, sizes: list[int]) -> None:
    """Make the next group hold `members` calls (each waits until that many are queued); note group sizes."""
    def gather() -> None:
        deadline = time.monotonic() + 10
        while 0 < store.queued() < members and time.monotonic() < deadline:
            time.sleep(0.001)

    store.before_group_test_hook = gather           # type: ignore[method-assign]
    store.group_test_hook = sizes.append            # type: ignore[method-assign]


def _rows(store: Store) -> dict[str, str]:
    """The meta rows another connection sees: only what was committed."""
    with closing(sqlite3.connect(store.path)) as db:
        return dict(db.execute("SELECT key, value FROM meta WHERE key LIKE 'k%'").fetchall())


def _commit_all(store: Store, work_of, after_of) -> dict[int, object]:
    """MEMBERS threads each commit(work_of(i), after_of(i)); their results or exceptions by i."""
    out: dict[int, object] = {}

    def one(i: int) -> None:
        try:
            out[i] = store.commit(work_of(i), after_of(i))
        except Exception as e:
            out[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(MEMBERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def _put(i: int):
    def work(db: sqlite3.Connection) -> int:
        db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", (f"k{i}", str(i)))
        return i
    return work


def test_concurrent_commits_share_one_group_and_are_applied_only_once_committed(tmp_path):
    store = Store(str(tmp_path))
    sizes: list[int] = []
    _gathering(store, MEMBERS, sizes)
    seen_at_apply: dict[int, dict[str, str]] = {}

    def after_of(i: int):
        def after(result: int) -> None:
            seen_at_apply[i] = _rows(store)         # applied in memory only once the COMMIT is durable
        return after

    try:
        out = _commit_all(store, _put, after_of)
    finally:
        store.close()
    assert sizes == [MEMBERS], sizes                # one transaction for all four
    assert out == {i: i for i in range(MEMBERS)}
    everything = {f"k{i}": str(i) for i in range(MEMBERS)}
    assert seen_at_apply == {i: everything for i in range(MEMBERS)}


def test_a_member_that_fails_fails_alone(tmp_path):
    store = Store(str(tmp_path))
    _gathering(store, MEMBERS, [])
    applied: list[int] = []

    def work_of(i: int):
        put = _put(i)

        def work(db: sqlite3.Connection) -> int:
            put(db)                                 # written, then undone with the rollback
            if i == 2:
                raise ValueError("member 2 is wrong")
            return i
        return work

    try:
        out = _commit_all(store, work_of, lambda i: applied.append)
        rows = _rows(store)
    finally:
        store.close()
    assert isinstance(out[2], ValueError), out
    assert {i: out[i] for i in (0, 1, 3)} == {0: 0, 1: 1, 3: 3}
    assert sorted(applied) == [0, 1, 3]
    assert rows == {"k0": "0", "k1": "1", "k3": "3"}


def test_a_failed_group_commit_fails_every_member_and_changes_nothing(tmp_path):
    store = Store(str(tmp_path))
    sizes: list[int] = []
    _gathering(store, MEMBERS, sizes)

    def failing_commit(members: int) -> None:
        sizes.append(members)
        raise sqlite3.OperationalError("disk I/O error")    # what a COMMIT that cannot write raises

    store.group_test_hook = failing_commit          # type: ignore[method-assign]
    applied: list[int] = []
    try:
        out = _commit_all(store, _put, lambda i: applied.append)
        rows = _rows(store)
    finally:
        store.close()
    assert sizes == [MEMBERS], sizes
    assert all(isinstance(e, StateError) for e in out.values()), out
    assert applied == [] and rows == {}


def test_a_later_member_sees_what_an_earlier_one_staged(tmp_path):
    """Store.staged: bmid's persist compares a record with the last one written, in this group or before."""
    store = Store(str(tmp_path))
    _gathering(store, MEMBERS, [])
    seen: dict[int, dict] = {}

    def work_of(i: int):
        def work(db: sqlite3.Connection) -> None:
            seen[i] = dict(store.staged)
            store.staged[i] = True
        return work

    try:
        out = _commit_all(store, work_of, lambda i: None)
        left = dict(store.staged)
    finally:
        store.close()
    assert all(v is None for v in out.values()), out
    assert sorted(len(s) for s in seen.values()) == list(range(MEMBERS))
    assert left == {}                               # scratch of one group only



def test_records_of_a_member_that_fails_are_not_written_with_its_group(tmp_path):
    """write_pd stages a PD's record for its group's one INSERT: a member that raises after staging one is run
    out of the group, and its record with it; the others' records are stored."""
    store = Store(str(tmp_path))
    _gathering(store, MEMBERS, [])

    def work_of(i: int):
        def work(db: sqlite3.Connection) -> int:
            store.write_pd({"pd_id": i + 1, "parent": 0, "status": "READY"})
            if i == 1:
                raise ValueError("member 1 is wrong")
            return i
        return work

    try:
        out = _commit_all(store, work_of, lambda i: None)
        stored = sorted(store.pds())
    finally:
        store.close()
    assert isinstance(out[1], ValueError), out
    assert stored == [1, 3, 4]


def _staging(store: Store):
    """Member i's work as a set_priority's: it only stages its PD's record (write_pd), no statement of its own."""
    def work_of(i: int):
        def work(db: sqlite3.Connection) -> int:
            store.write_pd({"pd_id": i + 1, "parent": 0, "status": "READY", "priority": i})
            return i
        return work
    return work_of


def _statements(store: Store) -> list[str]:
    """Every statement the store's connection runs until _untraced (the first word of each, upper case)."""
    ran: list[str] = []
    store._db.set_trace_callback(lambda sql: ran.append(sql.split(None, 1)[0].upper()))
    return ran


def _untraced(store: Store) -> None:
    store._db.set_trace_callback(None)


def test_a_group_that_only_stages_records_writes_them_in_one_statement(tmp_path):
    """set_priority from 8 clients: each member only stages its PD's record, and the group writes them in one
    INSERT that is its own transaction -- no BEGIN IMMEDIATE and COMMIT around it, each of which let go of the
    GIL and waited to get it back from the busy client threads.  All are stored before any after() runs."""
    store = Store(str(tmp_path))
    sizes: list[int] = []
    _gathering(store, MEMBERS, sizes)
    ran = _statements(store)
    seen_at_apply: dict[int, list[int]] = {}

    def after_of(i: int):
        def after(result: int) -> None:
            with closing(sqlite3.connect(store.path)) as db:    # what another connection (or a restart) sees
                seen_at_apply[i] = [row[0] for row in db.execute("SELECT pd_id FROM pds ORDER BY pd_id")]
        return after

    try:
        out = _commit_all(store, _staging(store), after_of)
        _untraced(store)
        stored = store.pds()
    finally:
        store.close()
    assert sizes == [MEMBERS], sizes
    assert out == {i: i for i in range(MEMBERS)}
    assert ran == ["INSERT"], ran
    assert seen_at_apply == {i: [1, 2, 3, 4] for i in range(MEMBERS)}
    assert {pd_id: record["priority"] for pd_id, record in stored.items()} == {i + 1: i for i in range(MEMBERS)}


def test_a_group_whose_members_run_statements_is_still_one_transaction(tmp_path):
    """A member that runs a statement of its own (an event, the end of an intent) opens the transaction first:
    its statement and the group's records are committed together, or not at all."""
    store = Store(str(tmp_path))
    _gathering(store, 2, [])
    ran = _statements(store)

    def work_of(i: int):
        return _put(i) if i == 0 else _staging(store)(i)

    def one(i: int, out: dict) -> None:
        out[i] = store.commit(work_of(i))

    out: dict[int, object] = {}
    threads = [threading.Thread(target=one, args=(i, out)) for i in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        _untraced(store)
        rows, stored = _rows(store), sorted(store.pds())
    finally:
        store.close()
    assert out == {0: 0, 1: 1}
    assert ran == ["BEGIN", "INSERT", "INSERT", "COMMIT"], ran
    assert rows == {"k0": "0"} and stored == [2]


def test_a_failed_group_commit_of_records_only_fails_every_member_and_stores_none(tmp_path):
    """The one-statement group fails as a whole too: every member gets the StateError, no after() runs, no
    record is stored."""
    store = Store(str(tmp_path))
    _gathering(store, MEMBERS, [])
    real_execute = store._db

    class Failing:
        """The store's connection, whose INSERT of the records fails as a write to a broken disk does."""

        in_transaction = property(lambda self: real_execute.in_transaction)

        def execute(self, sql: str, *args):
            if sql.startswith("INSERT OR REPLACE INTO pds"):
                raise sqlite3.OperationalError("disk I/O error")
            return real_execute.execute(sql, *args)

    applied: list[int] = []
    store._db = Failing()                           # type: ignore[assignment]
    try:
        out = _commit_all(store, _staging(store), lambda i: applied.append)
    finally:
        store._db = real_execute
    try:
        stored = store.pds()
    finally:
        store.close()
    assert all(isinstance(e, StateError) for e in out.values()), out
    assert applied == [] and stored == {}


def test_waves_of_commits_hand_the_lead_on_and_all_finish(tmp_path):
    """More commits than one group takes: what queues while a group commits is led by one of its own members
    once that group is done (none waits for a group that never comes), and groups hold more than one."""
    store = Store(str(tmp_path))
    sizes: list[int] = []
    store.group_test_hook = sizes.append            # type: ignore[method-assign]
    threads_, each = 8, 25
    failed: list[BaseException] = []

    def one(t: int) -> None:
        try:
            for n in range(each):
                store.commit(_put(t * each + n))
        except BaseException as e:
            failed.append(e)

    threads = [threading.Thread(target=one, args=(t,)) for t in range(threads_)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in threads), "a commit never finished"
        rows = _rows(store)
    finally:
        store.close()
    assert failed == []
    assert len(rows) == threads_ * each and sum(sizes) == threads_ * each
    assert max(sizes) > 1, sizes


def test_commit_all_applies_nothing_before_the_sync_and_everything_after(tmp_path):
    """commit_all (bmid's client loop) commits without waiting for the WAL's sync: committed() counts the
    transaction, durable() does not yet, and no after() has run; committed() runs at once (bmid's record
    cache follows the database).  Once the WAL is flushed and made_durable() told, the after()s run, in
    order."""
    store = Store(str(tmp_path))
    seen: list[str] = []
    try:
        before = store.durable()
        commit = store.commit_all([(_put(i), lambda r, i=i: seen.append(f"after {i}"),
                                    lambda r, i=i: seen.append(f"committed {i}")) for i in range(3)])
        assert commit.errors() == [None, None, None]
        assert seen == ["committed 0", "committed 1", "committed 2"]
        assert store.committed() == commit.seq > store.durable() == before
        store.flush()
        store.made_durable(commit.seq)
        assert seen[3:] == ["after 0", "after 1", "after 2"]
        assert store.durable() == commit.seq
        store.commit(_put(9))                       # commit() itself returns durable
        assert store.durable() == store.committed()
    finally:
        store.close()


def test_a_sync_that_failed_breaks_the_store_for_good(tmp_path):
    """Linux reports a lost write to one fsync only: after a failed sync nothing written since can be trusted,
    so every later commit, transaction and after() is refused with the failure."""
    store = Store(str(tmp_path))
    try:
        commit = store.commit_all([(_put(1), lambda r: None, None)])
        failure = store.flush_failed(OSError(5, "Input/output error"))
        assert isinstance(failure, StateError) and "sync" in str(failure), failure
        for attempt in (lambda: store.made_durable(commit.seq), lambda: store.commit(_put(2)), store.sync):
            try:
                attempt()
            except StateError as e:
                assert "Input/output error" in str(e)
            else:
                raise AssertionError("the broken store took it")
        try:
            with store.tx() as db:
                db.execute("INSERT INTO meta(key, value) VALUES('k3', '3')")
        except StateError:
            pass
        else:
            raise AssertionError("the broken store took a transaction")
    finally:
        store.close()
