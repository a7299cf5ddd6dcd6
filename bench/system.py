"""System mode against session mode: setup_pd of a big image, per-call overhead, and list + status of many live PDs.

    .venv/bin/python bench/system.py [--image-mib 256] [--calls 2000] [--pds 1000] [--rounds 3] [--running]

setup_pd through bmid copies and hashes each image once, as session mode
does (the goal: within 1.25x of session mode for a 256 MiB FileImage).

Starts its own bmid (state and socket in a tmp dir, no TPM link) and runs
the same calls on linux:///session in this process.  Prints medians and
the system/session ratio; the goal for 1000 PDs is list_pd + the status of
each in < 50 ms (read from bmid's status board; the same done with one
request per PD is printed next to it).

Every per-call figure is printed beside the floors of bench/floor.py,
measured between its own calls (one of each after each call): a JSON-RPC
round trip between two Python processes, and a bare synchronous=FULL
SQLite commit in the state's directory (goals: reads <= 2x the round trip,
changes <= 3x it plus one commit).  Then group commit: CLIENTS client
processes, each on a PD of its own, each doing --changes set_priority
calls, against one client doing the same (goal: <= 2x the time), --rounds
pairs alternating (the pair with the median ratio is shown, then medians
and ranges, and the same pairs on the least group-commit server of
bench/floor.py, which no server can beat), what the rest of the
machine used meanwhile, and beside that ratio the least one the CPU
allows: what bmid and the clients spent in that run (bmid from /proc, the
clients from getrusage) spread over the machine's cores, or the time bmid's
client loop spent on a CPU (one thread: its calls, commits and system
calls run one after another), whichever is longer, over the one client's
time.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bmi  # noqa: E402
from bench.floor import BareCommit, Echo, GroupCommitFloor, echo_ns  # noqa: E402
from bench.host import cgroups_line  # noqa: E402
from tests.server.bmid import Bmid  # noqa: E402

BUSYBOX = "/bin/busybox"
CLIENTS = 8

#: One client process: open bmid, wait for a line on stdin, make `n` changes, print the seconds they took and
#: the CPU seconds they cost it (user, system).
_CHANGER = """
import resource, sys, time, bmi
with bmi.open(sys.argv[1]) as mgr:
    pd = mgr.get_controller(int(sys.argv[2]))
    pd.set_priority(1)
    print("ready", flush=True)
    sys.stdin.readline()
    t, r = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    for i in range(int(sys.argv[3])):
        pd.set_priority(i % 3)
    e = resource.getrusage(resource.RUSAGE_SELF)
    print(time.perf_counter() - t, e.ru_utime - r.ru_utime, e.ru_stime - r.ru_stime, flush=True)
"""
_TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    """One changers() run: its wall time, the CPU seconds it cost bmid and the clients, and what the rest of the
    machine used meanwhile (other processes and the kernel's own threads, in CPU seconds)."""

    seconds: float
    bmid_user: float
    bmid_system: float
    clients: float
    others: float = 0.0
    busiest: tuple[float, float] = (0.0, 0.0)   # bmid's busiest thread (its client loop): s on a CPU, s waiting for one

    @property
    def cpu(self) -> float:
        return self.bmid_user + self.bmid_system + self.clients

    def floor(self, cores: int) -> float:
        """The least wall time this CPU allows: all of it spread over `cores`, and the client loop's own time on
        a CPU (one thread: its calls, commits and system calls one after another)."""
        return max(self.cpu / cores, self.busiest[0])


def _cpu_of(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def _thread_times(pid: int) -> dict[str, tuple[float, float]]:
    """Each thread of a process: (seconds it ran, seconds it waited runnable for a CPU), from schedstat."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ran, waited, _ = (int(x) / 1e9 for x in f.read().split())
        except (OSError, ValueError):
            continue            # a thread that ended, or a kernel without schedstats
        out[tid] = (ran, waited)
    return out


def _busiest(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> tuple[float, float]:
    spent = {tid: (ran - before.get(tid, (0.0, 0.0))[0], waited - before.get(tid, (0.0, 0.0))[1])
             for tid, (ran, waited) in after.items()}
    return max(spent.values(), default=(0.0, 0.0))


def _machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (not idle, not waiting for I/O) since it started."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / _TICK


def changers(daemon: Bmid, mgr, clients: int, changes: int) -> Run:
    """`clients` processes, each on a PD of its own, each making `changes` set_priority calls: the time until
    all are done, and what CPU it took."""
    pds = [mgr.allocate_pd(bmi.PDDescription(mem=16 << 20)) for _ in range(clients)]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    procs = [subprocess.Popen([sys.executable, "-c", _CHANGER, daemon.uri, str(pd.get_pd_id()), str(changes)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env) for pd in pds]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready"
        before, busy, threads = _cpu_of(daemon.proc.pid), _machine_busy(), _thread_times(daemon.proc.pid)
        t = time.perf_counter()
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        spent = 0.0
        for proc in procs:
            _, user, system = map(float, proc.stdout.readline().split())
            spent += user + system
        seconds = time.perf_counter() - t
        after, busy = _cpu_of(daemon.proc.pid), _machine_busy() - busy
        run = Run(seconds, after[0] - before[0], after[1] - before[1], spent,
                  busiest=_busiest(threads, _thread_times(daemon.proc.pid)))
        run.others = max(0.0, busy - run.cpu)
        return run
    finally:
        for proc in procs:
            proc.stdin.close()
            proc.wait()
        for pd in pds:
            pd.destroy()


def group_commit_rounds(daemon: Bmid, mgr, clients: int, changes: int, rounds: int) -> str:
    """`rounds` pairs of runs, 1 client then `clients`, alternating (a shared machine's load drifts) with the
    same pair on the least group-commit server (bench/floor.py) on the same filesystem: the report of the pair
    whose ratio is the median, then the medians and ranges of all, and the least server's beside them."""
    floor = GroupCommitFloor(daemon.state_dir)
    try:
        pairs, floors = [], []
        for _ in range(rounds):
            floors.append((floor.seconds(1, changes), floor.seconds(clients, changes)))
            pairs.append((changers(daemon, mgr, 1, changes), changers(daemon, mgr, clients, changes)))
    finally:
        floor.close()
    ordered = sorted(pairs, key=lambda pair: pair[1].seconds / pair[0].seconds)
    one, many = ordered[len(ordered) // 2]
    report = group_commit_report(one, many, clients, changes)

    def spread(values: list[float], unit: str) -> str:
        return f"{statistics.median(values):.2f}{unit} ({min(values):.2f}-{max(values):.2f})"
    report += (f"\n  over {rounds} rounds, median (range): 1 client {spread([a.seconds for a, _ in pairs], ' s')}, "
               f"{clients} clients {spread([b.seconds for _, b in pairs], ' s')}, "
               f"ratio {spread([b.seconds / a.seconds for a, b in pairs], 'x')}\n"
               f"  the least group-commit server in the same rounds (bench/floor.py: JSON, one fdatasync a round, "
               f"nothing else): 1 client {spread([a for a, _ in floors], ' s')}, {clients} clients "
               f"{spread([b for _, b in floors], ' s')}, ratio {spread([b / a for a, b in floors], 'x')}; "
               f"bmid's time / its: 1 client {spread([p[0].seconds / f[0] for p, f in zip(pairs, floors)], 'x')}, "
               f"{clients} clients {spread([p[1].seconds / f[1] for p, f in zip(pairs, floors)], 'x')}")
    return report


def group_commit_report(one: Run, many: Run, clients: int, changes: int) -> str:
    """The N-clients/1-client ratio beside the least ratio the CPU those runs cost allows on this machine."""
    cores = len(os.sched_getaffinity(0))
    calls = clients * changes
    per = 1e6 / calls
    return (f"{changes} set_priority per client: 1 client {one.seconds:.2f} s, {clients} clients {many.seconds:.2f} s, "
            f"ratio {many.seconds / one.seconds:.2f}x  (goal <= 2x: group commit)\n"
            f"  the rest of the machine used {many.others:.2f} CPU s during the {clients} clients' "
            f"{many.seconds:.2f} s ({one.others:.2f} during the 1 client's): a shared machine's load slows the "
            f"{clients} clients, which need {many.cpu / many.seconds:.1f} cores, more than the one\n"
            f"  CPU per change with {clients} clients: bmid {many.bmid_user * per:.0f} us user + "
            f"{many.bmid_system * per:.0f} us system, client {many.clients * per:.0f} us "
            f"(1 client: bmid {(one.bmid_user + one.bmid_system) * 1e6 / changes:.0f} us, client "
            f"{one.clients * 1e6 / changes:.0f} us, wall {one.seconds * 1e6 / changes:.0f} us)\n"
            f"  bmid's busiest thread (its client loop), per change with {clients} clients: on a CPU "
            f"{many.busiest[0] * per:.0f} us, runnable but waiting for a CPU {many.busiest[1] * per:.0f} us, "
            f"idle {max(0.0, many.seconds - sum(many.busiest)) * per:.0f} us\n"
            f"  CPU-bound lower bound of the ratio on {cores} cores: {many.floor(cores) / one.seconds:.2f}x "
            f"(max(all CPU / {cores} = {many.cpu / cores:.2f} s, the client loop's own = {many.busiest[0]:.2f} s) "
            f"/ 1 client's {one.seconds:.2f} s)")


def per_call(mgr, calls: int, bare: BareCommit | None = None, echo: Echo | None = None) -> dict[str, float]:
    """Median microseconds of a read, a parameter read, and a stored change (set_priority).

    With `bare`: a bare commit after each call too, its median as "commit" (a disk's fsync time drifts: this
    measures it while the calls run).  With `echo`: a floor round trip after each call too, its median beside
    the call's as "<name> floor" (this VM's figures drift 2-5x between minutes: a floor measured before the
    calls is not theirs)."""
    pd = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
    out = {}
    priorities = itertools.cycle((1, 2))    # a new value each time: a change to store (the same one is not)
    todo = [("get_current_status", pd.get_current_status),
             ("get_runtime_param", lambda: pd.get_runtime_param("/system/memory/max")),
             ("set_priority", lambda: pd.set_priority(next(priorities)))]
    if hasattr(mgr, "_channel"):        # bmid: the status as a request too (get_current_status reads the board)
        todo.insert(1, ("get_current_status (request)",
                         lambda: mgr._channel.value("get_current_status", pd=pd.get_pd_id())))
    commits = []
    for name, fn in todo:
        times, floors = [], []
        for i in range(calls):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
            if bare is not None and name.startswith("set_"):
                commits.append(bare.once_ns() / 1e9)
            if echo is not None:
                floors.append(echo_ns(echo.sock, i) / 1e9)
        out[name] = statistics.median(times) * 1e6
        if floors:
            out[name + " floor"] = statistics.median(floors) * 1e6
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
    calls = []          # a change among `count` PDs (its subtree, its children and the lock it takes)
    for i in range(200):
        t = time.perf_counter()
        pds[-1].set_priority(i % 3)
        calls.append(time.perf_counter() - t)
    out["set_priority_us"] = statistics.median(calls) * 1e6
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
    parser.add_argument("--rounds", type=int, default=3, help="1-client / N-client pairs of group commit runs")
    parser.add_argument("--running", action="store_true", help="start every PD (busybox sleep), not only allocate")
    args = parser.parse_args()
    print(cgroups_line())
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Bmid(tmp).start()
        try:
            with bmi.open("linux:///session", integrity=False) as session, daemon.open() as system:
                if args.image_mib:
                    s_ms, y_ms = setup_pair(session, system, args.image_mib, tmp)
                    print(f"setup_pd {args.image_mib} MiB FileImage: session {s_ms:.0f} ms, system {y_ms:.0f} ms, "
                          f"ratio {y_ms / s_ms:.2f}x  (goal <= 1.25x)")
                bare, echo = BareCommit(daemon.state_dir), Echo()
                try:
                    a, b = per_call(session, args.calls), per_call(system, args.calls, bare, echo)
                finally:
                    bare.close()
                    echo.close()
                commit = b.pop("commit")
                floors = {name: b.pop(name + " floor") for name in list(b) if name + " floor" in b}
                print(f"floors: JSON-RPC round trip {statistics.median(floors.values()):.1f} us (median; each call "
                      f"is held to the round trips made between its own), synchronous=FULL commit {commit:.1f} us "
                      f"(one after each set_priority, same filesystem)")
                print(f"per call (median of {args.calls}, us)      session    system   ratio  floor  goal")
                for name in b:
                    floor = floors[name]
                    change = name.startswith("set_")
                    goal = f"{(3 * floor + commit) / floor:5.1f}x ((3 x floor + commit) / floor)" if change \
                        else "  2.0x"
                    session_us = f"{a[name]:9.1f}" if name in a else f"{'-':>9}"
                    ratio = f"{b[name] / a[name]:7.1f}x" if name in a else f"{'-':>8}"
                    print(f"  {name:<32} {session_us} {b[name]:9.1f} {ratio} {b[name] / floor:5.1f}x {goal}")
                print(group_commit_rounds(daemon, system, CLIENTS, args.changes, args.rounds))
                what = "running" if args.running else "allocated"
                print(f"{args.pds} {what} PDs (bmid; _ms: ms, _us: us)")
                for name, value in many(system, args.pds, args.running).items():
                    goal = {"list_and_status_ms": "  (goal < 50)",
                            "set_priority_us": f"  (with a few PDs: {b['set_priority']:.1f}, ratio "
                                               f"{value / b['set_priority']:.2f}x)"}.get(name, "")
                    print(f"  {name:<32} {value:9.2f}{goal}")
        finally:
            daemon.close()


if __name__ == "__main__":
    main()
