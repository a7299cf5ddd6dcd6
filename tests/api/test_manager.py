"""PDManagement (spec 7.1): version, allocation checks, controllers, listing, URIs."""
import os

import pytest

import bmi
from tests.helpers import busybox_path


def test_version_is_0_1(mgr):
    assert mgr.get_version() == 0x00000001
    assert mgr.get_version() >> 16 == 0 and mgr.get_version() & 0xFFFF == 1


def test_open_default_uri_is_linux_session(monkeypatch):
    monkeypatch.delenv("BMI_URI", raising=False)
    with bmi.open(integrity=False) as m:
        assert m.uri == "linux:///session"


@pytest.mark.parametrize("uri", ["nope:///x", "linux:///elsewhere", "linux://host/session", 42])
def test_open_rejects_unknown_uris(uri):
    with pytest.raises(bmi.InvalidArgument):
        bmi.open(uri, integrity=False)


def test_open_xen_session_without_xen_says_why():
    if os.path.exists("/proc/xen/capabilities"):
        pytest.skip("this is a Xen host")
    with pytest.raises(bmi.DriverUnavailable) as e:
        bmi.open("xen:///session", integrity=False)
    assert "xen" in str(e.value).lower()


def test_open_xen_system_without_bmid_says_how_to_start_it(tmp_path, monkeypatch):
    missing = tmp_path / "bmid-xen.sock"
    with pytest.raises(bmi.DriverUnavailable, match=f"xen:///system: cannot reach bmid on {missing}.*"
                                                    r"`bmid --uri xen:///system`.*bmid-xen.service"):
        bmi.open(f"xen:///system?socket={missing}")
    monkeypatch.setenv("BMID_XEN_SOCKET", str(missing))        # the variable names Xen's bmid, not Linux's
    monkeypatch.setenv("BMID_SOCKET", str(tmp_path / "linux.sock"))
    with pytest.raises(bmi.DriverUnavailable, match=f"cannot reach bmid on {missing}"):
        bmi.open("xen:///system")


def test_list_pd_and_controllers(mgr):
    assert mgr.list_pd() == [0]
    a = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
    b = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
    assert a.get_pd_id() != b.get_pd_id()
    assert mgr.list_pd() == [0, a.get_pd_id(), b.get_pd_id()]
    assert mgr.get_controller(a.get_pd_id()) == a
    assert mgr.get_controller().get_pd_id() == 0
    assert a.get_current_status() is bmi.PDStatus.ALLOCATED
    a.destroy()
    assert mgr.list_pd() == [0, b.get_pd_id()]
    assert a.get_current_status() is bmi.PDStatus.DESTROYED
    with pytest.raises(bmi.NoSuchDomain, match="destroyed"):
        mgr.get_controller(a.get_pd_id())
    with pytest.raises(bmi.NoSuchDomain):
        a.set_priority(1)


@pytest.mark.parametrize("pd_id", [999, -1])
def test_get_controller_unknown_id(mgr, pd_id):
    with pytest.raises(bmi.NoSuchDomain) as e:
        mgr.get_controller(pd_id)
    assert isinstance(e.value, LookupError) and str(pd_id) in str(e.value)


@pytest.mark.parametrize("pd_id", ["1", 1.0, True])
def test_get_controller_wrong_type(mgr, pd_id):
    with pytest.raises(bmi.InvalidArgument):
        mgr.get_controller(pd_id)


@pytest.mark.parametrize("desc, error", [
    (bmi.PDDescription(mem=0), bmi.InvalidArgument),
    (bmi.PDDescription(mem=1024), bmi.InvalidArgument),
    (bmi.PDDescription(mem=1 << 60), bmi.ResourceError),
    (bmi.PDDescription(mem=16 << 20, cpu=0), bmi.InvalidArgument),
    (bmi.PDDescription(mem=16 << 20, performance=0), bmi.InvalidArgument),
    (bmi.PDDescription(mem=16 << 20, performance=101), bmi.InvalidArgument),
    (bmi.PDDescription(mem=16.0 * (1 << 20)), bmi.InvalidArgument),   # "16M" is a size; a float is not
    (bmi.PDDescription(mem=True), bmi.InvalidArgument),
    ({"mem": 1 << 24}, bmi.InvalidArgument),
])
def test_allocate_rejects_bad_descriptions(mgr, desc, error):
    with pytest.raises(error):
        mgr.allocate_pd(desc)
    assert mgr.list_pd() == [0]


def test_cpu_request_is_clamped_to_the_host(mgr):
    pd = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20, cpu=10_000))
    host = len(os.sched_getaffinity(0))
    assert pd.get_runtime_param("/system/cpu/max") == str(host)
    assert pd.get_runtime_param("/system/cpu/current") == str(host)


def test_manager_pd_describes_the_host(mgr):
    host = mgr.get_controller(0)
    names = {c.name for c in host.list_runtime_params("/system")}
    assert {"/system/memory", "/system/cpu", "/system/driver"} <= names
    assert host.get_runtime_param("/system/cpu/max") == str(len(os.sched_getaffinity(0)))
    assert host.get_current_status() is bmi.PDStatus.RUNNING
    with pytest.raises(bmi.PermissionDenied):
        host.destroy()
    with pytest.raises(bmi.PermissionDenied):
        host.request_status_change(bmi.PDStatus.PAUSED)
    with pytest.raises(bmi.PermissionDenied):
        host.set_config_param("/boot/cmdline", "x")


def test_closed_manager_refuses_calls():
    m = bmi.open(integrity=False)
    pd = m.allocate_pd(bmi.PDDescription(mem=16 << 20))
    m.close()
    m.close()   # idempotent
    with pytest.raises(bmi.InvalidState, match="closed"):
        m.list_pd()
    with pytest.raises(bmi.InvalidState):
        pd.get_current_status()


def test_close_destroys_running_pds():
    m = bmi.open(integrity=False)
    pd = m.allocate_pd(bmi.PDDescription(mem=32 << 20))
    pd.setup_pd(bmi.FileImage(busybox_path()))
    pd.set_config_param("/boot/cmdline", "busybox sleep 1000")
    pd.request_status_change(bmi.PDStatus.RUNNING)
    m.close()   # the leak fixture checks the process and cgroups are gone


def test_device_manager(mgr):
    devices = mgr.get_device_manager()
    assert "/dev/null" not in devices.list_devices()        # every PD has it: nothing to assign
    pd = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
    assert "/dev/urandom" in devices.assigned(pd.get_pd_id())
    with pytest.raises(bmi.PermissionDenied, match="allow-list"):
        devices.assign("/dev/null", pd.get_pd_id())
    with pytest.raises(bmi.InvalidArgument, match="mode"):
        devices.assign("/dev/net/tun", pd.get_pd_id(), mode=0)
    if os.path.exists("/dev/net/tun") and os.geteuid() == 0:      # the same semantics through bmid
        devices.assign("/dev/net/tun", pd.get_pd_id(), bmi.READ)
        assert "/dev/net/tun" in devices.assigned(pd.get_pd_id())
        other = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
        with pytest.raises(bmi.InvalidState, match="one PD at a time"):
            devices.assign("/dev/net/tun", other.get_pd_id())
        devices.unassign("/dev/net/tun", pd.get_pd_id())
        assert "/dev/net/tun" not in devices.assigned(pd.get_pd_id())
    with pytest.raises(bmi.NoSuchDomain):
        devices.assigned(12345)
