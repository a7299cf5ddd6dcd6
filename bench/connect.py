"""Connection set-up and message round trip over the PD channel, against a plain socketpair.

    .venv/bin/python bench/connect.py [--n 2000]

Set-up: connect (policy check + socketpair + shutdown for the mode + fd pass
over the source's channel) and accept (fd pass over the destination's channel),
both through bmi.pd clients on two real PDs' channels, vs socket.socketpair()
in one process.  Round trip: 64-byte ping-pong over the resulting IPC
connection vs over a plain SOCK_SEQPACKET socketpair (the same kernel path:
a connection adds nothing once it is set up).  One channel call
(get_version) from another process, as a PD makes it.  Prints medians and
ratios, and beside them the floor of bench/floor.py measured in the same
run: one JSON-RPC round trip between two Python processes (goals: a call
<= 2x it, a set-up <= 10x a socketpair).
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bmi  # noqa: E402
import bmi.pd  # noqa: E402
from bench.floor import round_trip_us, versus  # noqa: E402
from bmi import ConnectionPolicy, ConnectionType as CT, PDDescription  # noqa: E402

#: A PD's side of channel calls: its channel is the fd given; prints the median microseconds of n get_version.
_CALLER = """
import statistics, sys, time
import bmi.pd
client, n, times = bmi.pd.open(int(sys.argv[1])), int(sys.argv[2]), []
for _ in range(n + 100):
    t = time.perf_counter_ns()
    client.get_version()
    times.append(time.perf_counter_ns() - t)
print(statistics.median(times[100:]) / 1e3)
"""


def median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def round_trips(a: socket.socket, b: socket.socket, n: int) -> list[float]:
    msg = b"x" * 64
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        a.send(msg)
        b.send(b.recv(128))
        a.recv(128)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="repetitions (default 2000)")
    n = parser.parse_args().n
    floor = round_trip_us(n)
    with bmi.open("linux:///session", integrity=False) as mgr:
        a, b = (mgr.allocate_pd(PDDescription(mem=32 << 20)) for _ in range(2))
        clients = []
        for pd in (a, b):
            fd = mgr.channels().open(pd.get_pd_id())
            clients.append(bmi.pd.open(fd))
            os.close(fd)
        ca, cb = clients
        a.set_allowed_connections(b.get_pd_id(), [ConnectionPolicy(CT.IPC, bmi.RW)])

        setup, anchor_setup = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            mine = ca.connect(b.get_pd_id(), CT.IPC)
            theirs = cb.accept(timeout=5)
            setup.append(time.perf_counter() - t0)
            mine.close()
            theirs.close()
            t0 = time.perf_counter()
            x, y = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            anchor_setup.append(time.perf_counter() - t0)
            x.close()
            y.close()
        a.set_allowed_connections(b.get_pd_id(), [ConnectionPolicy(CT.IPC, bmi.RW)], disable_existing=True)

        mine, theirs = ca.connect(b.get_pd_id(), CT.IPC), cb.accept(timeout=5)
        s1, s2 = mine.socket(), theirs.socket()
        x, y = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        rtt, anchor_rtt = round_trips(s1, s2, n), round_trips(x, y, n)
        for s in (s1, s2, x, y):
            s.close()
        call = []
        for _ in range(n):
            t0 = time.perf_counter()
            ca.get_version()
            call.append(time.perf_counter() - t0)
        for c in clients:
            c.close()
        fd = mgr.channels().open(a.get_pd_id())
        try:
            pd_call = float(subprocess.run([sys.executable, "-c", _CALLER, str(fd), str(n)], pass_fds=(fd,),
                                           check=True, capture_output=True, text=True).stdout)
        finally:
            os.close(fd)

    print(f"connection set-up (connect+accept, policy check, fd pair, 2 fd passes): "
          f"{median_us(setup):8.1f} us   socketpair(): {median_us(anchor_setup):6.1f} us   "
          f"ratio {statistics.median(setup) / statistics.median(anchor_setup):6.1f}x  (goal <= 10x)")
    print(f"64-byte round trip over an IPC connection: {median_us(rtt):8.1f} us   "
          f"plain socketpair: {median_us(anchor_rtt):6.1f} us   "
          f"ratio {statistics.median(rtt) / statistics.median(anchor_rtt):6.2f}x")
    print(f"floor: a JSON-RPC round trip between two Python processes: {floor:8.1f} us")
    print(f"one channel call (get_version), from another process (a PD): {versus(pd_call, floor)}  (goal <= 2x)")
    print(f"one channel call (get_version), from a thread of the layer's process: {versus(median_us(call), floor)}")
    print(f"connection set-up against the floor: {versus(median_us(setup), floor)} "
          f"(two channel calls: >= 2x)")


if __name__ == "__main__":
    main()
