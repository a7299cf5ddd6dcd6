"""QEMU test rigs: run parts of the suite on kernels and hypervisors this host lacks.

    rig.py cgroup2 [--timeout S] [-- PYTEST ARGS]   pure cgroup v2 Debian kernel
    rig.py xen     [--timeout S] [-- PYTEST ARGS]   Xen 4.17, Debian kernel as PV dom0

Each run builds its initramfs from the host's installed packages, boots
QEMU (TCG) with the host root shared read-only over 9p, and the guest
runs pytest from this checkout in the host root under a tmpfs overlay.
The guest ends with "BMI-RIG-RESULT <rc>" on its console and powers off;
this script exits with that rc (1 if QEMU hung, crashed or printed no
result), and keeps the console log in rig/out/<rig>-serial.log.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from typing import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
OUT = os.path.join(HERE, "out")
sys.path.insert(0, HERE)

import initramfs  # noqa: E402
from initramfs import RigError  # noqa: E402

MARKER = re.compile(rb"^BMI-RIG-RESULT (\d+)\s*$", re.M)
# pytest's closing line, e.g. "7 passed, 5 deselected in 240.12s (0:04:00)"
SUMMARY = re.compile(rb"^=*\s*((?:\d+ \w+, )*\d+ \w+) in [\d.]+s\b.*$", re.M)
NINEP_MODULES = ["virtio_pci", "9pnet_virtio", "9p", "overlay"]
# for the device and network tests: /dev/net/tun, veth pairs, the bridge they join
NET_MODULES = ["tun", "veth", "bridge"]
XEN_MODULES = ["xenfs", "xen-privcmd", "xen-evtchn", "xen-gntdev", "xen-gntalloc", "xen-netback"]
CGROUP2_TESTS = ["-m", "not hybrid_host", "tests/drivers/linux/test_cgroups.py",
                 "tests/drivers/linux/test_driver.py", "tests/api/test_lifecycle.py",
                 "tests/drivers/linux/test_devices.py", "tests/security/test_device_attacks.py",
                 # the init cloned into its v2 group, also into one the kernel kills newcomers of; bmid
                 # killed and restarted with PDs in such groups
                 "tests/drivers/linux/test_spawn.py::test_init_is_cloned_into_its_v2_group",
                 "tests/drivers/linux/test_spawn.py::test_a_v2_group_once_killed_still_takes_a_new_init",
                 "tests/server/test_crash.py"]
XEN_TEST_DIR = "tests/drivers/xen"
XEN_DIR = "/usr/lib/xen-4.17"
GUEST_MARKER = "BMI-GUEST-UP"             # what tests/drivers/xen waits for
PYTEST = ".venv/bin/python -m pytest -p no:cacheprovider -q -rfEs"
QEMU = ["qemu-system-x86_64", "-accel", "tcg,thread=multi", "-smp", "2",
        "-display", "none", "-monitor", "none", "-serial", "stdio", "-nic", "none", "-no-reboot",
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"]


def debian_kernel() -> tuple[str, str]:
    """(vmlinuz path, release) of the newest Debian 6.1 kernel installed, or $RIG_KERNEL."""
    chosen = os.environ.get("RIG_KERNEL") or max(glob.glob("/boot/vmlinuz-6.1.*"), default=None)
    if not chosen or not os.path.isfile(chosen):
        raise RigError("no Debian kernel in /boot (vmlinuz-6.1.*); install linux-image-amd64 or set RIG_KERNEL")
    release = os.path.basename(chosen)[len("vmlinuz-"):]
    if not os.path.isdir(f"/lib/modules/{release}"):
        raise RigError(f"{chosen} has no modules in /lib/modules/{release}")
    return chosen, release


def _write_initramfs(name: str, init: str, **kw) -> str:
    """rig/out/<name>.cpio with `init` (a file in rig/init) as /init; `kw` goes to initramfs.build."""
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, f"{name}.cpio")
    with open(path + ".tmp", "wb") as f:
        initramfs.build(f, init=os.path.join(HERE, "init", init), **kw)
    os.replace(path + ".tmp", path)
    return path


def _host_root_initramfs(name: str, stage2: str, env: dict[str, str], release: str,
                         modules: Sequence[str]) -> str:
    """Stage 1 mounts the host root and switches into it; `stage2` runs there as PID 1."""
    scripts = [os.path.join(HERE, "init", s) for s in ("common.sh", stage2)]
    return _write_initramfs(name, "stage1.sh", scripts=scripts, env={**env, "RIG_STAGE2": stage2},
                            release=release, modules=modules)


def _test_env(tests: Sequence[str], timeout: int, extra_env: str = "") -> dict[str, str]:
    """What the stage-2 scripts read: where the checkout is, the pytest command, its deadline."""
    # BMI_NO_SKIP=1: a test skipped in a rig fails (tests/conftest.py): a rig exists to run them.
    return {"RIG_CHECKOUT": REPO, "RIG_TEST_TIMEOUT": str(timeout), "RIG_EXTRA_ENV": f"BMI_NO_SKIP=1 {extra_env}",
            "RIG_TEST_CMD": f"{PYTEST} {shlex.join(tests)}"}


def boot(name: str, cmd: list[str], timeout: float, log_path: str) -> int:
    """Run the VM command, mirror its console to stdout and `log_path`; return the guest's rc."""
    start = time.monotonic()
    with open(log_path, "wb") as log:
        log.write(("$ " + shlex.join(cmd) + "\n").encode())
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)

        def pump() -> None:
            assert proc.stdout is not None
            for line in iter(proc.stdout.readline, b""):
                log.write(line)
                log.flush()
                sys.stdout.buffer.write(line)
                sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            qemu_rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            qemu_rc = None
        reader.join(10)
    elapsed = time.monotonic() - start
    with open(log_path, "rb") as f:
        console = f.read()
    results, summaries = MARKER.findall(console), SUMMARY.findall(console)
    counts = summaries[-1].decode() if summaries else "no pytest summary"
    if qemu_rc is None:
        verdict, rc = f"VM killed after the {timeout:.0f} s hard timeout", 1
    elif not results:
        verdict, rc = f"VM exited ({qemu_rc}) without a result line: the guest crashed or panicked", 1
    else:
        rc = int(results[-1])
        verdict = f"guest result {rc}" + (" (guest-side timeout)" if rc == 143 else "")
        if rc == 0 and not re.search(r"\b[1-9]\d* passed", counts):
            verdict, rc = verdict + " but no test passed", 1
    verdict += f"; {counts}"
    line = f"rig {name}: {verdict}; {elapsed:.0f} s; console log: {os.path.relpath(log_path)}"
    print(line, flush=True)
    with open(os.path.join(os.path.dirname(log_path), f"{name}.verdict"), "w") as f:   # .ci/run repeats it
        f.write(line + "\n")
    return rc


def run_cgroup2(tests: Sequence[str], timeout: int) -> int:
    """The Debian kernel with only cgroup v2, its controllers enabled for children of the root."""
    kernel, release = debian_kernel()
    initrd = _host_root_initramfs("cgroup2", "cgroup2.sh", _test_env(tests, timeout), release,
                                  NINEP_MODULES + NET_MODULES)
    append = ("console=ttyS0 rdinit=/init panic=-1 loglevel=4 "
              "cgroup_no_v1=all systemd.unified_cgroup_hierarchy=1")
    return boot("cgroup2", QEMU + ["-cpu", "qemu64", "-m", "2560", "-kernel", kernel, "-initrd", initrd,
                            "-append", append], timeout + 120, os.path.join(OUT, "cgroup2-serial.log"))


def xen_image() -> str:
    """Xen uncompressed (QEMU's multiboot loader cannot read the packaged .gz)."""
    packaged = "/boot/xen-4.17-amd64.gz"
    if not os.path.isfile(packaged):
        raise RigError(f"{packaged} is missing; install xen-hypervisor-4.17-amd64")
    os.makedirs(OUT, exist_ok=True)          # a fresh checkout has no rig/out yet
    path = os.path.join(OUT, "xen-4.17-amd64")
    if not os.path.exists(path) or os.path.getmtime(path) < os.path.getmtime(packaged):
        with gzip.open(packaged) as src, open(path + ".tmp", "wb") as dst:
            dst.write(src.read())
        os.replace(path + ".tmp", path)
    return path


def run_xen(tests: Sequence[str], timeout: int) -> int:
    """Xen with the Debian kernel as PV dom0; the tests get a guest kernel and initramfs to boot."""
    kernel, release = debian_kernel()
    if not os.path.isdir(XEN_DIR):
        raise RigError(f"{XEN_DIR} is missing; install xen-utils-4.17")
    xen = xen_image()
    guest = _write_initramfs("xen-guest", "pvguest.sh", env={"BMI_GUEST_MARKER": GUEST_MARKER})
    extra = (f"BMI_TPM_TCTI=swtpm:path=/run/rig/tpm/sock BMI_XEN_GUEST_KERNEL={kernel} "
             f"BMI_XEN_GUEST_RAMDISK={guest}")
    selection = ["-m", "xen", *(tests or [XEN_TEST_DIR])]
    env = _test_env(selection, timeout, extra)
    initrd = _host_root_initramfs("xen-dom0", "dom0.sh", env, release,
                                  NINEP_MODULES + XEN_MODULES + NET_MODULES)
    xen_append = "console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M dom0_max_vcpus=2 noreboot"
    dom0_append = "console=hvc0 rdinit=/init panic=-1 loglevel=4"
    return boot("xen", QEMU + ["-cpu", "qemu64,+svm,+npt", "-m", "3072", "-kernel", xen, "-append", xen_append,
                               "-initrd", f"{kernel} {dom0_append},{initrd}"],
                timeout + 180, os.path.join(OUT, "xen-serial.log"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("rig", choices=["cgroup2", "xen"])
    parser.add_argument("--timeout", type=int, default=1200,
                        help="guest-side pytest deadline in seconds (the host adds boot time on top)")
    parser.add_argument("tests", nargs="*", help="pytest paths (relative to the checkout) and options, after --; "
                             "default: the rig's own selection")
    args = parser.parse_intermixed_args(argv)
    try:
        if args.rig == "xen":
            return run_xen(args.tests, args.timeout)
        return run_cgroup2(args.tests or CGROUP2_TESTS, args.timeout)
    except RigError as e:
        print(f"rig {args.rig}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
