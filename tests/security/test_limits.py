"""A PD (tests/images/chanpeer.c) makes a child over its channel and tries to give it more than it has,
to make the layer hold more memory than it has, to wedge its channel with an oversized reply, and
to learn which PD ids exist.  Each attack must fail, and the layer must keep answering.
"""
from __future__ import annotations

import json
import os
import re
import shlex

import pytest

import bmi
from bmi import ConnectionPolicy, ConnectionType as CT, PDDescription
from tests.channel.progs import build, lines, run_pd, step, wait_console
from tests.images import newc

MB = 1 << 20
CHILD_MEM = 8 * MB


def parent(mgr, *argv: str, mem: int = 32 * MB, performance: int = 100, before=None) -> bmi.PDController:
    """Run chanpeer with argv, waiting at most 5 s for each reply; before(pd) may change the PD before it starts.

    chanpeer is the /init of a root archive, with a readable copy of itself as /self.image for its "self"
    command to give its child: a PD's programs are execute-only (unreadable, so its memory is the PD's own).
    """
    pd = mgr.allocate_pd(PDDescription(mem=mem, performance=performance))
    program = build("chanpeer").read_bytes()
    pd.setup_pd(bmi.BytesImage(newc([("init", 0o100755, program), ("self.image", 0o100644, program)])))
    pd.set_config_param("/boot/cmdline", shlex.join(["chanpeer", "patience", "5000", "+", *argv]))
    if before is not None:
        before(pd)
    pd.request_status_change(bmi.PDStatus.RUNNING)
    return pd


def call(method: str, **params) -> tuple[str, str, str, str]:
    """argv of chanpeer for one call; "CHILD" stands for the id of the child the PD made."""
    return "+", "call", method, json.dumps(params, separators=(",", ":")).replace('"CHILD"', "CHILD")


def child_of(mgr, pd: bmi.PDController) -> bmi.PDController:
    kids = [i for i in mgr.list_pd() if i and mgr.get_controller(i).get_runtime_param("/system/parent")
            == str(pd.get_pd_id())]
    assert len(kids) == 1, kids
    return mgr.get_controller(kids[0])


@pytest.fixture(params=["session", "bmid"])
def any_mgr(request, tmp_path):
    """A session manager, or a client of a bmid of this test's own (its PD channels are bmid's)."""
    if request.param == "session":
        yield request.getfixturevalue("mgr")
        return
    from tests.server.bmid import running_bmid
    with running_bmid(tmp_path) as d, d.open() as m:
        yield m


def results(out: dict[str, list[str]], key: str = "call") -> list[str]:
    return out.get(key, [])


# -- item 5: a child never gets more than its parent has -------------------------------------------------
def test_a_child_gets_no_more_performance_pids_or_priority_than_its_parent(mgr):
    pd = parent(mgr, "child", f'{CHILD_MEM},"performance":50',
                *call("set_runtime_param", pd="CHILD", name="/system/cpu/performance", value="100"),
                *call("set_runtime_param", pd="CHILD", name="/system/pids/max", value="4194304"),
                *call("set_priority", pd="CHILD", priority=10),
                *call("set_runtime_param", pd="CHILD", name="/system/cpu/performance", value="40"),
                *call("set_priority", pd="CHILD", priority=-3),
                performance=50)
    out = lines(pd)
    assert out["child"][0].startswith("ok"), out
    perf, pids, prio, lower_perf, lower_prio = results(out)
    own = f"above its parent PD {pd.get_pd_id()}'s own"
    assert perf.startswith("error -32004") and f"100 is {own} /system/cpu/performance (50)" in perf
    assert pids.startswith("error -32004") and f"4194304 is {own} /system/pids/max (1024)" in pids
    assert prio.startswith("error -32004") and f"10 is {own} priority (0)" in prio
    assert lower_perf.startswith("ok") and lower_prio.startswith("ok")        # less is fine
    child = child_of(mgr, pd)
    assert child.get_runtime_param("/system/cpu/performance") == "40"
    assert child.get_runtime_param("/system/pids/max") == "1024"
    assert child.get_priority() == -3


def test_a_child_is_allocated_within_its_parents_limits(mgr):
    def tighten(pd):
        pd.set_runtime_param("/system/pids/max", "32")
        pd.set_priority(-5)

    pd = parent(mgr, "child", f'{CHILD_MEM},"performance":100', "child", f'{CHILD_MEM},"performance":50',
                *call("get_runtime_param", pd="CHILD", name="/system/pids/max"),
                *call("get_priority", pd="CHILD"), performance=50, before=tighten)
    out = lines(pd)
    refused, made = out["child"]
    assert refused.startswith("error -32004") and "performance: 100 is above its parent PD" in refused
    assert made.startswith("ok"), out
    assert results(out) == ['ok "32"', "ok -5"]


def test_lowering_a_pds_limits_lowers_its_childrens(mgr):
    pd = parent(mgr, "child", str(CHILD_MEM), "+", "wait", "/test/step", "1", "20000",
                *call("set_runtime_param", pd="CHILD", name="/system/cpu/current", value="1"))
    wait_console(pd, "child: ok")
    child = child_of(mgr, pd)
    pd.set_runtime_param("/system/cpu/performance", "30")
    pd.set_runtime_param("/system/pids/max", "64")
    pd.set_priority(-2)
    assert child.get_runtime_param("/system/cpu/performance") == "30"
    assert child.get_runtime_param("/system/pids/max") == "64"
    assert child.get_priority() == -2
    with pytest.raises(bmi.PermissionDenied, match=r"performance of PD \d+: 90 is above its parent PD"):
        child.set_runtime_param("/system/cpu/performance", "90")         # not even the manager: lift the parent
    step(pd, "1")                   # the parent changes its child's CPUs: the share stays 30 % of them
    assert results(lines(pd)) == ["ok null"]
    if mgr.uri.startswith("linux:///session"):
        assert cpu_quota(mgr, child.get_pd_id()) == 30_000           # of a 100 ms period, on 1 CPU


def test_lowered_limits_of_children_outlive_a_restart_of_bmid(tmp_path):
    from tests.server.bmid import running_bmid
    with running_bmid(tmp_path) as d:
        with d.open() as mgr:
            pd = parent(mgr, "child", str(CHILD_MEM), "+", "sleep", "60000")
            wait_console(pd, "child: ok")
            child = child_of(mgr, pd).get_pd_id()
            pd.set_runtime_param("/system/cpu/performance", "30")
            pd.set_priority(-4)
        d.kill()
        d.start()
        with d.open() as mgr:
            assert mgr.get_controller(child).get_runtime_param("/system/cpu/performance") == "30"
            assert mgr.get_controller(child).get_priority() == -4


def cpu_quota(mgr, pd_id: int) -> int:
    """The CFS quota (us per 100 ms) of a session PD's cpu group, v1 or v2."""
    group = mgr._pds[pd_id].handle.groups._group("cpu", "read the quota")
    for name in ("cpu.max", "cpu.cfs_quota_us"):
        if os.path.exists(os.path.join(group.path, name)):
            with open(os.path.join(group.path, name)) as f:
                return int(f.read().split()[0])
    raise AssertionError(f"no CFS quota file in {group.path}")


def test_a_child_gets_no_capability_its_parent_lacks(mgr):
    pd = parent(mgr, "child", str(CHILD_MEM), "self",
                *call("set_config_param", pd="CHILD", name="/boot/capabilities", value="all"),
                *call("set_config_param", pd="CHILD", name="/boot/capabilities", value="net_raw sys_admin"),
                *call("set_config_param", pd="CHILD", name="/boot/capabilities", value="CAP_NET_RAW"),
                "+", "wait", "/test/step", "1", "20000",
                *call("request_status_change", pd="CHILD", status="RUNNING"),
                before=lambda pd: pd.set_config_param("/boot/capabilities", "net_raw"))
    wait_console(pd, "call: ok null")
    pd.set_config_param("/boot/capabilities", "")          # narrowed after the grant: the child cannot start
    step(pd, "1")
    everything, more, same, start = results(lines(pd))
    own = f"grants more than its parent PD {pd.get_pd_id()}'s own /boot/capabilities ('net_raw')"
    assert everything.startswith("error -32004") and f"'all' {own}" in everything
    assert more.startswith("error -32004") and f"'net_raw sys_admin' {own}" in more
    assert same == "ok null"
    assert start.startswith("error -32004") and "start of PD" in start and "('')" in start, start
    assert child_of(mgr, pd).get_current_status() is bmi.PDStatus.READY


def test_the_manager_gives_no_more_pids_than_the_host_has(mgr):
    with open("/proc/sys/kernel/pid_max") as f:
        pid_max = int(f.read())
    pd = mgr.allocate_pd(PDDescription(mem=16 * MB))
    for beyond in {pid_max + 1, 4194304} - {pid_max}:
        with pytest.raises(bmi.InvalidArgument, match=rf"{beyond} is above what the host has "
                                                      rf"\(/system/pids/max {pid_max}\)"):
            pd.set_runtime_param("/system/pids/max", str(beyond))
    pd.set_runtime_param("/system/pids/max", str(pid_max))
    assert mgr.get_controller(0).get_runtime_param("/system/pids/max") == str(pid_max)


# -- item 6: an image a PD supplies is no larger than its own memory -------------------------------------
def test_a_sparse_image_larger_than_the_supplier_is_refused_before_copying(mgr):
    pd = parent(mgr, "child", str(CHILD_MEM), "image", str(160 * MB), "image", str(1 * MB), mem=32 * MB)
    out = lines(pd)
    big, small = out["image"]
    assert big.startswith("error -32006"), big
    assert f"is {160 * MB} bytes, more than its own memory limit ({24 * MB} bytes)" in big
    assert small.startswith("error -32007"), small        # copied and measured: then it is no program
    assert child_of(mgr, pd).get_current_status() is bmi.PDStatus.ALLOCATED


# -- item 7: no reply can wedge a channel -----------------------------------------------------------------
def test_an_oversized_console_log_does_not_wedge_the_channel(any_mgr):
    mgr = any_mgr
    pd = parent(mgr, "child", str(CHILD_MEM), "self",
                *call("set_config_param", pd="CHILD", name="/boot/cmdline", value="chanpeer spew 102400"),
                *call("request_status_change", pd="CHILD", status="RUNNING"),
                "+", "wait", "/test/step", "1", "20000",
                *call("get_runtime_param", pd="CHILD", name="/console/log"),
                *call("get_version"), *call("destroy", pd="CHILD"))
    wait_console(pd, "call: ok", timeout=20)
    child = child_of(mgr, pd)
    assert child.wait(20) is bmi.PDStatus.SHUTDOWN
    assert len(child.get_runtime_param("/console/log")) == 102400
    step(pd, "1")
    out = lines(pd, timeout=40)
    assert out["self"] == ["ok null"], out
    log, version, destroyed = results(out)[2:]
    assert log.startswith('ok "') and "spew-spew" in log, log    # the most recent part that fits one record
    assert version == "ok 1" and destroyed == "ok null"
    assert child.get_pd_id() not in mgr.list_pd()


def test_a_reply_over_the_frame_is_an_error_the_caller_gets(mgr):
    """Session mode: only an in-process manager can set a value larger than a frame."""
    pd = parent(mgr, "child", str(CHILD_MEM), "+", "wait", "/test/step", "1", "20000",
                *call("get_config_param", pd="CHILD", name="/big"), *call("get_version"),
                *call("get_config_param", pd="CHILD", name="/small"))
    wait_console(pd, "child: ok")
    child = child_of(mgr, pd)
    child.set_config_param("/big", "x" * (100 * 1024))
    child.set_config_param("/small", "fine")
    step(pd, "1")
    big, version, small = results(lines(pd, timeout=40))
    assert big.startswith("error -32006 get_config_param by PD"), big
    assert re.search(r"the reply was 1\d{5} bytes, over the channel's frame of 65536 bytes; ask for less", big), big
    assert version == "ok 1" and small == 'ok "fine"'


# -- item 8: no existence oracle ------------------------------------------------------------------------------
#: Every PD-facing call that names another PD: (method, params with X for that PD's id).
NAMING_ANOTHER_PD = [
    ("get_controller", {"pd": "X"}),
    ("get_priority", {"pd": "X"}),
    ("set_priority", {"pd": "X", "priority": 0}),
    ("get_current_status", {"pd": "X"}),
    ("request_status_change", {"pd": "X", "status": "PAUSED"}),
    ("destroy", {"pd": "X"}),
    ("setup_pd", {"pd": "X"}),
    ("get_config_param", {"pd": "X", "name": "/boot/cmdline"}),
    ("set_config_param", {"pd": "X", "name": "/boot/cmdline", "value": "x"}),
    ("get_runtime_param", {"pd": "X", "name": "/system/status"}),
    ("set_runtime_param", {"pd": "X", "name": "/system/cpu/performance", "value": "10"}),
    ("list_runtime_params", {"pd": "X"}),
    ("get_integrity_link", {"pd": "X", "nonce": "00"}),
    ("get_protected_credentials", {"pd": "X", "policy": {"pd_integrity": "00", "pd_connections": []},
                                   "protected_credentials": "00"}),
    ("get_allowed_connections", {"pd": "X", "tid": 1}),
    ("set_allowed_connections", {"pd": "X", "tid": 1, "policies": []}),
    ("get_allowed_connections", {"tid": "X"}),
    ("get_allowed_connections", {"pd": "CHILD", "tid": "X"}),
    ("set_allowed_connections", {"pd": "CHILD", "tid": "X", "policies": [{"con_type": "IPC", "mode": 3}]}),
    ("set_allowed_connections", {"pd": "CHILD", "tid": "X", "policies": [], "disable_existing": True}),
    ("connect", {"tid": "X", "con_type": "IPC", "mode": 3}),
    ("connect", {"tid": "X", "con_type": "SHM", "mode": 1, "size": 4096}),
    # bmid's manager-only calls (on a session channel: no such method)
    ("measurement", {"pd": "X"}),
    ("read_console", {"pd": "X"}),
    ("wait", {"pd": "X", "timeout": 0}),
    ("assigned", {"pd": "X"}),
    ("assign", {"pd": "X", "device": "/dev/null"}),
    ("describe", {}),
]


def _params(params: dict, pd_id: int) -> str:
    text = json.dumps(params, separators=(",", ":"))
    return text.replace('"X"', str(pd_id)).replace('"CHILD"', "CHILD")


def test_a_pd_cannot_tell_existing_unknown_and_destroyed_pds_apart(any_mgr):
    mgr = any_mgr
    for _ in range(7):                                     # no PD id below 8: none reads as a mode (1, 3)
        mgr.allocate_pd(PDDescription(mem=8 * MB))
    other = run_pd(mgr, "chanpeer", ["sleep", "60000"])    # exists, running, not the caller's
    gone = mgr.allocate_pd(PDDescription(mem=8 * MB))
    gone.destroy()
    ids = {"existing": other.get_pd_id(), "destroyed": gone.get_pd_id(), "unknown": 987654}
    argv = ["child", str(CHILD_MEM)]
    for method, params in NAMING_ANOTHER_PD:
        for pd_id in ids.values():
            argv += ["+", "callfd" if method == "setup_pd" else "call", method, _params(params, pd_id)]
    pd = parent(mgr, *argv, mem=64 * MB)
    answers = results(lines(pd, timeout=60))
    assert len(answers) == 3 * len(NAMING_ANOTHER_PD), answers
    differ = []
    for i, (method, params) in enumerate(NAMING_ANOTHER_PD):
        seen = {name: re.sub(rf"\b{pd_id}\b", "<id>", answers[3 * i + j])
                for j, (name, pd_id) in enumerate(ids.items())}
        if len(set(seen.values())) != 1:
            differ.append((method, params, seen))
    assert not differ, "\n".join(map(str, differ))
    assert other.get_current_status() is bmi.PDStatus.RUNNING
