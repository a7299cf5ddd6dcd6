"""bmid's host networks: kept in its store, still there after a restart, made again when they went.

bmid runs in a network namespace made for this test (`ip netns add`,
entered with nsenter, so its mounts and cgroups stay the host's): the
bridge, the PD's veth and the client fetching a page from the PD all live
there, and nothing leaves the machine.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import textwrap

import pytest

import bmi
from tests.helpers import busybox_path

from .bmid import require_root, running_bmid

BRIDGE, SUBNET, ADDRESS = "bmitest3", "10.213.9.0/24", "10.213.9.2"

_FETCH = textwrap.dedent("""
    import sys, time, urllib.request
    for attempt in range(60):
        try:
            print(urllib.request.urlopen(f"http://{sys.argv[1]}:8080/", timeout=1).read().decode().strip())
            break
        except OSError as e:
            error = e
            time.sleep(0.25)
    else:
        print("unreachable:", error)
""")


@pytest.fixture
def netns():
    """A network namespace of this test's own, named under /run/netns, removed at the end."""
    require_root()
    if shutil.which("ip") is None or shutil.which("nsenter") is None:
        pytest.skip("needs iproute2 ip and util-linux nsenter")
    name = f"bmitest{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=True, capture_output=True)


def inside(ns: str, *argv: str) -> str:
    done = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "--", *argv], capture_output=True, text=True,
                          timeout=60)
    return done.stdout + done.stderr


def web_pd(mgr: bmi.PDManagement) -> bmi.PDController:
    pd = mgr.allocate_pd(bmi.PDDescription(mem=64 << 20))
    pd.setup_pd(bmi.FileImage(busybox_path()))
    pd.set_config_param("/boot/cmdline", shlex.join([
        "busybox", "sh", "-c", "mkdir /tmp/www && echo served-by-the-pd > /tmp/www/index.html && "
                               "exec busybox httpd -f -p 8080 -h /tmp/www"]))
    pd.set_config_param("/net/eth0", f"veth:{BRIDGE}")
    pd.set_config_param("/net/eth0/address", f"{ADDRESS}/24")
    return pd


def test_bmids_network_and_a_pds_net_config_survive_restarts(tmp_path, netns):
    fetch = (sys.executable, "-c", _FETCH, ADDRESS)
    with running_bmid(str(tmp_path), prefix=("nsenter", f"--net=/run/netns/{netns}", "--")) as daemon:
        with daemon.open() as mgr:
            mgr.get_device_manager().create_network(BRIDGE, SUBNET)
            pd = web_pd(mgr)
            pd_id = pd.get_pd_id()
            pd.request_status_change(bmi.PDStatus.RUNNING)
        assert "served-by-the-pd" in inside(netns, *fetch)

        daemon.stop()           # a restart: the bridge stays, and the running PD's veth in it
        daemon.start()
        with daemon.open() as mgr:
            networks = mgr.get_device_manager().list_networks()
            assert networks == [{"name": BRIDGE, "subnet": SUBNET, "nat": False}], networks
            assert mgr.get_controller(pd_id).get_config_param("/net/eth0") == f"veth:{BRIDGE}"
        assert "served-by-the-pd" in inside(netns, *fetch)

        daemon.kill()           # a crash, and the bridge gone with it (as after a reboot)
        inside(netns, "ip", "link", "del", BRIDGE)
        assert BRIDGE not in inside(netns, "ip", "-o", "link", "show")
        daemon.start()
        assert f"inet 10.213.9.1/24" in inside(netns, "ip", "-o", "-4", "addr", "show", "dev", BRIDGE)
        with daemon.open() as mgr:
            pd = mgr.get_controller(pd_id)
            pd.request_status_change(bmi.PDStatus.RESTARTING)     # a new run: a new veth into the new bridge
            assert pd.get_runtime_param("/interfaces/network") == f"eth0 veth:{BRIDGE} {ADDRESS}/24"
        assert "served-by-the-pd" in inside(netns, *fetch)

        with daemon.open() as mgr:
            mgr.get_controller(pd_id).destroy()
            mgr.get_device_manager().destroy_network(BRIDGE)
        daemon.stop()
        daemon.start()
        with daemon.open() as mgr:
            assert mgr.get_device_manager().list_networks() == []
        assert BRIDGE not in inside(netns, "ip", "-o", "link", "show")


_SESSION = textwrap.dedent("""
    import bmi
    from bmi.drivers import net
    with bmi.open("linux:///session", integrity=False) as mgr:
        mgr.get_device_manager().create_network("bmitest4", "10.213.10.0/24")
        print("while open:", net.exists("bmitest4"))
    print("after close:", net.exists("bmitest4"))
""")


def test_a_session_managers_networks_end_with_it():
    require_root()
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs util-linux unshare and iproute2 ip")
    done = subprocess.run(["unshare", "--net", "--", sys.executable, "-c", _SESSION], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "while open: True" in done.stdout and "after close: False" in done.stdout, done.stdout
