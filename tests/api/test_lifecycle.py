"""Status transitions (spec 7.2.4-7.2.6) on real PDs."""
import time

import pytest

import bmi
from bmi import PDStatus
from tests.helpers import busybox_path, output, sh, start


def test_allocated_ready_running_shutdown(mgr):
    pd = mgr.allocate_pd(bmi.PDDescription(mem=32 << 20))
    assert pd.get_current_status() is PDStatus.ALLOCATED
    with pytest.raises(bmi.InvalidState, match="setup_pd"):
        pd.request_status_change(PDStatus.RUNNING)
    pd.setup_pd(bmi.FileImage(busybox_path()))
    assert pd.get_current_status() is PDStatus.READY
    pd.set_config_param("/boot/cmdline", "busybox sh -c 'echo hello; exit 3'")
    pd.request_status_change("RUNNING")          # names work too (the /capability values)
    assert output(pd) == "hello\n"
    assert pd.get_current_status() is PDStatus.SHUTDOWN
    assert pd.get_runtime_param("/system/exit-status") == "3"
    assert "exited with status 3" in pd.get_runtime_param("/system/exit-reason")


def test_killed_by_signal_is_crashed(mgr):
    pd, _ = sh(mgr, "kill -SEGV $$")
    assert pd.get_current_status() is PDStatus.CRASHED
    assert "SIGSEGV" in pd.get_runtime_param("/system/exit-reason")
    assert "/system/exit-status" not in {c.name for c in pd.list_runtime_params("/system")}


def test_shutdown_request_terms_then_kills(mgr):
    mgr.shutdown_grace = 0.5
    polite = start(mgr, ["busybox", "sleep", "1000"])
    t0 = time.monotonic()
    polite.request_status_change(PDStatus.SHUTDOWN)
    assert time.monotonic() - t0 < 0.5, "SIGTERM should end sleep at once"
    assert polite.get_current_status() is PDStatus.SHUTDOWN
    assert "shutdown requested" in polite.get_runtime_param("/system/exit-reason")
    stubborn = start(mgr, ["busybox", "sh", "-c", "trap '' TERM; while :; do sleep 1; done"])
    time.sleep(0.2)
    stubborn.request_status_change(PDStatus.SHUTDOWN)
    assert stubborn.get_current_status() is PDStatus.SHUTDOWN
    assert "grace period" in stubborn.get_runtime_param("/system/exit-reason")


def test_pause_freezes_and_resume_thaws(mgr):
    pd = start(mgr, ["busybox", "sh", "-c", "i=0; while :; do i=$((i+1)); echo $i > /tmp/n; done"])
    time.sleep(0.3)
    pd.request_status_change(pd.get_runtime_param("/capability/pause"))
    assert pd.get_current_status() is PDStatus.PAUSED
    used = pd.get_runtime_param("/system/memory/used")
    log1 = pd.get_runtime_param("/console/log")
    time.sleep(0.3)
    assert pd.get_runtime_param("/console/log") == log1
    assert pd.get_current_status() is PDStatus.PAUSED
    with pytest.raises(bmi.InvalidState):
        pd.setup_pd(bmi.FileImage(busybox_path()))
    pd.request_status_change(PDStatus.RUNNING)
    assert pd.get_current_status() is PDStatus.RUNNING
    assert used
    pd.request_status_change(PDStatus.SHUTDOWN)   # a paused-then-running PD still shuts down
    assert pd.get_current_status() is PDStatus.SHUTDOWN


def test_shutdown_of_a_paused_pd(mgr):
    pd = start(mgr, ["busybox", "sleep", "1000"])
    pd.request_status_change(PDStatus.PAUSED)
    pd.request_status_change(PDStatus.SHUTDOWN)
    assert pd.get_current_status() is PDStatus.SHUTDOWN


def test_restart_runs_the_same_measured_image_again(mgr):
    pd, first = sh(mgr, "echo run; exit 0")
    digest = pd.get_runtime_param("/system/measurement/sha256")
    pd.request_status_change(pd.get_runtime_param("/capability/restart"))
    assert pd.get_current_status() in (PDStatus.RUNNING, PDStatus.SHUTDOWN)
    assert output(pd).count("run\n") == 2       # the console keeps both runs
    assert pd.get_runtime_param("/system/measurement/sha256") == digest
    live = start(mgr, ["busybox", "sleep", "1000"])
    live.request_status_change(PDStatus.RESTARTING)
    assert live.get_current_status() is PDStatus.RUNNING


def test_start_again_after_shutdown(mgr):
    pd, out = sh(mgr, "echo once")
    pd.request_status_change(PDStatus.RUNNING)
    assert output(pd).count("once") == 2


def test_suspend_is_not_supported_and_says_why(mgr):
    pd = start(mgr, ["busybox", "sleep", "1000"])
    with pytest.raises(bmi.NotSupported, match="checkpoint"):
        pd.request_status_change(PDStatus.SUSPENDED)
    names = {c.name for c in pd.list_runtime_params("/capability")}
    assert {"/capability/pause", "/capability/restart"} <= names
    assert not names & {"/capability/suspend", "/capability/resume"}
    assert pd.get_current_status() is PDStatus.RUNNING


@pytest.mark.parametrize("status", [PDStatus.ALLOCATED, PDStatus.READY, PDStatus.CRASHED, "BOGUS", 99, None])
def test_unrequestable_statuses(mgr, status):
    pd = start(mgr, ["busybox", "sleep", "1000"])
    with pytest.raises(bmi.InvalidArgument):
        pd.request_status_change(status)
    assert pd.get_current_status() is PDStatus.RUNNING


def test_pause_needs_running(mgr):
    pd = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
    pd.setup_pd(bmi.FileImage(busybox_path()))
    with pytest.raises(bmi.InvalidState):
        pd.request_status_change(PDStatus.PAUSED)
    with pytest.raises(bmi.InvalidState):
        pd.request_status_change(PDStatus.SHUTDOWN)


def test_destroy_running_pd_and_request_destroyed(mgr):
    pd = start(mgr, ["busybox", "sh", "-c", "busybox sleep 1000 & busybox sleep 1000"])
    pd.request_status_change(PDStatus.DESTROYED)
    assert pd.get_current_status() is PDStatus.DESTROYED
    with pytest.raises(bmi.NoSuchDomain):
        pd.destroy()


@pytest.mark.session_only("reads the in-process driver handle")
def test_priority_range_and_effect(mgr):
    pd = start(mgr, ["busybox", "sleep", "1000"])
    assert pd.get_priority() == 0
    pd.set_priority(5)
    assert pd.get_priority() == 5
    for bad in (11, -11, 1.5, "1", True):
        with pytest.raises(bmi.InvalidArgument):
            pd.set_priority(bad)
    assert pd.get_priority() == 5
    import os
    nice = {os.getpriority(os.PRIO_PROCESS, int(p)) for p in _pids(pd)}
    assert nice == {-5}


def _pids(pd):
    handle = pd._mgr._pds[pd.get_pd_id()].handle
    return handle.groups.pids()
