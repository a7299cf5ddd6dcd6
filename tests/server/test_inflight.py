"""Channel calls bmid had taken but not answered when it was SIGKILLed: resumed, or answered with an error.

Without the ledger (bmi/server/inflight.py) a PD blocked in accept, or
waiting for any reply, would wait forever once the bmid that read its
request was gone.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import closing

import bmi
from tests.channel.progs import build, run_pd, wait_console
from tests.helpers import busybox_path
from tests.server.bmid import Bmid

IPC_RW = [bmi.ConnectionPolicy(bmi.ConnectionType.IPC, bmi.RW)]


def _owed(d: Bmid) -> list[tuple[int, str]]:
    """(PD, method) of every reply the ledger says is owed."""
    with closing(sqlite3.connect(os.path.join(d.state_dir, "inflight.sqlite3"))) as db:
        return sorted(db.execute("SELECT pd_id, method FROM pending").fetchall())


def _begun(d: Bmid) -> list[tuple[int, str]]:
    """(PD, method) of every change bmid's store has begun and not yet committed."""
    with closing(sqlite3.connect(f"file:{os.path.join(d.state_dir, 'bmid.sqlite3')}?mode=ro", uri=True)) as db:
        return sorted(db.execute("SELECT pd_id, method FROM ops").fetchall())


def _until(check, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_an_accept_waiting_when_bmid_dies_gets_the_next_connection(daemon):
    with daemon.open() as mgr:
        server = run_pd(mgr, "chanpeer", ["print", "waiting", "accept", "60000", "recv", "20000"])
        server_id = server.get_pd_id()
        wait_console(server, "print: waiting")
        _until(lambda: _owed(daemon) == [(server_id, "accept")])
    daemon.kill()
    daemon.start()
    with daemon.open() as mgr:
        client = mgr.allocate_pd(bmi.PDDescription(mem=32 << 20))
        client.set_allowed_connections(server_id, IPC_RW)
        client.setup_pd(bmi.FileImage(str(build("chanpeer"))))
        client.set_config_param("/boot/cmdline", f"chanpeer connect {server_id} IPC 3 0 + send after-restart")
        client.request_status_change(bmi.PDStatus.RUNNING)
        server = mgr.get_controller(server_id)
        wait_console(server, f"accept: ok peer={client.get_pd_id()} type=IPC mode=3")
        wait_console(server, "recv: after-restart")
        _until(lambda: _owed(daemon) == [])


def test_a_change_cut_off_by_the_kill_is_answered_with_an_error_and_finished(daemon):
    with daemon.open() as mgr:
        parent = run_pd(mgr, "chanpeer", ["call", "allocate_pd", json.dumps({"mem": 16 << 20}),
                                          "wait", "/go", "yes", "60000"], mem=64 << 20, start=False)
        child_id = parent.get_pd_id() + 1           # the parent's first child (nothing else allocates)
        stop = json.dumps({"pd": child_id, "status": "SHUTDOWN"})
        parent.set_config_param("/boot/cmdline", parent.get_config_param("/boot/cmdline")
                                + f" + call request_status_change '{stop}' + print after + sleep 60000")
        parent.request_status_change(bmi.PDStatus.RUNNING)
        wait_console(parent, f"call: ok {child_id}")
        child = mgr.get_controller(child_id)
        child.setup_pd(bmi.FileImage(busybox_path()))
        child.set_config_param("/boot/cmdline", "busybox sh -c 'trap \"\" TERM; while :; do busybox sleep 1; done'")
        child.request_status_change(bmi.PDStatus.RUNNING)
        parent.set_config_param("/go", "yes")       # the parent asks for SHUTDOWN; the child ignores SIGTERM,
        _until(lambda: (parent.get_pd_id(), "request_status_change") in _owed(daemon))   # so it takes 2 s
        # the kill must come after the change began (else nothing was begun to finish: RUNNING is right)
        _until(lambda: (child_id, "request_status_change") in _begun(daemon))
    daemon.kill()
    daemon.start()
    with daemon.open() as mgr:
        parent = mgr.get_controller(parent.get_pd_id())
        wait_console(parent, "call: error")
        assert "cut off by a restart of bmid" in parent.get_runtime_param("/console/log")
        wait_console(parent, "print: after")        # and its later calls work
        assert mgr.get_controller(child_id).get_current_status() is bmi.PDStatus.SHUTDOWN    # finished
        _until(lambda: _owed(daemon) == [])
