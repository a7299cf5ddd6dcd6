"""xen:///system served by a real `bmid --uri xen:///system` in dom0 (rig/rig.py xen).  Skipped elsewhere.

The domains belong to bmid, not to the client or to bmid's process: a
SIGKILL of bmid leaves them running (checked with libxl), and the next
bmid adopts each one only if its domid still names the domain with the
UUID bmid gave it.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

import bmi
from bmi.errors import ImageError, InvalidArgument, InvalidState, NoSuchDomain, ResourceError
from tests.server.bmid import Bmid, require_root

from .conftest import GUEST_UP, MiB, domid, eventually, wait_console

pytestmark = [pytest.mark.xen, pytest.mark.slow]
UP = ("running", "blocked")


@pytest.fixture
def xen_bmid(xen_mgr, tmp_path):
    """A bmid for xen:///system on a private state dir (xen_mgr: skips outside dom0, warms libxl)."""
    require_root()
    daemon = Bmid(str(tmp_path), "--shutdown-grace", "60", system="xen:///system").start()
    try:
        yield daemon
    finally:
        if daemon.proc is None:
            daemon.start()
        daemon.close()


def state(xen, d: int) -> str | None:
    info = xen.info(d, what="test", pd_id=None)
    return None if info is None else info.state


def test_domains_outlive_bmid_and_are_adopted(xen_bmid, bundle_bytes, no_leftover_domains):
    xen = no_leftover_domains
    with xen_bmid.open() as mgr:
        assert mgr.layer_info()["driver"] == "xen"
        pd = mgr.allocate_pd(bmi.PDDescription(mem=128 * MiB, cpu=2, performance=100))
        pd_id = pd.get_pd_id()
        pd.setup_pd(bmi.BytesImage(bundle_bytes))
        measured = pd.measurement()
        assert measured["sha256"] == hashlib.sha256(bundle_bytes).digest()
        pd.set_config_param("/app/mode", "bmid")
        pd.set_runtime_param("/system/cpu/current", "1")           # the second vCPU comes after a restart
        pd.set_priority(5)
        pd.request_status_change(bmi.PDStatus.RUNNING)
        wait_console(pd, GUEST_UP)
        d = domid(pd)
        assert xen.sched(d, what="test", pd_id=None)[1] == 512
        pd.request_status_change(bmi.PDStatus.PAUSED)
        assert state(xen, d) == "paused"
        pd.request_status_change(bmi.PDStatus.RUNNING)
        assert state(xen, d) in UP

    xen_bmid.kill()
    assert state(xen, d) in UP                                      # bmid is gone, its domain is not
    xen_bmid.start()
    with xen_bmid.open() as mgr:
        assert mgr.list_pd() == [0, pd_id]
        pd = mgr.get_controller(pd_id)
        assert pd.get_current_status() is bmi.PDStatus.RUNNING
        assert domid(pd) == d and pd.measurement() == measured
        assert pd.get_config_param("/app/mode") == "bmid"
        assert xen.xs_read(f"/local/domain/{d}/bmi/config/app/mode", what="test") == "bmid"
        # the console is attached again: the guest onlines the vCPU Xen now offers and says so
        pd.set_runtime_param("/system/cpu/current", "2")
        wait_console(pd, "BMI-CPU-ONLINE")
        eventually(lambda: pd.get_runtime_param("/system/cpu/online") == "2", "the guest runs 2 vCPUs")
        pd.request_status_change(bmi.PDStatus.PAUSED)

    xen_bmid.kill()
    xen_bmid.start()
    with xen_bmid.open() as mgr:
        pd = mgr.get_controller(pd_id)
        assert pd.get_current_status() is bmi.PDStatus.PAUSED and state(xen, d) == "paused"
        pd.request_status_change(bmi.PDStatus.RUNNING)
        pd.request_status_change(bmi.PDStatus.SUSPENDED)            # the save stream goes to the fd keeper
        assert state(xen, d) is None

    xen_bmid.kill()
    xen_bmid.start()
    with xen_bmid.open() as mgr:
        pd = mgr.get_controller(pd_id)
        assert pd.get_current_status() is bmi.PDStatus.SUSPENDED
        pd.request_status_change(pd.get_runtime_param("/capability/resume"))
        restored = domid(pd)
        assert state(xen, restored) in UP and pd.measurement() == measured
        events = [e.status for e in mgr.events(since=0, timeout=1)]
        assert events.count(bmi.PDStatus.ALLOCATED) == 1 and events[-1] is bmi.PDStatus.RUNNING
        pd.destroy()
        assert state(xen, restored) is None
        assert mgr.list_pd() == [0]


def test_domains_that_ended_while_bmid_was_down_are_not_adopted(xen_bmid, bundle_bytes, no_leftover_domains):
    xen = no_leftover_domains
    with xen_bmid.open() as mgr:
        gone, off = (mgr.allocate_pd(bmi.PDDescription(mem=128 * MiB, cpu=1, performance=100)) for _ in range(2))
        for pd in (gone, off):
            pd.setup_pd(bmi.BytesImage(bundle_bytes))
            pd.request_status_change(bmi.PDStatus.RUNNING)
        wait_console(off, GUEST_UP)                                 # it must be up to power off when asked
        d_gone, d_off = domid(gone), domid(off)
        ids = gone.get_pd_id(), off.get_pd_id()

    xen_bmid.kill()
    xen.destroy(d_gone, what="test", pd_id=None)                    # behind bmid's back
    xen.shutdown(d_off, what="test", pd_id=None)                    # the guest powers off; nobody reaps it
    eventually(lambda: state(xen, d_gone) is None and state(xen, d_off) in ("shutdown", "dying", None),
               "the domains end")
    xen_bmid.start()
    with xen_bmid.open() as mgr:
        assert mgr.list_pd() == [0, *ids]
        gone, off = (mgr.get_controller(i) for i in ids)
        assert gone.get_current_status() is bmi.PDStatus.CRASHED
        assert f"domain {d_gone} ended while bmid was down" in gone.get_runtime_param("/system/exit-reason")
        assert gone.get_runtime_param("/system/xen/domid") == ""
        assert off.get_current_status() in (bmi.PDStatus.SHUTDOWN, bmi.PDStatus.CRASHED)
        assert "while bmid was down" in off.get_runtime_param("/system/exit-reason")
        assert state(xen, d_off) is None                            # reaped by the new bmid
        # the kept image was re-hashed and prepared again: the PD boots anew
        gone.request_status_change(bmi.PDStatus.RUNNING)
        assert state(xen, domid(gone)) in UP
        gone.destroy()
        off.destroy()


def test_bad_input_through_bmid_is_typed_and_leaves_nothing(xen_bmid, bundle_bytes, no_leftover_domains):
    with xen_bmid.open() as mgr:
        with pytest.raises(ResourceError, match="allocate_pd: mem="):
            mgr.allocate_pd(bmi.PDDescription(mem=1 << 50))
        with pytest.raises(NoSuchDomain, match="PD 999"):
            mgr.get_controller(999)
        pd = mgr.allocate_pd(bmi.PDDescription(mem=64 * MiB, cpu=1, performance=100))
        pd_id = pd.get_pd_id()
        with pytest.raises(ImageError, match=f"PD {pd_id}.*not a Xen guest image"):
            pd.setup_pd(bmi.BytesImage(b"#!/bin/sh\necho no\n"))
        assert pd.get_current_status() is bmi.PDStatus.ALLOCATED
        with pytest.raises(InvalidState):
            pd.request_status_change(bmi.PDStatus.RUNNING)
        with pytest.raises(InvalidArgument, match="xenstore"):
            pd.set_config_param("/app/a.b", "x")
        pd.setup_pd(bmi.BytesImage(b"\x7fELF\x02\x01\x01" + b"\0" * 200))   # libxl refuses to build it
        with pytest.raises(bmi.BMIError, match=f"PD {pd_id}.*libxl"):
            pd.request_status_change(bmi.PDStatus.RUNNING)
        assert pd.get_current_status() is bmi.PDStatus.READY
        uri = xen_bmid.uri
        listed = subprocess.run([sys.executable, "-m", "bmi.cli", "--uri", uri, "list", "--json"],
                                capture_output=True, text=True, timeout=120)
        assert listed.returncode == 0, listed.stderr
        assert [(x["pd"], x["status"]) for x in json.loads(listed.stdout)] == [(pd_id, "READY")]
        info = subprocess.run([sys.executable, "-m", "bmi.cli", "--uri", uri, "info", "--json"],
                              capture_output=True, text=True, timeout=120)
        assert info.returncode == 0 and json.loads(info.stdout)["driver"] == "xen", info.stderr
        pd.destroy()
        with pytest.raises(NoSuchDomain):
            pd.get_runtime_param("/system/status")
