"""A Xen PD's /net config: a vif into a dom0 bridge (rig/rig.py xen).  Skipped outside dom0.

The bridge is made with the manager's create_network in the rig's dom0 (a
QEMU VM with no network card: nothing leaves it); the guest
(rig/init/pvguest.sh) loads xen-netfront, reads its address from its
xenstore home with xsclient and brings eth0 up; dom0 then pings it.
"""
from __future__ import annotations

import os
import subprocess

import pytest

import bmi
from tests import images

from .conftest import MiB, domid, eventually, guest_bundle, guest_kernel, wait_console

pytestmark = [pytest.mark.xen, pytest.mark.slow]
BRIDGE, SUBNET, ADDRESS = "bmixen0", "10.213.11.0/24", "10.213.11.2"


def netfront_module() -> bytes:
    release = os.path.basename(guest_kernel())[len("vmlinuz-"):]
    path = f"/lib/modules/{release}/kernel/drivers/net/xen-netfront.ko"
    if not os.path.isfile(path):
        pytest.skip(f"no {path} for the guest kernel")
    with open(path, "rb") as f:
        return f.read()


def test_vif_into_a_dom0_bridge_carries_traffic(xen_mgr, no_leftover_domains):
    devices = xen_mgr.get_device_manager()
    devices.create_network(BRIDGE, SUBNET)
    pd = xen_mgr.allocate_pd(bmi.PDDescription(mem=128 * MiB, cpu=1, performance=100))
    vif = None
    try:
        with pytest.raises(bmi.NotSupported, match="veth:BRIDGE"):
            pd.set_config_param("/net/eth0", f"macvlan:{BRIDGE}")
        pd.setup_pd(bmi.BytesImage(guest_bundle(extra={"bin/xsclient": images.build("xsclient").read_bytes(),
                                                       "lib/modules/xen-netfront.ko": netfront_module()})))
        pd.set_config_param("/net/eth0", f"veth:{BRIDGE}")
        pd.set_config_param("/net/eth0/address", f"{ADDRESS}/24")
        assert pd.get_runtime_param("/capability/devices/network").startswith("veth: a vif")
        pd.request_status_change(bmi.PDStatus.RUNNING)
        vif = f"vif{domid(pd)}.0"
        assert os.path.realpath(f"/sys/class/net/{vif}/master").endswith(f"/{BRIDGE}")    # libxl's vif-bridge
        wait_console(pd, f"BMI-GUEST-NET-UP eth0 {ADDRESS}/24")
        eventually(lambda: subprocess.run(["busybox", "ping", "-c", "1", "-W", "2", ADDRESS],
                                          capture_output=True).returncode == 0, f"ping {ADDRESS} from dom0")
        assert pd.get_runtime_param("/interfaces/network") == f"eth0 veth:{BRIDGE} {ADDRESS}/24"
    finally:
        pd.destroy()
        devices.destroy_network(BRIDGE)
    assert vif is None or not os.path.exists(f"/sys/class/net/{vif}")       # gone with the domain

