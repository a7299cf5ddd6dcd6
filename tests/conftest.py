"""Fixtures shared by every layer's tests: a leak check after each test."""
from __future__ import annotations

import os
import threading
import time

import pytest

from bmi.testing import child_processes


def _fds() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
    return out


def _our_cgroups() -> set[str]:
    from bmi.drivers.linux.cgroups import groups_of_this_process
    return groups_of_this_process(f"bmi-{os.getpid()}-")


def _settle(check, before, timeout: float = 3.0):
    """Give exiting processes and closing threads a moment; return what is still extra."""
    deadline = time.monotonic() + timeout
    while True:
        extra = check() - before if isinstance(before, set) else None
        if not extra or time.monotonic() > deadline:
            return extra
        time.sleep(0.02)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under BMI_NO_SKIP=1 (the QEMU rigs) a skipped test fails: a rig exists to run its tests."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("BMI_NO_SKIP") == "1" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped where skips are not allowed (BMI_NO_SKIP=1): {reason}"


@pytest.fixture(autouse=True)
def no_leaks(request):
    """Fail a test that leaves a process, fd, thread or cgroup of ours behind."""
    if request.node.get_closest_marker("allow_leaks"):
        yield
        return
    children, fds, threads, groups = child_processes(), _fds(), set(threading.enumerate()), _our_cgroups()
    yield
    leaked_children = _settle(child_processes, children)
    leaked_threads = _settle(lambda: set(threading.enumerate()), threads)
    leaked_groups = _settle(_our_cgroups, groups)
    now = _fds()
    # bmi-init's sealed memfd is made once per process by the first spawn, by design.
    leaked_fds = {fd: target for fd, target in now.items()
                  if fds.get(fd) != target and not target.startswith("/memfd:bmi-init")}
    problems = []
    if leaked_children:
        problems.append(f"child processes left: {sorted(leaked_children)}")
    if leaked_threads:
        problems.append(f"threads left: {sorted(t.name for t in leaked_threads)}")
    if leaked_groups:
        problems.append(f"cgroups left: {sorted(leaked_groups)}")
    if leaked_fds:
        problems.append(f"fds left: {leaked_fds}")
    if problems:
        pytest.fail("leak check: " + "; ".join(problems), pytrace=False)


@pytest.fixture
def tmgr(tmp_path, monkeypatch):
    """A session manager on its own swtpm (private state: tests may extend PCRs freely)."""
    import shutil

    import bmi
    if shutil.which("swtpm") is None:
        pytest.skip("swtpm is not installed")
    monkeypatch.setenv("BMI_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("BMI_TPM", "swtpm")
    with bmi.open() as m:
        yield m
