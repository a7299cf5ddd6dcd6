"""Xen PD start vs `xl create` of the same guest, alternating (runs in dom0: the Xen rig).

bmi: allocate_pd + setup_pd (measuring the bundle into sealed memfds) +
request_status_change(RUNNING), which returns once the domain is built
and unpaused.  xl: `xl create` of the same kernel, ramdisk and command
line from files, which also returns once the domain is built and
unpaused.  Domains are destroyed between rounds, untimed.

    python bench/xen.py [--rounds N]
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
from tests.drivers.xen.conftest import dom0_reason, guest_bundle, guest_kernel, guest_ramdisk  # noqa: E402

CMDLINE = "console=hvc0 quiet"
MEM_MB = 128


def bmi_start(mgr: bmi.PDManagement, image: bytes) -> float:
    t0 = time.perf_counter()
    pd = mgr.allocate_pd(bmi.PDDescription(mem=MEM_MB << 20, cpu=1, performance=100))
    pd.setup_pd(bmi.BytesImage(image))
    pd.request_status_change(bmi.PDStatus.RUNNING)
    elapsed = time.perf_counter() - t0
    pd.destroy()
    return elapsed


def xl_start(workdir: str, round_no: int) -> float:
    name = f"bench-xl-{os.getpid()}-{round_no}"
    cfg = os.path.join(workdir, "guest.cfg")
    with open(cfg, "w") as f:
        f.write(f'name = "{name}"\ntype = "pv"\nkernel = "{workdir}/kernel"\nramdisk = "{workdir}/ramdisk"\n'
                f'cmdline = "{CMDLINE}"\nmemory = {MEM_MB}\nvcpus = 1\non_poweroff = "destroy"\n')
    t0 = time.perf_counter()
    subprocess.run(["xl", "create", "-q", cfg], check=True, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - t0
    subprocess.run(["xl", "destroy", name], check=True)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    reason = dom0_reason()
    if reason:
        print(f"bench/xen.py: skipped: {reason}")
        return 0
    image = guest_bundle(CMDLINE)
    with tempfile.TemporaryDirectory(prefix="bmi-bench-xen-") as workdir, \
            bmi.open("xen:///session", integrity=False) as mgr:
        with open(guest_kernel(), "rb") as src, open(os.path.join(workdir, "kernel"), "wb") as dst:
            dst.write(src.read())
        with open(os.path.join(workdir, "ramdisk"), "wb") as dst:
            dst.write(guest_ramdisk())
        bmi_times, xl_times = [], []
        for i in range(args.rounds):
            bmi_times.append(bmi_start(mgr, image))
            xl_times.append(xl_start(workdir, i))
            print(f"round {i + 1}: bmi {bmi_times[-1]:.2f} s, xl create {xl_times[-1]:.2f} s", flush=True)
    b, x = statistics.median(bmi_times), statistics.median(xl_times)
    print(f"median over {args.rounds} rounds ({len(image) >> 20} MiB bundle, PV, {MEM_MB} MiB):")
    print(f"  bmi allocate+setup+running  {b:.2f} s")
    print(f"  xl create                   {x:.2f} s")
    print(f"  ratio bmi / xl              {b / x:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
