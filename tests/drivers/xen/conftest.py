"""Fixtures for tests on real Xen domains (run in dom0 by `make test-xen`, rig/rig.py xen).

The guest is the host's Debian kernel (BMI_XEN_GUEST_KERNEL, else the
newest /boot/vmlinuz-*) with the rig's busybox initramfs (rig/init/pvguest.sh;
BMI_XEN_GUEST_RAMDISK, the one rig.py built, overrides it): it prints
BMI-GUEST-UP, onlines hot-added vCPUs, and powers off when Xen asks it to.
"""
from __future__ import annotations

import glob
import io
import os
import pathlib
import sys
import time
from typing import Mapping

import pytest

import bmi
from bmi.drivers.cpio import CpioWriter

RIG = str(pathlib.Path(__file__).resolve().parents[3] / "rig")
sys.path.insert(0, RIG)

import initramfs  # noqa: E402

GUEST_UP = "BMI-GUEST-UP"
MiB = 1 << 20
BOOT_TIMEOUT = 180.0


def wait_console(pd: bmi.PDController, text: str, since: int = 0, timeout: float = BOOT_TIMEOUT) -> int:
    """Wait for `text` in the console after offset `since`; return the offset after it."""
    deadline = time.monotonic() + timeout
    seen = b""
    offset = since
    while time.monotonic() < deadline:
        offset, data = pd.read_console(offset, timeout=2.0)
        seen += data
        if text.encode() in seen:
            return offset
    pytest.fail(f"PD {pd.get_pd_id()}: {text!r} not on the console within {timeout:g} s; console:\n"
                f"{seen[-3000:].decode(errors='replace')}")


def eventually(check, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            assert value, f"{what}: not within {timeout:g} s"
            return value
        time.sleep(0.5)


def domid(pd: bmi.PDController) -> int:
    return int(pd.get_runtime_param("/system/xen/domid"))


def dom0_reason() -> str | None:
    """Why these tests cannot run here, or None in a Xen dom0 with the shim built."""
    try:
        with open("/proc/xen/capabilities") as f:
            if "control_d" not in f.read():
                return "not a Xen dom0 (/proc/xen/capabilities lacks control_d); run `make test-xen`"
    except OSError:
        return "not running on Xen (no /proc/xen/capabilities); run `make test-xen` to boot Xen in QEMU"
    from bmi.drivers.xen.libxl import unavailable_reason
    return unavailable_reason()


def guest_kernel() -> str:
    path = os.environ.get("BMI_XEN_GUEST_KERNEL") or max(glob.glob("/boot/vmlinuz-*"), default="")
    if not os.path.isfile(path):
        pytest.skip("no guest kernel: install linux-image-amd64 or set BMI_XEN_GUEST_KERNEL")
    return path


def guest_ramdisk(extra: Mapping[str, bytes] | None = None) -> bytes:
    """The guest initramfs: $BMI_XEN_GUEST_RAMDISK, else rig/init/pvguest.sh as /init
    with busybox.  `extra` (path -> executable) goes in as a second archive
    appended to the first, which the kernel unpacks over it."""
    path = os.environ.get("BMI_XEN_GUEST_RAMDISK")
    out = io.BytesIO()
    if path:
        with open(path, "rb") as f:
            out.write(f.read())
    else:
        try:
            initramfs.build(out, init=os.path.join(RIG, "init", "pvguest.sh"), env={"BMI_GUEST_MARKER": GUEST_UP})
        except initramfs.RigError as e:
            pytest.skip(f"no guest initramfs: {e}")
    if extra:
        w = CpioWriter(out)
        for name, data in extra.items():
            w.file(name, data, 0o755)
        w.close()
    return out.getvalue()


def guest_bundle(cmdline: str = "console=hvc0 quiet", extra: Mapping[str, bytes] | None = None) -> bytes:
    """A Xen bundle image: kernel, ramdisk (with `extra` files), cmdline."""
    out = io.BytesIO()
    w = CpioWriter(out)
    with open(guest_kernel(), "rb") as f:
        w.file("kernel", f.read())
    w.file("ramdisk", guest_ramdisk(extra))
    w.file("cmdline", cmdline.encode())
    w.close()
    return out.getvalue()


@pytest.fixture(scope="module")
def xen_mgr():
    reason = dom0_reason()
    if reason:
        pytest.skip(reason)
    import bmi
    from bmi.drivers.xen.config import domain_json
    with bmi.open("xen:///session", integrity=False) as mgr:
        mgr.shutdown_grace = 60.0           # a PV guest under TCG needs seconds to power off
        # libxl's own xenstore handle opens its watch pipe the first time libxl
        # waits on a watch (building and destroying a domain) and keeps it for
        # the context's life: make that happen before the per-test fd check.
        xen = mgr._driver._xen
        warm = domain_json(name=f"bmi-warmup-{os.getpid()}", guest_type="pv", memory=128 << 20,
                           max_memory=128 << 20, vcpus=1, max_vcpus=1, weight=256, cap=0,
                           kernel=guest_kernel(), ramdisk=None, cmdline="")
        domid = xen.create(warm, what="warm-up", pd_id=None)
        xen.destroy(domid, what="warm-up", pd_id=None)
        yield mgr


@pytest.fixture(scope="module")
def bundle_bytes(xen_mgr):
    return guest_bundle()


@pytest.fixture
def no_leftover_domains(xen_mgr):
    """Fail a test that leaves a domain behind."""
    xen = xen_mgr._driver._xen
    before = {d for d, _ in xen.domains()}
    yield xen
    after = {d for d, _ in xen.domains()}
    assert after <= before, f"domains left behind: {sorted(after - before)}"
