"""Start-up cost of a PD against bubblewrap, alternating in one process.

bmi:   allocate_pd + setup_pd (1 MiB static binary, measured) + RUNNING,
       then wait for the program to exit and destroy the PD.
bwrap: `bwrap --unshare-all` with a tmpfs root, /proc, /dev, /tmp and the
       same binary bound in, until it exits.
Prints the medians and the ratio bmi/bwrap (goal <= 1.0).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import bmi  # noqa: E402

SOURCE = "static char pad[1 << 20] = {1};\nint main(void) { return pad[0] - 1; }\n"


def build_binary(directory: str, source: str = SOURCE) -> str:
    src, out = os.path.join(directory, "one_mib.c"), os.path.join(directory, "one_mib")
    with open(src, "w") as f:
        f.write(source)
    subprocess.run(["gcc", "-static", "-O2", "-o", out, src], check=True)
    return out


def bmi_once(mgr: bmi.PDManagement, path: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    pd = mgr.allocate_pd(bmi.PDDescription(mem=32 << 20))
    pd.setup_pd(bmi.FileImage(path))
    pd.request_status_change(bmi.PDStatus.RUNNING)
    running = time.perf_counter() - t0
    status = pd.wait(10)
    pd.destroy()
    assert status is bmi.PDStatus.SHUTDOWN, status
    return running, time.perf_counter() - t0


def bwrap_once(bwrap: str, path: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([bwrap, "--unshare-all", "--die-with-parent", "--tmpfs", "/", "--proc", "/proc",
                    "--dev", "/dev", "--tmpfs", "/tmp", "--ro-bind", path, "/prog", "/prog"], check=True)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--rounds", type=int, default=50)
    args = parser.parse_args()
    bwrap = shutil.which("bwrap")
    with tempfile.TemporaryDirectory() as tmp, bmi.open(integrity=False) as mgr:
        path = build_binary(tmp)
        for _ in range(3):      # warm caches on both sides
            bmi_once(mgr, path)
            if bwrap:
                bwrap_once(bwrap, path)
        to_running, full, anchor = [], [], []
        for _ in range(args.rounds):
            r, f = bmi_once(mgr, path)
            to_running.append(r)
            full.append(f)
            if bwrap:
                anchor.append(bwrap_once(bwrap, path))
    ms = lambda xs: statistics.median(xs) * 1000  # noqa: E731
    print(f"rounds: {args.rounds}, image: 1 MiB static ELF")
    print(f"bmi allocate+setup+RUNNING      median {ms(to_running):7.2f} ms")
    print(f"bmi full cycle (to exit+destroy) median {ms(full):7.2f} ms")
    if not anchor:
        print("bwrap not installed: no ratio (apt-get install bubblewrap)")
        return 0
    print(f"bwrap --unshare-all (to exit)     median {ms(anchor):7.2f} ms")
    print(f"ratio bmi-to-RUNNING / bwrap: {ms(to_running) / ms(anchor):.2f}")
    print(f"ratio bmi-full-cycle / bwrap: {ms(full) / ms(anchor):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
