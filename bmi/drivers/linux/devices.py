"""Host device nodes for Linux PDs: which ones may be assigned, and the mechanisms that hand them over.

What a PD gets is decided in bmi/api.py (DeviceManager); this module does it:
- the allow-list: only character devices matching the administrator's globs
  (BMI_DEVICES, colon-separated, replaces DEFAULT_ALLOW), plus the
  pseudo-terminal slaves whose master this process holds (one it made);
- the node in the PD's /dev: the host node bind-mounted from the manager's
  side into the PD's mount namespace (csrc/devices.c), removed on unassign;
- the kernel's check at every open: the PD's v1 devices cgroup, or on
  cgroup v2 a BPF device program on its group (csrc/devcg.c, made here from
  the same rules), denies every node but the five every PD has and those
  assigned;
- the owner: the host node is chowned to the PD's host uid while assigned to
  it alone, and its owner and mode are given back on unassign.
"""
from __future__ import annotations

import fcntl
import fnmatch
import glob
import os
import stat
import struct
from dataclasses import dataclass

from ...errors import InvalidArgument, PermissionDenied, ResourceError

try:
    from ..._devices import ffi as _ffi, lib as _lib
except ImportError:  # pragma: no cover - only when the package was never built
    _ffi = _lib = None

DEFAULT_ALLOW = ("/dev/ttyS*", "/dev/ttyUSB*", "/dev/ttyACM*", "/dev/net/tun", "/dev/fuse", "/dev/kvm")
ENV_ALLOW = "BMI_DEVICES"
#: The nodes every PD has (csrc/spawn.c binds them): null, zero, full, random, urandom.
BASE_RULES = ("c 1:3 rw", "c 1:5 rw", "c 1:7 rw", "c 1:8 rw", "c 1:9 rw")
_TIOCGPTN = 0x80045430
_READ, _WRITE = 1, 2

REVOCABLE = ("no: Linux has no revoke(); an fd the PD opened before unassign keeps working until it closes "
             "it (a pseudo-terminal's holder can hang it up); the node is removed from its /dev and, on "
             "cgroup v1, the devices controller refuses every later open, also through a kept O_PATH fd")


@dataclass(frozen=True)
class Owner:
    """A host node's owner and mode before it was handed to a PD."""

    uid: int
    gid: int
    mode: int


def allow_list() -> tuple[str, ...]:
    configured = os.environ.get(ENV_ALLOW)
    if configured is None:
        return DEFAULT_ALLOW
    return tuple(g for g in configured.split(":") if g)


def held_ptys() -> list[str]:
    """The slaves of the pseudo-terminal masters this process holds open (ones it created)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") not in ("/dev/ptmx", "/dev/pts/ptmx"):
                continue
            number = struct.unpack("I", fcntl.ioctl(int(name), _TIOCGPTN, b"\0" * 4))[0]
        except OSError:
            continue
        found.append(f"/dev/pts/{number}")
    return sorted(set(found))


def _char_device(path: str) -> bool:
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False


def assignable() -> list[str]:
    """The host devices a PD may be given here: allowed character devices that exist, and our ptys."""
    found = {path for pattern in allow_list() for path in glob.glob(pattern) if _char_device(path)}
    return sorted(found | set(held_ptys()))


def check(device: object, what: str, pd_id: int) -> str:
    """The device's path if a PD may be given it, else a typed refusal saying why."""
    if not isinstance(device, str) or not device.startswith("/dev/") or "\0" in device:
        raise InvalidArgument(f"{what}: {device!r} is not a device path under /dev/", pd_id=pd_id)
    path = os.path.normpath(device)
    if path != device or "/../" in f"{path}/" or os.path.islink(path):
        raise InvalidArgument(f"{what}: {device!r} must be a plain path (no '..', no symlink); "
                              f"name the node itself", pd_id=pd_id)
    if not _char_device(path):
        raise InvalidArgument(f"{what}: {device} is not a character device on this host", pd_id=pd_id)
    if path in held_ptys() or any(fnmatch.fnmatchcase(path, g) for g in allow_list()):
        return path
    raise PermissionDenied(f"{what}: {device} is not on the administrator's allow-list "
                           f"({ENV_ALLOW}={':'.join(allow_list())}) and is not a pseudo-terminal this "
                           f"manager created", pd_id=pd_id)


def rule(device: str, mode: int) -> str:
    """The devices-cgroup rule for `device` opened with `mode` (bmi.READ/WRITE/RW)."""
    rdev = os.stat(device).st_rdev
    access = ("r" if mode & _READ else "") + ("w" if mode & _WRITE else "")
    return f"c {os.major(rdev)}:{os.minor(rdev)} {access}"


def deny_rule(allowed: str) -> str:
    """The rule that takes back everything an allow rule ("c 5:2 rw") gave."""
    return allowed.rsplit(" ", 1)[0] + " rwm"


def capabilities(enforcement: str) -> dict[str, str]:
    """/capability/devices/...: what assignment does on this host (enforcement: PDCgroups.devices_enforcement())."""
    return {
        "/capability/devices/assign": f"character devices on the allow-list ({ENV_ALLOW}={':'.join(allow_list())})"
                                      " and pseudo-terminals the manager created",
        "/capability/devices/enforced": enforcement,
        "/capability/devices/revocable": REVOCABLE,
        "/capability/devices/network": "veth macvlan",
    }


# --- the cgroup v2 device check: rules as a BPF device program (csrc/devcg.c) ---------------------------
_BPF_ACCESS = {"m": 1, "r": 2, "w": 4}          # BPF_DEVCG_ACC_MKNOD, _READ, _WRITE
_BPF_TYPE = {"b": 1, "c": 2}                    # BPF_DEVCG_DEV_BLOCK, _CHAR


def parse_rule(rule: str) -> tuple[tuple[str, str, str], str]:
    """"c 5:2 rw" -> (("c", "5", "2"), "rw"); "*" stands for any major or minor."""
    kind, numbers, access = rule.split()
    major, minor = numbers.split(":")
    return (kind, major, minor), access


def program(cgroup_dir: str, rules: dict[tuple[str, str, str], str]) -> None:
    """Attach to the v2 group `cgroup_dir` the BPF device program allowing exactly `rules` (node -> access
    letters), replacing the one it had; OSError with the kernel's errno and what failed."""
    lib = _shim()
    given = [(node, access) for node, access in sorted(rules.items()) if access]
    table = _ffi.new("struct bmi_devcg_rule[]", max(len(given), 1))
    for slot, ((kind, major, minor), access) in zip(table, given):
        slot.type = _BPF_TYPE[kind]
        slot.major = lib.BMI_DEVCG_ANY if major == "*" else int(major)
        slot.minor = lib.BMI_DEVCG_ANY if minor == "*" else int(minor)
        slot.access = sum(_BPF_ACCESS[letter] for letter in set(access))
    err = _ffi.new("char[]", 512)
    prog = lib.bmi_devcg_load(table, len(given), err, len(err))
    if prog < 0:
        raise OSError(-prog, _ffi.string(err).decode(errors="replace"))
    try:
        group = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            rc = lib.bmi_devcg_attach(group, prog, err, len(err))
        finally:
            os.close(group)
    finally:
        os.close(prog)
    if rc:
        raise OSError(rc, _ffi.string(err).decode(errors="replace"))


def node_name(device: str) -> str:
    """Where the node appears under the PD's /dev (/dev/pts/3 -> pts/3)."""
    return device[len("/dev/"):]


def take_owner(device: str, uid: int, gid: int, mode: int) -> Owner:
    """Give the host node to the PD's uid with owner access of `mode`; returns what to give back."""
    st = os.stat(device)
    before = Owner(st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
    owner_bits = (0o400 if mode & _READ else 0) | (0o200 if mode & _WRITE else 0)
    os.chown(device, uid, gid)
    os.chmod(device, (before.mode & 0o077) | owner_bits)
    return before


def give_back(device: str, owner: Owner) -> None:
    try:
        os.chown(device, owner.uid, owner.gid)
        os.chmod(device, owner.mode)
    except FileNotFoundError:
        pass        # a pty whose master was closed: the node is gone


def _shim():
    if _lib is None:
        raise ResourceError("the device shim bmi._devices is not built (run the package build)")
    return _lib


def _call(fn, what: str, pd_id: int, *args: object) -> None:
    err = _ffi.new("char[]", 256)
    rc = fn(*args, err, len(err))
    if rc:
        raise ResourceError(f"{what}: {_ffi.string(err).decode(errors='replace')}", pd_id=pd_id)


def bind(pid: int, owner: int, device: str, what: str, pd_id: int) -> None:
    """Make the host node appear as /dev/<name> in the running PD whose init is `pid` (root: host uid `owner`)."""
    _call(_shim().bmi_dev_bind, what, pd_id, pid, owner, device.encode(), node_name(device).encode())


def unbind(pid: int, owner: int, device: str, what: str, pd_id: int) -> None:
    """Remove /dev/<name> from the running PD (nothing to do when it is not there)."""
    _call(_shim().bmi_dev_unbind, what, pd_id, pid, owner, node_name(device).encode())
