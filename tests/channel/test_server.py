"""How the channel server spreads requests over its threads (real socketpairs, real threads, a PD client in a
process of its own where wake-ups are counted)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

from bmi.channel import protocol as p
from bmi.channel.connections import Registry
from bmi.channel.server import THREADS, ChannelServer


class Slow:
    """A handler whose "slow" requests wait until released; it counts how many run at once."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.running = self.most = 0

    def __call__(self, caller: int, method: str, params: dict, fd: int | None):
        if method != "slow":
            return f"fine {caller}", None
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            self.release.wait(20)
        finally:
            with self.lock:
                self.running -= 1
        return f"slow {caller}", None


def serve(handler, pd_ids):
    registry = Registry()
    server = ChannelServer(handler, registry)
    socks = {pd_id: socket.socket(fileno=server.open(pd_id)) for pd_id in pd_ids}
    for s in socks.values():
        s.settimeout(10)
    return registry, server, socks


def stop(registry, server, socks) -> None:
    for s in socks.values():
        s.close()
    server.close()
    registry.close()


def reply(sock: socket.socket) -> dict:
    data, fds, whole = p.receive(sock)
    assert whole and not fds
    return json.loads(data)


def test_a_slow_request_holds_up_only_its_own_pd_whose_later_requests_follow_in_order():
    slow = Slow()
    registry, server, socks = serve(slow, (7, 8))
    try:
        p.send(socks[7], p.request(1, "slow", {}))
        p.send(socks[7], p.request(2, "ok", {}))
        for msg_id in range(3):         # PD 8 is answered while PD 7's request runs
            p.send(socks[8], p.request(msg_id, "ok", {}))
            assert reply(socks[8]) == {"jsonrpc": "2.0", "id": msg_id, "result": "fine 8"}
        socks[7].settimeout(0.2)
        try:
            socks[7].recv(1, socket.MSG_PEEK)
            raise AssertionError("PD 7 got a reply before its slow request ended")
        except TimeoutError:
            pass
        socks[7].settimeout(10)
        slow.release.set()
        assert [reply(socks[7])["id"] for _ in range(2)] == [1, 2]
    finally:
        slow.release.set()
        stop(registry, server, socks)


def test_at_most_THREADS_requests_run_at_once_and_the_rest_wait_for_a_thread():
    slow = Slow()
    pd_ids = range(10, 10 + THREADS + 3)
    registry, server, socks = serve(slow, pd_ids)
    try:
        for pd_id in pd_ids:
            p.send(socks[pd_id], p.request(1, "slow", {}))
        deadline = threading.Event()
        while slow.most < THREADS and not deadline.wait(0.01):
            pass
        assert slow.most == THREADS
        slow.release.set()
        for pd_id in pd_ids:
            assert reply(socks[pd_id]) == {"jsonrpc": "2.0", "id": 1, "result": f"slow {pd_id}"}
        assert slow.most == THREADS
        assert sum(t.name == "bmi-channel" for t in threading.enumerate()) <= THREADS
    finally:
        slow.release.set()
        stop(registry, server, socks)


#: A PD's program: n requests, one after the other, each waiting for its reply.
_CALLER = """
import json, socket, sys
s = socket.socket(fileno=int(sys.argv[1]))
for i in range(int(sys.argv[2])):
    s.send(json.dumps({"jsonrpc": "2.0", "id": i, "method": "ok", "params": {}}).encode())
    assert json.loads(s.recv(65536))["id"] == i
"""


def _sleeps_of_serving_threads() -> int:
    """How often the server's threads have gone to sleep (voluntary context switches), all together."""
    total = 0
    for t in threading.enumerate():
        if t.name == "bmi-channel" and t.native_id is not None:
            with open(f"/proc/self/task/{t.native_id}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))
    return total


def test_a_request_wakes_only_the_thread_that_serves_it():
    """The thread that reads a request runs it and sends the reply; no other thread is woken to take over
    the reading (a hand-off per request cost as much as the round trip).  So one PD's calls, one after the
    other, put the server's threads to sleep at most about once each (waiting for the next request)."""
    registry = Registry()
    server = ChannelServer(lambda caller, method, params, fd: ("fine", None), registry)
    fd = server.open(7)
    try:
        run = [sys.executable, "-c", _CALLER, str(fd)]
        subprocess.run(run + ["50"], pass_fds=(fd,), check=True, timeout=60)     # the threads are there
        before = _sleeps_of_serving_threads()
        subprocess.run(run + ["500"], pass_fds=(fd,), check=True, timeout=60)
        per_request = (_sleeps_of_serving_threads() - before) / 500
        assert per_request < 1.5, per_request        # with a hand-off of the reading per request: >= 3
    finally:
        os.close(fd)
        server.close()
        registry.close()
