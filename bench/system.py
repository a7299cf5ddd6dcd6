"""System mode against session mode: setup_pd of a big image, per-call overhead, and list + status of many live PDs.

    .venv/bin/python bench/system.py [--image-mib 256] [--calls 2000] [--pds 1000] [--running]

setup_pd through bmid copies and hashes each image once, as session mode
does (the goal: within 1.25x of session mode for a 256 MiB FileImage).

Starts its own bmid (state and socket in a tmp dir, no TPM link) and runs
the same calls on linux:///session in this process.  Prints medians and
the system/session ratio; the goal for 1000 PDs is list_pd + the status of
each in < 50 ms (read from bmid's status board; the same done with one
request per PD is printed next to it).

Every per-call figure is printed beside the floors of bench/floor.py,
measured in the same run: a JSON-RPC round trip between two Python
processes, and a bare synchronous=FULL SQLite commit in the state's
directory (goals: reads <= 2x the round trip, changes <= 3x it plus one
commit).  Then group commit: CLIENTS client processes, each on a PD of its
own, each doing --changes set_priority calls, against one client doing the
same (goal: <= 2x the time).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bmi  # noqa: E402
from bench.floor import BareCommit, round_trip_us  # noqa: E402
from tests.server.bmid import Bmid  # noqa: E402

BUSYBOX = "/bin/busybox"
CLIENTS = 8

#: One client process: open bmid, wait for a line on stdin, make `n` changes, print the seconds they took.
_CHANGER = """
import sys, time, bmi
with bmi.open(sys.argv[1]) as mgr:
    pd = mgr.get_controller(int(sys.argv[2]))
    pd.set_priority(1)
    print("ready", flush=True)
    sys.stdin.readline()
    t = time.perf_counter()
    for i in range(int(sys.argv[3])):
        pd.set_priority(i % 3)
    print(time.perf_counter() - t, flush=True)
"""


def changers(daemon: Bmid, mgr, clients: int, changes: int) -> float:
    """Seconds until `clients` processes, each on a PD of its own, have each made `changes` set_priority calls."""
    pds = [mgr.allocate_pd(bmi.PDDescription(mem=16 << 20)) for _ in range(clients)]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    procs = [subprocess.Popen([sys.executable, "-c", _CHANGER, daemon.uri, str(pd.get_pd_id()), str(changes)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env) for pd in pds]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready"
        t = time.perf_counter()
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in procs:
            float(proc.stdout.readline())
        return time.perf_counter() - t
    finally:
        for proc in procs:
            proc.stdin.close()
            proc.wait()
        for pd in pds:
            pd.destroy()


def per_call(mgr, calls: int, bare: BareCommit | None = None) -> dict[str, float]:
    """Median microseconds of a read, a parameter read, and a stored change (set_priority).

    With `bare`: a bare commit after each call too, its median as "commit" (a disk's fsync time drifts: this
    measures it while the calls run)."""
    pd = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
    out = {}
    todo = [("get_current_status", pd.get_current_status),
             ("get_runtime_param", lambda: pd.get_runtime_param("/system/memory/max")),
             ("set_priority", lambda: pd.set_priority(1))]
    if hasattr(mgr, "_channel"):        # bmid: the status as a request too (get_current_status reads the board)
        todo.insert(1, ("get_current_status (request)",
                         lambda: mgr._channel.value("get_current_status", pd=pd.get_pd_id())))
    commits = []
    for name, fn in todo:
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
            if bare is not None and name.startswith("set_"):
                commits.append(bare.once_ns() / 1e9)
        out[name] = statistics.median(times) * 1e6
    if commits:
        out["commit"] = statistics.median(commits) * 1e6
    pd.destroy()
    return out


def setup_ms(mgr, image: bmi.FileImage) -> float:
    """Milliseconds of one setup_pd of `image` into a fresh PD."""
    pd = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
    try:
        t = time.perf_counter()
        pd.setup_pd(image)
        return (time.perf_counter() - t) * 1e3
    finally:
        pd.destroy()


def setup_pair(session, system, mib: int, tmp: str, rounds: int = 5) -> tuple[float, float]:
    """Median setup_pd ms of a `mib` MiB FileImage (busybox, padded) in session and in system mode, alternating."""
    path = os.path.join(tmp, "big.img")
    with open(path, "wb") as f, open(BUSYBOX, "rb") as bb:
        f.write(bb.read())              # a static ELF with random bytes after it: a valid image
        chunk = os.urandom(1 << 20)
        while f.tell() < mib << 20:
            f.write(chunk[:(mib << 20) - f.tell()])
    image = bmi.FileImage(path)
    setup_ms(session, image), setup_ms(system, image)       # warm the page cache and both paths
    a, b = [], []
    for _ in range(rounds):
        a.append(setup_ms(session, image))
        b.append(setup_ms(system, image))
    os.unlink(path)
    return statistics.median(a), statistics.median(b)


def many(mgr, count: int, running: bool) -> dict[str, float]:
    image = bmi.BytesImage(open(BUSYBOX, "rb").read())
    pds = []
    t = time.perf_counter()
    for _ in range(count):
        pd = mgr.allocate_pd(bmi.PDDescription(mem=8 << 20))
        if running:
            pd.setup_pd(image)
            pd.set_config_param("/boot/cmdline", "busybox sleep 100000")
            pd.request_status_change(bmi.PDStatus.RUNNING)
        pds.append(pd)
    made = time.perf_counter() - t
    rounds = []
    for _ in range(5):
        t = time.perf_counter()
        statuses = [mgr.get_controller(i).get_current_status() for i in mgr.list_pd()[1:]]
        rounds.append(time.perf_counter() - t)
    assert len(statuses) == count
    out = {"create_each_ms": made / count * 1e3, "list_and_status_ms": min(rounds) * 1e3}
    if hasattr(mgr, "_channel"):        # the same through requests only, without the status board
        t = time.perf_counter()
        asked = [mgr._channel.value("get_current_status", pd=i) for i in mgr._channel.value("list_pd")[1:]]
        out["same_by_requests_ms"] = (time.perf_counter() - t) * 1e3
        assert asked == [s.name for s in statuses]
    if hasattr(mgr, "describe"):
        t = time.perf_counter()
        assert len(mgr.describe()) == count
        out["describe_ms"] = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    for pd in pds:
        pd.destroy()
    out["destroy_each_ms"] = (time.perf_counter() - t) / count * 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image-mib", type=int, default=256, help="setup_pd image size (0: skip)")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--pds", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=500, help="set_priority calls per client (group commit)")
    parser.add_argument("--running", action="store_true", help="start every PD (busybox sleep), not only allocate")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Bmid(tmp).start()
        try:
            with bmi.open("linux:///session", integrity=False) as session, daemon.open() as system:
                if args.image_mib:
                    s_ms, y_ms = setup_pair(session, system, args.image_mib, tmp)
                    print(f"setup_pd {args.image_mib} MiB FileImage: session {s_ms:.0f} ms, system {y_ms:.0f} ms, "
                          f"ratio {y_ms / s_ms:.2f}x  (goal <= 1.25x)")
                floor, bare = round_trip_us(args.calls), BareCommit(daemon.state_dir)
                a, b = per_call(session, args.calls), per_call(system, args.calls, bare)
                bare.close()
                commit = b.pop("commit")
                print(f"floors: JSON-RPC round trip {floor:.1f} us, synchronous=FULL commit {commit:.1f} us "
                      f"(one after each set_priority, same filesystem)")
                print(f"per call (median of {args.calls}, us)      session    system   ratio  floor  goal")
                for name in b:
                    change = name.startswith("set_")
                    goal = f"{(3 * floor + commit) / floor:5.1f}x ((3 x floor + commit) / floor)" if change \
                        else "  2.0x"
                    session_us = f"{a[name]:9.1f}" if name in a else f"{'-':>9}"
                    ratio = f"{b[name] / a[name]:7.1f}x" if name in a else f"{'-':>8}"
                    print(f"  {name:<32} {session_us} {b[name]:9.1f} {ratio} {b[name] / floor:5.1f}x {goal}")
                one = changers(daemon, system, 1, args.changes)
                many_ = changers(daemon, system, CLIENTS, args.changes)
                print(f"{args.changes} set_priority per client: 1 client {one:.2f} s, {CLIENTS} clients "
                      f"{many_:.2f} s, ratio {many_ / one:.2f}x  (goal <= 2x: group commit)")
                what = "running" if args.running else "allocated"
                print(f"{args.pds} {what} PDs (bmid, ms)")
                for name, value in many(system, args.pds, args.running).items():
                    goal = "  (goal < 50)" if name == "list_and_status_ms" else ""
                    print(f"  {name:<32} {value:9.2f}{goal}")
        finally:
            daemon.close()


if __name__ == "__main__":
    main()
