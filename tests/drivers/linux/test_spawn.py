"""The Linux spawn path, tested with real PDs from the inside (a static probe program)."""
from __future__ import annotations

import array
import contextlib
import ctypes
import fcntl
import os
import pathlib
import select
import signal
import stat
import struct
import time

import pytest

from bmi.drivers.linux import spawn as sp
from bmi.errors import ImageError, InvalidArgument, ResourceError
from tests.images import build, newc, sealed_memfd

pytestmark = pytest.mark.skipif(os.uname().machine != "x86_64", reason="the seccomp filter is x86_64-only")

S_DIR, S_REG, S_LNK = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o755, stat.S_IFLNK | 0o777


@pytest.fixture(scope="module")
def probe() -> bytes:
    return build("probe").read_bytes()


class PD:
    """One running PD with its console and status pipes; closes everything on exit."""

    def __init__(self, image: bytes, argv: list[str], *, archive: bool = False, lifeline: bool = False,
                 channel: bool = False, **kw):
        self.console_r, console_w = os.pipe()
        self.status_r, status_w = os.pipe()
        self.lifeline_w = self.channel = -1
        self.reaped = False
        lifeline_r = channel_fd = -1
        if lifeline:
            lifeline_r, self.lifeline_w = os.pipe()
        if channel:
            self.channel, channel_fd = os.pipe()
        exec_fd = sealed_memfd(image)
        try:
            self.spawned = sp.spawn(exec_fd, archive=archive, argv=argv, env=kw.pop("env", {}),
                                    console_fd=console_w, status_fd=status_w, lifeline_fd=lifeline_r,
                                    channel_fd=channel_fd, **kw)
        except BaseException:
            self.close()
            raise
        finally:
            for fd in (exec_fd, console_w, status_w, lifeline_r, channel_fd):
                if fd >= 0:
                    os.close(fd)

    def output(self, timeout: float = 10.0) -> str:
        """Console output until EOF (every writer in the PD gone)."""
        out, deadline = b"", time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0 and select.select([self.console_r], [], [], left)[0], "PD console never closed"
            chunk = os.read(self.console_r, 65536)
            if not chunk:
                return out.decode()
            out += chunk

    def line(self, timeout: float = 10.0) -> str:
        """The next console line (for PDs that keep running)."""
        out = b""
        while not out.endswith(b"\n"):
            assert select.select([self.console_r], [], [], timeout)[0], "PD printed nothing"
            byte = os.read(self.console_r, 1)
            assert byte, f"the PD's console closed after {out!r}: it ended"
            out += byte
        return out.decode().strip()

    def wait(self, timeout: float = 10.0) -> int:
        """Reap the PD's init; its exit code mirrors the program's."""
        assert select.select([self.spawned.pidfd], [], [], timeout)[0], "PD did not end"
        self.reaped = True
        return os.waitid(os.P_PIDFD, self.spawned.pidfd, os.WEXITED).si_status

    def close(self) -> None:
        if getattr(self, "spawned", None) is not None:
            if not self.reaped:
                try:
                    signal.pidfd_send_signal(self.spawned.pidfd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                os.waitid(os.P_PIDFD, self.spawned.pidfd, os.WEXITED)
            os.close(self.spawned.pidfd)
            self.spawned = None
        for fd in (self.console_r, self.status_r, self.lifeline_w, self.channel):
            if fd >= 0:
                os.close(fd)
        self.console_r = self.status_r = self.lifeline_w = self.channel = -1

    def __enter__(self) -> "PD":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run(image: bytes, argv: list[str], **kw) -> tuple[dict[str, str], tuple[str, int] | None, int]:
    """Run a PD to its end: ({command: result}, status line, init's exit code)."""
    with PD(image, argv, **kw) as pd:
        out = pd.output()
        code = pd.wait()
        status = sp.read_exit(pd.status_r)
    lines = dict(line.split(": ", 1) if ": " in line else (line, "") for line in out.splitlines())
    return lines, status, code


# ------------------------------------------------------------------ running programs

def test_elf_output_exit_code_and_status(probe):
    out, status, code = run(probe, ["probe", "echo", "hello", "pd", "+", "exit", "42"])
    assert "hello pd" in out
    assert status == ("exit", 42)
    assert code == 42


def test_signal_death_is_reported(probe):
    _, status, code = run(probe, ["probe", "signal", str(int(signal.SIGUSR1))])
    assert status == ("signal", signal.SIGUSR1)
    assert code == 128 + signal.SIGUSR1


def test_argv_and_env_arrive_exactly(probe):
    out, _, _ = run(probe, ["probe", "argv", "x y", "--z"], env={"A": "1", "PD_NAME": "t e"})
    assert out["argv"] == "probe argv x y --z"
    out, _, _ = run(probe, ["probe", "env"], env={"A": "1", "PD_NAME": "te"})
    assert sorted(out["env"].split()) == ["A=1", "PD_NAME=te"]


def test_pd_is_isolated_from_the_host(probe):
    out, status, _ = run(probe, ["probe", "ifaces", "+", "ps", "+", "ls", "/", "+", "hostname", "+", "uid",
                                 "+", "cat", "/proc/self/uid_map"], hostname="box7")
    assert status == ("exit", 0)
    assert out["ifaces"].split() == ["lo"]
    assert out["ps"].split() == ["1", "2"]          # our init and the program, nothing of the host
    assert sorted(out["ls"].split()) == ["dev", "proc", "tmp"]
    assert out["cat"].split() == ["0", str(sp.default_outer_ids()[0]), "1"]
    assert out["hostname"] == "box7"
    assert out["uid"] == "0 0"


def test_host_files_are_absent_and_dev_is_minimal(probe):
    out, _, _ = run(probe, ["probe", "cat", "/etc/hostname", "+", "ls", "/dev"])
    assert out["cat"] == "ENOENT"
    assert sorted(out["ls"].split()) == ["full", "null", "random", "urandom", "zero"]


def test_root_inside_is_the_outer_uid_outside(probe):
    uid, gid = sp.default_outer_ids()
    if os.getuid() == 0:
        assert (uid, gid) == (65534, 65534)
    with PD(probe, ["probe", "cat", "/proc/self/uid_map", "+", "sleep", "30"]) as pd:
        assert pd.line().split() == ["cat:", "0", str(uid), "1"]
        host = pathlib.Path(f"/proc/{pd.spawned.pid}/status").read_text()
        uids = next(line for line in host.splitlines() if line.startswith("Uid:")).split()[1:]
        assert uids == [str(uid)] * 4


def test_explicit_outer_ids_are_mapped(probe):
    with PD(probe, ["probe", "uid", "+", "sleep", "30"], outer_uid=4321, outer_gid=4322) as pd:
        assert pd.line() == "uid: 0 0"
        status = pathlib.Path(f"/proc/{pd.spawned.pid}/status").read_text().splitlines()
        assert next(x for x in status if x.startswith("Uid:")).split()[1:] == ["4321"] * 4
        assert next(x for x in status if x.startswith("Gid:")).split()[1:] == ["4322"] * 4


NS_GET_OWNER_UID = 0xB704      # _IO(0xb7, 0x4)


def test_the_pds_user_namespace_belongs_to_its_outer_uid(probe):
    """Per-user limits inside are charged to the namespace's owner: the PD's uid, not the manager's."""
    dumpable = ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)
    with PD(probe, ["probe", "sleep", "30"], outer_uid=4321, outer_gid=4322) as pd:
        fd = os.open(f"/proc/{pd.spawned.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        try:
            owner = array.array("I", [0])
            fcntl.ioctl(fd, NS_GET_OWNER_UID, owner, True)
        finally:
            os.close(fd)
    assert owner[0] == (4321 if os.geteuid() == 0 else os.geteuid())
    assert (os.geteuid(), os.getegid()) == (os.getuid(), os.getgid())      # the manager's thread got its ids back
    assert ctypes.CDLL(None).prctl(3, 0, 0, 0, 0) == dumpable            # PR_GET_DUMPABLE: and stays as it was


def test_concurrent_spawns_from_threads_do_not_leak_into_each_other(probe):
    """Each PD's init closes the fds it inherited from spawns racing in other threads."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> tuple:
        return run(probe, ["probe", "fds", "+", "echo", str(i), "+", "exit", str(i)])

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(12)))
    for i, (out, status, code) in enumerate(results):
        assert sorted(out["fds"].split()) == ["0", "1", "2"]
        assert str(i) in out and status == ("exit", i) and code == i


def test_only_stdio_fds_and_the_channel_reach_the_program(probe):
    out, _, _ = run(probe, ["probe", "fds"])
    assert sorted(out["fds"].split()) == ["0", "1", "2"]
    out, _, _ = run(probe, ["probe", "fds"], channel=True)
    assert sorted(out["fds"].split()) == ["0", "1", "2", "3"]


def test_channel_fd_is_fd_3(probe):
    with PD(probe, ["probe", "say", "3", "over the channel"], channel=True) as pd:
        assert pd.output() == "say: ok\n"
        pd.wait()
        assert os.read(pd.channel, 64) == b"over the channel"


# ------------------------------------------------------------------ confinement

@pytest.mark.parametrize("cmd", ["ptrace", "mount", "unshare", "keyctl", "bpf", "clonens"])
def test_seccomp_denies_host_reaching_calls(probe, cmd):
    if not sp.seccomp_available():
        pytest.skip("seccomp filters unavailable on this kernel")
    out, _, _ = run(probe, ["probe", cmd], landlock=False)  # landlock alone also refuses mount
    assert out[cmd] == "EPERM"


@pytest.mark.parametrize("cmd", ["ptrace", "mount", "unshare"])
def test_without_seccomp_those_calls_work(probe, cmd):
    """The contrast that shows the filter, not the namespaces, made them fail (capabilities kept for it)."""
    out, _, _ = run(probe, ["probe", cmd], seccomp=False, landlock=False,
                    keep_caps=sp.capability_mask("all", "test"))
    assert out[cmd] == "ok"


def test_without_capabilities_mount_fails_even_without_seccomp(probe):
    # (unshare(CLONE_NEWUSER) needs no capability: only the filter stops a PD regaining them in a child userns)
    out, _, _ = run(probe, ["probe", "mount"], seccomp=False, landlock=False)
    assert out["mount"] == "EPERM"


@pytest.mark.parametrize("mask", [-1, 1 << 64, "all", 1.0])
def test_bad_capability_masks(probe, mask):
    with pytest.raises(InvalidArgument, match="keep_caps"):
        run(probe, ["probe", "fds"], keep_caps=mask)


def test_capability_names():
    assert sp.capability_mask("", "x") == 0
    assert sp.capability_mask("CAP_SYS_ADMIN,net_raw", "x") == (1 << 21) | (1 << 13)
    assert sp.capability_mask("all", "x") == (1 << 41) - 1
    with pytest.raises(InvalidArgument, match="'nope' is not a Linux capability"):
        sp.capability_mask("chown nope", "start of PD 3", 3)


def test_fork_works_under_seccomp(probe):
    out, _, _ = run(probe, ["probe", "fork"])  # clone3 -> ENOSYS, libc falls back to clone
    assert out["fork"] == "child exit 7"


def test_landlock_scopes_signals_and_forbids_device_nodes(probe):
    abi = sp.landlock_abi()
    if abi < 6:
        pytest.skip(f"landlock ABI {abi} < 6 has no signal scoping")
    every = sp.capability_mask("all", "test")       # so that landlock alone is what refuses
    out, _, _ = run(probe, ["probe", "kill1", "+", "mknod", "+", "mount"], seccomp=False, keep_caps=every)
    assert out == {"kill1": "EPERM", "mknod": "EACCES", "mount": "EPERM"}
    out, _, _ = run(probe, ["probe", "kill1", "+", "mknod", "+", "mount"], seccomp=False, landlock=False,
                    keep_caps=every)
    assert out == {"kill1": "ok", "mknod": "EPERM", "mount": "ok"}  # mknod: a userns cannot make devices


# ------------------------------------------------------------------ archives

def test_archive_root_with_dirs_symlink_and_hard_link(probe):
    arc = newc([(".", S_DIR), ("bin", S_DIR), ("etc", S_DIR),
                ("bin/probe", S_REG, b"", {"ino": 5, "nlink": 2}),
                ("bin/probe2", S_REG, probe, {"ino": 5, "nlink": 2}),
                ("etc/motd", stat.S_IFREG | 0o644, b"hello\n"),
                ("init", S_LNK, b"/bin/probe")])
    out, status, _ = run(arc, ["/init", "ls", "/", "+", "cat", "/etc/motd", "+", "ls", "/bin"], archive=True)
    assert status == ("exit", 0)
    assert sorted(out["ls"].split()) == ["probe", "probe2"]  # later "ls" wins: /bin
    assert out["cat"] == "hello"
    out, _, _ = run(arc, ["/init", "ls", "/"], archive=True)
    assert sorted(out["ls"].split()) == ["bin", "dev", "etc", "init", "proc", "tmp"]


def _elf_header(e_type: int, phoff: int, phnum: int) -> bytes:
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    return ident + struct.pack("<HHIQQQIHHHHHH", e_type, 62, 1, 0, phoff, 0, 0, 64, 56, phnum, 0, 0, 0)


def test_archive_programs_are_execute_only_and_libraries_scripts_and_lying_elves_stay_readable(probe):
    """bmi-init makes an archive's ELF programs execute-only (so processes exec'ing them are not dumpable)
    and reads every executable's headers to tell programs from libraries: headers that lie (the PD's data)
    leave a readable file, and the PD starts."""
    dynamic = 64 + 56 + 4096
    liars = {"past-the-end": _elf_header(3, 1 << 62, 65535), "many-headers": _elf_header(3, 64, 65535),
             "dynamic-everywhere": _elf_header(3, 64, 1) + struct.pack("<IIQQQQQQ", 2, 0, 0, 0, 0, dynamic,
                                                                       dynamic, 8) + bytes(4096),
             "truncated": b"\x7fELF\x02"}
    readable = {f"bin/{name}": data for name, data in liars.items()}
    readable["bin/script"] = b"#!/bin/sh\necho hi\n"
    libc = pathlib.Path("/lib/x86_64-linux-gnu/libc.so.6")
    if libc.exists():                            # PT_INTERP, but a DT_SONAME: a library, which ld.so reads
        readable["bin/libc.so.6"] = libc.read_bytes()
    arc = newc([("bin", S_DIR), ("bin/probe", S_REG, probe), ("init", S_LNK, b"/bin/probe"),
                *((name, S_REG, data) for name, data in readable.items())])
    for name in ["bin/probe", *readable]:
        out, status, _ = run(arc, ["/init", "cat", f"/{name}"], archive=True)
        assert status == ("exit", 0)
        assert (out["cat"] == "EACCES") == (name == "bin/probe"), (name, out["cat"])


def test_busybox_archive_runs_a_shell():
    busybox = pathlib.Path("/bin/busybox")
    if not busybox.exists() or b"ld-linux" in busybox.read_bytes()[:4096]:
        pytest.skip("no static /bin/busybox (Debian busybox-static)")
    arc = newc([("bin", S_DIR), ("bin/busybox", S_REG, busybox.read_bytes()), ("init", S_LNK, b"bin/busybox")])
    out, status, _ = run(arc, ["sh", "-c", "echo pid: $$"], archive=True)
    assert out["pid"] == "2"
    assert status == ("exit", 0)


def _init(probe: bytes) -> tuple:
    return ("init", S_REG, probe)


HOSTILE = {  # case: (entries, why it must fail)
    "dotdot": (lambda p: [("../../etc/bmi-escape", S_REG, b"x"), _init(p)], r"'\.\.' component"),
    "absolute": (lambda p: [("/etc/bmi-escape", S_REG, b"x"), _init(p)], "absolute path"),
    "through-symlink": (lambda p: [("a", S_LNK, b"/etc"), ("a/bmi-escape", S_REG, b"x"), _init(p)],
                        "through a symlink"),
    "symlink-named-proc": (lambda p: [("proc", S_LNK, b"/"), _init(p)], "replace a directory proc"),
    "file-over-dev": (lambda p: [("dev", S_REG, b"x"), _init(p)], "replace a directory dev"),
    "reserved-dev-node": (lambda p: [("dev/null", S_REG, b"x"), _init(p)], "must not contain it.* dev/null"),
    "device-node": (lambda p: [("console", stat.S_IFCHR | 0o600), _init(p)], "device node"),
    "fifo": (lambda p: [("fifo", stat.S_IFIFO | 0o600), _init(p)], "fifo"),
    "missing-init": (lambda p: [("bin", S_DIR), ("bin/probe", S_REG, p)], "no usable /init"),
    "missing-parent": (lambda p: [("no/such/dir/file", S_REG, b"x"), _init(p)], "missing"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_is_an_image_error_and_leaves_nothing(probe, case):
    entries, why = HOSTILE[case]
    with pytest.raises(ImageError, match=why) as err:
        PD(newc(entries(probe)), ["/init"], archive=True, pd_id=9)
    assert "PD 9" in str(err.value) and err.value.pd_id == 9
    assert not pathlib.Path("/etc/bmi-escape").exists()


def test_huge_name_truncated_and_unterminated_archives(probe):
    good = newc([_init(probe)])
    for arc, why in ((newc([("x" * 5000, S_REG, b"")]) + good, "PATH_MAX"),
                     (good[:len(good) // 2], "truncated"),
                     (newc([_init(probe)], trailer=False), "TRAILER"),
                     (b"07070X" + good[6:], "newc"),
                     (b"", "empty")):
        with pytest.raises(ImageError, match=why):
            PD(arc, ["/init"], archive=True)


def test_archive_larger_than_tmpfs_bytes_is_a_resource_error(probe):
    arc = newc([("big", S_REG, b"\0" * (2 << 20)), _init(probe)])
    with pytest.raises(ResourceError, match="No space left"):
        PD(arc, ["/init"], archive=True, tmpfs_bytes=1 << 20)


def test_dynamically_linked_elf_is_an_image_error():
    with pytest.raises(ImageError, match="dynamically linked"):
        PD(pathlib.Path("/bin/true").read_bytes(), ["true"])


def test_garbage_elf_is_an_image_error():
    with pytest.raises(ImageError, match="Exec format error"):
        PD(b"\x7fELF" + b"\0" * 200, ["x"])


# ------------------------------------------------------------------ lifecycle

def test_lifeline_eof_kills_the_pd(probe):
    with PD(probe, ["probe", "echo", "up", "+", "sleep", "60"], lifeline=True) as pd:
        assert pd.line() == "up"
        os.close(pd.lifeline_w)   # what the kernel does when the manager dies
        pd.lifeline_w = -1
        start = time.monotonic()
        assert pd.wait(timeout=5) == 128 + signal.SIGKILL
        assert time.monotonic() - start < 2
        assert pd.output() == ""                 # every writer in the PD is gone
        assert sp.read_exit(pd.status_r) is None  # and no exit was invented


def test_sigterm_to_init_is_forwarded_to_the_program(probe):
    with PD(probe, ["probe", "echo", "up", "+", "sleep", "60"]) as pd:
        assert pd.line() == "up"
        signal.pidfd_send_signal(pd.spawned.pidfd, signal.SIGTERM)
        assert pd.wait() == 128 + signal.SIGTERM
        assert sp.read_exit(pd.status_r) == ("signal", signal.SIGTERM)


def _own_v1_cgroup(controller: str) -> pathlib.Path | None:
    for line in pathlib.Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if controller in names.split(","):
            base = pathlib.Path("/sys/fs/cgroup") / controller / path.lstrip("/")
            return base if base.is_dir() else None
    return None


@contextlib.contextmanager
def _test_group(own: pathlib.Path | None, kind: str):
    """A fresh group under `own` for one test (skipped when there is none we may write)."""
    if own is None or not os.access(own, os.W_OK):
        pytest.skip(f"no writable {kind} cgroup")
    group = own / f"bmi-spawn-test-{kind}-{os.getpid()}"
    group.mkdir()
    try:
        yield group
    finally:
        group.rmdir()


@pytest.fixture
def pids_cgroup():
    with _test_group(_own_v1_cgroup("pids"), "v1-pids") as group:
        yield group


@pytest.mark.hybrid_host
def test_cgroup_placement_happens_before_exec(probe, pids_cgroup):
    """In a v1 hierarchy the init writes "0" into the group's tasks file itself: before the program runs
    (its cgroup namespace is rooted at the group), and the tasks file's fd does not reach the program."""
    (pids_cgroup / "pids.max").write_text("5\n")
    with PD(probe, ["probe", "cat", "/proc/self/cgroup", "+", "fds", "+", "sleep", "60"],
            cgroup_procs=[str(pids_cgroup / "cgroup.procs")]) as pd:
        inside = pd.line()
        assert any(part.split(":", 2)[1:] == ["pids", "/"] for part in inside.split(": ", 1)[1].split("|"))
        assert sorted(pd.line().split(": ", 1)[1].split()) == ["0", "1", "2"]
        init = pd.spawned.pid
        program = int(pathlib.Path(f"/proc/{init}/task/{init}/children").read_text().split()[0])
        procs = {int(p) for p in (pids_cgroup / "cgroup.procs").read_text().split()}
        assert procs == {init, program}
    assert (pids_cgroup / "cgroup.procs").read_text() == ""


def _own_v2_cgroup() -> pathlib.Path | None:
    """This process's group in the cgroup2 tree (the unified one on a hybrid host), if mounted."""
    for line in pathlib.Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[fields.index("-") + 1] == "cgroup2" and fields[3] == "/":
            own = next(l for l in pathlib.Path("/proc/self/cgroup").read_text().splitlines() if l.startswith("0::"))
            base = pathlib.Path(fields[4]) / own[3:].lstrip("/")
            return base if base.is_dir() else None
    return None


@pytest.fixture
def v2_cgroup():
    with _test_group(_own_v2_cgroup(), "v2") as group:
        yield group


def test_init_is_cloned_into_its_v2_group(probe, v2_cgroup):
    """clone3 CLONE_INTO_CGROUP for the v2 group: in it before the program runs (its cgroup namespace is
    rooted there), and the group's fd does not reach the program."""
    argv = ["probe", "cat", "/proc/self/cgroup", "+", "fds", "+", "sleep", "60"]
    with PD(probe, argv, cgroup_procs=[str(v2_cgroup / "cgroup.procs")]) as pd:
        assert "0::/" in pd.line().split(": ", 1)[1].split("|")
        assert sorted(pd.line().split(": ", 1)[1].split()) == ["0", "1", "2"]
        init = pd.spawned.pid
        program = int(pathlib.Path(f"/proc/{init}/task/{init}/children").read_text().split()[0])
        assert {int(p) for p in (v2_cgroup / "cgroup.procs").read_text().split()} == {init, program}


def test_a_v2_group_once_killed_still_takes_a_new_init(probe, v2_cgroup):
    """A kernel bug (6.18): after "1" was written to a v2 group's cgroup.kill, every process cloned into it
    is SIGKILLed at birth.  A PD's group is killed by a forced shutdown or an adoption, and the PD must
    start again in it: the init is then placed by pid, and runs."""
    kill = v2_cgroup / "cgroup.kill"
    if not kill.exists():
        pytest.skip("no cgroup.kill (kernel before 5.14)")
    kill.write_text("1")
    with PD(probe, ["probe", "cat", "/proc/self/cgroup", "+", "sleep", "60"],
            cgroup_procs=[str(v2_cgroup / "cgroup.procs")]) as pd:
        assert "0::/" in pd.line().split(": ", 1)[1].split("|")
        assert pd.spawned.pid in {int(p) for p in (v2_cgroup / "cgroup.procs").read_text().split()}


@pytest.mark.hybrid_host
def test_a_v1_group_refusing_the_init_is_a_resource_error_and_leaves_nothing(probe):
    """The init places itself in a v1 group (its own write to `tasks`); a refusal there (an empty cpuset
    takes no task: ENOSPC) comes back as the placing error, and the init is killed and reaped."""
    with _test_group(_own_v1_cgroup("cpuset"), "v1-cpuset") as group:     # its cpuset.cpus left empty
        with pytest.raises(ResourceError, match=f"placing the PD in {group}/cgroup.procs: No space left"):
            PD(probe, ["probe"], cgroup_procs=[str(group / "cgroup.procs")], pd_id=4)
        assert (group / "cgroup.procs").read_text() == ""


def test_unwritable_cgroup_is_a_resource_error_and_leaves_nothing(probe):
    with pytest.raises(ResourceError, match="placing the PD in /nonexistent/cgroup.procs"):
        PD(probe, ["probe"], cgroup_procs=["/nonexistent/cgroup.procs"], pd_id=3)


# ------------------------------------------------------------------ argument checks

def test_unsealed_image_is_refused(probe):
    fd = os.memfd_create("x", os.MFD_CLOEXEC)
    r, w = os.pipe()
    try:
        with pytest.raises(InvalidArgument, match="sealed"):
            sp.spawn(fd, archive=False, argv=["x"], env={}, console_fd=w, status_fd=w)
    finally:
        for f in (fd, r, w):
            os.close(f)


@pytest.mark.parametrize("kw,match", [
    ({"env": {"A=B": "1"}}, "environment name"),
    ({"argv": ["a\0b"]}, "argv"),
    ({"hostname": "h" * 65}, "hostname"),
    ({"console_fd": 9999}, "console_fd"),
    ({"status_fd": "1"}, "status_fd"),
    ({"tmpfs_bytes": -1}, "tmpfs_bytes"),
    ({"outer_uid": -5}, "outer_uid"),
])
def test_bad_arguments_are_invalid_argument(probe, kw, match):
    exec_fd = sealed_memfd(probe)
    r, w = os.pipe()
    args = dict(archive=False, argv=["probe"], env={}, console_fd=w, status_fd=w, pd_id=4) | kw
    try:
        with pytest.raises(InvalidArgument, match=match) as err:
            sp.spawn(exec_fd, **args)
        assert "PD 4" in str(err.value)
    finally:
        for fd in (exec_fd, r, w):
            os.close(fd)
