"""Start a PD's process tree: the only wrapper of the C shim bmi._spawn.

Everything from fork to exec happens in C (csrc/spawn/spawn.c): a copy of a
Python process must not run Python, and the PD must be mapped, placed in
its cgroups and confined before any byte of its image runs.  This module
checks arguments, marshals them and turns the shim's error codes into bmi
exceptions.
"""
from __future__ import annotations

import fcntl
import os
import select
import socket
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ...errors import ImageError, InvalidArgument, ResourceError

try:
    from ..._spawn import ffi as _ffi, lib as _lib
except ImportError:  # pragma: no cover - only when the package was never built
    _ffi = _lib = None

_NOBODY = 65534
_MAX_HOSTNAME = 64
_REQUIRED_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


@dataclass(frozen=True)
class Spawned:
    pid: int      # host pid of the PD's init (pid 1 inside the PD)
    pidfd: int    # pidfd of that process (caller owns it and closes it)
    #: ns spent in the shim: clone into the namespaces; uid maps and cgroup placement; from releasing
    #: the init to the program's exec (what bench/spawn.py prints per phase)
    phases_ns: tuple[int, int, int] = (0, 0, 0)


def _shim():
    if _lib is None:
        raise ResourceError("the Linux spawn shim bmi._spawn is not built (run the package build)")
    return _lib


def _who(pd_id: int | None) -> str:
    return "a PD" if pd_id is None else f"PD {pd_id}"


def _cstrings(items: Sequence[str], what: str, pd_id: int | None):
    """NUL-terminated char*[] plus the buffers that keep it alive."""
    bufs = []
    for s in items:
        if not isinstance(s, str) or "\0" in s:
            raise InvalidArgument(f"spawn of {_who(pd_id)}: {what} entry {s!r} is not a string without NUL",
                                  pd_id=pd_id)
        bufs.append(_ffi.new("char[]", os.fsencode(s)))
    return _ffi.new("char *[]", bufs + [_ffi.NULL]), bufs


def _check_fd(fd: int, name: str, pd_id: int | None, optional: bool = False) -> None:
    if not isinstance(fd, int) or isinstance(fd, bool):
        raise InvalidArgument(f"spawn of {_who(pd_id)}: {name} must be an int, got {fd!r}", pd_id=pd_id)
    if optional and fd == -1:
        return
    try:
        os.fstat(fd)
    except OSError as e:
        raise InvalidArgument(f"spawn of {_who(pd_id)}: {name}={fd} is not an open fd ({e.strerror})",
                              pd_id=pd_id) from None


#: Linux capability numbers (linux/capability.h), for /boot/capabilities.
CAPABILITIES = {name: number for number, name in enumerate((
    "chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid", "setuid", "setpcap",
    "linux_immutable", "net_bind_service", "net_broadcast", "net_admin", "net_raw", "ipc_lock", "ipc_owner",
    "sys_module", "sys_rawio", "sys_chroot", "sys_ptrace", "sys_pacct", "sys_admin", "sys_boot", "sys_nice",
    "sys_resource", "sys_time", "sys_tty_config", "mknod", "lease", "audit_write", "audit_control", "setfcap",
    "mac_override", "mac_admin", "syslog", "wake_alarm", "block_suspend", "audit_read", "perfmon", "bpf",
    "checkpoint_restore"))}


#: Kept capabilities that undo the execute-only programs of an archive PD (see proc_mem_isolation).
_PROC_MEM_BREAKERS = ("dac_override", "dac_read_search", "sys_ptrace")


def proc_mem_isolation(archive: bool | None, keep_caps: int) -> str:
    """The /capability/isolation/proc-mem value: whether a PD's processes can open each other's /proc/PID/mem.

    The kernel refuses it for a process that is not dumpable, and a process is not dumpable after exec'ing
    a file it cannot read (csrc/init/init.c: is_elf_program, drop_caps).  An ELF image is the manager's
    file, so no capability inside the PD reads it or outranks the user namespace its processes' memory is
    tied to; an archive's programs are the PD's own files, so DAC override or CAP_SYS_PTRACE undo it.
    """
    uncovered = ("not covered: a process that makes itself dumpable (prctl), or one exec'd from a file the PD "
                 "wrote")
    if archive is None:
        return "refused once an image is set: an ELF image or the ELF programs of an archive are execute-only"
    if not archive:
        return ("refused: the ELF image is execute-only and owned by the manager, so the program and its forks "
                f"are not dumpable; {uncovered}")
    kept = [name for name in _PROC_MEM_BREAKERS if keep_caps >> CAPABILITIES[name] & 1]
    if kept:
        return (f"possible: /boot/capabilities keeps {', '.join(kept)}, which reaches past the execute-only "
                "programs of an archive, files the PD owns")
    return ("refused: the archive's ELF programs are execute-only, so every process that execs one (a #! script "
            f"through its interpreter) is not dumpable; {uncovered} or made readable (it owns its root)")


def capability_mask(names: str, what: str, pd_id: int | None = None) -> int:
    """The mask of "net_raw CAP_NET_BIND_SERVICE ..." (space or comma separated, any case); "all" is every one."""
    mask = 0
    for name in names.replace(",", " ").lower().split():
        if name == "all":
            mask |= (1 << len(CAPABILITIES)) - 1
            continue
        number = CAPABILITIES.get(name.removeprefix("cap_"))
        if number is None:
            raise InvalidArgument(f"{what}: {name!r} is not a Linux capability (e.g. net_raw, sys_admin, or all)",
                                  pd_id=pd_id)
        mask |= 1 << number
    return mask


class _Unpacking:
    """The caller's progress callback as bmi-init's reports reach it (bmi_spawn_progress below): whatever it
    raises is kept, and stops the start."""

    def __init__(self, callback: Callable[[int, int], None]):
        self.callback = callback
        self.error: BaseException | None = None

    def __call__(self, done: int, total: int) -> int:
        try:
            self.callback(done, total)
        except BaseException as e:      # not into C: kept, raised once bmi_spawn has cleaned up
            self.error = e
            return 1
        return 0


if _ffi is not None:
    @_ffi.def_extern()
    def bmi_spawn_progress(ctx: Any, done: int, total: int) -> int:
        return _ffi.from_handle(ctx)(done, total)


def spawn(exec_fd: int, *, archive: bool, argv: list[str], env: dict[str, str],
          console_fd: int, status_fd: int, lifeline_fd: int = -1, channel_fd: int = -1,
          cgroup_procs: Sequence[str] = (), outer_uid: int | None = None, outer_gid: int | None = None,
          hostname: str = "pd", tmpfs_bytes: int = 0, seccomp: bool = True, landlock: bool = True,
          keep_caps: int = 0, io_uring: bool = False, map_helper: bool = False, hold: bool = False,
          progress: Callable[[int, int], None] | None = None, pd_id: int | None = None) -> Spawned:
    """Run the sealed memfd `exec_fd` (static ELF, or newc cpio root with /init) as a new PD.

    Returns once the program has been exec'd (or raises, leaving no process
    and no fd behind).  An empty argv becomes ["/init"].  The PD's init
    writes "exit N" / "signal N" to status_fd when the program ends; the
    caller should close its own copy of that pipe's write end (and of the
    lifeline's read end) after this returns.

    Archives may hold regular files (hard links too), directories and
    symlinks, by relative names without '..'; device nodes, fifos and
    sockets are refused (ImageError), not skipped, so the PD's root is
    exactly the measured archive plus proc, dev (null, zero, full, random,
    urandom bound from the host) and a tmpfs on tmp.

    The program is uid 0 of its user namespace with no capabilities there
    but those in the `keep_caps` mask (bit n = capability n, see
    capability_mask).  Its seccomp filter refuses io_uring unless `io_uring`
    is true, and always refuses turning SO_PASSRIGHTS on.  Outside it is
    outer_uid/outer_gid; when we are root the user namespace is created with
    those as euid/egid, so it is theirs (per-user limits are charged to
    them).  map_helper: the ids are from our /etc/subuid and /etc/subgid,
    mapped with newuidmap/newgidmap.  An ELF image, and every ELF program
    of an archive, is made execute-only (mode 0111), which keeps the memory
    of the processes running them from the PD's other processes (see
    csrc/init/init.c, write_file and drop_caps).  hold: return while the
    program waits, set up, before its exec until the caller sends the init
    SIGCONT (the hook that adds devices and network interfaces first).
    progress(done, total): called in this thread as bmi-init unpacks a root archive, with the archive's
    bytes done so far, increasing, and last (total, total); what it raises stops the start (nothing is
    left behind) and is raised here, an Exception as InvalidArgument, as setup_pd's progress does.
    """
    who = _who(pd_id)
    for fd, name, optional in ((exec_fd, "exec_fd", False), (console_fd, "console_fd", False),
                               (status_fd, "status_fd", False), (lifeline_fd, "lifeline_fd", True),
                               (channel_fd, "channel_fd", True)):
        _check_fd(fd, name, pd_id, optional)
    try:
        seals = fcntl.fcntl(exec_fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0
    if seals & _REQUIRED_SEALS != _REQUIRED_SEALS:
        # what runs must be exactly what was measured
        raise InvalidArgument(f"spawn of {who}: exec_fd {exec_fd} is not a memfd sealed against write, "
                              "shrink and grow", pd_id=pd_id)
    encoded_host = hostname.encode() if isinstance(hostname, str) else b""
    if not encoded_host or len(encoded_host) > _MAX_HOSTNAME or b"\0" in encoded_host:
        raise InvalidArgument(f"spawn of {who}: hostname {hostname!r} must be 1-{_MAX_HOSTNAME} bytes",
                              pd_id=pd_id)
    if not isinstance(keep_caps, int) or not 0 <= keep_caps < 2**64:
        raise InvalidArgument(f"spawn of {who}: keep_caps must be a 64-bit mask, got {keep_caps!r}", pd_id=pd_id)
    if not isinstance(tmpfs_bytes, int) or tmpfs_bytes < 0:
        raise InvalidArgument(f"spawn of {who}: tmpfs_bytes must be an int >= 0, got {tmpfs_bytes!r}",
                              pd_id=pd_id)
    for key in env:
        if not isinstance(key, str) or not key or "=" in key:
            raise InvalidArgument(f"spawn of {who}: environment name {key!r} is empty or has '='", pd_id=pd_id)
    default_uid, default_gid = default_outer_ids()
    uid = default_uid if outer_uid is None else outer_uid
    gid = default_gid if outer_gid is None else outer_gid
    for value, name in ((uid, "outer_uid"), (gid, "outer_gid")):
        if not isinstance(value, int) or not 0 <= value < 2**32 - 1:
            raise InvalidArgument(f"spawn of {who}: {name} {value!r} is not a valid id", pd_id=pd_id)

    lib = _shim()
    # the keep_* lists hold the strings the char*[] arrays point to until the call returns
    c_argv, keep_argv = _cstrings(list(argv) or ["/init"], "argv", pd_id)
    c_env, keep_env = _cstrings([f"{k}={v}" for k, v in env.items()], "env", pd_id)
    c_cg, keep_cg = _cstrings(list(cgroup_procs), "cgroup_procs", pd_id)
    pid = _ffi.new("int *")
    pidfd = _ffi.new("int *")
    err = _ffi.new("char[]", 1024)
    phases = _ffi.new("unsigned long long[]", lib.BMI_SPAWN_PHASES)
    flags = ((lib.BMI_SPAWN_SECCOMP if seccomp else 0) | (lib.BMI_SPAWN_LANDLOCK if landlock else 0)
             | (lib.BMI_SPAWN_IO_URING if io_uring else 0))
    if hold:
        flags |= lib.BMI_SPAWN_HOLD
    if map_helper:
        flags |= lib.BMI_SPAWN_MAP_HELPER
    elif os.geteuid() == 0 and uid != 0:
        flags |= lib.BMI_SPAWN_OWN_USERNS
    c_host = _ffi.new("char[]", encoded_host)
    args = _ffi.new("struct bmi_spawn_args *", {
        "exec_fd": exec_fd, "archive": int(bool(archive)), "argv": c_argv, "envp": c_env,
        "console_fd": console_fd, "status_fd": status_fd, "lifeline_fd": lifeline_fd, "channel_fd": channel_fd,
        "cgroup_procs": c_cg, "outer_uid": uid, "outer_gid": gid, "hostname": c_host,
        "tmpfs_bytes": tmpfs_bytes, "flags": flags, "keep_caps": keep_caps, "phases_ns": phases})
    unpacking = _Unpacking(progress) if progress is not None and archive else None
    if unpacking is not None:
        handle = _ffi.new_handle(unpacking)     # alive until bmi_spawn returns
        args.progress, args.progress_ctx = lib.bmi_spawn_progress, handle
    rc = lib.bmi_spawn(args, pid, pidfd, err, len(err))
    if rc == lib.BMI_SPAWN_OK:
        return Spawned(pid=pid[0], pidfd=pidfd[0], phases_ns=(phases[0], phases[1], phases[2]))
    reason = _ffi.string(err).decode(errors="backslashreplace")
    what = "an archive root" if archive else "an ELF image"
    message = f"spawn of {who} from {what}: {reason}"
    if rc == lib.BMI_SPAWN_STOPPED and unpacking is not None and unpacking.error is not None:
        if not isinstance(unpacking.error, Exception):
            raise unpacking.error       # KeyboardInterrupt and the like, untouched
        raise InvalidArgument(f"{message}: progress callback raised {unpacking.error!r}",
                              pd_id=pd_id) from unpacking.error
    if rc == lib.BMI_SPAWN_EIMAGE:
        raise ImageError(message, pd_id=pd_id)
    if rc == lib.BMI_SPAWN_EINVAL:
        raise InvalidArgument(message, pd_id=pd_id)
    raise ResourceError(message, pd_id=pd_id)


def read_exit(status_fd: int) -> tuple[str, int] | None:
    """Parse what the PD's init wrote: ("exit", code), ("signal", signo), or None if nothing yet.

    Never blocks (poll with timeout 0), so it does not change the fd's flags.
    """
    poller = select.poll()
    poller.register(status_fd, select.POLLIN)
    if not poller.poll(0):
        return None
    return parse_exit(os.read(status_fd, 64))


def parse_exit(line: bytes) -> tuple[str, int] | None:
    """The record read from the exit-status pipe (b"": init was killed before the program ended)."""
    if not line:
        return None
    kind, _, number = line.decode("ascii", "replace").strip().partition(" ")
    if kind not in ("exit", "signal") or not number.isdigit():
        raise ResourceError(f"reading a PD's exit status: malformed status line {line!r}")
    return kind, int(number)


def landlock_abi() -> int:
    """The kernel's landlock ABI version; 0 when landlock is unavailable."""
    return int(_shim().bmi_landlock_abi())


def seccomp_available() -> bool:
    """Whether seccomp filters can be installed here."""
    return bool(_shim().bmi_seccomp_available())


def start_socket_maker() -> tuple[socket.socket, int, int]:
    """Start the process that makes the sockets handed to PDs in an empty network namespace (csrc/spawn/sockmaker.c).

    Returns its socket, pid and pidfd (the caller reaps it: closing the socket ends it).
    """
    lib = _shim()
    pid, pidfd = _ffi.new("int *"), _ffi.new("int *")
    fd = lib.bmi_sockmaker_start(pid, pidfd)
    if fd < 0:
        raise ResourceError(f"starting the socket maker in an empty network namespace failed: "
                            f"{os.strerror(_ffi.errno)}")
    return socket.socket(fileno=fd), pid[0], pidfd[0]


def default_outer_ids() -> tuple[int, int]:
    """Who the PD's root is outside when the caller names nobody: nobody when we are root, else the
    caller (the only id it may map).  The driver always names the PD's own ids (uids.IdPool)."""
    if os.getuid() == 0:
        return _NOBODY, _NOBODY
    return os.getuid(), os.getgid()
