"""Each PD is its own host user: nobody else can signal it, and per-user kernel limits are its own.

And /proc/<pid>/mem is no way around the ptrace ban.  Attacks come from
inside real PDs (tests/images/hostile.c) or from other host users.
"""
from __future__ import annotations

import ctypes
import json
import os
import pathlib
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
from contextlib import closing

import pytest

import bmi
from bmi import PDDescription
from tests.channel.progs import build, lines, run_pd, wait_console
from tests.helpers import busybox_path
from tests.images import HERE, newc
from tests.server.bmid import running_bmid

MB = 1 << 20
NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="per-PD host uids of their own need a root manager "
                                "(or an /etc/subuid range, which this machine's test user does not have)")


def host_pid(mgr, pd: bmi.PDController) -> int:
    return mgr._pds[pd.get_pd_id()].handle.run.pid


def host_ids(pid: int) -> set[int]:
    """Every uid and gid (real, effective, saved, fs) of a host process."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {int(x) for key in ("Uid", "Gid") for x in fields[key].split()}


def sleeper(mgr) -> bmi.PDController:
    return run_pd(mgr, "chanpeer", ["sleep", "60000"])


def as_user(uid: int, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv],
                          capture_output=True, text=True, timeout=30)


def test_two_pds_are_two_host_users_neither_of_them_nobody(mgr):
    a, b = sleeper(mgr), sleeper(mgr)
    ids_a, ids_b = host_ids(host_pid(mgr, a)), host_ids(host_pid(mgr, b))
    assert len(ids_a) == len(ids_b) == 1 and ids_a != ids_b, (ids_a, ids_b)
    assert not (ids_a | ids_b) & {0, NOBODY}
    assert a.get_runtime_param("/capability/isolation/per-pd-uid") == "yes"


def test_another_host_user_cannot_kill_a_pd(mgr):
    pd = sleeper(mgr)
    pid = host_pid(mgr, pd)
    done = as_user(NOBODY, "kill", "-KILL", str(pid))
    assert done.returncode != 0 and "not permitted" in done.stderr, done
    time.sleep(0.2)
    assert pd.get_current_status() is bmi.PDStatus.RUNNING
    (uid,) = host_ids(pid)
    assert as_user(uid, "kill", "-0", str(pid)).returncode == 0      # the same signal as its own uid would land


def _inotify_for_root() -> int:
    """0 if root can create an inotify instance now, else the errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_CLOEXEC)
    if fd < 0:
        return ctypes.get_errno()
    os.close(fd)
    return 0


def test_inotify_exhausted_in_one_pd_is_not_exhausted_for_root_or_another_pd(mgr):
    if _inotify_for_root():
        pytest.skip("root on this host is already at its inotify instance limit")
    hog = run_pd(mgr, "hostile", ["inotify", "8000"])
    took = wait_console(hog, "inotify:").split("inotify:")[1].split()
    assert int(took[0]) > 0 and took[1] == "EMFILE", took        # it did exhaust its own limit
    assert _inotify_for_root() == 0
    other = lines(run_pd(mgr, "hostile", ["inotify", "0"]))["inotify"][0].split()
    assert int(other[0]) >= int(took[0]), (other, took)
    hog.destroy()


def hostile_pd(mgr, kind: str, argv: list[str], caps: str = "") -> bmi.PDController:
    """The hostile program as an ELF image, or as /init of a root archive (the PD then owns the file)."""
    if kind == "elf":
        pd = run_pd(mgr, "hostile", argv, start=False)
    else:
        pd = mgr.allocate_pd(PDDescription(mem=32 * MB))
        pd.setup_pd(bmi.BytesImage(newc([("init", 0o100755, build("hostile").read_bytes())])))
        pd.set_config_param("/boot/cmdline", shlex.join(["hostile", *argv]))
    if caps:
        pd.set_config_param("/boot/capabilities", caps)
    pd.request_status_change(bmi.PDStatus.RUNNING)
    return pd


@pytest.mark.parametrize("kind", ["elf", "archive"])
def test_proc_mem_of_a_child_is_refused(mgr, kind):
    pds = {how: hostile_pd(mgr, kind, ["procmem", how]) for how in ("read", "write")}
    assert pds["read"].get_runtime_param("/capability/isolation/proc-mem").startswith("refused: ")
    out = {how: lines(pd)["procmem"][0] for how, pd in pds.items()}
    assert out == {"read": "EACCES", "write": "EACCES"}
    # the attack can be seen: a child that makes itself dumpable again is read
    assert lines(hostile_pd(mgr, kind, ["procmem", "consent"]))["procmem"][0] == "ok child-secret"
    # a process cannot open its own /proc/self/mem either in an ELF PD, whose image the manager owns; in an
    # archive PD it can (the kernel lets a process read itself when it owns its /proc entries), which
    # exposes nothing of any other process (the README says so)
    own = lines(hostile_pd(mgr, kind, ["procmem", "self"]))["procmem"][0]
    assert own == ("EACCES" if kind == "elf" else "ok child-secret")


@pytest.mark.parametrize("kind", ["elf", "archive"])
def test_a_kept_sys_ptrace_reads_children_only_where_the_capability_says_so(mgr, kind):
    """An ELF image is the manager's file, so CAP_SYS_PTRACE in the PD's namespace does not reach its
    processes' memory; an archive's programs are the PD's own, so it does, and proc-mem says "possible"."""
    pd = hostile_pd(mgr, kind, ["procmem", "read"], caps="sys_ptrace")
    said = pd.get_runtime_param("/capability/isolation/proc-mem")
    got = lines(pd)["procmem"][0]
    if kind == "elf":
        assert (said.split(":")[0], got) == ("refused", "EACCES")
    else:
        assert said.startswith("possible: /boot/capabilities keeps sys_ptrace"), said
        assert got == "ok child-secret"


_ARCHIVE_SCRIPT = b"#!/bin/sh\nsleep 60\n"
_ARCHIVE_INIT = """#!/bin/sh
sleep 60 &
applet=$!
/bin/script &
script=$!
sleep 0.3
/bin/hostile procmem-of $applet $script $$ 1
"""


def test_proc_mem_of_busybox_applets_scripts_and_the_shell_is_refused_in_an_archive_pd(mgr):
    """Every process of an archive PD: an applet the shell starts, a #! script, the shell itself."""
    with open(busybox_path(), "rb") as f:
        busybox = f.read()
    archive = newc([("bin", 0o40755), ("bin/busybox", 0o100755, busybox), ("bin/sh", 0o120777, b"busybox"),
                    ("bin/sleep", 0o120777, b"busybox"), ("bin/script", 0o100755, _ARCHIVE_SCRIPT),
                    ("bin/hostile", 0o100755, build("hostile").read_bytes()),
                    ("init", 0o100755, _ARCHIVE_INIT.encode())])
    pd = mgr.allocate_pd(PDDescription(mem=64 * MB))
    pd.setup_pd(bmi.BytesImage(archive))
    pd.request_status_change(bmi.PDStatus.RUNNING)
    seen = lines(pd)["procmem-of"]
    assert len(seen) == 4, seen
    assert all(line.endswith(": EACCES") for line in seen), seen


def test_a_dynamically_linked_program_in_an_archive_runs_and_is_refused_too(mgr, tmp_path):
    """ld.so and libc stay readable (the program runs); the PIE program itself is execute-only."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the dynamically linked test program")
    prog = tmp_path / "hostile"
    subprocess.run(["gcc", "-O2", "-pie", "-fPIE", "-o", str(prog), str(HERE / "hostile.c")],
                   check=True)
    libs = {"lib64/ld-linux-x86-64.so.2": "/lib64/ld-linux-x86-64.so.2",
            "lib/x86_64-linux-gnu/libc.so.6": "/lib/x86_64-linux-gnu/libc.so.6"}
    if not all(os.path.exists(path) for path in libs.values()):
        pytest.skip("this host's glibc is not at the Debian x86_64 paths")
    entries = [("lib", 0o40755), ("lib/x86_64-linux-gnu", 0o40755), ("lib64", 0o40755)]
    entries += [(name, 0o100755, pathlib.Path(path).read_bytes()) for name, path in libs.items()]
    pd = mgr.allocate_pd(PDDescription(mem=64 * MB))
    pd.setup_pd(bmi.BytesImage(newc([*entries, ("init", 0o100755, prog.read_bytes())])))
    pd.set_config_param("/boot/cmdline", "hostile procmem read")
    pd.request_status_change(bmi.PDStatus.RUNNING)
    assert lines(pd)["procmem"] == ["EACCES"]


@pytest.fixture
def small_range(monkeypatch):
    """A 2-uid range of this test's own (outside the default block), for every manager it starts."""
    start = 0x71000000 + (os.getpid() % 4096) * 4
    monkeypatch.setenv("BMI_UID_RANGE", f"{start}:2")
    return start


def test_exhausted_uid_range_is_a_resource_error_and_leaks_nothing(small_range):
    with bmi.open("linux:///session", integrity=False) as mgr:
        a = mgr.allocate_pd(PDDescription(mem=16 * MB))
        b = mgr.allocate_pd(PDDescription(mem=16 * MB))
        assert {mgr._pds[p.get_pd_id()].handle.ids.uid for p in (a, b)} == {small_range, small_range + 1}
        with pytest.raises(bmi.ResourceError, match=r"every host uid .* is taken.*BMI_UID_RANGE"):
            mgr.allocate_pd(PDDescription(mem=16 * MB))
        assert mgr.list_pd() == [0, a.get_pd_id(), b.get_pd_id()]
        a.destroy()                                     # released at destroy, and taken again
        c = mgr.allocate_pd(PDDescription(mem=16 * MB))
        assert mgr._pds[c.get_pd_id()].handle.ids.uid == small_range


_OTHER_MANAGER = """
import sys, bmi
with bmi.open("linux:///session", integrity=False) as mgr:
    pd = mgr.allocate_pd(bmi.PDDescription(mem=16 << 20))
    print(mgr._pds[pd.get_pd_id()].handle.ids.uid, flush=True)
    sys.stdin.read()
"""


def test_uids_are_shared_safely_between_managers_and_come_back_when_one_dies(small_range):
    other = subprocess.Popen([sys.executable, "-c", _OTHER_MANAGER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        assert int(other.stdout.readline()) == small_range
        with bmi.open("linux:///session", integrity=False) as mgr:
            a = mgr.allocate_pd(PDDescription(mem=16 * MB))
            assert mgr._pds[a.get_pd_id()].handle.ids.uid == small_range + 1
            with pytest.raises(bmi.ResourceError, match="every host uid"):
                mgr.allocate_pd(PDDescription(mem=16 * MB))
            other.kill()                                # its holder died: the uid is free again
            other.wait(10)
            b = mgr.allocate_pd(PDDescription(mem=16 * MB))
            assert mgr._pds[b.get_pd_id()].handle.ids.uid == small_range
    finally:
        other.kill()
        other.wait(10)
        other.stdout.close()
        other.stdin.close()


@pytest.fixture
def daemon(tmp_path):
    with running_bmid(tmp_path) as d:
        yield d


def _stored_ids(d) -> dict[int, list[int]]:
    with closing(sqlite3.connect(os.path.join(d.state_dir, "bmid.sqlite3"))) as db:
        rows = db.execute("SELECT pd_id, record FROM pds").fetchall()
    return {pd_id: json.loads(record)["ids"] for pd_id, record in rows}


def test_bmid_keeps_an_adopted_pds_uid_through_a_crash(daemon):
    """The uid of a PD that outlives bmid must not go to another PD, during bmid's absence or after it."""
    with daemon.open() as mgr:
        pd = run_pd(mgr, "chanpeer", ["sleep", "60000"])
        pd_id = pd.get_pd_id()
    (uid, gid) = _stored_ids(daemon)[pd_id]
    daemon.kill()
    with bmi.open("linux:///session", integrity=False) as mgr:  # another manager while bmid is down
        assert mgr._pds[mgr.allocate_pd(PDDescription(mem=16 * MB)).get_pd_id()].handle.ids.uid != uid
    daemon.start()
    with daemon.open() as mgr:
        assert mgr.get_controller(pd_id).get_current_status() is bmi.PDStatus.RUNNING
        other = run_pd(mgr, "chanpeer", ["sleep", "60000"])
        assert _stored_ids(daemon)[pd_id] == [uid, gid]
        assert _stored_ids(daemon)[other.get_pd_id()][0] != uid
        mgr.get_controller(pd_id).destroy()             # destroyed: its uid is free for the next PD
        again = mgr.allocate_pd(PDDescription(mem=16 * MB))
        assert _stored_ids(daemon)[again.get_pd_id()][0] == uid
