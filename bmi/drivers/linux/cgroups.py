"""cgroups for PDs: one group per PD in every hierarchy that carries a
controller we need, on cgroup v1 (legacy or hybrid) and v2 (unified).

Groups are nested under the cgroup *this process* is in (read from
/proc/self/cgroup for each hierarchy), so limits stack under whatever the
manager itself is confined to and a delegated subtree is enough.

Layouts handled:
- v1 / hybrid: a group in each v1 hierarchy carrying cpu, cpuset, memory,
  freezer or pids, plus one in the v2 tree when it is mounted and writable,
  because v2's cgroup.freeze and cgroup.kill are race-free even without
  controllers.
- v2: one group `<own>/<name>`; the controllers it needs are enabled in
  `<own>/cgroup.subtree_control`.  The kernel refuses that (EBUSY) while
  `<own>` holds processes and is not the root; an intermediate level would
  not help, so that case is a ResourceError that explains delegation.

A controller that is not available (not mounted on v1, not delegated on v2)
makes only the calls that need it fail, with NotSupported saying why.
"""
from __future__ import annotations

import errno
import glob
import os
import re
import select
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from bmi.errors import (DriverUnavailable, InvalidArgument, InvalidState,
                        NotSupported, PermissionDenied, ResourceError)

from . import devices

__all__ = ["cgroup_version", "describe", "hold_layout", "PDCgroups", "read_raw", "release_layout", "UNLIMITED"]

UNLIMITED = 2**63 - 1
"""What memory_max() returns when no limit is set."""

_V1_CONTROLLERS = frozenset({"cpu", "cpuset", "memory", "freezer", "pids", "devices"})
_V2_CONTROLLERS = frozenset({"cpu", "cpuset", "memory", "pids"})
_V1_UNLIMITED = 2**63 - 4096      # v1 shows "no limit" as LONG_MAX rounded to pages
_CFS_PERIOD_US = 100_000
_CFS_MIN_QUOTA_US = 1_000         # the kernel refuses smaller quotas
#: (version, controller) -> what the kernel puts in these files of a new group (fixed in the kernel's source:
#: default_cfs_period(), NICE_0_LOAD, CGROUP_WEIGHT_DFL, PAGE_COUNTER_MAX); a write of the same is skipped
_KERNEL_DEFAULTS = {(1, "cpu"): (("cpu.cfs_period_us", str(_CFS_PERIOD_US)), ("cpu.shares", "1024")),
                    (2, "cpu"): (("cpu.weight", "100"),),
                    (1, "memory"): (("memory.memsw.limit_in_bytes", str(_V1_UNLIMITED)),)}
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")


@dataclass(frozen=True)
class _Tree:
    """One mounted cgroup hierarchy as this process sees it."""
    version: int
    mount: str
    own: str                        # absolute path of this process's cgroup in it
    controllers: frozenset[str]     # the ones PD groups get from this tree


@dataclass(frozen=True)
class _Group:
    """One directory made for a PD."""
    version: int
    path: str
    controllers: frozenset[str]


def read_raw(path: str) -> str:
    """The whole file through raw reads (a buffered text open costs ~60 us more, per file, on these
    pseudo-files: fstat, ioctl, lseeks and a decoder)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode()



def _write(path: str, value: str) -> None:
    """One write(2), so the kernel's errno reaches the caller unbuffered."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _keyed(text: str) -> dict[str, str]:
    """Parse 'key value' lines (memory.events, cgroup.events, oom_control)."""
    return dict(line.split(None, 1) for line in text.splitlines() if " " in line)


def _cpu_list(text: str) -> list[int]:
    """'0-2,5' -> [0, 1, 2, 5]."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field) if "\\" in field else field


def _own_dir(mount: str, mount_root: str, path: str) -> str | None:
    """Where this process's cgroup `path` is under a mount of `mount_root`,
    or None when that mount does not show it (bind of another subtree, or a
    cgroup namespace we are outside of)."""
    if mount_root != "/":
        if path != mount_root and not path.startswith(mount_root + "/"):
            return None
        path = path[len(mount_root):]
    if path.startswith("/.."):
        return None
    return os.path.normpath(os.path.join(mount, path.lstrip("/")))


class _MountWatch:
    """The cgroup lines of /proc/self/mountinfo, kept while a driver is open (hold/release) and read again only
    when the kernel says the mount table changed: an open mountinfo polls POLLPRI|POLLERR after any mount or
    umount in its mount namespace (proc(5)).  A read costs ~60 us (the kernel prints every mount of the
    host), and every create of a PD's groups needs the layout.  A fork (the poll state of an inherited fd is
    shared with the parent) and a process now in another mount namespace open their own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._watched: tuple[int, int] | None = None    # (pid, mount namespace inode) of the fd below
        self._fd = -1
        self._poller = select.poll()
        self._lines: list[str] = []

    def hold(self) -> None:
        with self._lock:
            self._holders += 1

    def release(self) -> None:
        """The last holder gone: the fd is closed, nothing is kept."""
        with self._lock:
            self._holders -= 1
            if self._holders == 0:
                self._forget()

    def _forget(self) -> None:
        fd, self._fd = self._fd, -1     # taken before the close: an interrupt must not close it twice
        self._watched, self._lines, self._poller = None, [], select.poll()
        if fd >= 0:
            os.close(fd)

    def after_fork(self) -> None:
        """In a fork's child: a lock another thread held at the fork would never be released there."""
        self._lock = threading.Lock()

    def cgroup_lines(self) -> list[str]:
        """The lines of /proc/self/mountinfo that are cgroup or cgroup2 mounts."""
        with self._lock:
            if not self._holders:
                return _cgroup_mounts(read_raw("/proc/self/mountinfo"))
            here = (os.getpid(), os.stat("/proc/self/ns/mnt").st_ino)
            if here != self._watched:
                self._forget()
                self._fd = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
                self._poller.register(self._fd, select.POLLPRI)
                self._watched = here
            elif not self._poller.poll(0):
                return self._lines
            # the poll above consumed the change (or the fd is new): a change after it is reported next time
            try:
                self._lines = _cgroup_mounts(read_raw("/proc/self/mountinfo"))
            except OSError:
                self._forget()      # (the change is consumed: the next call must not keep the old lines)
                raise
            return self._lines


def _cgroup_mounts(mountinfo: str) -> list[str]:
    # (cgroup and cgroup2) most of a host's mounts: no split, no unescape
    return [line for line in mountinfo.splitlines() if " - cgroup" in line]


_mounts = _MountWatch()
os.register_at_fork(after_in_child=_mounts.after_fork)
hold_layout, release_layout = _mounts.hold, _mounts.release


def _layout() -> list[_Tree]:
    """The hierarchies PD groups go into: v1 ones first, then v2."""
    try:
        own = read_raw("/proc/self/cgroup")
        mounts = _mounts.cgroup_lines()
    except OSError as e:
        raise DriverUnavailable(f"find this process's cgroups: {e}") from e
    global _parsed
    parsed = _parsed
    if parsed is None or parsed[0] is not mounts or parsed[1] != own:    # (the same mounts and own groups)
        parsed = _parsed = (mounts, own, *_parse(mounts, own))
    v1, v2 = parsed[2], parsed[3]
    if v2 is None:
        return list(v1)
    try:    # read each time: what our parent delegates to us may change
        offered = frozenset(read_raw(os.path.join(v2[1], "cgroup.controllers")).split())
    except OSError:
        offered = frozenset()
    return [*v1, _Tree(2, *v2, offered & _V2_CONTROLLERS)]


#: the last _parse: (its mount lines, /proc/self/cgroup, its v1 trees, the v2 mount and own group)
_parsed: tuple[list[str], str, tuple[_Tree, ...], tuple[str, str] | None] | None = None


def _parse(mounts: list[str], own_groups: str) -> tuple[tuple[_Tree, ...], tuple[str, str] | None]:
    """The v1 trees, and where the v2 one is (mount, own group), from the cgroup mount lines of
    /proc/self/mountinfo and the text of /proc/self/cgroup."""
    own_v1: dict[str, str] = {}
    own_v2: str | None = None
    for line in own_groups.splitlines():
        hid, ctls, path = line.split(":", 2)
        if hid == "0" and not ctls:
            own_v2 = path
        else:
            own_v1.update(dict.fromkeys(ctls.split(","), path))
    trees: list[_Tree] = []
    v2: tuple[str, str] | None = None
    seen: set[frozenset[str]] = set()
    for line in mounts:
        fields = line.split()
        sep = fields.index("-")
        fstype, root, mount = fields[sep + 1], _unescape(fields[3]), _unescape(fields[4])
        if fstype == "cgroup":
            ctls = frozenset(fields[sep + 3].split(",")) & _V1_CONTROLLERS
            path = own_v1.get(next(iter(ctls))) if ctls else None
            own = _own_dir(mount, root, path) if path is not None else None
            if own and ctls not in seen:
                seen.add(ctls)
                trees.append(_Tree(1, mount, own, ctls))
        elif fstype == "cgroup2" and v2 is None and own_v2 is not None:
            own = _own_dir(mount, root, own_v2)
            if own:
                v2 = (mount, own)
    return tuple(trees), v2


def groups_of_this_process(prefix: str) -> set[str]:
    """Paths of the PD groups named prefix* under this process's own groups, in every hierarchy.

    For leak checks (the test suite's, the pytest plugin's bmi_no_leaks).
    """
    return {path for tree in _layout() for path in glob.glob(os.path.join(tree.own, glob.escape(prefix) + "*"))}


def cgroup_version() -> int:
    """1 when any controller we use lives in a v1 hierarchy (legacy or
    hybrid), 2 on a unified-only host."""
    trees = _layout()
    if any(t.version == 1 for t in trees):
        return 1
    if trees:
        return 2
    raise DriverUnavailable("cgroups: no cgroup or cgroup2 filesystem is mounted "
                            "where this process's cgroups are visible")


def _kernel_at_least(major: int, minor: int) -> bool:
    nums = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return bool(nums) and (int(nums[1]), int(nums[2])) >= (major, minor)


def describe() -> dict[str, str]:
    """What `bmi info` shows about cgroups on this host."""
    trees = _layout()
    v1 = [t for t in trees if t.version == 1]
    v2 = next((t for t in trees if t.version == 2), None)
    ctls = sorted(set().union(*(t.controllers for t in trees))) if trees else []
    v2_usable = v2 is not None and os.access(v2.own, os.W_OK)
    return {
        "version": str(cgroup_version()),
        "mode": "hybrid" if v1 and v2 else "legacy" if v1 else "unified",
        "mounts": " ".join(f"{','.join(sorted(t.controllers)) or 'none'}={t.mount}" for t in trees),
        "parent": " ".join(t.own for t in trees),
        "controllers": " ".join(ctls),
        # cgroup.freeze appeared in Linux 5.2, cgroup.kill in 5.14
        "freeze": "freezer.state (v1)" if any("freezer" in t.controllers for t in v1)
                  else "cgroup.freeze (v2)" if v2_usable and _kernel_at_least(5, 2) else "none",
        "kill": "cgroup.kill (v2)" if v2_usable and _kernel_at_least(5, 14)
                else "freeze + SIGKILL each process",
    }


class PDCgroups:
    """The cgroups of one PD.  Make it with create(); destroy() removes it."""

    FREEZE_TIMEOUT = 5.0
    KILL_TIMEOUT = 10.0

    procs_files: tuple[str, ...]

    def __init__(self, name: str, pd_id: int | None, groups: list[_Group]):
        self.name = name
        self.pd_id = pd_id
        self._destroyed = False
        # v2 only: the rules of the BPF device program attached (None: none yet), or why it was refused
        self._device_rules: dict[tuple[str, str, str], str] | None = None
        self._device_refusal = ""
        # files of the groups just made, with the value the kernel gave them, until our first write to each
        self._fresh: dict[str, str] = {}
        # v1: (n, CPUs picked) when create(cpus=n) pinned the new cpuset, until the set_cpus(n) that follows
        self._pinned: tuple[int, int] | None = None
        # cpu.weight / cpu.shares, open once set_weight wrote it: a client of bmid may change a PD's priority
        # at its own pace, and one pwrite costs a fifth of an open, a write and a close; closed by destroy()
        self._weight_fd = -1
        self._use(groups)

    def _use(self, groups: list[_Group]) -> None:
        """Act on these groups: what follows from them (files, controllers, how to kill and freeze)."""
        self._groups = groups
        self.procs_files = tuple(os.path.join(g.path, "cgroup.procs") for g in groups)
        self._ctl = {c: g for g in groups for c in g.controllers}
        v2 = next((g for g in groups if g.version == 2), None)
        # the v2 group whose cgroup.kill kills its whole subtree at once
        self._killer: _Group | None = v2 if v2 and _has_core_file(v2, "cgroup.kill") else None
        # the host's own v1 freezer first: on a hybrid host the v2 tree is systemd's bookkeeping
        v1_freezer = self._ctl.get("freezer")
        if v1_freezer is None and v2 and _has_core_file(v2, "cgroup.freeze"):
            self._freezer: _Group | None = v2
        else:
            self._freezer = v1_freezer

    # --- creation -------------------------------------------------------

    @classmethod
    def create(cls, name: str, *, pd_id: int | None = None, cpus: int | None = None) -> "PDCgroups":
        """Make the PD's group in every hierarchy; on failure remove what
        was made and raise ResourceError.  cpus: a new v1 cpuset gets the CPUs set_cpus(cpus) picks
        rather than a copy of the parent's, and that set_cpus then has nothing to write (each write to
        cpuset.cpus costs ~50 us)."""
        return cls._open(name, pd_id, reuse=False, cpus=cpus)[0]

    @classmethod
    def reopen(cls, name: str, *, pd_id: int | None = None) -> tuple["PDCgroups", bool]:
        """The PD's existing groups, making those missing (a crash halfway through a create or a
        destroy leaves some); True when any had to be made, so the caller sets the limits again."""
        return cls._open(name, pd_id, reuse=True)

    @classmethod
    def _open(cls, name: str, pd_id: int | None, reuse: bool,
              cpus: int | None = None) -> tuple["PDCgroups", bool]:
        label = _label(name, pd_id)
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidArgument(f"create cgroups for {label}: bad group name {name!r}: "
                                  "want 1 to 64 of A-Z a-z 0-9 _ -", pd_id=pd_id)
        trees = _layout()
        if not trees:
            raise DriverUnavailable(f"create cgroups for {label}: no cgroup filesystem is mounted",
                                    pd_id=pd_id)
        has_v1 = any(t.version == 1 for t in trees)
        if isinstance(cpus, bool) or not isinstance(cpus, int) or not 1 <= cpus <= 1 << 16:
            cpus = None     # (set_cpus refuses it by name)
        pinned: tuple[int, int] | None = None
        groups: list[_Group] = []
        made: list[_Group] = []
        try:
            for tree in trees:
                path = os.path.join(tree.own, name)
                if reuse and os.path.isdir(path):
                    groups.append(_Group(tree.version, path, tree.controllers))
                    continue
                # on hybrid hosts a v2 tree without controllers is only a bonus; so is a v1 devices
                # hierarchy we may not write (the PD then says /capability/devices/enforced = no)
                optional = (tree.version == 2 and has_v1 and not tree.controllers) or tree.controllers == {"devices"}
                group, picked = _make(tree, name, label, pd_id, optional, cpus)
                if group:
                    groups.append(group)
                    made.append(group)
                if picked and cpus is not None:
                    pinned = (cpus, picked)
        except BaseException:
            for group in reversed(made):
                _remove_tree(group.path)
            raise
        opened = cls(name, pd_id, groups)
        opened._fresh = {os.path.join(g.path, file): value for g in made for controller in g.controllers
                         for file, value in _KERNEL_DEFAULTS.get((g.version, controller), ())}
        opened._pinned = pinned
        return opened, bool(made)

    # --- helpers ----------------------------------------------------------

    def _live(self, what: str) -> None:
        if self._destroyed:
            raise InvalidState(f"{what} of {_label(self.name, self.pd_id)}: its cgroups are destroyed",
                               pd_id=self.pd_id)

    def _group(self, controller: str, what: str) -> _Group:
        self._live(what)
        group = self._ctl.get(controller)
        if group is None:
            raise NotSupported(
                f"{what} of {_label(self.name, self.pd_id)}: the {controller} cgroup controller is "
                "not available to this process (not mounted on cgroup v1, or not listed in its "
                "cgroup's cgroup.controllers on v2, i.e. not delegated)", pd_id=self.pd_id)
        return group

    def _fail(self, what: str, path: str, err: OSError, doing: str) -> ResourceError:
        return ResourceError(f"{what} of {_label(self.name, self.pd_id)}: {doing} {path} failed: "
                             f"{errno.errorcode.get(err.errno or 0, '?')} {err.strerror}",
                             pd_id=self.pd_id)

    def _set(self, path: str, value: str, what: str) -> None:
        try:
            _write(path, value)
        except OSError as e:
            raise self._fail(what, path, e, f"writing {value!r} to") from e

    def _set_new(self, path: str, value: str, what: str) -> None:
        """_set, unless the group was just made and the kernel gave the file that value already."""
        if self._fresh.pop(path, None) != value:
            self._set(path, value, what)

    def _set_each(self, path: str, values: Sequence[str], what: str) -> None:
        """_set of each value in turn through one open (the kernel takes one devices rule a write)."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            raise self._fail(what, path, e, f"writing {values[0]!r} to" if values else "opening") from e
        try:
            for value in values:
                try:
                    os.write(fd, value.encode())
                except OSError as e:
                    raise self._fail(what, path, e, f"writing {value!r} to") from e
        finally:
            os.close(fd)

    def _get(self, path: str, what: str) -> str:
        try:
            return read_raw(path)
        except OSError as e:
            raise self._fail(what, path, e, "reading") from e

    def _int(self, value: object, lo: int, hi: int, what: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise InvalidArgument(f"{what} of {_label(self.name, self.pd_id)}: {value!r} is not an "
                                  f"integer in {lo}..{hi}", pd_id=self.pd_id)
        return value

    # --- memory -----------------------------------------------------------

    def set_memory_max(self, nbytes: int) -> None:
        """Hard limit on RAM + swap: past it the kernel OOM-kills in the PD."""
        what = "set memory limit"
        g = self._group("memory", what)
        nbytes = self._int(nbytes, os.sysconf("SC_PAGE_SIZE"), UNLIMITED, what)
        if g.version == 2:
            self._set(os.path.join(g.path, "memory.max"), str(nbytes), what)
            swap = os.path.join(g.path, "memory.swap.max")
            if os.path.exists(swap):
                self._set(swap, "0", what)
            return
        files = [os.path.join(g.path, "memory.limit_in_bytes")]
        memsw = os.path.join(g.path, "memory.memsw.limit_in_bytes")
        if os.path.exists(memsw):
            # the kernel keeps memsw >= limit: raise memsw first, lower it last
            known = self._fresh.pop(memsw, None)
            grow = nbytes > int(known if known is not None else self._get(memsw, what))
            files.insert(0, memsw) if grow else files.append(memsw)
        for path in files:
            self._set(path, str(nbytes), what)

    def memory_current(self) -> int:
        g = self._group("memory", "read memory use")
        name = "memory.current" if g.version == 2 else "memory.usage_in_bytes"
        return int(self._get(os.path.join(g.path, name), "read memory use"))

    def memory_max(self) -> int:
        """The limit in bytes, UNLIMITED when none is set."""
        g = self._group("memory", "read memory limit")
        name = "memory.max" if g.version == 2 else "memory.limit_in_bytes"
        text = self._get(os.path.join(g.path, name), "read memory limit").strip()
        if text == "max" or int(text) >= _V1_UNLIMITED:
            return UNLIMITED
        return int(text)

    def oom_kills(self) -> int:
        """How many processes the OOM killer took in this PD."""
        g = self._group("memory", "count OOM kills")
        name = "memory.events" if g.version == 2 else "memory.oom_control"
        return int(_keyed(self._get(os.path.join(g.path, name), "count OOM kills")).get("oom_kill", 0))

    # --- CPU --------------------------------------------------------------

    def _cpuset_file(self, g: _Group) -> str:
        return "cpuset.cpus.effective" if g.version == 2 else "cpuset.effective_cpus"

    def set_cpus(self, n: int) -> int:
        """Pin the PD to n CPUs of the manager's own cpuset (fewer if it has
        fewer); the start rotates with pd_id so PDs spread over the CPUs."""
        what = "set CPUs"
        g = self._group("cpuset", what)
        n = self._int(n, 1, 1 << 16, what)
        pinned, self._pinned = self._pinned, None
        if pinned is not None and pinned[0] == n:
            return pinned[1]        # create(cpus=n) wrote just that
        parent = os.path.dirname(g.path)
        avail = _cpu_list(self._get(os.path.join(parent, self._cpuset_file(g)), what))
        if not avail:
            raise ResourceError(f"{what} of {_label(self.name, self.pd_id)}: the parent cgroup "
                                f"{parent} has no CPUs", pd_id=self.pd_id)
        chosen = _pick_cpus(avail, n, self.pd_id)
        self._set(os.path.join(g.path, "cpuset.cpus"), ",".join(map(str, chosen)), what)
        return len(chosen)

    def cpus(self) -> int:
        g = self._group("cpuset", "count CPUs")
        return len(_cpu_list(self._get(os.path.join(g.path, self._cpuset_file(g)), "count CPUs")))

    def set_cpu_share(self, performance: int, ncpus: int) -> None:
        """Cap CPU time at `performance` percent of `ncpus` CPUs (CFS bandwidth)."""
        what = "set CPU share"
        g = self._group("cpu", what)
        performance = self._int(performance, 1, 100, what + " (performance %)")
        ncpus = self._int(ncpus, 1, 1 << 16, what + " (CPUs)")
        quota = max(_CFS_MIN_QUOTA_US, _CFS_PERIOD_US * ncpus * performance // 100)
        if g.version == 2:
            self._set(os.path.join(g.path, "cpu.max"), f"{quota} {_CFS_PERIOD_US}", what)
        else:
            self._set_new(os.path.join(g.path, "cpu.cfs_period_us"), str(_CFS_PERIOD_US), what)
            self._set(os.path.join(g.path, "cpu.cfs_quota_us"), str(quota), what)

    def set_weight(self, priority: int) -> None:
        """Priority -10..+10 (0 default, higher gets more CPU) -> CPU weight
        default * 1.25**priority, the same 1.25 step per level as nice:
        v1 cpu.shares 1024 (110..9537), v2 cpu.weight 100 (11..931)."""
        what = "set priority"
        g = self._group("cpu", what)
        priority = self._int(priority, -10, 10, what)
        name, default = ("cpu.weight", 100) if g.version == 2 else ("cpu.shares", 1024)
        value = str(round(default * 1.25**priority))
        try:
            if self._weight_fd < 0:
                if self._fresh.pop(os.path.join(g.path, name), None) == value:
                    return
                self._weight_fd = os.open(os.path.join(g.path, name), os.O_WRONLY | os.O_CLOEXEC)
            os.pwrite(self._weight_fd, value.encode(), 0)
        except OSError as e:
            raise self._fail(what, os.path.join(g.path, name), e, f"writing {value!r} to") from e

    # --- processes ----------------------------------------------------------

    def set_pids_max(self, n: int | None) -> None:
        """At most n processes (threads count) in the PD; None lifts the cap."""
        what = "set process limit"
        g = self._group("pids", what)
        value = "max" if n is None else str(self._int(n, 1, 1 << 22, what))
        self._set(os.path.join(g.path, "pids.max"), value, what)

    def pids(self) -> list[int]:
        """Every process in the PD's groups, including sub-groups it made."""
        self._live("list processes")
        return sorted(self._pids())

    def _pids(self, groups: list[_Group] | None = None) -> set[int]:
        found: set[int] = set()
        directories = [g.path for g in (self._groups if groups is None else groups)]
        while directories:
            directory = directories.pop()
            try:
                found.update(int(p) for p in read_raw(os.path.join(directory, "cgroup.procs")).split())
                with os.scandir(directory) as entries:
                    directories.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))
            except FileNotFoundError:
                pass        # a sub-group went away while we looked
            except OSError as e:
                raise self._fail("list processes", directory, e, "reading cgroup.procs in") from e
        return found

    # --- devices: the v1 devices controller, else on v2 a BPF device program ------------------------

    def devices_enforcement(self) -> str:
        """/capability/devices/enforced: whether (and how) the kernel checks the PD's every device open."""
        if "devices" in self._ctl:
            return "yes: cgroup v1 devices controller"
        if self._device_rules is not None and not self._device_refusal:
            return "yes: cgroup v2 BPF device program (BPF_PROG_TYPE_CGROUP_DEVICE) on the PD's group"
        return ("no: " + (self._device_refusal or "the PD has neither a v1 devices cgroup nor a v2 group")
                + "; a PD sees only the nodes bound into its /dev, and a node's detached mount refuses a reopen "
                "through a kept fd, but nothing checks its opens against its assignments")

    def devices_enforced(self) -> bool:
        return self.devices_enforcement().startswith("yes")

    def limit_devices(self, rules: tuple[str, ...]) -> None:
        """Deny every device node but those of `rules` ("c 1:3 rw", ...); where the kernel cannot be made to
        check (no v1 devices controller, and the BPF program refused: no CAP_SYS_ADMIN), say why instead."""
        if "devices" in self._ctl:
            path = self._group("devices", "limit devices").path
            self._set(os.path.join(path, "devices.deny"), "a", "limit devices")
            self._set_each(os.path.join(path, "devices.allow"), rules, "allow a device")
        else:
            self._program_devices(dict(map(devices.parse_rule, rules)), "limit devices", strict=False)

    def keep_devices(self, rules: tuple[str, ...]) -> None:
        """After a manager restart: the kept groups still enforce `rules`; on v2 the new manager takes over
        the program (attaching its own in place of the one whose fd went with the old manager)."""
        if "devices" not in self._ctl:
            self._program_devices(dict(map(devices.parse_rule, rules)), "keep device rules", strict=False)

    def allow_device(self, rule: str) -> None:
        self._change_device(rule, "allow", lambda have, access: "".join(sorted(set(have + access))))

    def deny_device(self, rule: str) -> None:
        self._change_device(rule, "deny", lambda have, access: "".join(c for c in have if c not in access))

    def _change_device(self, rule: str, verb: str, combine: Callable[[str, str], str]) -> None:
        """v1: write the rule to devices.allow / devices.deny; v2: the program again, with the node's access
        combined from what it had and the rule's."""
        what = f"{verb} a device"
        if "devices" in self._ctl:
            self._set(os.path.join(self._group("devices", what).path, f"devices.{verb}"), rule, what)
        elif self._device_rules is not None and not self._device_refusal:
            node, access = devices.parse_rule(rule)
            self._program_devices({**self._device_rules, node: combine(self._device_rules.get(node, ""), access)},
                                  what, strict=True)

    def _program_devices(self, rules: dict[tuple[str, str, str], str], what: str, strict: bool) -> None:
        """Make `rules` the v2 group's BPF device program.  strict: a refusal raises (the rules in force stay);
        else it is kept as the reason the PD's devices are not enforced."""
        self._live(what)
        v2 = next((g for g in self._groups if g.version == 2), None)
        if v2 is None:
            self._device_refusal = "the PD has neither a v1 devices cgroup nor a v2 group"
            return
        try:
            devices.program(v2.path, rules)
        except (OSError, ResourceError) as e:
            why = str(getattr(e, "strerror", None) or e)
            if strict:
                raise ResourceError(f"{what} of {_label(self.name, self.pd_id)}: {why}", pd_id=self.pd_id) from e
            self._device_refusal = why
            return
        self._device_rules, self._device_refusal = rules, ""

    # --- freezing -----------------------------------------------------------

    def _freezer_group(self, what: str) -> _Group:
        self._live(what)
        if self._freezer is None:
            raise NotSupported(f"{what} {_label(self.name, self.pd_id)}: neither v2 cgroup.freeze "
                               "nor the v1 freezer controller is available", pd_id=self.pd_id)
        return self._freezer

    def _set_frozen(self, frozen: bool, what: str) -> None:
        g = self._freezer_group(what)
        if g.version == 2:
            self._set(os.path.join(g.path, "cgroup.freeze"), "1" if frozen else "0", what)
        else:
            self._set(os.path.join(g.path, "freezer.state"), "FROZEN" if frozen else "THAWED", what)

    def _is_frozen(self, g: _Group, what: str) -> bool:
        if g.version == 2:
            events = _keyed(self._get(os.path.join(g.path, "cgroup.events"), what))
            return events.get("frozen", "").strip() == "1"
        return self._get(os.path.join(g.path, "freezer.state"), what).strip() == "FROZEN"

    def freeze(self) -> None:
        """Stop every process of the PD; return once the kernel says FROZEN."""
        what = "freeze"
        g = self._freezer_group(what)
        self._set_frozen(True, what)
        if not _wait(lambda: self._is_frozen(g, what), self.FREEZE_TIMEOUT):
            self._set_frozen(False, what)
            raise ResourceError(f"{what} {_label(self.name, self.pd_id)}: not frozen after "
                                f"{self.FREEZE_TIMEOUT} s (a process stuck in the kernel?); thawed it "
                                "again", pd_id=self.pd_id)

    def thaw(self) -> None:
        what = "thaw"
        g = self._freezer_group(what)
        self._set_frozen(False, what)
        if not _wait(lambda: not self._is_frozen(g, what), self.FREEZE_TIMEOUT):
            raise ResourceError(f"{what} {_label(self.name, self.pd_id)}: still frozen after "
                                f"{self.FREEZE_TIMEOUT} s", pd_id=self.pd_id)

    def frozen(self) -> bool:
        what = "read freezer state"
        return self._is_frozen(self._freezer_group(what), what)

    # --- killing ------------------------------------------------------------

    def kill_all(self) -> None:
        """SIGKILL every process of the PD and return once none is left."""
        self._live("kill all processes")
        self._kill_all()

    def _kill_all(self) -> None:
        what = "kill all processes"
        deadline = time.monotonic() + self.KILL_TIMEOUT
        hurried: list[tuple[str, str]] | None = None
        try:
            while left := self._pids():
                if time.monotonic() > deadline:
                    raise ResourceError(f"{what} of {_label(self.name, self.pd_id)}: {len(left)} "
                                        f"processes survive SIGKILL after {self.KILL_TIMEOUT} s: "
                                        f"{sorted(left)[:10]}", pd_id=self.pd_id)
                if self._killer:
                    self._set(os.path.join(self._killer.path, "cgroup.kill"), "1", what)
                    if self._freezer is not None and self._freezer.version == 1:
                        self._set_frozen(False, what)   # v1-frozen processes act on SIGKILL only once thawed
                if not self._killer or left - self._pids([self._killer]):
                    self._signal_all(what)   # no cgroup.kill, or a process left the v2 group
                if hurried is None:
                    hurried = self._hurry()
                self._await_exits(left, deadline)
        finally:
            for path, value in hurried or ():   # the limits again, for the PD's next start
                try:
                    _write(path, value)
                except OSError:
                    pass

    def _hurry(self) -> list[tuple[str, str]]:
        """Once the SIGKILL is pending (no process of the PD runs a user instruction again): lift the
        PD's CPU cap and give its group the highest CPU weight, so its dying processes are scheduled
        at once (a throttled group would wait for its next CFS period, up to 100 ms, and a busy host's
        run queue is several ms long).  Best effort: the kill goes on whatever happens here.  Returns
        what to write back once they are gone, (file, its value before)."""
        g = self._ctl.get("cpu")
        if g is None:
            return []
        files = ((("cpu.max", "max"), ("cpu.weight", "10000")) if g.version == 2 else
                 (("cpu.cfs_quota_us", "-1"), ("cpu.shares", "262144")))
        saved = []
        for name, value in files:
            path = os.path.join(g.path, name)
            try:
                saved.append((path, read_raw(path).strip()))
                _write(path, value)
            except OSError:
                pass
        return saved

    def _await_exits(self, pids: set[int], deadline: float) -> None:
        """Block until every one of `pids` still in our groups has ended, or the deadline: poll on
        their pidfds (readable once the process is dead), not a sleep.  A pidfd is kept only if its
        pid is still ours after it was opened, so a recycled pid is never waited for."""
        fds = {}
        try:
            for pid in pids:
                try:
                    fds[pid] = os.pidfd_open(pid)
                except ProcessLookupError:
                    pass
            poller = select.poll()
            listed = self._pids()
            waiting = {fds[pid] for pid in listed & fds.keys()}
            if not waiting and listed & pids:
                time.sleep(0.0005)  # (rare) dead but still listed a moment: no busy loop meanwhile
            for fd in waiting:
                poller.register(fd, select.POLLIN)
            while waiting:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    return
                for fd, _ in poller.poll(max(1, int(timeout * 1000))):
                    poller.unregister(fd)
                    waiting.discard(fd)
        finally:
            for fd in fds.values():
                os.close(fd)

    def _signal_all(self, what: str) -> None:
        """SIGKILL by pidfd, so a recycled pid can never be hit: the pidfd is
        opened first and used only if the pid is still in our groups after.
        Frozen meanwhile (when we can) so nothing forks away; v1-frozen
        processes act on SIGKILL only once thawed, hence the thaw."""
        freezer = self._freezer
        if freezer:
            self._set_frozen(True, what)
            _wait(lambda: self._is_frozen(freezer, what), self.FREEZE_TIMEOUT)
        try:
            fds = {}
            for pid in self._pids():
                try:
                    fds[pid] = os.pidfd_open(pid)
                except ProcessLookupError:
                    pass
            still = self._pids()
            for pid, fd in fds.items():
                try:
                    if pid in still:
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                finally:
                    os.close(fd)
        finally:
            if freezer:
                self._set_frozen(False, what)

    # --- teardown -----------------------------------------------------------

    def destroy(self) -> None:
        """Kill everything, then remove every directory made (sub-groups
        first).  Idempotent; if it raises, calling it again retries."""
        if self._destroyed:
            return
        weight, self._weight_fd = self._weight_fd, -1   # taken first: a Ctrl-C between the close and the
        if weight >= 0:                                 # reset made the exit's destroy() close it again (EBADF,
            os.close(weight)                            # or an fd reused by then)
        self._drop_empty_groups()
        self._kill_all()
        failures = []
        for g in reversed(self._groups):
            try:
                _remove_tree(g.path)
            except OSError as e:
                failures.append(f"{e.filename}: {errno.errorcode.get(e.errno or 0, '?')} {e.strerror}")
        if failures:
            raise ResourceError(f"destroy cgroups of {_label(self.name, self.pd_id)}: cannot remove "
                                + "; ".join(failures), pd_id=self.pd_id)
        self._destroyed = True

    def _drop_empty_groups(self) -> None:
        """rmdir every group at once: the kernel refuses (EBUSY) one that still holds a process or a
        sub-group, and those stay for the kill and the walk; usually none does (the PD's tree was
        killed and reaped already), and nothing is listed at all."""
        kept = []
        for g in reversed(self._groups):
            try:
                os.rmdir(g.path)
            except FileNotFoundError:
                pass
            except OSError:
                kept.insert(0, g)
        if len(kept) != len(self._groups):
            self._use(kept)


#: whether the kernel gives a (non-root) v2 group a file: cgroup.freeze (5.2), cgroup.kill (5.14); per kernel, so
#: looked up once (a stat in each new group costs ~20 us)
_core_files: dict[str, bool] = {}


def _has_core_file(group: _Group, name: str) -> bool:
    found = _core_files.get(name)
    if found is None:
        found = os.path.exists(os.path.join(group.path, name))
        if found or os.path.isdir(group.path):      # (not a group that is gone)
            _core_files[name] = found
    return found


def _label(name: object, pd_id: int | None) -> str:
    return f"PD {pd_id} (cgroup {name!r})" if pd_id is not None else f"cgroup {name!r}"


def _wait(done, timeout: float) -> bool:
    """Poll `done` with a short backoff; freezing usually takes < 1 ms."""
    deadline = time.monotonic() + timeout
    delay = 0.0002
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    return True


def _pick_cpus(available: list[int], n: int, pd_id: int | None) -> list[int]:
    """n of `available` (all if fewer); the start rotates with pd_id so PDs spread over the CPUs."""
    start = (pd_id or 0) % len(available)
    return sorted((available[start:] + available[:start])[:n])


def _make(tree: _Tree, name: str, label: str, pd_id: int | None, optional: bool,
          cpus: int | None = None) -> tuple[_Group | None, int]:
    """mkdir the PD's group in one tree and prepare it; None if an optional tree is not writable.  With the
    group, how many CPUs it was pinned to (v1 cpuset and cpus given, as set_cpus(cpus) would), else 0."""
    path = os.path.join(tree.own, name)
    doing = f"create cgroups for {label}"
    if tree.version == 2 and tree.controllers:
        _enable_controllers(tree, doing, pd_id)
    try:
        os.mkdir(path)
    except OSError as e:
        if optional and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return None, 0
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise _no_cgroup_access(doing, pd_id) from e
        why = ("it already exists (a PD of that name, or left by a manager that died)"
               if e.errno == errno.EEXIST else f"{errno.errorcode.get(e.errno or 0, '?')} {e.strerror}")
        raise ResourceError(f"{doing}: mkdir {path}: {why}", pd_id=pd_id) from e
    group = _Group(tree.version, path, tree.controllers)
    picked = 0
    if tree.version == 1 and "cpuset" in tree.controllers:
        # a new v1 cpuset starts empty and refuses processes until filled
        try:
            for f in ("cpuset.cpus", "cpuset.mems"):
                available = (_cpu_list(read_raw(os.path.join(tree.own, "cpuset.effective_cpus")))
                             if f == "cpuset.cpus" and cpus is not None else [])
                if available:   # (none: the copy, and then set_cpus says the parent has no CPUs)
                    chosen = _pick_cpus(available, cpus or 1, pd_id)
                    value, picked = ",".join(map(str, chosen)), len(chosen)
                else:
                    value = read_raw(os.path.join(tree.own, f)).strip()
                _write(os.path.join(path, f), value)
        except OSError as e:
            _remove_tree(path)
            raise ResourceError(f"{doing}: copying {f} into {path}: {e.strerror}", pd_id=pd_id) from e
    return group, picked


def _enable_controllers(tree: _Tree, doing: str, pd_id: int | None) -> None:
    """Let children of our own v2 cgroup have the controllers PDs need."""
    control = os.path.join(tree.own, "cgroup.subtree_control")
    try:
        missing = tree.controllers - set(read_raw(control).split())
        if missing:
            _write(control, " ".join("+" + c for c in sorted(missing)))
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise ResourceError(
                f"{doing}: cannot enable the {', '.join(sorted(missing))} controller(s) for child "
                f"groups of {tree.own}: that cgroup holds processes and cgroup v2 lets only a group "
                "without processes hand controllers down (EBUSY). Run the manager in a delegated "
                "cgroup whose processes sit in a leaf, e.g. `systemd-run -p Delegate=yes ...` and "
                "move the manager into <its cgroup>/manager first.", pd_id=pd_id) from e
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise _no_cgroup_access(doing, pd_id) from e
        raise ResourceError(f"{doing}: enabling controllers in {control}: {e.strerror}",
                            pd_id=pd_id) from e


def _no_cgroup_access(doing: str, pd_id: int | None) -> PermissionDenied:
    """A user who may not make cgroups here gets the way out, not an EACCES on a path."""
    return PermissionDenied(f"{doing}: this user may not make cgroups for PDs here; run as root or delegate "
                            f"a cgroup (systemd-run --user --scope -p Delegate=yes)", pd_id=pd_id)


def sweep(name: re.Pattern[str], stale: Callable[[re.Match[str]], bool]) -> list[str]:
    """Remove groups next to ours that `name` matches and `stale` judges left over; return their paths.

    For groups whose manager died without removing them (SIGKILL): the
    name says whose they are.  A group with a process in it stays (rmdir
    refuses), so a PD that is still alive never loses its limits.
    """
    removed = []
    for tree in _layout():
        try:
            entries = os.listdir(tree.own)
        except OSError:
            continue
        for entry in entries:
            match = name.fullmatch(entry)
            path = os.path.join(tree.own, entry)
            if match and stale(match) and _remove_if_empty(path):
                removed.append(path)
    return removed


def _remove_if_empty(path: str) -> bool:
    try:
        for directory, _, _ in os.walk(path, topdown=False):
            os.rmdir(directory)
    except OSError:
        return False
    return True


def _remove_tree(path: str) -> None:
    """rmdir a group and any sub-groups, deepest first; a group that just
    emptied can stay busy for a moment, so EBUSY is retried briefly."""
    try:
        os.rmdir(path)      # the usual case: no sub-groups, no process left
        return
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise
    for directory, _, _ in os.walk(path, topdown=False):
        deadline = time.monotonic() + 2.0
        while True:
            try:
                os.rmdir(directory)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.005)
