"""Runtime and config parameters (spec 7.2.10-7.2.14, 7.6) and their live effect."""
import pytest

import bmi
from bmi import PDStatus, RuntimeCapability
from tests.helpers import output, sh, start


@pytest.fixture
def pd(mgr):
    return mgr.allocate_pd(bmi.PDDescription(mem=64 << 20, cpu=1, performance=50))


def test_listing_is_direct_children_with_access(pd):
    top = pd.list_runtime_params("/")
    assert RuntimeCapability("/system", False, False) in top
    assert RuntimeCapability("/capability", False, False) in top
    assert pd.list_runtime_params("") == top
    mem = pd.list_runtime_params("/system/memory/")
    assert RuntimeCapability("/system/memory/current", True, True) in mem
    assert RuntimeCapability("/system/memory/max", True, False) in mem
    assert RuntimeCapability("/system/memory/min", True, False) in mem
    assert all(c.name.count("/") == 3 for c in mem)


def _leaves(pd, root="/"):
    for cap in pd.list_runtime_params(root):
        if cap.read or cap.write:
            yield cap
        else:
            yield from _leaves(pd, cap.name)


def test_every_readable_parameter_reads_as_text_and_every_other_refuses(pd):
    """A constant is its text in the tree and a costly value a getter run only when read (bmi/params.py): every
    leaf the listing says is readable must read, and one it says is not must refuse, whichever form it has."""
    leaves = list(_leaves(pd))
    assert len(leaves) > 20, leaves
    for cap in leaves:
        assert cap.read, cap         # (no write-only parameter yet)
        assert isinstance(pd.get_runtime_param(cap.name), str), cap
        if not cap.write:
            with pytest.raises(bmi.PermissionDenied, match="read-only"):
                pd.set_runtime_param(cap.name, "1")
    assert "/capability/isolation/proc-mem" in {c.name for c in leaves}


@pytest.mark.session_only
def test_a_parameter_every_pd_has_is_the_whole_trees_own_when_made_alone(mgr):
    """A get or set of a parameter every PD has makes that leaf alone (api._PD_PARAMS, for speed): it must read,
    write and list as the whole tree's does, and no driver parameter nor later entry may stand in its place."""
    from bmi import api
    from bmi.params import Leaf, read
    pd = mgr.allocate_pd(bmi.PDDescription(mem=64 << 20, cpu=1, performance=50))
    pd.set_config_param("/net/eth0", "veth:none")
    whole = pd._tree().leaves
    record = mgr._pds[pd.get_pd_id()]
    assert not set(api._PD_PARAMS) & set(mgr._driver.extra_params(record.handle, record.config))
    for path in api._PD_PARAMS:
        alone = pd._tree(path).leaves
        assert list(alone) == [path] and path in whole, path
        assert type(alone[path]) is type(whole[path]), path
        if isinstance(whole[path], Leaf):
            assert (alone[path].get is None, alone[path].set is None) == \
                (whole[path].get is None, whole[path].set is None), path
        assert pd.get_runtime_param(path) == read(whole[path]), path
    pd.set_runtime_param("/system/cpu/performance", "30")
    assert read(pd._tree().leaves["/system/cpu/performance"]) == "30"
    assert pd.get_runtime_param("/interfaces/network") == "eth0 veth:none"


def test_required_parameters_exist_with_values(pd):
    assert pd.get_runtime_param("/system/memory/max") == str(64 << 20)
    assert pd.get_runtime_param("/system/memory/current") == str(64 << 20)
    assert int(pd.get_runtime_param("/system/memory/min")) <= 64 << 20
    assert pd.get_runtime_param("/system/cpu/max") == "1"
    assert pd.get_runtime_param("/system/cpu/min") == "1"
    assert pd.get_runtime_param("/system/cpu/current") == "1"
    assert pd.get_runtime_param("/system/cpu/performance") == "50"
    assert pd.get_runtime_param("/capability/pause") == "PAUSED"
    assert pd.get_runtime_param("/capability/restart") == "RESTARTING"
    assert pd.get_runtime_param("/system/status") == "ALLOCATED"


@pytest.mark.parametrize("name, error", [
    ("/no/such", bmi.InvalidArgument), ("/system", bmi.InvalidArgument), ("", bmi.InvalidArgument),
    ("/system/../system/status", bmi.InvalidArgument), (3, bmi.InvalidArgument),
])
def test_get_bad_names(pd, name, error):
    with pytest.raises(error):
        pd.get_runtime_param(name)


def test_list_unknown_root(pd):
    with pytest.raises(bmi.InvalidArgument):
        pd.list_runtime_params("/nothing/here")


@pytest.mark.parametrize("name, value, error", [
    ("/system/memory/max", "1", bmi.PermissionDenied),
    ("/system/memory/current", str(65 << 20), bmi.InvalidArgument),     # above max
    ("/system/memory/current", "1024", bmi.InvalidArgument),            # below min
    ("/system/memory/current", "lots", bmi.InvalidArgument),
    ("/system/cpu/current", "0", bmi.InvalidArgument),
    ("/system/cpu/current", "2", bmi.InvalidArgument),                  # above this PD's max of 1
    ("/system/cpu/performance", "101", bmi.InvalidArgument),
    ("/system/memory/current", 5, bmi.InvalidArgument),
    ("/nope", "1", bmi.InvalidArgument),
])
def test_set_bad_values(pd, name, value, error):
    before = pd.get_runtime_param("/system/memory/current")
    with pytest.raises(error):
        pd.set_runtime_param(name, value)
    assert pd.get_runtime_param("/system/memory/current") == before


@pytest.mark.session_only("reads the in-process driver handle")
def test_memory_current_changes_the_live_pd(mgr):
    pd = start(mgr, ["busybox", "sleep", "1000"], mem=64 << 20)
    pd.set_runtime_param("/system/memory/current", "32M")
    assert pd.get_runtime_param("/system/memory/current") == str(32 << 20)
    handle = mgr._pds[pd.get_pd_id()].handle
    assert handle.groups.memory_max() == 32 << 20


def test_cpu_current_changes_the_live_pd(mgr):
    import os
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs")
    pd = start(mgr, ["busybox", "sh", "-c", "while :; do grep Cpus_allowed_list /proc/self/status; sleep 0.1; done"],
               cpu=2)
    assert pd.get_runtime_param("/system/cpu/current") == "2"
    pd.set_runtime_param("/system/cpu/current", "1")
    assert pd.get_runtime_param("/system/cpu/current") == "1"
    import time
    time.sleep(0.5)
    last = pd.get_runtime_param("/console/log").strip().splitlines()[-1]
    assert "," not in last.split(":")[1] and "-" not in last.split(":")[1], last


def test_config_params_are_kept_per_pd(mgr):
    a = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
    b = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
    a.set_config_param("/app/mode", "fast")
    b.set_config_param("/app/mode", "slow")
    assert a.get_config_param("/app/mode") == "fast"
    assert b.get_config_param("app/mode/") == "slow"
    with pytest.raises(bmi.InvalidArgument, match="not set"):
        a.get_config_param("/app/other")


@pytest.mark.parametrize("name, value", [
    ("/boot/cmdline", "unterminated 'quote"), ("/boot/env/1BAD", "x"), ("/x", 5), ("/x", "a\0b"), ("", "x"),
])
def test_bad_config_params(pd, name, value):
    with pytest.raises(bmi.InvalidArgument):
        pd.set_config_param(name, value)


def test_cmdline_and_env_reach_the_program(mgr):
    pd = mgr.allocate_pd(bmi.PDDescription(mem=32 << 20))
    from tests.helpers import busybox_path
    pd.setup_pd(bmi.FileImage(busybox_path()))
    pd.set_config_param("/boot/cmdline", "busybox sh -c 'echo \"$0|$1|$GREETING|$BMI_PD_ID\"' 'a b' c")
    pd.set_config_param("/boot/env/GREETING", "hi there")
    pd.request_status_change(PDStatus.RUNNING)
    assert output(pd) == f"a b|c|hi there|{pd.get_pd_id()}\n"


def test_console_log_is_bounded(mgr):
    pd, out = sh(mgr, "i=0; while [ $i -lt 40000 ]; do echo 0123456789abcdef; i=$((i+1)); done")
    log = pd.get_runtime_param("/console/log")
    assert 0 < len(log) <= 256 * 1024
    assert log.endswith("0123456789abcdef\n")


def test_measurement_parameters(mgr):
    import hashlib
    from tests.helpers import busybox_path
    pd = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
    assert "/system/measurement" not in {c.name for c in pd.list_runtime_params("/system")}
    pd.setup_pd(bmi.FileImage(busybox_path()), banks=("sha256", "sha384"))
    data = open(busybox_path(), "rb").read()
    assert pd.get_runtime_param("/system/measurement/sha256") == hashlib.sha256(data).hexdigest()
    assert pd.get_runtime_param("/system/measurement/sha384") == hashlib.sha384(data).hexdigest()
    with pytest.raises(bmi.PermissionDenied):
        pd.set_runtime_param("/system/measurement/sha256", "00")


def test_connections_policy_round_trip(mgr):
    a = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
    b = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
    policy = [bmi.ConnectionPolicy(bmi.ConnectionType.STREAM, bmi.READ)]
    assert a.get_allowed_connections(b.get_pd_id()) == []
    a.set_allowed_connections(b.get_pd_id(), policy)
    assert a.get_allowed_connections(b.get_pd_id()) == policy
    assert b.get_allowed_connections(a.get_pd_id()) == []       # directed
    a.set_allowed_connections(b.get_pd_id(), [])
    assert a.get_allowed_connections(b.get_pd_id()) == []
    for bad in ([bmi.ConnectionPolicy(7, 1)], [bmi.ConnectionPolicy(bmi.ConnectionType.IPC, 4)], "x", [1]):
        with pytest.raises(bmi.InvalidArgument):
            a.set_allowed_connections(b.get_pd_id(), bad)
    with pytest.raises(bmi.NoSuchDomain):
        a.set_allowed_connections(999, policy)
    with pytest.raises(bmi.InvalidArgument):
        a.set_allowed_connections(a.get_pd_id(), policy)
    a.set_allowed_connections(b.get_pd_id(), policy)
    b.destroy()
    with pytest.raises(bmi.NoSuchDomain):
        a.get_allowed_connections(b.get_pd_id())
