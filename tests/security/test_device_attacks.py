"""Hostile PDs against device assignment: making nodes, and reopening a taken-back node through /proc/self/fd.

The reopen attack: after unassign the node is gone from the PD's /dev, but
an fd the PD kept names the host node, and opening /proc/self/fd/N opens it
afresh.  Two layers refuse it: the devices cgroup rule taken back at
unassign (EPERM, checked first, and what this test asserts: without that
rule the open gets to the second layer), and the node's detached mount
(EACCES).
"""
from __future__ import annotations

import os
import shlex

import pytest

import bmi
from tests.helpers import busybox_path, output
from tests.images import newc

TUN = "/dev/net/tun"


def busybox_pd(mgr, script: str, **config: str) -> bmi.PDController:
    """busybox as the /init of a root archive: its file is readable, so the PD's processes stay dumpable and
    /proc/self/fd is theirs (an ELF image runs execute-only, which already hides /proc/self/fd from it)."""
    with open(busybox_path(), "rb") as f:
        archive = newc([("bin", 0o40755), ("bin/busybox", 0o100755, f.read()), ("init", 0o120777, b"bin/busybox")])
    pd = mgr.allocate_pd(bmi.PDDescription(mem=64 << 20))
    pd.setup_pd(bmi.BytesImage(archive))
    pd.set_config_param("/boot/cmdline", shlex.join(["busybox", "sh", "-c", script]))
    for name, value in config.items():
        pd.set_config_param(name, value)
    return pd


def test_mknod_is_refused_even_with_cap_mknod(mgr):
    pd = busybox_pd(mgr, "busybox mknod /tmp/null c 1 3 && echo made-tmp; busybox mknod /dev/tun c 10 200 "
                         "&& echo made-dev; ls /dev; echo done", **{"/boot/capabilities": "mknod"})
    pd.request_status_change(bmi.PDStatus.RUNNING)
    console = output(pd)
    assert "done" in console and "made-" not in console, console
    assert "tun" not in console.split("done")[0].split(), console


@pytest.mark.skipif(not os.path.exists(TUN), reason=f"{TUN} is missing (no tun module)")
def test_reopening_an_unassigned_node_through_proc_self_fd_is_refused(mgr):
    pd = busybox_pd(mgr, f"exec 3<{TUN}; echo held; while [ -c {TUN} ]; do usleep 50000; done; "
                         "( exec 4</proc/self/fd/3 ) && echo reopened || echo refused")
    devices = mgr.get_device_manager()
    devices.assign(TUN, pd.get_pd_id(), bmi.READ)
    pd.request_status_change(bmi.PDStatus.RUNNING)
    offset, seen = 0, b""
    while b"held" not in seen:
        offset, chunk = pd.read_console(offset, timeout=10)
        assert chunk, seen
        seen += chunk
    if not pd.get_runtime_param("/capability/devices/enforced").startswith("yes"):
        devices.unassign(TUN, pd.get_pd_id())
        pytest.skip("no device controller here: " + pd.get_runtime_param("/capability/devices/enforced"))
    devices.unassign(TUN, pd.get_pd_id())
    console = output(pd)
    assert "refused" in console and "reopened" not in console, console
    assert "Operation not permitted" in console, console
