"""System mode against session mode: setup_pd of a big image, per-call overhead, and list + status of many live PDs.

    .venv/bin/python bench/system.py [--image-mib 256] [--calls 2000] [--pds 1000] [--running]

setup_pd through bmid copies and hashes each image once, as session mode
does (the goal: within 1.25x of session mode for a 256 MiB FileImage).

Starts its own bmid (state and socket in a tmp dir, no TPM link) and runs
the same calls on linux:///session in this process.  Prints medians and
the system/session ratio; the goal for 1000 PDs is list_pd + the status of
each in < 50 ms (read from bmid's status board; the same done with one
request per PD is printed next to it).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bmi  # noqa: E402
from tests.server.bmid import Bmid  # noqa: E402

BUSYBOX = "/bin/busybox"


def per_call(mgr, calls: int) -> dict[str, float]:
    """Median microseconds of a read, a parameter read, and a stored change (set_priority)."""
    pd = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
    out = {}
    for name, fn in (("get_current_status", pd.get_current_status),
                     ("get_runtime_param", lambda: pd.get_runtime_param("/system/memory/max")),
                     ("set_priority", lambda: pd.set_priority(1))):
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[name] = statistics.median(times) * 1e6
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
                a, b = per_call(session, args.calls), per_call(system, args.calls)
                print(f"per call (median of {args.calls}, us)      session    system   ratio")
                for name in a:
                    print(f"  {name:<32} {a[name]:9.1f} {b[name]:9.1f} {b[name] / a[name]:7.1f}x")
                what = "running" if args.running else "allocated"
                print(f"{args.pds} {what} PDs (bmid, ms)")
                for name, value in many(system, args.pds, args.running).items():
                    goal = "  (goal < 50)" if name == "list_and_status_ms" else ""
                    print(f"  {name:<32} {value:9.2f}{goal}")
        finally:
            daemon.close()


if __name__ == "__main__":
    main()
