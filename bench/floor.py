"""The floors every control-path figure is held to: one Python JSON-RPC round trip, one durable commit, and
the least server group commit can be.

    .venv/bin/python bench/floor.py [--n 2000] [--dir /var/lib/bmi] [--group-rounds 5]

Round trip: two Python processes exchange one small JSON-RPC request and
reply over a SOCK_SEQPACKET socketpair (json on each side, nothing else);
no call through a PD channel or bmid can be cheaper.  Commit: a bare SQLite
WAL synchronous=FULL transaction of one small row in a file under --dir (use
the state directory's filesystem: the fsync is what costs).  Medians.
Group commit: one Python process serving N client processes the way bmid's
client loop does, with nothing else -- epoll, a JSON request from each ready
client, one pwrite and fdatasync for the round, the replies -- timed for 1
and 8 clients making 500 calls each: the ratio bmid's group commit is held
to cannot be lower than this server's on the same machine and disk.
bench/connect.py and bench/system.py print their figures beside these,
measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

#: The peer: answers each request with a result, until EOF.
_ECHO = """
import json, socket, sys
s = socket.socket(fileno=int(sys.argv[1]))
while True:
    data = s.recv(65536)
    if not data:
        break
    msg = json.loads(data)
    s.send(json.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": 1}, separators=(",", ":")).encode())
"""


class Echo:
    """The floor's peer process, kept running: a caller can interleave its round trips with the calls it
    holds to them, so both are measured at the same moment, under the same load (this 2-core VM's
    figures drift by 2-5x between minutes)."""

    def __init__(self) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._peer = subprocess.Popen([sys.executable, "-c", _ECHO, str(theirs.fileno())],
                                      pass_fds=(theirs.fileno(),))
        theirs.close()

    def close(self) -> None:
        self.sock.close()
        self._peer.wait()


def echo_ns(sock: socket.socket, i: int) -> int:
    """Nanoseconds of one JSON-RPC request/reply with an Echo over `sock` (its own end, or a dup of it)."""
    t = time.perf_counter_ns()
    sock.send(json.dumps({"jsonrpc": "2.0", "id": i, "method": "get_version", "params": {}},
                         separators=(",", ":")).encode())
    reply = json.loads(sock.recv(65536))
    elapsed = time.perf_counter_ns() - t
    assert reply["id"] == i
    return elapsed


def round_trip_us(n: int = 2000) -> float:
    """Median microseconds of one JSON-RPC request/reply between two Python processes."""
    echo = Echo()
    try:
        times = [echo_ns(echo.sock, i) for i in range(n + 100)]     # the first 100 warm both sides up
    finally:
        echo.close()
    return statistics.median(times[100:]) / 1e3


class BareCommit:
    """A SQLite database in WAL mode, synchronous=FULL, in a temporary directory under `directory`."""

    def __init__(self, directory: str):
        self._tmp = tempfile.TemporaryDirectory(dir=directory, prefix="bmi-bench-commit-")
        self._db = sqlite3.connect(os.path.join(self._tmp.name, "commit.sqlite3"), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT NOT NULL)")
        self._i = 0

    def once_ns(self) -> int:
        """Nanoseconds of one transaction writing one small row."""
        self._i += 1
        t = time.perf_counter_ns()
        self._db.execute("BEGIN IMMEDIATE")
        self._db.execute("INSERT OR REPLACE INTO t(k, v) VALUES(?, ?)", (self._i % 16, f"priority {self._i}"))
        self._db.execute("COMMIT")
        return time.perf_counter_ns() - t

    def close(self) -> None:
        self._db.close()
        self._tmp.cleanup()


def commit_us(directory: str, n: int = 200) -> float:
    """Median microseconds of one SQLite WAL synchronous=FULL commit of one small row in `directory`."""
    bare = BareCommit(directory)
    try:
        times = [bare.once_ns() for _ in range(n + 10)]
    finally:
        bare.close()
    return statistics.median(times[10:]) / 1e3


#: The least group-commit server: each round, the request of every ready client (JSON), one write of the new
#: state and one fdatasync for all of them, then their replies.  argv: socket path, file to sync.
_GROUP_SERVER = """
import json, os, select, socket, sys
listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
listener.bind(sys.argv[1])
listener.listen(64)
fd = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
poller, clients, state, offset = select.epoll(), {}, {}, 0
poller.register(listener.fileno(), select.EPOLLIN)
print("up", flush=True)
while True:
    answered = []
    for ready, _ in poller.poll():
        if ready == listener.fileno():
            conn, _ = listener.accept()
            clients[conn.fileno()] = conn
            poller.register(conn.fileno(), select.EPOLLIN)
            continue
        conn = clients[ready]
        data = conn.recv(65536)
        if not data:
            poller.unregister(ready)
            del clients[ready]
            conn.close()
            continue
        request = json.loads(data)
        state[request["params"]["pd"]] = request["params"]["priority"]
        answered.append((conn, {"jsonrpc": "2.0", "id": request["id"], "result": None}))
    if answered:
        record = json.dumps(state).encode()
        offset = offset + len(record) if offset < (4 << 20) else 0     # a WAL's size, then written over again
        os.pwrite(fd, record, offset)
        os.fdatasync(fd)
        for conn, reply in answered:
            conn.send(json.dumps(reply, separators=(",", ":")).encode())
"""

#: One client of it: connect, wait for a line on stdin, make `n` calls, print the seconds they took.
_GROUP_CLIENT = """
import json, socket, sys, time
sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
sock.connect(sys.argv[1])
pd = int(sys.argv[3])
print("ready", flush=True)
sys.stdin.readline()
t = time.perf_counter()
for i in range(int(sys.argv[2])):
    sock.send(json.dumps({"jsonrpc": "2.0", "id": i, "method": "set_priority",
                          "params": {"pd": pd, "priority": i % 3}}, separators=(",", ":")).encode())
    assert json.loads(sock.recv(65536))["id"] == i
print(time.perf_counter() - t, flush=True)
"""


class GroupCommitFloor:
    """The least group-commit server, kept running with its file in a temporary directory under `directory`
    (the state's filesystem), so its runs can alternate with bmid's in one bench run."""

    def __init__(self, directory: str):
        self._tmp = tempfile.TemporaryDirectory(dir=directory, prefix="bmi-bench-group-")
        self._socket = os.path.join(self._tmp.name, "floor.sock")
        self._server = subprocess.Popen([sys.executable, "-c", _GROUP_SERVER, self._socket,
                                         os.path.join(self._tmp.name, "wal")], stdout=subprocess.PIPE, text=True)
        assert self._server.stdout.readline().strip() == "up"

    def seconds(self, clients: int, calls: int) -> float:
        """Wall time until `clients` processes, started together, have each made `calls` calls."""
        procs = [subprocess.Popen([sys.executable, "-c", _GROUP_CLIENT, self._socket, str(calls), str(pd)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                 for pd in range(1, clients + 1)]
        try:
            for proc in procs:
                assert proc.stdout.readline().strip() == "ready"
            t = time.perf_counter()
            for proc in procs:
                proc.stdin.write("go\n")
                proc.stdin.flush()
            for proc in procs:
                proc.stdout.readline()
            return time.perf_counter() - t
        finally:
            for proc in procs:
                proc.stdin.close()
                proc.wait()

    def close(self) -> None:
        self._server.kill()
        self._server.wait()
        self._server.stdout.close()
        self._tmp.cleanup()


def versus(value_us: float, floor: float) -> str:
    """`value` beside its floor: '123.4 us  2.1x floor'."""
    return f"{value_us:8.1f} us  {value_us / floor:5.2f}x floor"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="a directory on the state's filesystem")
    parser.add_argument("--group-rounds", type=int, default=5, help="1-client / 8-client pairs of the group floor")
    args = parser.parse_args()
    print(f"floor: JSON-RPC round trip between two Python processes (median of {args.n}): "
          f"{round_trip_us(args.n):7.1f} us")
    print(f"floor: SQLite WAL synchronous=FULL commit of one row in {args.dir}: {commit_us(args.dir):7.1f} us")
    group = GroupCommitFloor(args.dir)
    try:
        pairs = [(group.seconds(1, 500), group.seconds(8, 500)) for _ in range(args.group_rounds)]
    finally:
        group.close()
    ratios = [b / a for a, b in pairs]
    print(f"floor: the least group-commit server, 8 clients / 1 client making 500 calls each: ratio median "
          f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) over {args.group_rounds} rounds")


if __name__ == "__main__":
    main()
