"""Start-up cost of a PD against bubblewrap, alternating in one process.

bmi:   allocate_pd + setup_pd (1 MiB static binary, measured) + RUNNING,
       then wait for the program to exit and destroy the PD.
bwrap: `bwrap --unshare-all` with a tmpfs root, /proc, /dev, /tmp and the
       same binary bound in, until it exits.
Prints the medians and the ratio bmi/bwrap (goal <= 1.0), then where bmi's
time goes, phase by phase (medians over the same rounds), and the time to
destroy a running PD (its whole tree killed, cgroups removed, fds closed).
The phases are timed by wrapping the driver's functions (Phases below); the
wrappers cost about a microsecond each.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import bmi  # noqa: E402
from bmi.drivers.linux import cgroups, driver, spawn  # noqa: E402
from bench.host import cgroups_line  # noqa: E402

SOURCE = "static char pad[1 << 20] = {1};\nint main(void) { return pad[0] - 1; }\n"
SPIN = "static char pad[1 << 20] = {1};\nint main(void) { for (;;) __asm__ volatile(\"pause\"); return pad[0]; }\n"

#: (label, owner, attribute): the driver calls timed per round
TIMED = (("cgroup creation", cgroups.PDCgroups, "create"),
         ("cgroup limits", driver.LinuxDriver, "_limit"),
         ("uid allocation", driver.LinuxDriver, "_take_ids"),
         ("spawn (C shim)", spawn, "spawn"),
         ("cgroup removal", cgroups.PDCgroups, "destroy"),
         ("kill and reap", driver.LinuxDriver, "_kill"))
SHIM_PHASES = ("clone into namespaces", "uid maps + cgroup placement", "init: root, program exec")


class Phases:
    """Durations (ns) of the TIMED calls, and of the shim's own phases, for the current round."""

    def __init__(self) -> None:
        self.now: dict[str, int] = {}

    @contextlib.contextmanager
    def installed(self):
        saved = []
        for label, owner, name in TIMED:
            raw = owner.__dict__[name]
            saved.append((owner, name, raw))
            setattr(owner, name, self._timed(label, raw))
        try:
            yield self
        finally:
            for owner, name, raw in saved:
                setattr(owner, name, raw)

    def _timed(self, label: str, raw):
        kind = type(raw) if isinstance(raw, (staticmethod, classmethod)) else None
        func = raw.__func__ if kind else raw

        def timed(*args, **kwargs):
            t0 = time.perf_counter_ns()
            try:
                result = func(*args, **kwargs)
            finally:
                self.now[label] = self.now.get(label, 0) + time.perf_counter_ns() - t0
            if isinstance(result, spawn.Spawned):
                for phase, ns in zip(SHIM_PHASES, result.phases_ns):
                    self.now["  " + phase] = ns
            return result
        return kind(timed) if kind else timed

    def take(self) -> dict[str, int]:
        now, self.now = self.now, {}
        return now


def build_binary(directory: str, source: str = SOURCE, name: str = "one_mib") -> str:
    src, out = os.path.join(directory, name + ".c"), os.path.join(directory, name)
    with open(src, "w") as f:
        f.write(source)
    subprocess.run(["gcc", "-static", "-O2", "-o", out, src], check=True)
    return out


def bmi_once(mgr: bmi.PDManagement, path: str, marks: dict[str, int] | None = None) -> tuple[float, float]:
    t0 = time.perf_counter()
    pd = mgr.allocate_pd(bmi.PDDescription(mem=32 << 20))
    t1 = time.perf_counter()
    pd.setup_pd(bmi.FileImage(path))
    t2 = time.perf_counter()
    pd.request_status_change(bmi.PDStatus.RUNNING)
    t3 = time.perf_counter()
    running = t3 - t0
    status = pd.wait(10)
    t4 = time.perf_counter()
    pd.destroy()
    t5 = time.perf_counter()
    assert status is bmi.PDStatus.SHUTDOWN, status
    if marks is not None:
        marks.update({"allocate_pd": t1 - t0, "setup_pd": t2 - t1, "RUNNING": t3 - t2, "wait for exit": t4 - t3,
                      "destroy (exited PD)": t5 - t4})
    return running, t5 - t0


def destroy_running_once(mgr: bmi.PDManagement, path: str) -> float:
    """destroy() of a PD whose program spins: SIGKILL to its tree, reaped, cgroups removed, fds closed."""
    pd = mgr.allocate_pd(bmi.PDDescription(mem=32 << 20))
    pd.setup_pd(bmi.FileImage(path))
    pd.request_status_change(bmi.PDStatus.RUNNING)
    time.sleep(0.002)
    t0 = time.perf_counter()
    pd.destroy()
    return time.perf_counter() - t0


def bwrap_once(bwrap: str, path: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([bwrap, "--unshare-all", "--die-with-parent", "--tmpfs", "/", "--proc", "/proc",
                    "--dev", "/dev", "--tmpfs", "/tmp", "--ro-bind", path, "/prog", "/prog"], check=True)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--rounds", type=int, default=50)
    parser.add_argument("-d", "--destroy-rounds", type=int, default=30)
    args = parser.parse_args()
    print(cgroups_line())
    bwrap = shutil.which("bwrap")
    phases = Phases()
    per_phase: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp, bmi.open(integrity=False) as mgr, phases.installed():
        path = build_binary(tmp)
        spinner = build_binary(tmp, SPIN, "spin")
        for _ in range(3):      # warm caches on both sides
            bmi_once(mgr, path)
            if bwrap:
                bwrap_once(bwrap, path)
        to_running, full, anchor = [], [], []
        for _ in range(args.rounds):
            phases.take()
            marks: dict[str, float] = {}
            r, f = bmi_once(mgr, path, marks)
            marks.update({label: ns / 1e9 for label, ns in phases.take().items()})
            for label, seconds in marks.items():
                per_phase.setdefault(label, []).append(seconds)
            to_running.append(r)
            full.append(f)
            if bwrap:
                anchor.append(bwrap_once(bwrap, path))
        destroy_running, destroy_phases = [], {}
        for _ in range(args.destroy_rounds):
            destroy_running.append(destroy_running_once(mgr, spinner))
            for label, ns in phases.take().items():
                destroy_phases.setdefault(label, []).append(ns / 1e9)
    ms = lambda xs: statistics.median(xs) * 1000  # noqa: E731
    print(f"rounds: {args.rounds}, image: 1 MiB static ELF")
    print(f"bmi allocate+setup+RUNNING      median {ms(to_running):7.2f} ms")
    print(f"bmi full cycle (to exit+destroy) median {ms(full):7.2f} ms")
    print_phases(per_phase, destroy_running, destroy_phases)
    if not anchor:
        print("bwrap not installed: no ratio (apt-get install bubblewrap)")
        return 0
    print(f"bwrap --unshare-all (to exit)     median {ms(anchor):7.2f} ms")
    print(f"ratio bmi-to-RUNNING / bwrap: {ms(to_running) / ms(anchor):.2f}")
    print(f"ratio bmi-full-cycle / bwrap: {ms(full) / ms(anchor):.2f}")
    return 0


def print_phases(per_phase: dict[str, list[float]], destroy_running: list[float],
                 destroy_phases: dict[str, list[float]]) -> None:
    """Where bmi's time goes (medians over the rounds; the indented lines are parts of the line above)."""
    ms = lambda xs: statistics.median(xs) * 1000  # noqa: E731
    # (label, depth): allocate_pd, setup_pd and RUNNING add up to the to-RUNNING figure
    layout = (("allocate_pd", 0), ("cgroup creation", 1), ("cgroup limits", 1), ("uid allocation", 1),
              ("setup_pd", 0), ("RUNNING", 0), ("spawn (C shim)", 1), ("  clone into namespaces", 2),
              ("  uid maps + cgroup placement", 2), ("  init: root, program exec", 2), ("wait for exit", 0),
              ("destroy (exited PD)", 0), ("cgroup removal", 1))
    print("phase medians (ms):")
    for label, depth in layout:
        if label in per_phase:
            print(f"  {'  ' * depth}{label.strip():<{34 - 2 * depth}} {ms(per_phase[label]):7.3f}")
    if destroy_running:
        print(f"bmi destroy of a running PD      median {ms(destroy_running):7.2f} ms  "
              f"max {max(destroy_running) * 1000:7.2f} ms over {len(destroy_running)} (goal <= 5)")
        for label in ("kill and reap", "cgroup removal"):
            if label in destroy_phases:
                print(f"    {label:<30} {ms(destroy_phases[label]):7.3f}")


if __name__ == "__main__":
    sys.exit(main())
