"""bmid's client loop (bmi/server/clients.py): one thread runs the quick calls of every client and commits
them in groups; a call that can block runs in a thread of its own.  Through a real bmid, with raw client
sockets where a well-behaved client (bmi.open) cannot misbehave as the test needs."""
from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import sys
import threading
import time

import pytest

import bmi
from bmi.channel import protocol as p
from tests.server.bmid import Bmid, require_root, running_bmid
from tests.server.test_bmid import _run, public_dir  # noqa: F401 (a fixture)

WAIT = 3.0          # s: how long the slow call (wait on a running PD) blocks


def _connect(d) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.connect(d.socket)
    return sock


def _ask(sock: socket.socket, msg_id: int, method: str, **params) -> None:
    p.send(sock, {"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})


def _answer(sock: socket.socket, timeout: float = 10.0) -> dict:
    assert select.select([sock], [], [], timeout)[0], "no reply"
    return p.decode(sock.recv(p.MAX_MESSAGE + 1))


def test_a_call_that_blocks_holds_up_no_other_client(daemon):
    """A `wait` on a running PD runs in a thread of its own: meanwhile the loop answers another client's
    changes and reads, and the wait is answered when its timeout ends."""
    with daemon.open() as mgr, _connect(daemon) as waiter:
        pd = _run(mgr, "busybox sleep 100")
        other = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
        started = time.monotonic()
        _ask(waiter, 1, "wait", pd=pd.get_pd_id(), timeout=WAIT)
        for i in range(30):
            other.set_priority(i % 5)
            assert other.get_current_status() is bmi.PDStatus.ALLOCATED
        served = time.monotonic() - started
        assert not select.select([waiter], [], [], 0)[0], "the wait was answered before its timeout"
        assert served < WAIT - 0.5, f"30 changes took {served:.2f}s while another client waited"
        reply = _answer(waiter, WAIT + 10)
        assert reply == {"jsonrpc": "2.0", "id": 1, "result": "RUNNING"}, reply
        assert time.monotonic() - started >= WAIT - 0.1
        assert other.get_priority() == 29 % 5
        pd.destroy()


def test_requests_sent_before_their_replies_run_in_order_and_are_answered_once(daemon):
    """A client that sends many requests before reading any: quick ones (set_priority, run by the loop) and
    ones that go to a thread (get_priority) alternate, and each get_priority sees the set_priority sent just
    before it; every request is answered once, in the order sent."""
    with daemon.open() as mgr, _connect(daemon) as sock:
        pd_id = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20)).get_pd_id()
        priorities = [(i * 7) % 21 - 10 for i in range(60)]
        for i, priority in enumerate(priorities):
            _ask(sock, 2 * i, "set_priority", pd=pd_id, priority=priority)
            _ask(sock, 2 * i + 1, "get_priority", pd=pd_id)
        replies = [_answer(sock) for _ in range(2 * len(priorities))]
        assert [r["id"] for r in replies] == list(range(2 * len(priorities)))
        assert [r["result"] for r in replies[1::2]] == priorities
        assert all(r == {"jsonrpc": "2.0", "id": r["id"], "result": None} for r in replies[0::2])
        assert not select.select([sock], [], [], 0.2)[0], "a request was answered twice"


def test_a_client_that_does_not_read_its_replies_holds_up_no_one(daemon):
    """A client sends requests and never reads a reply, until its socket pushes back: bmid sends no more to it
    than fits, takes no more from it, and serves the other clients as before; once it goes, all is well."""
    with daemon.open() as mgr:
        pd = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
        hog = _connect(daemon)
        hog.setblocking(False)
        sent = 0
        try:
            deadline = time.monotonic() + 10
            while sent < 20000 and time.monotonic() < deadline:
                try:
                    _ask(hog, sent, "get_version")
                    sent += 1
                except BlockingIOError:
                    time.sleep(0.01)        # bmid may still be taking some: then it stops, and so do we
                    try:
                        _ask(hog, sent, "get_version")
                        sent += 1
                    except BlockingIOError:
                        break
            started = time.monotonic()
            for i in range(50):
                pd.set_priority(i % 3)
            assert time.monotonic() - started < 5.0
            assert pd.get_priority() == 49 % 3
        finally:
            hog.close()
        time.sleep(0.2)
        assert mgr.list_pd() == [0, pd.get_pd_id()]
        with daemon.open() as again:
            assert again.get_controller(pd.get_pd_id()).get_priority() == 49 % 3


def test_every_acknowledged_change_of_many_clients_survives_a_kill(daemon):
    """Eight clients, each on its PD, change it concurrently (their changes share the loop's commits): after a
    SIGKILL of bmid and a restart, each PD has the last priority its client was told was set."""
    changes, clients = 60, 8
    with daemon.open() as mgr:
        pds = [mgr.allocate_pd(bmi.PDDescription(mem=16 << 20)) for _ in range(clients)]
        ids = [pd.get_pd_id() for pd in pds]
    failures: list[BaseException] = []
    barrier = threading.Barrier(clients)

    def client(pd_id: int, k: int) -> None:
        try:
            with daemon.open() as own:
                ctl = own.get_controller(pd_id)
                barrier.wait(10)
                for i in range(changes):
                    ctl.set_priority((i + k) % 21 - 10)
        except BaseException as e:      # noqa: BLE001 - reported below
            failures.append(e)

    threads = [threading.Thread(target=client, args=(pd_id, k)) for k, pd_id in enumerate(ids)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures
    daemon.kill()
    daemon.start()
    with daemon.open() as mgr:
        assert [mgr.get_controller(i).get_priority() for i in ids] == \
            [(changes - 1 + k) % 21 - 10 for k in range(clients)]
        for pd_id in ids:
            mgr.get_controller(pd_id).destroy()


def test_a_long_call_on_a_pd_holds_up_only_the_calls_on_that_pd(daemon):
    """A shutdown of a PD that ignores SIGTERM holds that PD for bmid's grace period (2 s in these tests).
    Meanwhile another client's quick calls on other PDs are answered at once, and its quick call on that PD
    waits for the shutdown -- in a thread of its own, not in the loop that serves everyone."""
    with daemon.open() as mgr, _connect(daemon) as stopper, _connect(daemon) as reader:
        stubborn = _run(mgr, 'trap "" TERM; while :; do busybox sleep 0.1; done')
        other = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
        time.sleep(0.3)                             # the trap is set
        started = time.monotonic()
        _ask(stopper, 1, "request_status_change", pd=stubborn.get_pd_id(), status="SHUTDOWN")
        time.sleep(0.3)                             # the shutdown holds the PD now
        _ask(reader, 2, "get_current_status", pd=stubborn.get_pd_id())
        for i in range(20):
            other.set_priority(i % 5)
            assert other.get_current_status() is bmi.PDStatus.ALLOCATED
        served = time.monotonic() - started
        assert served < 1.5, f"20 calls on another PD took {served:.2f}s behind a shutdown"
        assert not select.select([reader], [], [], 0)[0], "the status was answered in the middle of the shutdown"
        assert _answer(stopper, 30) == {"jsonrpc": "2.0", "id": 1, "result": None}
        assert _answer(reader, 30) == {"jsonrpc": "2.0", "id": 2, "result": "SHUTDOWN"}
        assert time.monotonic() - started >= 1.5


def test_clients_that_come_and_go_leave_nothing_behind(daemon):
    """Short-lived clients (a `bmi list` each) leave no connection, fd or thread in bmid once they are gone."""
    def bmid_fds() -> int:
        return len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))

    def bmid_threads() -> int:
        return len(os.listdir(f"/proc/{daemon.proc.pid}/task"))

    with daemon.open() as mgr:
        mgr.list_pd()
        fds, threads = bmid_fds(), bmid_threads()
        for _ in range(200):
            with daemon.open() as brief:
                assert brief.list_pd() == [0]
                assert brief.get_version() == mgr.get_version()
        deadline = time.monotonic() + 10       # (a thread of an earlier call may end meanwhile: not more, then)
        while (bmid_fds() > fds or bmid_threads() > threads) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert bmid_fds() <= fds and bmid_threads() <= threads, (bmid_fds(), fds, bmid_threads(), threads)


def test_requests_that_come_while_a_round_runs_share_its_commit(tmp_path):
    """Four clients, one PD each.  The first client's set_priority is held inside the loop's round (a test
    pause) while the other three send theirs; once it goes on, the loop takes the three in before it commits,
    so all four changes are stored by one commit group of 4 -- not one of 1 and then a second -- and each
    client is answered only after that group's commit."""
    with running_bmid(str(tmp_path), env={"BMID_TEST_PAUSE": "commit:set_priority group"}) as d:
        with d.open() as mgr:
            ids = [mgr.allocate_pd(bmi.PDDescription(mem=16 << 20)).get_pd_id() for _ in range(4)]
        open(os.path.join(d.state_dir, "gather-1"), "w").close()    # every group stops at group-of-<size>
        socks = [_connect(d) for _ in ids]
        try:
            _ask(socks[0], 1, "set_priority", pd=ids[0], priority=3)
            d.wait_paused("commit:set_priority")                    # the first change, made, in the loop
            for k in range(1, 4):
                _ask(socks[k], 1, "set_priority", pd=ids[k], priority=3 + k)
            d.resume("commit:set_priority")
            for _ in range(3):                                      # the three others, in the same round
                d.wait_paused("commit:set_priority", timeout=10)
                d.resume("commit:set_priority")
            d.wait_paused("group-of-4", timeout=10)
            assert not select.select(socks, [], [], 0.2)[0], "a change was answered before its commit"
            d.resume("group-of-4")
            assert [_answer(s) for s in socks] == [{"jsonrpc": "2.0", "id": 1, "result": None}] * 4
        except BaseException:
            d.kill()        # stopped inside a commit: a stop, or the destroys at the end, would wait for ever
            del d.env["BMID_TEST_PAUSE"]
            raise
        finally:
            for s in socks:
                s.close()
        os.unlink(os.path.join(d.state_dir, "gather-1"))
        with d.open() as mgr:
            assert [mgr.get_controller(i).get_priority() for i in ids] == [3, 4, 5, 6]


def _answered(sock: socket.socket) -> bool:
    """Whether bmid answered the request sent on sock (a connection bmid refused reads as closed or reset)."""
    try:
        return bool(select.select([sock], [], [], 10)[0] and sock.recv(p.MAX_MESSAGE))
    except OSError:
        return False


#: Run as nobody (in the read-only group): everything imported first, as root can read the interpreter's tree.
_HOLD_CONNECTIONS = """
import os, select, socket, sys
from bmi.channel import protocol as p
os.setgroups([]); os.setgid(65534); os.setuid(65534)
held, served = [], 0
for n in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(sys.argv[1])
    held.append(s)
for n, s in enumerate(held):
    try:
        p.send(s, {"jsonrpc": "2.0", "id": n, "method": "get_version", "params": {}})
        served += bool(select.select([s], [], [], 10)[0] and s.recv(p.MAX_MESSAGE))
    except OSError:
        continue                        # refused: bmid closed it
print(served, flush=True)
sys.stdin.readline()
"""


def test_a_flood_of_connections_leaves_bmid_serving_and_root_a_way_in(tmp_path, public_dir):
    """A member of the read-only group opens 100 connections to a bmid whose fd limit is 256: bmid serves 32
    (an eighth of its fds), closes the rest and stays up; root still gets in while they are held, and a flood
    of root's own stops at its reserve; once they are gone every client is served again.  Before, such a flood
    ran bmid out of fds and accept()'s EMFILE ended it."""
    require_root()
    d = Bmid(str(tmp_path), "--group", "65534", socket_dir=public_dir, prefix=("prlimit", "--nofile=256:256"))
    d.start()
    try:
        nobody = subprocess.Popen([sys.executable, "-c", _HOLD_CONNECTIONS, d.socket, "100"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        flood: list[socket.socket] = []
        try:
            assert nobody.stdout.readline().strip() == "32"
            with d.open() as mgr:                               # root's reserve: a quarter more
                pd = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
                for n in range(20):
                    flood.append(_connect(d))
                    with contextlib.suppress(OSError):          # refused: closed by bmid
                        _ask(flood[-1], n, "get_version")
                answered = [s for s in flood if _answered(s)]
                assert len(answered) == 32 // 4 - 1             # the reserve, less the manager's own
                assert len(os.listdir(f"/proc/{d.proc.pid}/fd")) < 128
                pd.set_priority(2)
                with pytest.raises(bmi.ResourceError, match="bmid closed it: .* serves as many clients as it may"):
                    with d.open() as refused:
                        refused.get_version()
        finally:
            for s in flood:
                s.close()
            nobody.communicate("go\n", timeout=30)
        with d.open() as mgr:           # at once: the connections just closed count as gone
            assert mgr.get_controller(pd.get_pd_id()).get_priority() == 2
            clients = [d.open() for _ in range(30)]
            assert [c.get_version() for c in clients] == [mgr.get_version()] * 30
            for c in clients:
                c.close()
    finally:
        d.close()


def test_bmid_out_of_fds_waits_for_some_instead_of_exiting(daemon):
    """accept() fails with EMFILE when bmid has no fd left (its limit lowered under it here): it waits for one
    and goes on; the connections that came meanwhile are served once fds are free again."""
    with daemon.open() as mgr:
        pd = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
        pid = str(daemon.proc.pid)
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/limits") as f:
            soft = next(line.split()[3] for line in f if line.startswith("Max open files"))
        subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={fds + 4}:"], check=True)     # the soft limit
        try:
            waiting = [_connect(daemon) for _ in range(40)]      # more than bmid can take: the rest wait
            for n, s in enumerate(waiting):
                _ask(s, n, "get_version")
            time.sleep(1.0)
            assert daemon.proc.poll() is None, "bmid exited when accept() found no fd"
        finally:
            subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={soft}:"], check=True)
        assert all(_answer(s, 10)["result"] == mgr.get_version() for s in waiting)
        for s in waiting:
            s.close()
        pd.set_priority(3)
        assert pd.get_priority() == 3


def test_event_streams_are_capped_and_a_closed_one_frees_its_place(daemon):
    """Each event stream holds a thread of bmid: past SUBSCRIBERS_MAX a subscribe is refused with ResourceError
    (not a thread more), and one that closes makes room."""
    from bmi.server.daemon import SUBSCRIBERS_MAX
    streams = [_connect(daemon) for _ in range(SUBSCRIBERS_MAX + 1)]
    try:
        for n, s in enumerate(streams):
            _ask(s, n, "subscribe")
        replies = [_answer(s) for s in streams]
        assert [("result" in r) for r in replies] == [True] * SUBSCRIBERS_MAX + [False]
        assert replies[-1]["error"]["message"].startswith(f"subscribe: bmid streams events to {SUBSCRIBERS_MAX} ")
        streams.pop(0).close()
        deadline = time.monotonic() + 10
        while True:                     # (a stream's thread sees its peer gone within EVENT_POLL)
            with _connect(daemon) as again:
                _ask(again, 1, "subscribe")
                if "result" in _answer(again):
                    break
            assert time.monotonic() < deadline, "a closed stream's place was not freed"
            time.sleep(0.2)
    finally:
        for s in streams:
            s.close()


def test_a_client_that_leaves_its_socket_full_is_dropped_and_frees_its_thread(daemon):
    """Replies a thread sends (here read_console's, 32 KiB of hex each) and event streams waited for good in
    send() for a client that never reads: a thread of bmid and what it was sending, held for as long as the
    client kept its connection.  Past SEND_TIMEOUT such a client is dropped (its thread ends with it)."""
    from bmi.server.clients import SEND_TIMEOUT

    with daemon.open() as mgr:
        pd = _run(mgr, "yes hello | head -c 100000")
        pd.wait(10)
        hog, watcher = _connect(daemon), _connect(daemon)
        try:
            for n in range(40):                 # 1.3 MB of replies: far more than its socket holds
                _ask(hog, n, "read_console", pd=pd.get_pd_id())
            _ask(watcher, 1, "subscribe")
            for _ in range(150):                # 300 events: more than the watcher's socket holds
                mgr.allocate_pd(bmi.PDDescription(mem=16 << 20)).destroy()
            time.sleep(SEND_TIMEOUT + 10)
            for sock in (hog, watcher):         # what its socket held, then the end bmid closed (a reset
                sock.settimeout(5)              # when bmid had requests of it unread); before, reading
                with contextlib.suppress(ConnectionResetError):     # let bmid send on, and then it waited
                    while sock.recv(p.MAX_MESSAGE + 1):
                        pass
            assert pd.get_current_status() is bmi.PDStatus.SHUTDOWN      # bmid serves on
        finally:
            hog.close()
            watcher.close()
