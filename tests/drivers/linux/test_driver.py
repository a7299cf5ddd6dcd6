"""The Linux driver through the public API: isolation seen from inside, limits enforced, root archives."""
import os
import time

import pytest

import bmi
from bmi import PDStatus
from bmi.drivers.linux.bundle import bundle
from tests.helpers import output, sh, start


@pytest.fixture
def mgr():
    with bmi.open(integrity=False) as m:
        m.shutdown_grace = 1.0
        yield m


def _host_pids(mgr, pd):
    return mgr._pds[pd.get_pd_id()].handle.groups.pids()


def test_isolation_seen_from_inside(mgr):
    _, out = sh(mgr, "cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '; echo --; "
                     "ls /proc | grep '^[0-9]' | tr '\\n' ' '; echo; echo --; ls /; echo --; "
                     "cat /etc/hostname 2>&1; hostname; id -u; ls /dev | tr '\\n' ' '")
    ifaces, pids, root, rest = out.split("--\n")
    assert ifaces.split() == ["lo"]
    assert set(pids.split()) <= {"1", "2", "3", "4", "5", "6", "7", "8", "9", "10"}
    assert "1" in pids.split()
    assert sorted(root.split()) == ["dev", "proc", "tmp"]
    lines = rest.splitlines()
    assert "No such file" in lines[0]
    assert lines[1].startswith("pd")
    assert lines[2] == "0"
    assert set(lines[3].split()) == {"null", "zero", "full", "random", "urandom"}


def _host_ids(pid: int) -> set[int]:
    """Real, effective, saved and fs uids and gids of a host process."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {int(x) for key in ("Uid", "Gid") for x in fields[key].split()}


def test_pd_runs_as_an_unprivileged_host_user(mgr):
    pd = start(mgr, ["busybox", "sleep", "1000"])
    ids = set().union(*(_host_ids(p) for p in _host_pids(mgr, pd)))
    own = mgr._pds[pd.get_pd_id()].handle.ids
    expected = own.uid if os.getuid() == 0 else os.getuid()
    assert ids == {expected} and expected not in (0, 65534) or os.getuid() != 0


def test_no_manager_memory_or_arguments_reach_the_pd(mgr, monkeypatch):
    """The PD's init is a fork of the manager: its memory, environment and argv must stay unreadable."""
    monkeypatch.setenv("BMI_SECRET_FOR_TEST", "manager-only")
    _, out = sh(mgr, "for f in environ mem maps; do cat /proc/1/$f >/dev/null 2>&1 && echo $f-readable; done; "
                     "tr '\\0' ' ' < /proc/1/cmdline; echo; env | grep -c BMI_SECRET_FOR_TEST")
    lines = out.splitlines()
    assert not [line for line in lines if line.endswith("-readable")], out
    assert "python" not in out and "pytest" not in out, out
    assert lines[-1] == "0"


#: A program that takes 64 MiB at once (dd's buffer, filled by one read): under a 24 MiB limit the OOM killer
#: takes it within milliseconds, even under QEMU's emulation (the rig), and "survived" is not printed.
OVER_24_MIB = "busybox dd if=/dev/zero of=/dev/null bs=64M count=1 && echo survived"


def test_memory_limit_kills_with_reason_oom(mgr):
    pd, _ = sh(mgr, OVER_24_MIB, mem=24 << 20)
    assert pd.get_current_status() is PDStatus.CRASHED
    assert pd.get_runtime_param("/system/exit-reason") == "oom"
    assert "survived" not in pd.get_runtime_param("/console/log")


def test_a_start_after_an_oom_kill_counts_only_its_own(mgr):
    """The OOM count of a PD's groups is kept over its runs: a start takes its count as the base (0 in the groups
    allocate just made), so the run after an OOM kill ends as what it did, not as oom."""
    pd, _ = sh(mgr, OVER_24_MIB, mem=24 << 20)
    assert pd.get_runtime_param("/system/exit-reason") == "oom"
    pd.set_config_param("/boot/cmdline", "busybox true")
    pd.request_status_change(PDStatus.RUNNING)
    assert pd.wait(20) is PDStatus.SHUTDOWN
    assert pd.get_runtime_param("/system/exit-reason") == "exited with status 0"


def _cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            continue
    return total / os.sysconf("SC_CLK_TCK")


def test_cpu_quota_holds_a_busy_loop(mgr):
    """20% of one CPU caps a busy loop; lifting the cap lets it run (robust to a loaded host)."""
    pd = start(mgr, ["busybox", "sh", "-c", "while :; do :; done"], performance=20)
    pids = _host_pids(mgr, pd)

    def share(seconds):
        c0, t0 = _cpu_seconds(pids), time.monotonic()
        time.sleep(seconds)
        return (_cpu_seconds(pids) - c0) / (time.monotonic() - t0)

    capped = share(1.5)
    assert 0.01 < capped < 0.3, capped
    pd.set_runtime_param("/system/cpu/performance", "100")
    # Uncapped, the loop takes what the host leaves it: on a busy host give it windows until one shows it.
    frees: list[float] = []
    deadline = time.monotonic() + 15
    while not frees or (frees[-1] <= 2 * capped and time.monotonic() < deadline):
        frees.append(share(1.0))
    assert frees[-1] > 2 * capped, (capped, frees)


def test_pids_limit(mgr):
    pd = mgr.allocate_pd(bmi.PDDescription(mem=64 << 20))
    pd.set_runtime_param("/system/pids/max", "4")
    from tests.helpers import busybox_path
    pd.setup_pd(bmi.FileImage(busybox_path()))
    pd.set_config_param("/boot/cmdline",
                        "busybox sh -c 'for i in 1 2 3 4 5 6 7 8; do busybox sleep 30 & done; echo done'")
    pd.request_status_change(PDStatus.RUNNING)
    time.sleep(1.0)
    assert int(pd.get_runtime_param("/system/pids/current")) <= 4
    assert "can't fork" in pd.get_runtime_param("/console/log") or \
        "Resource temporarily unavailable" in pd.get_runtime_param("/console/log")


def test_paused_pd_uses_no_cpu(mgr):
    pd = start(mgr, ["busybox", "sh", "-c", "while :; do :; done"])
    pids = _host_pids(mgr, pd)
    pd.request_status_change(PDStatus.PAUSED)
    c0 = _cpu_seconds(pids)
    time.sleep(0.5)
    assert _cpu_seconds(pids) - c0 < 0.05
    pd.request_status_change(PDStatus.RUNNING)
    deadline = time.monotonic() + 10          # a busy host may give the resumed loop little CPU at first
    while _cpu_seconds(pids) - c0 <= 0.2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _cpu_seconds(pids) - c0 > 0.2


def test_destroy_of_a_paused_pd_and_of_one_that_ended_takes_its_whole_tree(mgr):
    """A paused PD's frozen tree is thawed to die; an ended PD has no process left, so nothing is thawed."""
    paused = start(mgr, ["busybox", "sh", "-c", "busybox sleep 100 & while :; do :; done"])
    ended = start(mgr, ["busybox", "true"])
    assert ended.wait(20) is PDStatus.SHUTDOWN
    deadline = time.monotonic() + 10
    while len(_host_pids(mgr, paused)) < 3 and time.monotonic() < deadline:   # its init, sh and sleep
        time.sleep(0.05)
    pids = _host_pids(mgr, paused)
    assert len(pids) == 3
    paused.request_status_change(PDStatus.PAUSED)
    for pd in (paused, ended):
        t0 = time.monotonic()
        pd.destroy()
        assert time.monotonic() - t0 < 5, "destroy waited for a frozen process"
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), f"process {pid} of the paused PD survived its destroy"


def test_bundled_dynamic_program_runs_as_archive(mgr, tmp_path):
    archive = tmp_path / "root.cpio"
    with open(archive, "wb") as f:
        paths = bundle("/bin/sh", f, extra=["/bin/ls", "/bin/cat"])
    assert any("libc" in p for p in paths)
    pd = mgr.allocate_pd(bmi.PDDescription(mem=64 << 20))
    pd.setup_pd(bmi.FileImage(archive))
    assert pd.get_runtime_param("/system/image/format") == "archive"
    pd.set_config_param("/boot/cmdline", "sh -c 'ls /bin; echo hi > /tmp/f; cat /tmp/f'")
    pd.request_status_change(PDStatus.RUNNING)
    out = output(pd)
    assert "ls" in out.split() and "hi" in out.split(), out
    assert pd.get_runtime_param("/system/exit-status") == "0"


def test_lifeline_ends_pds_when_the_manager_process_dies(tmp_path):
    """Session PDs live while the opening process lives: kill -9 the opener, the PD goes too."""
    import subprocess
    import sys
    from tests.helpers import busybox_path
    script = f"""
import bmi, sys, time
m = bmi.open(integrity=False)
pd = m.allocate_pd(bmi.PDDescription(mem=32 << 20))
pd.setup_pd(bmi.FileImage({busybox_path()!r}))
pd.set_config_param('/boot/cmdline', 'busybox sleep 1000')
pd.request_status_change(bmi.PDStatus.RUNNING)
print(' '.join(map(str, m._pds[pd.get_pd_id()].handle.groups.pids())), flush=True)
time.sleep(1000)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert pids
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
        time.sleep(0.05)
    assert not any(os.path.exists(f"/proc/{p}") for p in pids)
