"""bmid's state under attack by circumstance: SIGKILLs at exact windows, a full disk, damaged or read-only files.

Each test reproduces one way an acknowledged change, an exit status or a
clear refusal used to be lost (issue: no acknowledged change lost, no exit
misreported, every bad state refused in one clear line).
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import threading
import time
from contextlib import closing

import pytest

import bmi
from bmi.store import RESERVE_FILE
from tests.channel.progs import run_pd
from tests.server.bmid import Bmid, require_root
from tests.server.conftest import SmallFs
from tests.server.test_bmid import TICKER, _records, _run, _running

BIG = "x" * (30 << 10)
TERM_EXITS_7 = "trap \"exit 7\" TERM; while :; do busybox sleep 0.1; done"


@contextlib.contextmanager
def _bmid(directory, fs: SmallFs | None = None, **kw):
    """A Bmid whose PDs are all destroyed at the end, whatever state the test left it (or its fs) in."""
    require_root()
    d = Bmid(str(directory), **kw)
    try:
        yield d
    finally:
        d.kill()
        d.env.clear()
        if fs is not None:
            fs.free()
        with contextlib.suppress(Exception):
            d.start()
        d.close()


def _pid(d: Bmid, pd_id: int) -> int:
    return _records(d)[pd_id]["run"]["pid"]


def _spend_reserve(d: Bmid) -> None:
    """As if an earlier commit had spent bmid's reserve on the state filesystem."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(d.state_dir, RESERVE_FILE))


def _full_from(d: Bmid, fs: SmallFs, point: str) -> None:
    """With bmid paused at `point`: no reserve left and the state filesystem full; then let it go on."""
    _spend_reserve(d)
    fs.fill()
    d.resume(point)


def _restart_after_fail_stop(d: Bmid, fs: SmallFs) -> None:
    """bmid stopped with FAIL_STOP (75) rather than keep what it could not store: free space, start it again."""
    assert d.proc.wait(10) == 75
    d.proc.stderr.close()
    d.proc = None
    fs.free()
    d.env.clear()
    d.start()


def _db_bytes(d: Bmid) -> bytes:
    with open(os.path.join(d.state_dir, "bmid.sqlite3"), "rb") as f:
        return f.read()


# -- (1) a shutdown in progress ---------------------------------------------------------------------
def test_a_shutdown_cut_off_by_a_kill_is_shutdown_with_its_exit_status(tmp_path):
    """SHUTDOWN asked, the PD's init exits 7, bmid dies after reading the exit record and before storing it."""
    with _bmid(tmp_path) as d:
        d.start()
        with d.open() as mgr:
            pd_id = _run(mgr, TERM_EXITS_7).get_pd_id()
            time.sleep(0.3)
        d.kill()
        d.env["BMID_TEST_PAUSE"] = "exit commit:request_status_change"
        d.start()
        mgr = d.open()

        def shut_down() -> None:
            with contextlib.suppress(bmi.BMIError):
                mgr.get_controller(pd_id).request_status_change(bmi.PDStatus.SHUTDOWN)

        asked = threading.Thread(target=shut_down)
        asked.start()
        d.wait_paused("exit")
        d.wait_paused("commit:request_status_change")
        d.kill()
        asked.join()
        mgr.close()
        d.env.clear()
        d.start()
        with d.open() as mgr:
            pd = mgr.get_controller(pd_id)
            assert pd.get_current_status() is bmi.PDStatus.SHUTDOWN, pd.get_runtime_param("/system/exit-reason")
            assert pd.get_runtime_param("/system/exit-status") == "7"
            assert pd.get_runtime_param("/system/exit-reason").startswith("shutdown requested")


# -- (2) a full disk ---------------------------------------------------------------------------------
def test_a_full_disk_never_loses_an_acknowledged_change(tmp_path, state_fs: SmallFs):
    """Every set_config_param is either acknowledged and kept through a SIGKILL, or refused as `full` and not
    visible; after space is freed the same call is stored."""
    with _bmid(state_fs.path, state_fs, socket_dir=str(tmp_path)) as d:
        d.start()
        with d.open() as mgr:
            pd = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
            pd.set_config_param("/big", "before")
            state_fs.fill()
            stored, refused = "before", None
            for i in range(200):
                value = f"{i}:{BIG}"
                try:
                    pd.set_config_param("/big", value)
                except bmi.ResourceError as e:
                    assert "full" in str(e), e
                    refused = value
                    break
                stored = value
            assert refused is not None, "a full state filesystem never refused a change"
            assert pd.get_config_param("/big") == stored        # not the refused value
            with pytest.raises(bmi.ResourceError, match="full"):
                pd.set_priority(3)
            assert pd.get_priority() == 0
        d.kill()
        state_fs.free()
        d.start()
        with d.open() as mgr:
            pd = mgr.get_controller(pd.get_pd_id())
            assert pd.get_config_param("/big") == stored
            pd.set_config_param("/big", refused)                # the identical call, now with room: stored
        d.kill()
        d.start()
        with d.open() as mgr:
            assert mgr.get_controller(pd.get_pd_id()).get_config_param("/big") == refused


def test_a_change_made_that_cannot_be_stored_stops_bmid_and_is_rolled_back(tmp_path, state_fs: SmallFs):
    """The intent stored, the change made, then the disk fills and there is no reserve left: bmid stops
    (exit 75) rather than keep in memory what it could not store, and the next start rolls the change back."""
    with _bmid(state_fs.path, state_fs, socket_dir=str(tmp_path)) as d:
        d.start()
        with d.open() as mgr:
            pd_id = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20)).get_pd_id()
            mgr.get_controller(pd_id).set_config_param("/big", "before")
        d.kill()
        d.env["BMID_TEST_PAUSE"] = "commit:set_config_param"
        d.start()
        mgr = d.open()
        failed: list[BaseException] = []

        def change() -> None:
            try:
                mgr.get_controller(pd_id).set_config_param("/big", BIG)
            except bmi.BMIError as e:
                failed.append(e)

        asked = threading.Thread(target=change)
        asked.start()
        d.wait_paused("commit:set_config_param")            # the change is made, not yet stored
        _full_from(d, state_fs, "commit:set_config_param")
        asked.join(30)
        mgr.close()
        assert failed and isinstance(failed[0], bmi.ResourceError), failed   # never acknowledged
        _restart_after_fail_stop(d, state_fs)
        with d.open() as mgr:
            assert mgr.get_controller(pd_id).get_config_param("/big") == "before"


def test_a_failed_group_commit_refuses_every_member_and_stores_none(tmp_path, state_fs: SmallFs):
    """Four changes by four clients, each on its own PD, share one commit group (group commit); the disk fills
    and the reserve is gone before its COMMIT: every one of the four is refused (bmid stops, exit 75, rather
    than keep what it could not store), and after a restart none of the four is there."""
    members = 4
    with _bmid(state_fs.path, state_fs, socket_dir=str(tmp_path)) as d:
        d.start()
        with d.open() as mgr:
            pd_ids = [mgr.allocate_pd(bmi.PDDescription(mem=16 << 20)).get_pd_id() for _ in range(members)]
            for pd_id in pd_ids:
                mgr.get_controller(pd_id).set_config_param("/big", "before")
        d.kill()
        d.env["BMID_TEST_PAUSE"] = "group"
        d.start()
        open(os.path.join(d.state_dir, f"gather-{members}"), "w").close()
        clients = [d.open() for _ in range(members)]
        failed: dict[int, BaseException] = {}

        def change(mgr: bmi.PDManagement, pd_id: int) -> None:
            try:
                mgr.get_controller(pd_id).set_config_param("/big", BIG)
            except bmi.BMIError as e:
                failed[pd_id] = e

        asked = [threading.Thread(target=change, args=(c, pd_id)) for c, pd_id in zip(clients, pd_ids)]
        for t in asked:
            t.start()
        d.wait_paused(f"group-of-{members}")                # all four in one transaction, not yet committed
        _full_from(d, state_fs, f"group-of-{members}")
        for t in asked:
            t.join(30)
        for c in clients:
            c.close()
        assert sorted(failed) == sorted(pd_ids), failed     # none acknowledged
        assert all(isinstance(e, bmi.ResourceError) for e in failed.values()), failed
        _restart_after_fail_stop(d, state_fs)
        with d.open() as mgr:
            assert [mgr.get_controller(i).get_config_param("/big") for i in pd_ids] == ["before"] * members


def test_an_exit_while_the_disk_is_full_is_stored_once_there_is_room(tmp_path, state_fs: SmallFs):
    with _bmid(state_fs.path, state_fs, socket_dir=str(tmp_path)) as d:
        d.start()
        with d.open() as mgr:
            pd = _run(mgr, TERM_EXITS_7)
            _spend_reserve(d)
            state_fs.fill()
            pid = _pid(d, pd.get_pd_id())
            os.kill(pid, 15)
            assert pd.wait(10) is bmi.PDStatus.SHUTDOWN
            time.sleep(0.5)
            state_fs.free()
            deadline = time.monotonic() + 10
            while _records(d)[pd.get_pd_id()]["status"] != "SHUTDOWN":
                assert time.monotonic() < deadline, "the exit was never stored"
                time.sleep(0.1)
        d.kill()
        d.start()
        with d.open() as mgr:
            assert mgr.get_controller(pd.get_pd_id()).get_runtime_param("/system/exit-status") == "7"


# -- (3) an exit status and a failed restart ---------------------------------------------------------
def test_an_exit_status_survives_a_restart_that_dies_before_storing_it(tmp_path, state_fs: SmallFs):
    with _bmid(state_fs.path, state_fs, socket_dir=str(tmp_path)) as d:
        d.start()
        with d.open() as mgr:
            pd_id = _run(mgr, "busybox sleep 0.5; exit 7").get_pd_id()
        d.kill()
        time.sleep(1.5)                                     # the PD exits 7 while bmid is down
        _spend_reserve(d)
        state_fs.fill()
        line = d.refused()                                  # full at start: refused before any adoption
        assert "full" in line and d.state_dir in line, line
        state_fs.free()
        d.env["BMID_TEST_PAUSE"] = "restore"
        d.start(ready=False)
        d.wait_paused("restore")                            # adopted, not yet stored: dies here
        d.kill()
        d.env.clear()
        d.start()
        with d.open() as mgr:
            pd = mgr.get_controller(pd_id)
            assert pd.get_current_status() is bmi.PDStatus.SHUTDOWN
            assert pd.get_runtime_param("/system/exit-status") == "7"


# -- (4) damaged or unusable state ---------------------------------------------------------------------
def _with_a_running_pd(d: Bmid) -> tuple[int, int]:
    d.start()
    with d.open() as mgr:
        pd = _run(mgr, TICKER)
        pd.set_config_param("/name", "ticker")
        for i in range(200):                                # pages beyond the header to damage
            pd.set_config_param(f"/pad/{i}", "y" * 500)
    pd_id = pd.get_pd_id()
    pid = _pid(d, pd_id)
    d.kill()
    for name in ("bmid.sqlite3", "inflight.sqlite3"):       # everything in the files to damage, not in -wal
        with closing(sqlite3.connect(os.path.join(d.state_dir, name))) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return pd_id, pid


def test_a_database_damaged_behind_its_header_is_refused_and_left_as_it_is(tmp_path):
    with _bmid(tmp_path) as d:
        pd_id, pid = _with_a_running_pd(d)
        path = os.path.join(d.state_dir, "bmid.sqlite3")
        backup = _db_bytes(d)
        with open(path, "r+b") as f:
            size = f.seek(0, 2)
            for offset in range(4096, size, 4096):          # page 1 (the header) intact, every other damaged
                f.seek(offset + 100)
                f.write(os.urandom(200))
        damaged = _db_bytes(d)
        for _ in range(2):                                  # every start refuses
            line = d.refused()
            assert "corrupt" in line and path in line and "restore it from a backup" in line, line
            assert d.exit_status == 78                      # systemd: RestartPreventExitStatus=78
        assert _db_bytes(d) == damaged, "bmid changed the damaged database"
        assert _running(pid), "a refusing bmid touched the PD"
        os.unlink(path)                 # removed: still no empty start while the PD's keeper and cgroups remain
        line = d.refused()
        assert "missing or empty" in line and "remain" in line, line
        assert _running(pid)
        for suffix in ("-wal", "-shm"):                     # the operator restores the backup
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path + suffix)
        with open(path, "wb") as f:
            f.write(backup)
        d.start()
        with d.open() as mgr:
            pd = mgr.get_controller(pd_id)
            assert pd.get_current_status() is bmi.PDStatus.RUNNING
            assert pd.get_config_param("/name") == "ticker"


def test_a_damaged_ledger_is_refused(tmp_path):
    with _bmid(tmp_path) as d:
        pd_id, pid = _with_a_running_pd(d)
        path = os.path.join(d.state_dir, "inflight.sqlite3")
        with open(path, "r+b") as f:
            f.write(b"this is not SQLite" * 10)
        line = d.refused()
        assert "in-flight ledger" in line and "corrupt" in line and "remove it" in line, line
        assert _running(pid)
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path + suffix)
        d.start()
        with d.open() as mgr:
            assert mgr.get_controller(pd_id).get_current_status() is bmi.PDStatus.RUNNING


def test_a_read_only_state_directory_is_refused(tmp_path):
    with _bmid(tmp_path) as d:
        pd_id, pid = _with_a_running_pd(d)
        subprocess.run(["mount", "--bind", d.state_dir, d.state_dir], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", d.state_dir], check=True)
            line = d.refused()
            assert "read-only" in line and d.state_dir in line, line
            assert _running(pid)
        finally:
            subprocess.run(["umount", d.state_dir], check=True)
        d.start()
        with d.open() as mgr:
            assert mgr.get_controller(pd_id).get_current_status() is bmi.PDStatus.RUNNING


# -- (5) a client that outlives a restart ----------------------------------------------------------------
def test_a_client_and_its_controllers_outlive_a_restart_of_bmid(daemon):
    with daemon.open() as mgr:
        pd = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
        pd.set_config_param("/name", "kept")
        stream = mgr.events(timeout=30)
        daemon.kill()
        with pytest.raises(bmi.ResourceError):
            mgr.list_pd()                               # bmid is down: an error, not a stale board
        with pytest.raises(bmi.ResourceError, match=r"events\(since="):
            next(stream)                                # not a silent end of the iteration
        last = stream.last
        stream.close()
        daemon.start()
        assert mgr.list_pd() == [0, pd.get_pd_id()]    # the same client, connected again
        assert pd.get_config_param("/name") == "kept"  # and a controller made before the restart
        pd.set_priority(2)
        assert pd.get_priority() == 2
        with mgr.events(since=last, timeout=5) as resumed:
            other = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
            event = next(resumed)
        assert (event.pd_id, event.status) == (other.get_pd_id(), bmi.PDStatus.ALLOCATED)


# -- (6) events ----------------------------------------------------------------------------------------------
def test_restarts_and_changes_found_at_adoption_are_events_with_the_pds_name(daemon):
    with daemon.open() as mgr:
        pd = _run(mgr, TICKER)
        pd.set_config_param("/name", "web")
        with mgr.events(timeout=15) as stream:
            pd.request_status_change(bmi.PDStatus.RESTARTING)
            got = [next(stream) for _ in range(2)]
        assert [(e.pd_id, e.status, e.name) for e in got] == [
            (pd.get_pd_id(), bmi.PDStatus.RESTARTING, "web"), (pd.get_pd_id(), bmi.PDStatus.RUNNING, "web")]
        brief = _run(mgr, "busybox sleep 0.5; exit 3")
        brief.set_config_param("/name", "brief")
        with mgr.events() as now:
            last = now.last
    daemon.kill()
    time.sleep(1.5)                                     # brief ends while bmid is down
    daemon.start()
    with daemon.open() as mgr:
        seen = [(e.pd_id, e.status, e.name) for e in mgr.events(since=last, timeout=1)]
    assert (brief.get_pd_id(), bmi.PDStatus.SHUTDOWN, "brief") in seen, seen


def test_a_destroy_stores_the_pds_it_changed_and_only_those(daemon):
    """A destroy stores its reach (the PD, its parent, the PDs with a policy toward it), not every PD: after a
    kill -9 the parent has the memory of its destroyed child back, the policies toward the destroyed PD are
    gone from the PDs that had them, and a PD it did not reach is as it was."""
    ipc = [bmi.ConnectionPolicy(bmi.ConnectionType.IPC, bmi.RW)]
    with daemon.open() as mgr:
        parent = run_pd(mgr, "chanpeer", ["child", str(8 << 20), "+", "sleep", "30000"], mem=32 << 20)
        deadline = time.monotonic() + 15
        while len(mgr.list_pd()) < 3 and time.monotonic() < deadline:     # 0, the parent, its child
            time.sleep(0.02)
        [child_id] = [i for i in mgr.list_pd() if i not in (0, parent.get_pd_id())]
        assert parent.get_runtime_param("/system/memory/current") == str(24 << 20)
        a, b, c, d = (mgr.allocate_pd(bmi.PDDescription(mem=16 << 20)) for _ in range(4))
        a.set_allowed_connections(b.get_pd_id(), ipc)
        c.set_allowed_connections(b.get_pd_id(), ipc)
        c.set_allowed_connections(d.get_pd_id(), ipc)
        b.destroy()
        mgr.get_controller(child_id).destroy()
        ids = [pd.get_pd_id() for pd in (a, c, d)]
    daemon.kill()
    stored = _records(daemon)
    daemon.start()
    assert b.get_pd_id() not in stored and child_id not in stored
    assert stored[parent.get_pd_id()]["lent"] == 0
    assert stored[ids[0]]["policies"] == {}
    assert list(stored[ids[1]]["policies"]) == [str(ids[2])]
    with daemon.open() as mgr:
        assert mgr.get_controller(parent.get_pd_id()).get_runtime_param("/system/memory/current") == str(32 << 20)
        assert mgr.get_controller(ids[1]).get_allowed_connections(ids[2]) == ipc
        for pd_id in [parent.get_pd_id(), *ids]:
            mgr.get_controller(pd_id).destroy()
