"""bmi.drivers.linux.cgroups on the real kernel: real cgroups, real processes.

Test processes are placed in a PD's groups before they exec (preexec_fn
writes to every procs_files entry), like the driver does.  The v2 code
path is also run on a v1/hybrid host, in a private mount namespace where
the v1 hierarchies are unmounted and cgroup2 is mounted at /sys/fs/cgroup
(the real unified hierarchy; on a hybrid host it has no resource
controllers, so there only grouping, freeze and kill can be exercised).
Run as a script (`python test_cgroups.py SCENARIO NAME`) this file is the
body of those namespace runs.
"""
from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest

import bmi
from bmi.drivers.linux.cgroups import UNLIMITED, PDCgroups, cgroup_version, describe
from bmi.errors import InvalidArgument, InvalidState, NotSupported, ResourceError

PREFIX = f"bmi-test-{os.getpid()}-"
CGROUP_ROOT = "/sys/fs/cgroup"
HYBRID = os.path.isdir(os.path.join(CGROUP_ROOT, "unified"))


def _cgroups_usable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create cgroups"
    try:
        cgroup_version()
    except bmi.errors.BMIError as e:
        return str(e)
    return None


pytestmark = pytest.mark.skipif(_cgroups_usable() is not None, reason=str(_cgroups_usable()))


# --- helpers (also used by the namespace scenarios) ------------------------

def spawn(cg: PDCgroups, argv: list[str], **kw) -> subprocess.Popen:
    """Start argv inside the PD's groups, placed before exec."""
    def place() -> None:
        for f in cg.procs_files:
            with open(f, "w") as fh:
                fh.write("0")
    return subprocess.Popen(argv, preexec_fn=place, **kw)


def cpu_ns(pid: int) -> int:
    """CPU time the process has used, from the scheduler (ns)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


def group_dirs(cg: PDCgroups) -> list[str]:
    return [os.path.dirname(f) for f in cg.procs_files]


def control_file(cg: PDCgroups, *names: str) -> str:
    """The first of `names` that exists in one of the PD's groups."""
    for name in names:
        for d in group_dirs(cg):
            if os.path.exists(os.path.join(d, name)):
                return os.path.join(d, name)
    raise AssertionError(f"none of {names} in {group_dirs(cg)}")


def read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def wait_for(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def our_dirs() -> list[str]:
    """Every directory of ours in any cgroup hierarchy, seen from the fs."""
    return [os.path.join(d, n) for d, subdirs, _ in os.walk(CGROUP_ROOT)
            for n in subdirs if n.startswith(PREFIX)]


def lifecycle(cg: PDCgroups) -> None:
    """Freeze/thaw a busy loop, kill a tree that has a reparented
    grandchild, destroy: the parts every cgroup layout must do."""
    p = spawn(cg, ["sh", "-c", "(sleep 100 &); while :; do :; done"])
    try:
        wait_for(lambda: len(cg.pids()) == 2)          # the shell and the orphaned sleep
        assert p.pid in cg.pids()
        cg.freeze()
        assert cg.frozen()
        before = cpu_ns(p.pid)
        time.sleep(0.3)
        assert cpu_ns(p.pid) == before, "a frozen process ran"
        cg.thaw()
        assert not cg.frozen()
        before = cpu_ns(p.pid)
        time.sleep(0.3)
        assert cpu_ns(p.pid) > before, "a thawed process did not run"

        pidfds = [os.pidfd_open(pid) for pid in cg.pids()]
        cg.kill_all()
        assert cg.pids() == []
        try:
            for fd in pidfds:                          # every one of them has exited
                assert select.select([fd], [], [], 1.0)[0] == [fd]
        finally:
            for fd in pidfds:
                os.close(fd)
        assert p.wait(5) == -signal.SIGKILL
        dirs = group_dirs(cg)
        cg.destroy()
        assert not [d for d in dirs if os.path.exists(d)]
        cg.destroy()                                    # idempotent
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


# --- fixtures -------------------------------------------------------------

@pytest.fixture(autouse=True)
def no_leftovers():
    """After each test: no cgroup directory of ours, no process of ours."""
    assert our_dirs() == []
    before = set(_children())
    yield
    leftovers = our_dirs()
    assert leftovers == [], f"cgroup directories left behind: {leftovers}"
    assert set(_children()) <= before, "test processes left behind"


def _children() -> list[str]:
    """Our child processes (session fixtures elsewhere, e.g. a bmid, may own some before a test)."""
    return subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True, text=True).stdout.split()


@pytest.fixture
def make():
    """create() with a test-unique name; destroys what a failing test left."""
    made: list[PDCgroups] = []
    count = iter(range(1000))

    def _make(pd_id: int | None = 7) -> PDCgroups:
        cg = PDCgroups.create(f"{PREFIX}pd{next(count)}", pd_id=pd_id)
        made.append(cg)
        return cg
    yield _make
    for cg in made:
        cg.destroy()


@pytest.fixture
def run():
    """spawn() that kills and reaps whatever a failing test left running."""
    procs: list[subprocess.Popen] = []

    def _run(cg: PDCgroups, argv: list[str], **kw) -> subprocess.Popen:
        p = spawn(cg, argv, **kw)
        procs.append(p)
        return p
    yield _run
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
        if p.stdout:
            p.stdout.close()


BUSY = ["sh", "-c", "while :; do :; done"]


# --- layout -----------------------------------------------------------------

def test_version_and_describe_match_the_mounts():
    expected = 2 if os.path.exists(os.path.join(CGROUP_ROOT, "cgroup.controllers")) else 1
    assert cgroup_version() == expected
    info = describe()
    assert info["version"] == str(expected)
    assert info["mode"] == ("unified" if expected == 2 else "hybrid" if HYBRID else "legacy")
    if expected == 1:
        assert set(info["controllers"].split()) >= {"cpu", "cpuset", "memory", "freezer", "pids"}


def test_create_makes_one_group_per_hierarchy_under_our_own(make):
    cg = make()
    dirs = group_dirs(cg)
    assert all(os.path.isdir(d) and os.path.basename(d) == cg.name for d in dirs)
    # nested under the cgroup this process is in, e.g. memory:/process_api/<id>
    own = {line.split(":", 2)[2] for line in open("/proc/self/cgroup").read().splitlines()}
    assert all(any(os.path.dirname(d).endswith(o.rstrip("/")) for o in own) for d in dirs)
    if cgroup_version() == 1:
        assert len(dirs) >= 5 and len(set(dirs)) == len(dirs)
        # v1 cpuset levels start empty; create must have filled them
        assert read(control_file(cg, "cpuset.cpus")) != ""
        assert read(control_file(cg, "cpuset.mems")) != ""
    else:
        assert len(dirs) == 1


# --- bad input and state ----------------------------------------------------

@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "with space", "a.b",
                                  "x" * 65, "nl\n", 7, None])
def test_bad_names_are_invalid_arguments(name):
    with pytest.raises(InvalidArgument) as e:
        PDCgroups.create(name, pd_id=9)
    assert "PD 9" in str(e.value) and e.value.pd_id == 9


def test_taken_name_is_a_resource_error_and_harms_nothing(make):
    cg = make()
    with pytest.raises(ResourceError, match="already exists") as e:
        PDCgroups.create(cg.name, pd_id=8)
    assert "PD 8" in str(e.value)
    assert all(os.path.isdir(d) for d in group_dirs(cg))


def test_failure_halfway_removes_what_was_made():
    name = f"{PREFIX}half"
    probe = PDCgroups.create(name)
    dirs = group_dirs(probe)
    probe.destroy()
    os.mkdir(dirs[-1])                               # only the last hierarchy is taken
    try:
        with pytest.raises(ResourceError, match="already exists"):
            PDCgroups.create(name, pd_id=3)
        assert [d for d in dirs if os.path.exists(d)] == [dirs[-1]]
    finally:
        os.rmdir(dirs[-1])


def test_calls_after_destroy_are_invalid_state_and_the_name_is_free_again(make):
    cg = make()
    cg.destroy()
    for call in (cg.pids, cg.freeze, cg.kill_all, cg.memory_current,
                 lambda: cg.set_weight(0), lambda: cg.set_pids_max(5)):
        with pytest.raises(InvalidState, match="PD 7"):
            call()
    again = PDCgroups.create(cg.name, pd_id=7)
    assert all(os.path.isdir(d) for d in group_dirs(again))
    again.destroy()


def test_a_destroy_interrupted_after_a_close_never_closes_that_fd_again(make, monkeypatch):
    """Ctrl-C landing right after destroy() closed the weight fd: the destroy at exit (a weakref finalizer) must
    not close that number again: by then it may be another file's (`bmi run` printed EBADF in a traceback)."""
    cg = make()
    cg.set_weight(2)                                    # opens the weight fd, kept for the next change
    weight = next(int(fd) for fd in os.listdir("/proc/self/fd")
                  if os.readlink(f"/proc/self/fd/{fd}").endswith(("/cpu.shares", "/cpu.weight")))
    real_close = os.close

    def close_then_interrupt(fd: int) -> None:
        real_close(fd)
        if fd == weight:
            raise KeyboardInterrupt
    monkeypatch.setattr(os, "close", close_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        cg.destroy()
    monkeypatch.setattr(os, "close", real_close)
    reused = os.open(os.devnull, os.O_RDONLY)          # the lowest free number: the weight fd's
    try:
        assert reused == weight
        cg.destroy()                                    # as at exit
        os.fstat(reused)                                # still open: not closed in its place
    finally:
        real_close(reused)


@pytest.mark.parametrize("call", [
    lambda cg: cg.set_memory_max(0), lambda cg: cg.set_memory_max(-1),
    lambda cg: cg.set_memory_max("64M"), lambda cg: cg.set_memory_max(True),
    lambda cg: cg.set_cpus(0), lambda cg: cg.set_cpu_share(0, 1),
    lambda cg: cg.set_cpu_share(101, 1), lambda cg: cg.set_cpu_share(50, 0),
    lambda cg: cg.set_weight(11), lambda cg: cg.set_weight(-11),
    lambda cg: cg.set_weight(1.5), lambda cg: cg.set_pids_max(0),
])
def test_out_of_range_values_are_invalid_arguments(make, call):
    cg = make()
    with pytest.raises(InvalidArgument, match="PD 7"):
        call(cg)


# --- memory -----------------------------------------------------------------

def test_memory_limit_oom_kills_an_allocating_process(make, run):
    cg = make()
    assert cg.memory_max() == UNLIMITED
    cg.set_memory_max(48 << 20)
    assert cg.memory_max() == 48 << 20
    holder = run(cg, [sys.executable, "-c",
                      "import time; b = b'x' * (16 << 20); print(1, flush=True); time.sleep(60)"],
                 stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "1"
    assert cg.memory_current() >= 16 << 20
    assert cg.oom_kills() == 0
    hog = run(cg, [sys.executable, "-c",
                   "x = []\nwhile True: x.append(b'x' * (1 << 20))"])
    assert hog.wait(20) == -signal.SIGKILL
    assert cg.oom_kills() >= 1
    cg.destroy()


def test_memory_limit_goes_down_and_up_in_a_new_group_and_a_reopened_one(make):
    """v1 keeps memory.memsw.limit_in_bytes >= memory.limit_in_bytes, so the order of the two writes depends on
    the memsw limit in force (known without a read only in a group just made): every move must succeed."""
    cg = make()
    for group in (cg, PDCgroups.reopen(cg.name, pd_id=7)[0]):
        for nbytes in (48 << 20, 1 << 30, 16 << 20, 2 << 30, 32 << 20):
            group.set_memory_max(nbytes)
            assert group.memory_max() == nbytes
            memsw = [os.path.join(d, "memory.memsw.limit_in_bytes") for d in group_dirs(group)
                     if os.path.exists(os.path.join(d, "memory.memsw.limit_in_bytes"))]
            assert [int(read(f)) for f in memsw] == [nbytes] * len(memsw)


# --- CPU --------------------------------------------------------------------

def test_cpu_quota_holds_a_busy_loop_near_20_percent(make, run):
    cg = make()
    cg.set_cpu_share(20, 1)
    assert read(control_file(cg, "cpu.max", "cpu.cfs_quota_us")).split()[0] == "20000"
    p = run(cg, BUSY)
    time.sleep(0.2)
    t0, c0 = time.monotonic(), cpu_ns(p.pid)
    time.sleep(1.0)
    share = (cpu_ns(p.pid) - c0) / 1e9 / (time.monotonic() - t0)
    assert 0.05 < share < 0.30, f"busy loop got {share:.0%} of a CPU under a 20% quota"
    cg.destroy()


def test_set_cpus_pins_and_clamps_to_the_parent(make, run):
    cg = make()
    p = run(cg, ["sleep", "60"])
    assert cg.set_cpus(1) == 1
    assert cg.cpus() == 1
    assert len(os.sched_getaffinity(p.pid)) == 1
    every = cg.set_cpus(1 << 12)                     # more than there are: clamped
    assert every == cg.cpus() == len(os.sched_getaffinity(p.pid)) >= 1
    cg.destroy()


def test_a_new_group_holds_the_kernel_defaults_whose_writes_are_skipped():
    """The limits skip writing a value a group just made has anyway (cgroups._KERNEL_DEFAULTS): on this kernel
    each of those files must hold exactly that, and a write of another value must still reach the file."""
    from bmi.drivers.linux.cgroups import _KERNEL_DEFAULTS
    cg = PDCgroups.create(f"{PREFIX}defaults", pd_id=3)
    try:
        checked = {}
        for d in group_dirs(cg):
            for files in _KERNEL_DEFAULTS.values():
                for name, value in files:
                    if os.path.exists(os.path.join(d, name)):
                        checked[name] = (read(os.path.join(d, name)), value)
        if not any(os.path.exists(os.path.join(d, f)) for d in group_dirs(cg) for f in ("cpu.weight", "cpu.shares")):
            pytest.skip("no cpu controller for the PD's groups here")
        assert checked and all(have == want for have, want in checked.values()), checked
        cg.set_weight(0)                    # the default: nothing to write
        cg.set_weight(3)
        assert int(read(control_file(cg, "cpu.weight", "cpu.shares"))) in (195, 2000)
        cg.set_weight(0)                    # no longer fresh: written
        assert int(read(control_file(cg, "cpu.weight", "cpu.shares"))) in (100, 1024)
    finally:
        cg.destroy()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to tell one CPU from all")
@pytest.mark.hybrid_host
def test_create_with_cpus_pins_a_v1_cpuset_at_once_as_set_cpus_would(run):
    """create(cpus=n) writes the CPUs set_cpus(n) picks instead of the parent's; set_cpus(n) then keeps them."""
    groups = [PDCgroups.create(f"{PREFIX}pinned{pd_id}", pd_id=pd_id, cpus=1) for pd_id in (1, 2)]
    try:
        if not any(os.path.exists(os.path.join(d, "cpuset.effective_cpus")) for d in group_dirs(groups[0])):
            pytest.skip("no v1 cpuset: a v2 one is empty (the parent's CPUs) until set_cpus")
        files = [os.path.join(os.path.dirname(control_file(cg, "cpuset.effective_cpus")), "cpuset.cpus")
                 for cg in groups]
        picked = [read(f) for f in files]
        assert all(len(p.split(",")) == 1 and "-" not in p for p in picked), picked     # one CPU each, at once
        assert picked[0] != picked[1]                                                   # rotated with pd_id
        p = run(groups[0], ["sleep", "60"])
        assert os.sched_getaffinity(p.pid) == {int(picked[0])}
        assert groups[0].set_cpus(1) == 1 and read(files[0]) == picked[0]
        assert groups[0].set_cpus(2) == 2 and len(os.sched_getaffinity(p.pid)) == 2
    finally:
        for cg in groups:
            cg.destroy()


@pytest.mark.parametrize("priority,v1,v2", [(0, 1024, 100), (10, 9537, 931),
                                            (-10, 110, 11), (3, 2000, 195)])
def test_weight_sets_the_cpu_weight_file(make, priority, v1, v2):
    cg = make()
    cg.set_weight(priority)
    path = control_file(cg, "cpu.weight", "cpu.shares")
    assert int(read(path)) == (v2 if path.endswith("cpu.weight") else v1)


def test_weight_splits_one_cpu(make, run):
    """Two loops on the same CPU: priority +10 against -10 (86:1 by weight)."""
    high, low = make(pd_id=1), make(pd_id=1)         # same pd_id: same CPU picked
    high.set_weight(10)
    low.set_weight(-10)
    assert high.set_cpus(1) == low.set_cpus(1) == 1
    ph, pl = run(high, BUSY), run(low, BUSY)
    assert os.sched_getaffinity(ph.pid) == os.sched_getaffinity(pl.pid)
    time.sleep(0.2)
    h0, l0 = cpu_ns(ph.pid), cpu_ns(pl.pid)
    time.sleep(1.0)
    h, l = cpu_ns(ph.pid) - h0, cpu_ns(pl.pid) - l0
    assert h > 4 * l, f"+10 got {h / 1e6:.0f} ms, -10 got {l / 1e6:.0f} ms"
    high.destroy()
    low.destroy()


# --- processes ----------------------------------------------------------------

FORKER = """
import os, time
n = 0
for _ in range(10):
    try:
        pid = os.fork()
    except BlockingIOError:
        continue
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    n += 1
print(n, flush=True)
time.sleep(60)
"""


def test_pids_max_stops_forks(make, run):
    cg = make()
    cg.set_pids_max(4)
    p = run(cg, [sys.executable, "-c", FORKER], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "3"         # itself + 3 children
    assert len(cg.pids()) == 4
    cg.set_pids_max(None)
    assert read(control_file(cg, "pids.max")) == "max"
    cg.destroy()
    assert p.wait(5) == -signal.SIGKILL


def test_lifecycle_on_this_host(make):
    lifecycle(make())


def test_freeze_an_empty_group_and_kill_all_while_frozen(make, run):
    cg = make()
    cg.freeze()
    assert cg.frozen()
    cg.thaw()
    p = run(cg, BUSY)
    cg.freeze()
    cg.kill_all()                                    # must work on a frozen PD too
    assert cg.pids() == []
    assert p.wait(5) == -signal.SIGKILL
    cg.destroy()


def test_kill_all_leaves_the_cpu_limits_as_they_were(make, run):
    """kill_all lifts the CPU cap and raises the weight while the killed processes die; a PD that is
    started again in the same groups (after a forced shutdown) has its own limits back."""
    cg = make()
    cg.set_cpu_share(20, 1)
    cg.set_weight(-3)
    quota, weight = control_file(cg, "cpu.max", "cpu.cfs_quota_us"), control_file(cg, "cpu.weight", "cpu.shares")
    before = read(quota), read(weight)
    p = run(cg, BUSY)
    cg.kill_all()
    assert p.wait(5) == -signal.SIGKILL
    assert (read(quota), read(weight)) == before


def test_destroy_removes_subgroups_the_pd_made(make, run):
    cg = make()
    p = run(cg, ["sleep", "60"])
    sub = os.path.join(group_dirs(cg)[0], "inner")
    os.mkdir(sub)
    with open(os.path.join(sub, "cgroup.procs"), "w") as f:
        f.write(str(p.pid))
    assert p.pid in cg.pids()                        # found in the sub-group too
    cg.destroy()
    assert not os.path.exists(sub) and not any(os.path.exists(d) for d in group_dirs(cg))
    assert p.wait(5) == -signal.SIGKILL


# --- device rules: the v1 devices controller, or on v2 the BPF device program --------------

_OPEN_EACH = """
import os, sys
for arg in sys.argv[1:]:
    path, flags = arg.split("=")
    try:
        os.close(os.open(path, os.O_RDWR if flags == "rw" else os.O_RDONLY))
        print(arg, "ok")
    except OSError as e:
        print(arg, e.strerror)
"""


def opens(cg: PDCgroups, *tries: str) -> list[str]:
    """What a process in the PD's groups gets opening each "path=r|rw" (placed before exec, like a PD)."""
    p = spawn(cg, [sys.executable, "-c", _OPEN_EACH, *tries], stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(timeout=30)
    return out.splitlines()


def check_device_rules(cg: PDCgroups) -> None:
    """Only the nodes allowed open, with only the access allowed; a rule taken back refuses the next open."""
    cg.limit_devices(("c 1:3 rw",))
    assert opens(cg, "/dev/null=rw", "/dev/zero=r") == ["/dev/null=rw ok", "/dev/zero=r Operation not permitted"]
    cg.allow_device("c 1:5 r")
    assert opens(cg, "/dev/zero=r", "/dev/zero=rw", "/dev/full=r") == [
        "/dev/zero=r ok", "/dev/zero=rw Operation not permitted", "/dev/full=r Operation not permitted"]
    cg.deny_device("c 1:5 rwm")
    assert opens(cg, "/dev/null=rw", "/dev/zero=r") == ["/dev/null=rw ok", "/dev/zero=r Operation not permitted"]


def test_device_rules_are_checked_by_the_kernel():
    cg = PDCgroups.create(f"{PREFIX}dev", pd_id=6)
    try:
        cg.limit_devices(("c 1:3 rw",))
        enforcement = cg.devices_enforcement()
        if not cg.devices_enforced():
            pytest.skip(enforcement)
        assert enforcement.startswith("yes: cgroup v1" if "devices" in cg._ctl else "yes: cgroup v2 BPF")
        check_device_rules(cg)
    finally:
        cg.destroy()


# --- other layouts, in a private mount namespace ----------------------------

def _in_mount_namespace(scenario: str) -> subprocess.CompletedProcess:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(bmi.__file__)))
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, __file__,
         scenario, f"{PREFIX}{scenario}"],
        env={**os.environ, "PYTHONPATH": repo}, capture_output=True, text=True, timeout=60)


def needs_hybrid(test):
    """Marked hybrid_host (a pure-v2 rig deselects these) and skipped where there is no hybrid layout."""
    return pytest.mark.hybrid_host(pytest.mark.skipif(
        not HYBRID or shutil.which("unshare") is None,
        reason="needs a hybrid v1+v2 host and unshare(1) to hide one of the two")(test))


@needs_hybrid
def test_pure_v2_path_on_the_unified_hierarchy():
    result = _in_mount_namespace("v2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok v2")


@needs_hybrid
def test_v1_only_path_freezer_and_signal_kill():
    result = _in_mount_namespace("v1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok v1")


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1) for a private mount namespace")
def test_the_kept_layout_follows_mounts_and_a_move_to_another_cgroup():
    """While a driver holds the layout, a create reads /proc/self/mountinfo again only after the kernel reports a
    mount change: an umount and a new mount of a hierarchy, and a move of this process, must still show."""
    result = _in_mount_namespace("held")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok held")


def _held_layout_scenario(name: str) -> None:
    """Runs inside the private mount namespace: the layout kept by hold_layout after mount changes and a move."""
    from bmi.drivers.linux import cgroups
    cgroups.hold_layout()
    try:
        first = cgroups._layout()[0]
        sub = os.path.join(first.own, name)
        os.mkdir(sub)
        try:
            child = os.fork()   # (the fork moves, not this process: v2 may refuse it back into a parent group)
            if child == 0:
                moved = False
                try:
                    cgroups._layout()           # a fork watches the mounts on its own fd
                    with open(os.path.join(sub, "cgroup.procs"), "w") as f:
                        f.write(str(os.getpid()))
                    moved = cgroups._layout()[0].own == sub
                finally:
                    os._exit(0 if moved else 1)
            assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0, "the kept layout missed a move"
        finally:
            cgroups._remove_tree(sub)
        assert cgroups._layout()[0].own == first.own
        v2 = next(t for t in cgroups._layout() if t.version == 2)
        subprocess.run(["umount", "-l", v2.mount], check=True)
        assert [t for t in cgroups._layout() if t.version == 2] == [], "the kept layout missed an umount"
        elsewhere = os.path.join("/tmp", name)
        os.mkdir(elsewhere)
        try:
            subprocess.run(["mount", "-t", "cgroup2", "cgroup2", elsewhere], check=True)
            assert [t.mount for t in cgroups._layout() if t.version == 2] == [elsewhere], \
                "the kept layout missed a new mount"
            subprocess.run(["umount", elsewhere], check=True)
        finally:
            os.rmdir(elsewhere)
    finally:
        cgroups.release_layout()
    print("ok held")


def _scenario(layout: str, name: str) -> None:
    """Runs inside the private mount namespace."""
    if layout == "held":
        _held_layout_scenario(name)
        return
    if layout == "v2":      # only cgroup2, at the usual place
        subprocess.run(["umount", "-l", CGROUP_ROOT], check=True)
        subprocess.run(["mount", "-t", "cgroup2", "cgroup2", CGROUP_ROOT], check=True)
    else:                   # only the v1 hierarchies
        subprocess.run(["umount", "-l", os.path.join(CGROUP_ROOT, "unified")], check=True)
    assert cgroup_version() == (2 if layout == "v2" else 1)
    assert describe()["mode"] == ("unified" if layout == "v2" else "legacy")
    cg = PDCgroups.create(name, pd_id=5)
    try:
        if layout == "v2":
            assert group_dirs(cg) == [os.path.join(CGROUP_ROOT, name)]
            cg.limit_devices(("c 1:3 rw",))
            assert cg.devices_enforcement().startswith("yes: cgroup v2 BPF device program"), cg.devices_enforcement()
            check_device_rules(cg)
            assert os.path.exists(os.path.join(CGROUP_ROOT, name, "cgroup.kill"))
            available = set(read(os.path.join(CGROUP_ROOT, "cgroup.controllers")).split())
            if "memory" not in available:           # bound to v1 on this host
                try:
                    cg.set_memory_max(1 << 30)
                    raise AssertionError("set_memory_max without a memory controller")
                except NotSupported as e:
                    assert "memory" in str(e) and "PD 5" in str(e)
        else:
            assert not any("unified" in d for d in group_dirs(cg))
            freezer = control_file(cg, "freezer.state")
            cg.freeze()
            assert read(freezer) == "FROZEN"
            cg.thaw()
            assert read(freezer) == "THAWED"
        lifecycle(cg)
    finally:
        cg.destroy()
    print("ok", layout)


if __name__ == "__main__":
    _scenario(sys.argv[1], sys.argv[2])


# --- groups a SIGKILLed manager left ----------------------------------------

def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_a_new_session_manager_removes_the_empty_groups_of_dead_managers(run):
    dead = _dead_pid()
    left = PDCgroups.create(f"bmi-{dead}-pd1", pd_id=1)           # what a SIGKILLed manager leaves
    busy = PDCgroups.create(f"bmi-{dead}-pd2", pd_id=2)           # ... with a process still in it
    mine = PDCgroups.create(f"bmi-{os.getpid()}-pd99", pd_id=99)  # a live manager's
    other = PDCgroups.create(f"bmid-x{dead}-pd1", pd_id=1)        # not a session group at all
    sleeper = run(busy, ["sleep", "60"])
    try:
        assert all(os.path.isdir(d) for d in group_dirs(left))
        with bmi.open(integrity=False):
            pass
        assert not any(os.path.exists(d) for d in group_dirs(left))
        for kept in (busy, mine, other):
            assert all(os.path.isdir(d) for d in group_dirs(kept))
    finally:
        sleeper.kill()
        sleeper.wait()
        for cg in (left, busy, mine, other):
            cg.destroy()
