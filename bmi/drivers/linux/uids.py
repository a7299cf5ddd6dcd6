"""Host uids (and gids, same numbers) for PDs: each PD gets its own from a block reserved for bmi.

A PD's root is one host uid that no user, no daemon and no other PD has, so
no other host process can signal or trace its processes, and the PD's user
namespace is created with that uid as owner, so per-user kernel limits
(inotify instances and watches, fanotify, mqueues, keys, processes) are
charged to the PD and not to root.

The block (BMI_UID_RANGE=start:count, default DEFAULT_RANGE: above
systemd's container ranges, below the ids many tools treat as negative) is
shared by every manager on the host: session managers in any process and
bmid.  A uid is taken with an open-file-description lock on byte <uid> of
one lock file (LOCK_FILE), held by the fd the PD keeps until it is
destroyed (bmid hands a copy to its fd keeper, so a restarted bmid adopts
the PD with its uid still taken); the kernel drops the lock when the last
holder dies, so a crashed manager's uids come back by themselves.

A manager that is not root can only map ids it was given: its own
/etc/subuid and /etc/subgid ranges through newuidmap/newgidmap, when it has
both; otherwise every PD maps the manager's own uid (IdPool.range None,
with the reason).  So does a root manager whose user namespace lacks the
block (a container): its PDs are all nobody (65534), as before.
"""
from __future__ import annotations

import errno
import fcntl
import grp
import os
import pwd
import struct
from dataclasses import dataclass, field
from typing import Mapping

from ...errors import InvalidArgument, ResourceError

#: 0x70000000 and up: unused by systemd's map of uid ranges (its container block ends at 0x6fffffff).
DEFAULT_RANGE = (0x70000000, 65536)
LOCK_FILE = "/run/bmi/uids.lock"
ENV_RANGE = "BMI_UID_RANGE"
MAP_HELPERS = ("/usr/bin/newuidmap", "/usr/bin/newgidmap")     # the paths csrc/spawn/spawn.c runs
_MAX_ID = 2**31 - 2     # above, many tools read ids as negative
NOBODY = 65534          # a root manager's PDs when they cannot have ids of their own (as before per-PD ids)


@dataclass
class IdLease:
    """One PD's host uid and gid while it exists; release() (or the holder's death) frees them."""

    uid: int
    gid: int
    fd: int = -1            # its lock (an own open file description); -1: nothing to release
    held: set[int] | None = field(default=None, repr=False)     # its pool's ids in use, which it leaves

    def release(self) -> None:
        fd, self.fd = self.fd, -1       # taken before the close: an interrupt must not close it twice
        if fd >= 0:
            os.close(fd)
            if self.held is not None:
                self.held.discard(self.uid)


def parse_range(text: str, what: str) -> tuple[int, int]:
    """"start:count" as (start, count), both checked."""
    start_text, sep, count_text = text.partition(":")
    try:
        start, count = int(start_text), int(count_text)
    except ValueError:
        start = count = -1
    if not sep or start < 1 or count < 1 or start + count - 1 > _MAX_ID:
        raise InvalidArgument(f"{what}: {text!r} is not start:count with 1 <= start and start+count-1 <= {_MAX_ID}")
    return start, count


def _sub_range(path: str, user: str, uid: int) -> tuple[int, int] | None:
    """The first range of `user` (by name or uid) in /etc/subuid-style `path`."""
    try:
        with open(path) as f:
            for line in f:
                fields = line.strip().split(":")
                if len(fields) == 3 and fields[0] in (user, str(uid)) and fields[1].isdigit() \
                        and fields[2].isdigit() and int(fields[2]) > 0:
                    return int(fields[1]), int(fields[2])
    except OSError:
        pass
    return None


def _mapped(ids: tuple[int, int], map_file: str) -> bool:
    """Whether every id of the range exists in our user namespace (one extent of its uid_map/gid_map)."""
    start, count = ids
    try:
        with open(map_file) as f:
            extents = [tuple(int(x) for x in line.split()) for line in f if line.strip()]
    except OSError:
        return False
    return any(inside <= start and start + count <= inside + length for inside, _, length in extents)


def _flock(start: int, kind: int = fcntl.F_WRLCK) -> bytes:
    """struct flock for byte `start` (x86_64 layout: short, short, off_t, off_t, pid_t)."""
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, start, 1, 0)


class IdPool:
    """Where a manager takes its PDs' host ids from."""

    def __init__(self, environ: Mapping[str, str] | None = None):
        env = os.environ if environ is None else environ
        self.map_helper = False          # True: ids are mapped with newuidmap/newgidmap (not root)
        self.reason = ""                 # why PDs share one uid, when they do
        self.lock_file = LOCK_FILE
        self.range: tuple[int, int] | None = None
        self._unnamed: set[int] = set()     # ids of the range known to be no user's or group's
        #: ids this pool's leases hold: acquire() skips them without a lock attempt (each attempt is a system
        #: call that walks every lock of the file: the n-th PD's allocation made n of them)
        self._held: set[int] = set()
        euid = os.geteuid()
        self.shared = (euid, os.getegid())       # what every PD maps when they cannot have their own
        if euid == 0:
            self.shared = (NOBODY, NOBODY)
            wanted = parse_range(env[ENV_RANGE], ENV_RANGE) if env.get(ENV_RANGE) else DEFAULT_RANGE
            if _mapped(wanted, "/proc/self/uid_map") and _mapped(wanted, "/proc/self/gid_map"):
                self.range = wanted
            elif env.get(ENV_RANGE):
                raise InvalidArgument(f"{ENV_RANGE} {env[ENV_RANGE]}: these ids are not all mapped in the manager's "
                                      "user namespace (see /proc/self/uid_map and gid_map)")
            else:
                self.reason = (f"the default block {wanted[0]}:{wanted[1]} is not mapped in the manager's user "
                               f"namespace; set {ENV_RANGE}=start:count to ids it has")
            return
        try:
            user = pwd.getpwuid(euid).pw_name
        except KeyError:
            user = str(euid)
        subuid, subgid = _sub_range("/etc/subuid", user, euid), _sub_range("/etc/subgid", user, euid)
        helpers = [h for h in MAP_HELPERS if not os.access(h, os.X_OK)]
        runtime = env.get("XDG_RUNTIME_DIR") or f"/run/user/{euid}"
        if subuid is None or subgid is None:
            self.reason = f"the manager runs as uid {euid}, which has no /etc/subuid and /etc/subgid range"
        elif helpers:
            self.reason = f"no {' or '.join(helpers)} (Debian package uidmap)"
        elif not os.path.isdir(runtime):
            self.reason = f"no runtime directory {runtime} for the uid lock file"
        else:
            start, count = (max(subuid[0], subgid[0]),
                            min(subuid[0] + subuid[1], subgid[0] + subgid[1]) - max(subuid[0], subgid[0]))
            if env.get(ENV_RANGE):
                start, count = parse_range(env[ENV_RANGE], ENV_RANGE)
                if start < subuid[0] or start < subgid[0] or start + count > subuid[0] + subuid[1] \
                        or start + count > subgid[0] + subgid[1]:
                    raise InvalidArgument(f"{ENV_RANGE} {env[ENV_RANGE]} is outside uid {euid}'s /etc/subuid "
                                        f"{subuid[0]}:{subuid[1]} or /etc/subgid {subgid[0]}:{subgid[1]}")
            if count < 1:
                self.reason = f"uid {euid}'s /etc/subuid and /etc/subgid ranges do not overlap"
            else:
                self.range, self.map_helper = (start, count), True
                self.lock_file = os.path.join(runtime, "bmi-uids.lock")

    def capability(self) -> str:
        """The /capability/isolation/per-pd-uid value: "yes" or "no: <reason>"."""
        return "yes" if self.range is not None else f"no: {self.reason}"

    def describe(self) -> str:
        """capability() and, when yes, where from (`bmi info`)."""
        if self.range is None:
            return self.capability()
        start, count = self.range
        how = ("mapped with newuidmap/newgidmap; limits charged to the manager's uid" if self.map_helper
               else "each owns its user namespace")
        return f"yes (host ids {start}-{start + count - 1}, {how})"

    def _open_lock(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            try:
                fd = os.open(self.lock_file, flags, 0o600)
            except FileNotFoundError:   # (its directory only the first time: no makedirs on each allocate)
                os.makedirs(os.path.dirname(self.lock_file), mode=0o755, exist_ok=True)
                fd = os.open(self.lock_file, flags, 0o600)
        except OSError as e:
            raise ResourceError(f"cannot open the uid lock file {self.lock_file}: {e.strerror}") from None
        if os.fstat(fd).st_uid != os.geteuid():     # others must not be able to take read locks on it
            os.close(fd)
            raise ResourceError(f"the uid lock file {self.lock_file} is not owned by uid {os.geteuid()}")
        return fd

    def acquire(self, pd_id: int) -> IdLease:
        """The lowest free id of the range for PD pd_id; ResourceError when every one is taken."""
        if self.range is None:
            return IdLease(*self.shared)
        start, count = self.range
        fd = self._open_lock()
        try:
            for uid in range(start, start + count):
                if uid in self._held or not self._lock(fd, uid):
                    continue
                if uid in self._unnamed or not _named(uid):
                    self._unnamed.add(uid)      # (looked up once per process: NSS may be slow)
                    return self.lease(uid, uid, fd)
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(uid, fcntl.F_UNLCK))    # a real user's id: skip it
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        raise ResourceError(f"allocate of PD {pd_id}: every host uid of the PD range {start}-{start + count - 1} "
                            f"is taken by a PD (set {ENV_RANGE}=start:count for a larger block)", pd_id=pd_id)

    def reclaim(self, uid: int) -> IdLease | None:
        """Take exactly `uid` again (a PD adopted after its lock was lost); None if another holds it."""
        if self.range is None:
            return IdLease(*self.shared)
        fd = self._open_lock()
        if self._lock(fd, uid):
            return self.lease(uid, uid, fd)
        os.close(fd)
        return None

    def lease(self, uid: int, gid: int, fd: int) -> IdLease:
        """The lease of ids whose lock `fd` holds (just taken, or the fd keeper's copy at adoption), known to
        this pool until it is released."""
        self._held.add(uid)
        return IdLease(uid, gid, fd, self._held)

    def _lock(self, fd: int, uid: int) -> bool:
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(uid))
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise ResourceError(f"locking host uid {uid} in {self.lock_file}: {e.strerror}") from None
        return True


def _has_passwd(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def _named(uid: int) -> bool:
    """Whether a user or group of the host has this number (then no PD may have it)."""
    if _has_passwd(uid):
        return True
    try:
        grp.getgrgid(uid)
    except KeyError:
        return False
    return True
