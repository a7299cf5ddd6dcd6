"""Host devices and network interfaces for Linux PDs, with real nodes and real namespaces.

Every network test runs its manager in a network namespace made for it
(`unshare -n`): bridges and veths exist only there, nothing leaves the
machine, and the host's own interfaces are never touched.
"""
from __future__ import annotations

import json
import os
import pty
import select
import shlex
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

import bmi
from tests.helpers import busybox_path, output

MB = 1 << 20
TUN = "/dev/net/tun"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="device assignment needs root (mount namespaces, chown)")


@pytest.fixture
def mgr():
    with bmi.open("linux:///session", integrity=False) as m:
        m.shutdown_grace = 1.0
        yield m


def prepared(mgr: bmi.PDManagement, script: str, **config: str) -> bmi.PDController:
    """A PD set up to run a busybox shell script (not started), with extra config parameters."""
    pd = mgr.allocate_pd(bmi.PDDescription(mem=64 * MB))
    pd.setup_pd(bmi.FileImage(busybox_path()))
    pd.set_config_param("/boot/cmdline", shlex.join(["busybox", "sh", "-c", script]))
    for name, value in config.items():
        pd.set_config_param(name, value)
    return pd


def read_until(fd: int, marker: bytes, timeout: float = 10.0) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.2)[0]:
            seen += os.read(fd, 1024)
    return seen


def test_pty_pair_written_by_the_pd_and_gone_after_unassign(mgr):
    master, slave = pty.openpty()
    try:
        node = os.ttyname(slave)
        before = os.stat(node)
        devices = mgr.get_device_manager()
        assert node in devices.list_devices()       # a pseudo-terminal this manager created
        pd = prepared(mgr, f"echo hello-over-pty > {node}; while [ -c {node} ]; do usleep 50000; done; "
                           f"cat {node}; echo after=$?")
        devices.assign(node, pd.get_pd_id())
        assert node in devices.assigned(pd.get_pd_id())
        assert os.stat(node).st_uid != before.st_uid     # owned by the PD's host uid while it has it
        pd.request_status_change(bmi.PDStatus.RUNNING)
        assert b"hello-over-pty" in read_until(master, b"hello-over-pty")
        assert pd.get_runtime_param("/interfaces/devices") == node
        devices.unassign(node, pd.get_pd_id())
        console = output(pd)
        assert "after=1" in console, console
        assert node not in devices.assigned(pd.get_pd_id())
        after = os.stat(node)
        assert (after.st_uid, after.st_gid, after.st_mode) == (before.st_uid, before.st_gid, before.st_mode)
    finally:
        os.close(master)
        os.close(slave)


def test_tun_usable_only_when_assigned(mgr):
    if not os.path.exists(TUN):
        pytest.skip(f"{TUN} is missing (no tun module)")
    script = "busybox tunctl -t bmitap0 >/dev/null && ip link show bmitap0 >/dev/null && echo tun=ok || echo tun=no"
    caps = {"/boot/capabilities": "net_admin"}
    without = prepared(mgr, script, **caps)
    without.request_status_change(bmi.PDStatus.RUNNING)
    assert "tun=no" in output(without)
    with_tun = prepared(mgr, script, **caps)
    mgr.get_device_manager().assign(TUN, with_tun.get_pd_id())
    with_tun.request_status_change(bmi.PDStatus.RUNNING)
    assert "tun=ok" in output(with_tun)


def test_assign_to_a_running_pd(mgr):
    if not os.path.exists(TUN):
        pytest.skip(f"{TUN} is missing (no tun module)")
    pd = prepared(mgr, f"while ! [ -c {TUN} ]; do usleep 50000; done; echo arrived")
    pd.request_status_change(bmi.PDStatus.RUNNING)
    mgr.get_device_manager().assign(TUN, pd.get_pd_id(), bmi.READ)
    assert "arrived" in output(pd)


def test_one_pd_at_a_time_unless_shared(mgr):
    if not os.path.exists(TUN):
        pytest.skip(f"{TUN} is missing (no tun module)")
    devices = mgr.get_device_manager()
    a, b = (mgr.allocate_pd(bmi.PDDescription(mem=16 * MB)) for _ in range(2))
    devices.assign(TUN, a.get_pd_id())
    with pytest.raises(bmi.InvalidState, match=f"assigned to PD {a.get_pd_id()}"):
        devices.assign(TUN, b.get_pd_id(), shared=True)
    devices.unassign(TUN, a.get_pd_id())
    devices.assign(TUN, a.get_pd_id(), shared=True)
    devices.assign(TUN, b.get_pd_id(), shared=True)
    assert TUN in devices.assigned(b.get_pd_id())
    with pytest.raises(bmi.InvalidArgument, match="not assigned"):
        devices.unassign("/dev/ttyS0", a.get_pd_id())


def test_refusals_say_why(mgr):
    devices = mgr.get_device_manager()
    pd = mgr.allocate_pd(bmi.PDDescription(mem=16 * MB)).get_pd_id()
    with pytest.raises(bmi.PermissionDenied, match="allow-list"):
        devices.assign("/dev/null", pd)            # a character device, but not one to hand out
    with pytest.raises(bmi.InvalidArgument, match="not a character device"):
        devices.assign("/dev/does-not-exist", pd)
    with pytest.raises(bmi.InvalidArgument, match="plain path"):
        devices.assign("/dev/net/../net/tun", pd)
    with pytest.raises(bmi.InvalidArgument, match="mode"):
        devices.assign(TUN, pd, mode=7)
    with pytest.raises(bmi.InvalidArgument, match="PD 0"):
        devices.assign(TUN, 0)
    with pytest.raises(bmi.NoSuchDomain):
        devices.assign(TUN, 999)
    assert devices.assigned(pd) == ["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"]


def test_capabilities_are_listed(mgr):
    pd = mgr.allocate_pd(bmi.PDDescription(mem=16 * MB))
    names = {c.name for c in pd.list_runtime_params("/capability/devices")}
    assert {"/capability/devices/enforced", "/capability/devices/revocable"} <= names
    assert pd.get_runtime_param("/capability/devices/revocable").startswith("no: ")
    assert pd.get_runtime_param("/interfaces/network") == ""        # never given by default


def test_bad_network_config_is_refused(mgr):
    pd = mgr.allocate_pd(bmi.PDDescription(mem=16 * MB))
    for name, value in (("/net/eth0", "bridge:br0"), ("/net/eth0/address", "10.0.0.2"),
                        ("/net/eth0/gateway", "nowhere"), ("/net/this-name-is-too-long", "veth:br0"),
                        ("/net/eth0/mtu", "1500")):
        with pytest.raises(bmi.InvalidArgument):
            pd.set_config_param(name, value)


# The manager, the bridge and the client all live in a network namespace made for this test.
_NETWORK_CHECK = textwrap.dedent("""
    import shlex, sys, urllib.request
    import bmi
    from bmi.drivers import net

    BUSYBOX, WITH_NET = sys.argv[1], sys.argv[2] == "1"
    net.create_bridge("bmitest0", "10.213.7.0/24")
    with bmi.open("linux:///session", integrity=False) as mgr:
        mgr.shutdown_grace = 1.0
        pd = mgr.allocate_pd(bmi.PDDescription(mem=64 << 20))
        pd.setup_pd(bmi.FileImage(BUSYBOX))
        pd.set_config_param("/boot/cmdline", shlex.join(["busybox", "sh", "-c",
            "mkdir /tmp/www && echo served-by-the-pd > /tmp/www/index.html && "
            "exec busybox httpd -f -p 8080 -h /tmp/www"]))
        if WITH_NET:
            pd.set_config_param("/net/eth0", "veth:bmitest0")
            pd.set_config_param("/net/eth0/address", "10.213.7.2/24")
            pd.set_config_param("/net/eth0/gateway", "10.213.7.1")
        pd.request_status_change(bmi.PDStatus.RUNNING)
        print("interfaces:", pd.get_runtime_param("/interfaces/network"))
        for attempt in range(30 if WITH_NET else 2):
            try:
                page = urllib.request.urlopen("http://10.213.7.2:8080/", timeout=1).read()
                print("fetched:", page.decode().strip())
                break
            except OSError as e:
                error = e
        else:
            print("unreachable:", error)
    print("host ends left:", [n for n in __import__("os").listdir("/sys/class/net") if n.startswith("bmi")])
""")


def fetch_in_netns(with_net: bool) -> str:
    if shutil.which("unshare") is None or shutil.which("ip") is None and not os.path.exists("/usr/sbin/ip"):
        pytest.skip("needs util-linux unshare and iproute2 ip")
    done = subprocess.run(["unshare", "--net", "--", sys.executable, "-c", _NETWORK_CHECK, busybox_path(),
                           "1" if with_net else "0"], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__)))))
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_veth_network_serves_a_page_to_the_host():
    out = fetch_in_netns(True)
    assert "interfaces: eth0 veth:bmitest0 10.213.7.2/24 10.213.7.1" in out, out
    assert "fetched: served-by-the-pd" in out, out
    assert "host ends left: []" in out, out         # the host end of the PD's veth went with it


def test_without_network_config_the_pd_is_unreachable():
    out = fetch_in_netns(False)
    assert "interfaces: \n" in out, out
    assert "unreachable:" in out and "fetched" not in out, out


def bmi_cli(*argv: str, netns: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "bmi.cli", *argv]
    return subprocess.run(["unshare", "--net", "--", *command] if netns else command, capture_output=True,
                          text=True, timeout=120)


def test_cli_run_with_device_and_net():
    script = "ls /dev/net; ip -o -4 addr show dev lan0"
    setup = ["sh", "-c", 'ip link add bmitest1 type bridge && ip link set bmitest1 up && exec "$@"', "sh"]
    done = subprocess.run(["unshare", "--net", "--", *setup, sys.executable, "-m", "bmi.cli", "run",
                           "--device", f"{TUN}:r", "--net", "lan0=veth:bmitest1,10.213.8.2/24",
                           busybox_path(), "--", "busybox", "sh", "-c", script],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "tun" in done.stdout and "10.213.8.2/24" in done.stdout, done.stdout


def test_cli_refusals_are_one_line():
    bad_net = bmi_cli("run", "--net", "veth:br0,10.0.0.2", busybox_path())
    assert bad_net.returncode == 2 and "ADDRESS/PREFIX" in bad_net.stderr and "Traceback" not in bad_net.stderr
    bad_device = bmi_cli("run", "--device", "/dev/null", busybox_path(), "--", "busybox", "true")
    assert bad_device.returncode == 1 and "allow-list" in bad_device.stderr, bad_device.stderr
    assert "Traceback" not in bad_device.stderr
    session = bmi_cli("device", "assign", "1", TUN)
    assert session.returncode == 1 and "bmid" in session.stderr
    listed = bmi_cli("device", "list", "--json")
    assert listed.returncode == 0 and "/dev/null" not in json.loads(listed.stdout)


def test_bmid_keeps_an_assignment_through_a_crash(tmp_path):
    if not os.path.exists(TUN):
        pytest.skip(f"{TUN} is missing (no tun module)")
    from tests.server.bmid import running_bmid
    before = os.stat(TUN)
    with running_bmid(str(tmp_path)) as daemon:
        with daemon.open() as mgr:
            pd = prepared(mgr, "while :; do busybox sleep 1; done")
            pd_id = pd.get_pd_id()
            mgr.get_device_manager().assign(TUN, pd_id, bmi.READ)
            pd.request_status_change(bmi.PDStatus.RUNNING)
        daemon.kill()
        daemon.start()
        with daemon.open() as mgr:
            devices = mgr.get_device_manager()
            assert TUN in devices.assigned(pd_id)
            other = mgr.allocate_pd(bmi.PDDescription(mem=16 * MB))
            with pytest.raises(bmi.InvalidState, match=f"assigned to PD {pd_id}"):
                devices.assign(TUN, other.get_pd_id())
            assert os.stat(TUN).st_uid != before.st_uid
            mgr.get_controller(pd_id).destroy()     # gives the node its owner back
            other.destroy()
    after = os.stat(TUN)
    assert (after.st_uid, after.st_gid, after.st_mode) == (before.st_uid, before.st_gid, before.st_mode)
