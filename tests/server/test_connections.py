"""Connections between PDs, destroyed ids and the PDs' own channel calls across bmid restarts (SIGKILL and SIGTERM).

The PDs are the C channel client (tests/images/chanpeer.c); each is killed
or stopped while both PDs sleep (calls in flight: test_inflight.py), and the
PDs' later calls wait in the kept channel until the new bmid answers them.
"""
from __future__ import annotations

import os
import socket
import sqlite3
import time
from contextlib import closing

import pytest

import bmi
from bmi.channel.connections import lines
from bmi.server.connections import KeptConnections
from bmi.server.keeper import Keeper
from bmi.store import Store
from bmi.system import SystemController
from tests.channel.progs import build, run_pd, wait_console
from tests.server.bmid import Bmid, running_bmid

IPC_RW = [bmi.ConnectionPolicy(bmi.ConnectionType.IPC, bmi.RW)]
IDLE = "2500"           # ms a PD sleeps while the test restarts bmid


@pytest.fixture
def daemon(tmp_path):
    with running_bmid(tmp_path) as d:
        yield d
    assert _stored_connections(d) == [], "connections stay recorded after every PD was destroyed"


def _restart(d: Bmid, how: str) -> None:
    d.kill() if how == "kill" else d.stop()
    d.start()


def _stored_connections(d: Bmid) -> list[tuple]:
    with closing(sqlite3.connect(os.path.join(d.state_dir, "bmid.sqlite3"))) as db:
        return db.execute("SELECT conn_id, source, dest FROM conns ORDER BY conn_id").fetchall()


def _connections(pd: bmi.PDController) -> str:
    return pd.get_runtime_param("/interfaces/connections")


def _connector(mgr, tid: int, script: str) -> bmi.PDController:
    """A chanpeer PD allowed IPC RW towards tid, running `script` (chanpeer commands)."""
    pd = mgr.allocate_pd(bmi.PDDescription(mem=32 << 20))
    pd.set_allowed_connections(tid, IPC_RW)
    pd.setup_pd(bmi.FileImage(str(build("chanpeer"))))
    pd.set_config_param("/boot/cmdline", f"chanpeer {script}")
    pd.request_status_change(bmi.PDStatus.RUNNING)
    return pd


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_an_accepted_connection_is_listed_used_and_revoked_after_a_restart(daemon, how):
    with daemon.open() as mgr:
        b = run_pd(mgr, "chanpeer", ["accept", "10000", "recv", "10000", "print", "idle", "sleep", IDLE,
                                     "send", "two", "param", "/interfaces/connections", "recv", "30000"])
        b_id = b.get_pd_id()
        a = _connector(mgr, b_id, f"connect {b_id} IPC 3 0 + send one + print idle + sleep {IDLE} + "
                                  f"recv 10000 + recv 30000")
        a_id = a.get_pd_id()
        wait_console(a, "print: idle")
        wait_console(b, "recv: one")
        wait_console(b, "print: idle")
        before = _connections(a)
        assert before.endswith(f" to {b_id} IPC RW") and "pending" not in before, before
    _restart(daemon, how)
    with daemon.open() as mgr:
        a, b = mgr.get_controller(a_id), mgr.get_controller(b_id)
        assert _connections(a) == before, "bmid forgot the connection"
        conn_id = before.split()[0]
        assert _connections(b) == f"{conn_id} from {a_id} IPC RW"
        wait_console(a, "recv: two")            # the connection carried data after the restart
        text = wait_console(b, "param: ")       # the PD's own call after the restart was answered
        assert f"param: {conn_id} from {a_id} IPC RW" in text, text
        a.set_allowed_connections(b_id, [], disable_existing=True)
        assert _connections(a) == "" and _connections(b) == ""
        wait_console(a, "recv: EOF")            # revoked: both ends see end-of-file
        wait_console(b, "recv: EOF")


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_connection_not_yet_accepted_is_accepted_after_a_restart(daemon, how):
    with daemon.open() as mgr:
        c = run_pd(mgr, "chanpeer", ["print", "idle", "sleep", IDLE, "accept", "20000", "recv", "10000",
                                     "recv", "30000"])
        c_id = c.get_pd_id()
        a = _connector(mgr, c_id, f"connect {c_id} IPC 3 0 + send early + print idle + recv 40000")
        a_id = a.get_pd_id()
        wait_console(a, "print: idle")
        wait_console(c, "print: idle")
        before = _connections(c)
        assert before.endswith(f" from {a_id} IPC RW pending"), before
    _restart(daemon, how)
    with daemon.open() as mgr:
        a, c = mgr.get_controller(a_id), mgr.get_controller(c_id)
        assert _connections(c) in (before, before.removesuffix(" pending"))
        wait_console(c, f"accept: ok peer={a_id} type=IPC mode=3")
        wait_console(c, "recv: early")          # sent before the restart, kept in the pending end
        assert _connections(c) == before.removesuffix(" pending")
        c.destroy()                             # destroy after a restart still cuts
        wait_console(a, "recv: EOF")
        assert _connections(a) == ""


def test_ids_of_cut_connections_and_destroyed_pds_stay_taken_after_a_restart(daemon):
    with daemon.open() as mgr:
        b = run_pd(mgr, "chanpeer", ["accept", "10000", "sleep", IDLE, "accept", "30000", "recv", "30000"])
        b_id = b.get_pd_id()
        a = _connector(mgr, b_id, f"connect {b_id} IPC 3 0 + recv 10000 + sleep {IDLE} + "
                                  f"connect {b_id} IPC 3 0 + recv 30000")
        a_id = a.get_pd_id()
        wait_console(b, "accept: ok")
        first = int(_connections(a).split()[0])
        a.set_allowed_connections(b_id, [], disable_existing=True)
        wait_console(a, "recv: EOF")
        a.set_allowed_connections(b_id, IPC_RW)
        gone = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20)).get_pd_id()
        mgr.get_controller(gone).destroy()
        said = _lookup(mgr, gone)
        assert said == ("it was destroyed", "DESTROYED")
        assert _lookup(mgr, gone + 1000) == ("no PD has that id", "")
    daemon.kill()
    daemon.start()
    with daemon.open() as mgr:
        assert _lookup(mgr, gone) == said, "after a restart bmid no longer knows the PD was destroyed"
        assert _lookup(mgr, gone + 1000) == ("no PD has that id", "")
        a = mgr.get_controller(a_id)
        deadline = time.monotonic() + 15
        while not _connections(a) and time.monotonic() < deadline:     # A connects again after its sleep
            time.sleep(0.05)
        second = int(_connections(a).split()[0])
        assert second > first, f"connection id {first} given again after a restart"


def _lookup(mgr, pd_id: int) -> tuple[str, str]:
    """Why get_controller(pd_id) fails, and the status a controller of that id reports ("" if none)."""
    with pytest.raises(bmi.NoSuchDomain) as e:
        mgr.get_controller(pd_id)
    why = str(e.value).rpartition("(")[2].rstrip(")")
    try:
        status = SystemController(mgr, pd_id).get_current_status().name   # a controller kept from before
    except bmi.NoSuchDomain:
        status = ""
    return why, status


# -- the reconciliation on its own: a real store and a real fd keeper, states a SIGKILL can leave ---------
@pytest.fixture
def kept(tmp_path):
    """(store, keeper, make_registry) on a private state dir; the keeper ends holding nothing."""
    store = Store(str(tmp_path))
    keeper = Keeper(os.path.join(str(tmp_path), "keeper.sock"))
    made: list[KeptConnections] = []

    def make_registry() -> KeptConnections:
        made.append(KeptConnections(store, keeper, lambda pd_id: None))
        return made[-1]

    yield store, keeper, make_registry
    for registry in made:               # the socket maker each started (a registry "killed" is not closed)
        registry.sockets.close()
    keeper.drop("")
    keeper.close()
    store.close()


def _die(conn) -> None:
    """What a SIGKILL of bmid does to its own copies of a connection's fds: closed, not shut."""
    for s in conn.held:
        s.close()
    os.close(conn.pending_fd)


def test_restore_cuts_a_connection_kept_but_never_recorded(kept):
    """SIGKILL after the keeper took the fds, before the row: nobody was answered; restore cuts it."""
    store, keeper, registry = kept
    conn, src_fd = registry().make(1, 2, bmi.ConnectionType.IPC, bmi.RW)
    src = socket.socket(fileno=src_fd)
    store.delete_connection(conn.conn_id)       # the row never made it
    _die(conn)
    after = registry()
    after.restore({1, 2}, {1, 2})
    assert after.live(1) == []
    src.settimeout(5)
    assert src.recv(16) == b""                  # cut: EOF at once, though its peer end was kept
    assert not [k for k in keeper.keys() if k.startswith("conn")]
    src.close()
    again, fd = after.make(1, 2, bmi.ConnectionType.IPC, bmi.RW)
    assert again.conn_id > conn.conn_id
    os.close(fd)
    after.cut()


def test_restore_forgets_a_recorded_connection_whose_fds_are_gone(kept):
    """SIGKILL after a cut dropped the kept fds, before the row went: the cut is finished at restore."""
    store, keeper, registry = kept
    before = registry()
    conn, src_fd = before.make(1, 2, bmi.ConnectionType.STREAM, bmi.RW)
    os.close(src_fd)
    before._shut(conn)
    os.close(conn.pending_fd)
    keeper.drop(f"conn{conn.conn_id}.")
    after = registry()
    after.restore({1, 2}, {1, 2})
    assert after.live(1) == [] and store.connections() == []


def test_restore_keeps_a_pending_end_and_ends_what_a_stopped_pd_had(kept):
    """Both recorded: the pending end is queued again; a PD that stopped while bmid was down loses its own."""
    store, keeper, registry = kept
    before = registry()
    queued, src_fd = before.make(1, 2, bmi.ConnectionType.IPC, bmi.RW)
    src = socket.socket(fileno=src_fd)
    shm, shm_fd = before.make(3, 2, bmi.ConnectionType.SHM, bmi.READ, 4096)
    os.close(shm_fd)
    for c in (queued, shm):             # bmid dies
        _die(c)
    after = registry()
    after.restore({1, 2, 3}, {1, 2})           # PD 3 ended while bmid was down
    assert lines(after.live(2), 2) == (f"{queued.conn_id} from 1 IPC RW pending\n"
                                       f"{shm.conn_id} from 3 SHM READ 4096 pending")
    got, fd = after.take(2)
    assert got.conn_id == queued.conn_id
    with socket.socket(fileno=fd) as dst:
        src.sendall(b"hi")
        assert dst.recv(16) == b"hi"
        after.cut(pd_id=1)
        src.settimeout(5)
        assert src.recv(16) == b"" and dst.recv(16) == b""
    src.close()
    assert [c["conn"] for c in store.connections()] == [shm.conn_id]
    after.cut()
    assert store.connections() == [] and not [k for k in keeper.keys() if k.startswith("conn")]
