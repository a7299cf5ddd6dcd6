"""The BMI surface on real Xen domains, in dom0 (rig/rig.py xen).  Skipped elsewhere, with the reason.

Every boot costs seconds under TCG, so each test drives one or two guests
through many steps.
"""
from __future__ import annotations

import hashlib
import time

import pytest

import bmi
from bmi.drivers.xen import config as xcfg
from bmi.drivers.xen.libxl import PERM_NONE, PERM_READ, PERM_RW
from bmi.errors import ImageError, InvalidArgument, InvalidState, NoSuchDomain

from .conftest import GUEST_UP, MiB, domid, eventually, wait_console

pytestmark = [pytest.mark.xen, pytest.mark.slow]
def boot(mgr, bundle_bytes, **config) -> bmi.PDController:
    pd = mgr.allocate_pd(bmi.PDDescription(mem=128 * MiB, cpu=2, performance=100))
    pd.setup_pd(bmi.BytesImage(bundle_bytes))
    for name, value in config.items():
        pd.set_config_param(name, value)
    pd.request_status_change(bmi.PDStatus.RUNNING)
    return pd


def test_lifecycle_and_live_resources(xen_mgr, bundle_bytes, no_leftover_domains):
    pd = xen_mgr.allocate_pd(bmi.PDDescription(mem=128 * MiB, cpu=2, performance=100))
    try:
        _lifecycle(pd, no_leftover_domains, bundle_bytes)
    finally:
        if pd.get_current_status() is not bmi.PDStatus.DESTROYED:
            pd.destroy()


def _lifecycle(pd: bmi.PDController, xen, bundle_bytes: bytes) -> None:
    pd.setup_pd(bmi.BytesImage(bundle_bytes), banks=("sha256", "sha384"))
    m = pd.measurement()
    assert m["sha256"] == hashlib.sha256(bundle_bytes).digest()
    assert m["sha384"] == hashlib.sha384(bundle_bytes).digest()
    assert pd.get_runtime_param("/system/image/format") == "bundle"
    pd.set_config_param("/app/mode", "demo")
    pd.set_runtime_param("/system/cpu/current", "1")           # boot with one of two vCPUs
    pd.set_priority(5)
    pd.request_status_change("RUNNING")
    wait_console(pd, GUEST_UP)
    d = domid(pd)
    assert dict(xen.domains())[d] in ("running", "blocked")

    # config parameters: in the guest's xenstore home, readable but not writable by it
    home = f"/local/domain/{d}/bmi"
    assert xen.xs_read(f"{home}/config/app/mode", what="t") == "demo"
    assert xen.xs_read(f"{home}/pd-id", what="t") == str(pd.get_pd_id())
    for path in (home, f"{home}/config/app/mode"):
        assert xen.xs_get_perms(path, what="t") == [(0, PERM_NONE), (d, PERM_READ)]

    # priority -> credit2 weight, live
    assert xen.sched(d, what="t", pd_id=None)[1] == xcfg.priority_weight(5) == 512
    pd.set_priority(-10)
    assert xen.sched(d, what="t", pd_id=None)[1] == 64
    assert pd.get_runtime_param("/system/cpu/weight") == "64"
    pd.set_runtime_param("/system/cpu/performance", "50")
    assert xen.sched(d, what="t", pd_id=None)[2] == 50         # 50 % of one vCPU

    # pause / resume
    pd.request_status_change(bmi.PDStatus.PAUSED)
    assert xen.info(d, what="t", pd_id=None).state == "paused"
    assert pd.get_current_status() is bmi.PDStatus.PAUSED
    pd.request_status_change(bmi.PDStatus.RUNNING)
    assert xen.info(d, what="t", pd_id=None).state in ("running", "blocked")

    # memory: the balloon target moves, within [min, max]
    pd.set_runtime_param("/system/memory/current", str(96 * MiB))
    assert int(pd.get_runtime_param("/system/memory/current")) == 96 * MiB
    eventually(lambda: int(pd.get_runtime_param("/system/memory/used")) <= 100 * MiB,
               "the guest balloons down to 96 MiB")
    with pytest.raises(InvalidArgument, match="memory/current"):
        pd.set_runtime_param("/system/memory/current", str(256 * MiB))

    # vCPUs: the guest onlines the second one when Xen offers it
    pd.set_runtime_param("/system/cpu/current", "2")
    eventually(lambda: pd.get_runtime_param("/system/cpu/online") == "2", "the guest runs 2 vCPUs")

    # shutdown: the guest powers off through PV shutdown
    pd.request_status_change(bmi.PDStatus.SHUTDOWN)
    assert pd.get_current_status() is bmi.PDStatus.SHUTDOWN
    assert "powered off" in pd.get_runtime_param("/system/exit-reason")
    assert xen.info(d, what="t", pd_id=None) is None

    # restart: a fresh boot of the same measured image
    offset, _ = pd.read_console(0, timeout=0)
    pd.request_status_change(bmi.PDStatus.RESTARTING)
    assert pd.get_current_status() is bmi.PDStatus.RUNNING
    wait_console(pd, GUEST_UP, since=offset)
    d2 = domid(pd)
    assert d2 != d
    pd.destroy()
    assert xen.info(d2, what="t", pd_id=None) is None
    assert pd.get_current_status() is bmi.PDStatus.DESTROYED


def test_suspend_resume_and_rendezvous(xen_mgr, bundle_bytes, no_leftover_domains):
    xen = no_leftover_domains
    a, b = boot(xen_mgr, bundle_bytes), boot(xen_mgr, bundle_bytes)
    try:
        wait_console(a, GUEST_UP)
        wait_console(b, GUEST_UP)
        assert a.get_runtime_param("/capability/connection-enforcement") == "rendezvous"
        drv = xen_mgr._driver
        ha, hb = (x._mgr._pd(x.get_pd_id(), "t").handle for x in (a, b))
        assert drv.rendezvous_path(ha, hb) is None                      # no policy: no meeting place
        ipc = [bmi.ConnectionPolicy(bmi.ConnectionType.IPC, bmi.RW)]
        a.set_allowed_connections(b.get_pd_id(), ipc)
        path = drv.rendezvous_path(ha, hb)
        assert xen.xs_get_perms(path, what="t") == [(0, PERM_NONE), (domid(a), PERM_RW), (domid(b), PERM_RW)]
        a.set_allowed_connections(b.get_pd_id(), [])                    # withdrawn: the path goes
        assert drv.rendezvous_path(ha, hb) is None and xen.xs_read(path, what="t") is None
        a.set_allowed_connections(b.get_pd_id(), ipc)

        before = domid(a)
        assert a.get_runtime_param("/capability/suspend") == "SUSPENDED"
        a.request_status_change(bmi.PDStatus.SUSPENDED)
        assert a.get_current_status() is bmi.PDStatus.SUSPENDED
        assert xen.info(before, what="t", pd_id=None) is None          # the domain is gone, its state saved
        assert drv.rendezvous_path(ha, hb) is None                      # and so is its rendezvous
        a.request_status_change(a.get_runtime_param("/capability/resume"))
        assert a.get_current_status() is bmi.PDStatus.RUNNING
        after = domid(a)
        assert xen.info(after, what="t", pd_id=None).state in ("running", "blocked")
        path = drv.rendezvous_path(ha, hb)                              # back, for the new domid
        assert xen.xs_get_perms(path, what="t") == [(0, PERM_NONE), (after, PERM_RW), (domid(b), PERM_RW)]
        # the restored guest carries on where it was: same boot, CPUs still polled
        time.sleep(3)
        assert a.get_current_status() is bmi.PDStatus.RUNNING
    finally:
        a.destroy()
        b.destroy()


def test_bad_input_typed_errors_and_nothing_left(xen_mgr, bundle_bytes, no_leftover_domains):
    pd = xen_mgr.allocate_pd(bmi.PDDescription(mem=64 * MiB, cpu=1, performance=100))
    try:
        with pytest.raises(ImageError, match=f"PD {pd.get_pd_id()}.*not a Xen guest image"):
            pd.setup_pd(bmi.BytesImage(b"#!/bin/sh\necho no\n"))
        with pytest.raises(InvalidState):
            pd.request_status_change(bmi.PDStatus.RUNNING)
        with pytest.raises(InvalidArgument, match="xenstore"):
            pd.set_config_param("/app/a.b", "x")
        with pytest.raises(InvalidArgument, match="not one of"):
            pd.set_config_param("/boot/type", "hvm")
        # an ELF header with nothing behind it: libxl refuses, no half-built domain stays
        pd.setup_pd(bmi.BytesImage(b"\x7fELF\x02\x01\x01" + b"\0" * 200))
        with pytest.raises(bmi.errors.BMIError) as info:
            pd.request_status_change(bmi.PDStatus.RUNNING)
        assert f"PD {pd.get_pd_id()}" in str(info.value) and "libxl" in str(info.value)
        assert pd.get_current_status() is bmi.PDStatus.READY
    finally:
        pd.destroy()
    with pytest.raises(NoSuchDomain):
        pd.get_runtime_param("/system/status")


def test_pci_passthrough_says_why_not_and_a_missing_bridge_is_named(xen_mgr, bundle_bytes, no_leftover_domains):
    """No IOMMU in the rig: assign refuses and says why, and /capability/devices/assign lists it; a vif into
    a bridge dom0 lacks is refused at start, naming it (test_network.py has the working vif)."""
    pd = xen_mgr.allocate_pd(bmi.PDDescription(mem=128 * MiB, cpu=1, performance=100))
    try:
        devices = xen_mgr.get_device_manager()
        assert all(d.startswith("pci:") for d in devices.list_devices())
        with pytest.raises(bmi.NotSupported, match="IOMMU"):
            devices.assign("pci:0000:00:02.0", pd.get_pd_id())
        assert pd.get_runtime_param("/capability/devices/assign").startswith("no: ")
        pd.setup_pd(bmi.BytesImage(bundle_bytes))
        pd.set_config_param("/net/eth0", "veth:nosuchbr0")
        with pytest.raises(bmi.InvalidArgument, match="no bridge 'nosuchbr0' in dom0"):
            pd.request_status_change(bmi.PDStatus.RUNNING)
    finally:
        pd.destroy()
