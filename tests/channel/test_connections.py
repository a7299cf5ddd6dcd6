"""Two real PDs (static C programs using csrc/client/bmi_client.c) talking over connections."""
from __future__ import annotations

import pytest

import bmi
from bmi import ConnectionPolicy, ConnectionType as CT
from tests.channel.progs import lines, run_pd, step, wait_console

W = "15000"    # ms: generous for a loaded host; only a failing test waits it out


def test_a_pd_reads_its_own_configuration_and_parameters(mgr):
    pd = run_pd(mgr, "chanpeer", ["id", "+", "config", "/boot/cmdline", "+", "param", "/system/memory/max",
                                  "+", "config", "/nope", "+", "call", "set_config_param",
                                  '{"name":"/x","value":"y"}'])
    out = lines(pd)
    assert out["id"] == [str(pd.get_pd_id())]
    assert out["config"][0].startswith("chanpeer id + config /boot/cmdline")
    assert out["param"] == [str(32 << 20)]
    assert out["config"][1].startswith("error -32001 get_config_param '/nope'")
    assert out["call"][0].startswith("error -32004") and "cannot change itself" in out["call"][0]


def test_no_connection_without_policy(mgr):
    b = run_pd(mgr, "chanpeer", ["accept", "500"])
    a = run_pd(mgr, "chanpeer", ["connect", str(b.get_pd_id()), "IPC", "3", "0", "+",
                                 "connect", "0", "IPC", "3", "0", "+", "connect", "999", "IPC", "3", "0"])
    assert [r.split()[:2] for r in lines(a)["connect"]] == [["error", "-32004"], ["error", "-32001"],
                                                           ["error", "-32004"]]
    assert lines(b)["accept"] == ["timeout"]


def test_rw_ipc_exchanges_both_ways(mgr):
    b = run_pd(mgr, "chanpeer", ["accept", W, "+", "recv", W, "+", "send", "pong"])
    a = run_pd(mgr, "chanpeer", ["connect", str(b.get_pd_id()), "IPC", "3", "0", "+", "send", "ping",
                                 "+", "recv", W], start=False)
    a.set_allowed_connections(b.get_pd_id(), [ConnectionPolicy(CT.IPC, bmi.RW)])
    a.request_status_change(bmi.PDStatus.RUNNING)
    oa, ob = lines(a), lines(b)
    assert ob["accept"] == [f"ok peer={a.get_pd_id()} type=IPC mode=3"]
    assert ob["recv"] == ["ping"] and oa["recv"] == ["pong"]


@pytest.mark.parametrize("kind", ["IPC", "STREAM", "EVENT"])
def test_read_mode_is_enforced_by_the_kernel(mgr, kind):
    b = run_pd(mgr, "chanpeer", ["accept", W, "+", "send", "from-b", "+", "recv", "300"])
    a = run_pd(mgr, "chanpeer", ["connect", str(b.get_pd_id()), kind, "1", "0", "+", "recv", W,
                                 "+", "send", "from-a"], start=False)
    a.set_allowed_connections(b.get_pd_id(), [ConnectionPolicy(CT[kind], bmi.READ)])
    a.request_status_change(bmi.PDStatus.RUNNING)
    oa, ob = lines(a), lines(b)
    assert oa["recv"] == ["from-b"]
    assert oa["send"] == ["EPIPE"]            # the source of a READ connection cannot write
    assert ob["recv"] in (["EOF"], ["timeout"])  # and nothing arrives at the destination


def test_write_mode_is_enforced_by_the_kernel(mgr):
    b = run_pd(mgr, "chanpeer", ["accept", W, "+", "recv", W, "+", "send", "from-b"])
    a = run_pd(mgr, "chanpeer", ["connect", str(b.get_pd_id()), "STREAM", "2", "0", "+", "send", "from-a",
                                 "+", "recv", "300"], start=False)
    a.set_allowed_connections(b.get_pd_id(), [ConnectionPolicy(CT.STREAM, bmi.WRITE)])
    a.request_status_change(bmi.PDStatus.RUNNING)
    oa, ob = lines(a), lines(b)
    assert ob["recv"] == ["from-a"] and ob["send"] == ["EPIPE"]
    assert oa["recv"] in (["EOF"], ["timeout"])


def test_what_a_pd_sent_before_it_ended_still_arrives(mgr):
    """A source that exits before its peer accepts: the queued connection is kept, at end-of-file."""
    b = run_pd(mgr, "chanpeer", ["wait", "/test/step", "1", W, "+", "accept", W, "+", "recv", W, "+", "recv", W])
    a = run_pd(mgr, "chanpeer", ["connect", str(b.get_pd_id()), "IPC", "2", "0", "+", "send", "early"],
               start=False)
    a.set_allowed_connections(b.get_pd_id(), [ConnectionPolicy(CT.IPC, bmi.WRITE)])
    a.request_status_change(bmi.PDStatus.RUNNING)
    assert lines(a)["send"] == ["ok"]                 # a has ended: its channel is gone
    assert b.get_runtime_param("/interfaces/connections").endswith("pending")
    step(b, "1")
    ob = lines(b)
    assert ob["accept"][0].startswith(f"ok peer={a.get_pd_id()}") and ob["recv"] == ["early", "EOF"]
    a.destroy()
    assert b.get_runtime_param("/interfaces/connections") == ""


def test_policy_for_another_type_or_a_wider_mode_does_not_allow(mgr):
    b = run_pd(mgr, "chanpeer", ["accept", "300"])
    a = run_pd(mgr, "chanpeer", ["connect", str(b.get_pd_id()), "IPC", "3", "0", "+",
                                 "connect", str(b.get_pd_id()), "STREAM", "1", "0"], start=False)
    a.set_allowed_connections(b.get_pd_id(), [ConnectionPolicy(CT.IPC, bmi.READ)])
    a.request_status_change(bmi.PDStatus.RUNNING)
    out = lines(a)["connect"]
    assert out[0].startswith("error -32004") and out[1].startswith("error -32004")


def test_withdrawing_the_policy_cuts_the_live_connection(mgr):
    b = run_pd(mgr, "chanpeer", ["accept", W, "+", "recv", W, "+", "wait", "/test/step", "1", W,
                                 "+", "recv", W, "+", "send", "late"])
    a = run_pd(mgr, "chanpeer", ["connect", str(b.get_pd_id()), "IPC", "3", "0", "+", "send", "hello",
                                 "+", "wait", "/test/step", "1", W, "+", "send", "after", "+", "recv", W],
               start=False)
    a.set_allowed_connections(b.get_pd_id(), [ConnectionPolicy(CT.IPC, bmi.RW)])
    a.request_status_change(bmi.PDStatus.RUNNING)
    wait_console(b, "recv: hello")
    assert a.get_runtime_param("/interfaces/connections").endswith(f"to {b.get_pd_id()} IPC RW")
    # disable_existing=False keeps the connection; True cuts it
    a.set_allowed_connections(b.get_pd_id(), [], disable_existing=False)
    assert a.get_runtime_param("/interfaces/connections") != ""
    a.set_allowed_connections(b.get_pd_id(), [ConnectionPolicy(CT.STREAM, bmi.RW)], disable_existing=True)
    assert a.get_runtime_param("/interfaces/connections") == ""
    step(a, "1")
    step(b, "1")
    oa, ob = lines(a), lines(b)
    assert oa["send"] == ["ok", "EPIPE"] and oa["recv"] == ["EOF"]
    assert ob["recv"] == ["hello", "EOF"] and ob["send"] == ["EPIPE"]


def test_destroying_a_pd_cuts_its_connections(mgr):
    b = run_pd(mgr, "chanpeer", ["accept", W, "+", "sleep", "60000"])
    a = run_pd(mgr, "chanpeer", ["connect", str(b.get_pd_id()), "IPC", "3", "0", "+", "print", "connected",
                                 "+", "recv", W], start=False)
    a.set_allowed_connections(b.get_pd_id(), [ConnectionPolicy(CT.IPC, bmi.RW)])
    a.request_status_change(bmi.PDStatus.RUNNING)
    wait_console(b, "accept: ok")
    wait_console(a, "print: connected")
    assert b.get_runtime_param("/interfaces/connections") == f"1 from {a.get_pd_id()} IPC RW"
    b.destroy()
    assert lines(a)["recv"] == ["EOF"]
    assert a.get_runtime_param("/interfaces/connections") == ""


def test_read_only_shared_memory_cannot_be_written(mgr):
    b = run_pd(mgr, "chanpeer", ["accept", W, "+", "shmw", "written-by-b", "+", "print", "done",
                                 "+", "wait", "/test/step", "1", W])
    a = run_pd(mgr, "chanpeer", ["connect", str(b.get_pd_id()), "SHM", "1", "4096", "+",
                                 "wait", "/test/step", "1", W, "+", "shmr", "+", "shmw", "evil", "+", "reopen"],
               start=False)
    a.set_allowed_connections(b.get_pd_id(), [ConnectionPolicy(CT.SHM, bmi.READ)])
    a.request_status_change(bmi.PDStatus.RUNNING)
    wait_console(b, "print: done")
    step(a, "1")
    step(b, "1")
    oa, ob = lines(a), lines(b)
    assert ob["shmw"] == ["ok"]
    assert oa["shmr"] == ["written-by-b"]
    assert oa["mprotect"] == ["EACCES"] and oa["shmw"] == ["EACCES"] and oa["reopen"] == ["EACCES"]


def test_interfaces_connections_is_read_only(mgr):
    pd = run_pd(mgr, "chanpeer", ["sleep", "10"])
    caps = {c.name: c for c in pd.list_runtime_params("/interfaces")}
    assert caps["/interfaces/connections"].read and not caps["/interfaces/connections"].write
    with pytest.raises(bmi.PermissionDenied):
        pd.set_runtime_param("/interfaces/connections", "1 to 2 IPC RW")
    assert pd.get_runtime_param("/capability/connections/shm-revocable").startswith("no")
    lines(pd)


@pytest.mark.parametrize("cut", ["destroy", "withdraw"])
def test_no_connection_outlives_a_cut_that_races_with_connect(mgr, cut):
    """connect checks the policy and the destination under the same locks that destroy and
    set_allowed_connections(disable_existing=True) cut under: nothing made in between survives."""
    for _ in range(5):
        dest = run_pd(mgr, "chanpeer", [*(["accept", "60000"] * 300), "sleep", "60000"])
        src = run_pd(mgr, "chanpeer", [*(["connect", str(dest.get_pd_id()), "IPC", "3", "0"] * 200),
                                       "print", "done", "sleep", "60000"], start=False)
        src.set_allowed_connections(dest.get_pd_id(), [ConnectionPolicy(CT.IPC, bmi.RW)])
        src.request_status_change(bmi.PDStatus.RUNNING)
        wait_console(src, "connect: ok")            # connecting in a loop now
        if cut == "destroy":
            dest.destroy()
        else:
            src.set_allowed_connections(dest.get_pd_id(), [], disable_existing=True)
        wait_console(src, "print: done", timeout=60)
        assert src.get_runtime_param("/interfaces/connections") == ""
        src.destroy()
        if cut == "withdraw":
            dest.destroy()
