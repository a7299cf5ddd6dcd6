"""Connection set-up and message round trip over the PD channel, against a plain socketpair.

    .venv/bin/python bench/connect.py [--n 2000]

Set-up: connect (policy check + socketpair + shutdown for the mode + fd pass
over the source's channel) and accept (fd pass over the destination's channel),
both through bmi.pd clients on two real PDs' channels, vs socket.socketpair()
in one process: one after the other (two channel calls), and with the
destination already waiting in accept, in a thread of this process or in
another process as a PD (connect's own request hands it its end right after
the reply: one channel call).  The layer's own work, in this process and
with no round trip: the dispatcher's connect (policy check, pair, mode), its
reply with the source's end, the destination's end taken from the queue and
its reply, both received (two fd passes).  Round trip: 64-byte ping-pong
over the resulting IPC connection vs over a plain SOCK_SEQPACKET socketpair
(the same kernel path: a connection adds nothing once it is set up).  One channel call
(get_version) from another process, as a PD makes it.  Prints medians and
ratios, and beside them the floor of bench/floor.py measured in the same
run: one JSON-RPC round trip between two Python processes (goals: a call
<= 2x it, a set-up <= 10x a socketpair).
"""
from __future__ import annotations

import argparse
import os
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bmi  # noqa: E402
import bmi.pd  # noqa: E402
from bench.floor import Echo, round_trip_us, versus  # noqa: E402
from bmi import ConnectionPolicy, ConnectionType as CT, PDDescription  # noqa: E402
from bmi.channel import protocol  # noqa: E402
from bmi.channel.connections import SOURCE_LIMIT  # noqa: E402
from bmi.channel.dispatch import Dispatcher  # noqa: E402

#: A PD's side of channel calls: its channel is fd argv[1]; n get_version calls, interleaved in blocks with n
#: round trips to the floor's Echo (a socket to it: fd argv[3]), so both see the same load.  Prints both
#: medians (us).
_CALLER = f"""
import statistics, socket, sys, time
sys.path.insert(0, {ROOT!r})
import bmi.pd
from bench.floor import echo_ns
client, n, echo = bmi.pd.open(int(sys.argv[1])), int(sys.argv[2]), socket.socket(fileno=int(sys.argv[3]))
calls, floor = [], []
for block in range(-1, n // 100):      # block -1 warms both up
    for i in range(100):
        t = time.perf_counter_ns()
        client.get_version()
        (calls if block >= 0 else []).append(time.perf_counter_ns() - t)
    for i in range(100):
        (floor if block >= 0 else []).append(echo_ns(echo, i))
print(statistics.median(calls) / 1e3, statistics.median(floor) / 1e3)
"""


#: the set-up loops cut every connection made this often, untimed: the layer holds an end of each until a
#: cut, and refuses a PD more than SOURCE_LIMIT live ones
CUT_EVERY = SOURCE_LIMIT // 2


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


#: acceptor() in a process of its own, as a PD: channel fd argv[1], argv[2] connections; says on stdout.
_ACCEPTOR = f"""
import sys
sys.path.insert(0, {ROOT!r})
from bench.connect import acceptor
acceptor(int(sys.argv[1]), int(sys.argv[2]), lambda line: print(line, flush=True))
"""


def acceptor(fd: int, n: int, say: Callable[[str], None]) -> None:
    """The destination, on its channel fd spoken by hand: for each of n connections it sends accept, then
    get_version; once get_version is answered the accept waits in the layer (which reads a channel's
    records in order), and it says "waiting"; then when it had the connection (perf_counter: one clock
    for every process)."""
    with socket.socket(fileno=fd) as sock:
        for i in range(n):
            protocol.send(sock, protocol.request(2 * i, "accept", {"timeout": 5}))
            protocol.send(sock, protocol.request(2 * i + 1, "get_version", {}))
            for expected in (2 * i + 1, 2 * i):
                data, fds, _ = protocol.receive(sock)
                assert protocol.decode(data)["id"] == expected
                for x in fds:
                    os.close(x)
                say("waiting" if expected % 2 else str(time.perf_counter()))


def waiting_setups(mgr: bmi.PDManagement, ca: bmi.pd.PDClient, dest: int, n: int, apart: bool,
                   cut: Callable[[], None]) -> tuple[list[float], list[float]]:
    """connect while the destination waits in accept on a new channel (the previous one ends): in a thread
    of ours, or (apart) in another process, as a PD.  Returns (until connect returned, until both ends
    had theirs)."""
    fd = mgr.channels().open(dest)
    if apart:
        peer = subprocess.Popen([sys.executable, "-c", _ACCEPTOR, str(fd), str(n)], pass_fds=(fd,),
                                stdout=subprocess.PIPE, text=True)
        os.close(fd)
        assert peer.stdout is not None
        out = peer.stdout
        hear, end = (lambda: out.readline().strip()), peer.wait
    else:
        said: queue.SimpleQueue[str] = queue.SimpleQueue()
        thread = threading.Thread(target=acceptor, args=(fd, n, said.put))
        thread.start()
        hear, end = said.get, thread.join
    connect, both = [], []
    for i in range(n):
        assert hear() == "waiting"
        t0 = time.perf_counter()
        mine = ca.connect(dest, CT.IPC)
        t1 = time.perf_counter()
        accepted = float(hear())
        connect.append(t1 - t0)
        both.append(max(t1, accepted) - t0)
        mine.close()
        if i % CUT_EVERY == CUT_EVERY - 1:
            cut()
    end()
    return connect, both


def layer_work(mgr: bmi.PDManagement, source: int, dest: int, n: int, cut: Callable[[], None]) -> list[float]:
    """The layer's part of a set-up in this process, with no round trip: the dispatcher's connect (policy
    check, pair, mode), its reply with the source's end, the destination's end taken and its reply, both
    ends received (two fd passes) as the PDs' channels would."""
    handler = Dispatcher(mgr.scoped)
    to_source, at_source = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    to_dest, at_dest = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    params = {"tid": dest, "con_type": "IPC", "mode": bmi.RW}
    times, received = [], []
    for i in range(n):
        t0 = time.perf_counter()
        info, fd = handler(source, "connect", params, None)
        protocol.send_encoded(to_source, protocol.encode(protocol.result(i, info)), (fd,))
        os.close(fd)
        conn, fd = mgr.registry.take(dest)
        protocol.send_encoded(to_dest, protocol.encode(protocol.result(i, conn.describe())), (fd,))
        os.close(fd)
        for end in (at_source, at_dest):
            received += protocol.receive(end)[1]
        times.append(time.perf_counter() - t0)
        for fd in received:
            os.close(fd)
        received.clear()
        if i % CUT_EVERY == CUT_EVERY - 1:
            cut()
    for s in (to_source, at_source, to_dest, at_dest):
        s.close()
    return times


def cut_all(a: bmi.PDController, b: bmi.PDController) -> None:
    """Cut a's connections to b (the layer holds an end of each until then) and allow IPC again."""
    a.set_allowed_connections(b.get_pd_id(), [], disable_existing=True)
    a.set_allowed_connections(b.get_pd_id(), [ConnectionPolicy(CT.IPC, bmi.RW)])


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

        def cut() -> None:
            cut_all(a, b)

        setup, anchor_setup = [], []
        for i in range(n):
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
            if i % CUT_EVERY == CUT_EVERY - 1:
                cut()
        cut_all(a, b)
        layer = layer_work(mgr, a.get_pd_id(), b.get_pd_id(), n, cut)
        cut_all(a, b)

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
        cut_all(a, b)
        waiting, waiting_both = waiting_setups(mgr, ca, b.get_pd_id(), n, False, cut)     # cb's channel ends
        cut_all(a, b)
        apart, apart_both = waiting_setups(mgr, ca, b.get_pd_id(), n, True, cut)
        cut_all(a, b)
        for c in clients:
            c.close()
        fd, echo = mgr.channels().open(a.get_pd_id()), Echo()
        try:
            out = subprocess.run([sys.executable, "-c", _CALLER, str(fd), str(n), str(echo.sock.fileno())],
                                 pass_fds=(fd, echo.sock.fileno()), check=True, capture_output=True, text=True)
            pd_call, pd_floor = map(float, out.stdout.split())
        finally:
            os.close(fd)
            echo.close()

    pair = statistics.median(anchor_setup)
    print(f"connection set-up (connect+accept, policy check, fd pair, 2 fd passes): "
          f"{median_us(setup):8.1f} us   socketpair(): {median_us(anchor_setup):6.1f} us   "
          f"ratio {statistics.median(setup) / pair:6.1f}x  (goal <= 10x)")
    print(f"connection set-up, destination already waiting in accept (a thread of this process): "
          f"connect {median_us(waiting):8.1f} us   ratio {statistics.median(waiting) / pair:6.1f}x;  "
          f"both ends {median_us(waiting_both):8.1f} us   ratio {statistics.median(waiting_both) / pair:6.1f}x")
    print(f"connection set-up, destination already waiting in accept (another process, as a PD): "
          f"connect {median_us(apart):8.1f} us   ratio {statistics.median(apart) / pair:6.1f}x;  "
          f"both ends {median_us(apart_both):8.1f} us   ratio {statistics.median(apart_both) / pair:6.1f}x")
    print(f"the layer's own work (policy check, pair, mode, 2 fd passes; in-process, no round trip): "
          f"{median_us(layer):8.1f} us   ratio {statistics.median(layer) / pair:6.1f}x  (goal <= 10x)")
    print(f"64-byte round trip over an IPC connection: {median_us(rtt):8.1f} us   "
          f"plain socketpair: {median_us(anchor_rtt):6.1f} us   "
          f"ratio {statistics.median(rtt) / statistics.median(anchor_rtt):6.2f}x")
    print(f"floor: a JSON-RPC round trip between two Python processes: {floor:8.1f} us")
    print(f"one channel call (get_version), from another process (a PD): {versus(pd_call, floor)}  (goal <= 2x)")
    print(f"  against that process's own round trips to the floor's peer, interleaved with its calls "
          f"({pd_floor:.1f} us): {pd_call / pd_floor:5.2f}x (both floors drift with the VM's idle wake-ups)")
    print(f"one channel call (get_version), from a thread of the layer's process: {versus(median_us(call), floor)}")
    print(f"connection set-up against the floor: {versus(median_us(setup), floor)} "
          f"(two channel calls: >= 2x)")
    print(f"connection set-up, destination waiting (a thread), against the floor: {versus(median_us(waiting), floor)} "
          f"(one channel call: >= 1x)")
    print(f"connection set-up, destination waiting (a process), against the floor: {versus(median_us(apart), floor)}")
    print(f"the floor against socketpair(): {floor / median_us(anchor_setup):6.1f}x "
          f"(a set-up through a channel call cannot be under this)")


if __name__ == "__main__":
    main()
