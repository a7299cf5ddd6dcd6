"""Linux driver: a PD is an isolated process tree started from a sealed memfd.

Mechanisms only: cgroups for resources (cgroups.py), the C spawn path for
namespaces and exec (spawn.py), the measurement hot path for images
(bmi/integrity/measure.py), and one monitor thread for consoles and exits.
"""
from __future__ import annotations

import fcntl
import os
import re
import shlex
import signal
import threading
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ...errors import InvalidArgument, InvalidState, ResourceError
from ...image import PDImage
from ...integrity.measure import measure_into
from ...params import Leaf, Param, parse_allow, parse_int
from ...types import PDDescription, PDStatus
from ..base import Driver, ExitInfo, HostResources, Progress
from ..console import Console
from .. import net
from . import cgroups, devices, formats, spawn, uids
from .monitor import Monitor

MFD_CLOEXEC, MFD_ALLOW_SEALING, MFD_EXEC = 0x1, 0x2, 0x10
SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
KILL_TIMEOUT = 10.0
DEFAULT_PIDS_MAX = 1024
PD_DEVICES = ["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"]
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SESSION_GROUP = re.compile(r"bmi-(\d+)-pd\d+")
NO_SUSPEND = ("no working checkpointer here: Debian's CRIU 3.17 fails on kernels >= 6.13 (vDSO bounds) "
              "and no CRIU can restore a process whose executable is a memfd")


@dataclass
class Run:
    """One start of a PD's image, until its init ends."""

    pid: int
    pidfd: int
    status_r: int
    oom_base: int
    stop_requested: bool = False
    forced: bool = False
    ended: ExitInfo | None = None
    exited: threading.Event = field(default_factory=threading.Event)
    console_closed: threading.Event = field(default_factory=threading.Event)


@dataclass
class LinuxPD:
    pd_id: int
    desc: PDDescription
    groups: cgroups.PDCgroups
    console: Console = field(default_factory=Console)
    image_fd: int | None = None
    archive: bool = False
    run: Run | None = None
    pids_max: int = DEFAULT_PIDS_MAX
    destroyed: bool = False
    ids: uids.IdLease | None = None     # its host uid/gid, held until it is destroyed
    assigned: dict[str, str] = field(default_factory=dict)         # assigned host node -> its cgroup rule
    owners: dict[str, devices.Owner] = field(default_factory=dict)  # host nodes chowned to it, and their owners
    links: list[str] = field(default_factory=list)                  # host ends of its network interfaces
    fresh_groups: bool = False      # made by allocate and no process put in them yet: no OOM kill counted there


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # someone else's process: alive
        pass
    return True


def process_start(pid: int) -> int | None:
    """The start time (clock ticks since boot) of pid, None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def _uptime(pid: int) -> str:
    """Whole seconds since the process started ('' once it is gone)."""
    start = process_start(pid)
    if start is None:
        return ""
    with open("/proc/uptime") as f:
        now = float(f.read().split()[0])
    return str(max(0, int(now - start / os.sysconf("SC_CLK_TCK"))))


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class LinuxDriver(net.HostBridges, Driver):
    name = "linux"
    boot_params = ("/boot/cmdline", "/boot/capabilities", "/boot/allow", "/boot/env/")
    capabilities = frozenset({PDStatus.PAUSED, PDStatus.RESTARTING})
    unsupported_reasons = {PDStatus.SUSPENDED: NO_SUSPEND}
    channels = True

    def __init__(self, *, lifeline: bool = True):
        # Session mode: PDs die with the manager process.  The init of each
        # PD watches the read end; only this process holds the write end.
        self._lifeline_r, self._lifeline_w = os.pipe2(os.O_CLOEXEC) if lifeline else (-1, -1)
        self._monitor = Monitor()
        self._ids = uids.IdPool()
        if lifeline:
            cgroups.sweep(_SESSION_GROUP, lambda match: not _alive(int(match[1])))
        cgroups.hold_layout()       # until close: a create reads the cgroup mounts again only after a mount change
        self._layout_held = True

    def cgroup_name(self, pd_id: int) -> str:
        """Session groups carry the manager's pid: a later manager removes them if it died (sweep)."""
        return f"bmi-{os.getpid()}-pd{pd_id}"

    # -- facts ------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        namespaces = sorted(os.listdir("/proc/self/ns"))
        return {
            "driver": self.name,
            "kernel": os.uname().release,
            "cgroup": cgroups.describe(),
            "namespaces": ", ".join(n for n in namespaces if not n.endswith("_for_children")),
            "landlock_abi": spawn.landlock_abi(),
            "seccomp": spawn.seccomp_available(),
            "per_pd_uid": self._ids.describe(),
            "capabilities": ", ".join(s.name for s in sorted(self.capabilities)),
            "not_supported": {s.name: why for s, why in self.unsupported_reasons.items()},
        }

    def host_resources(self) -> HostResources:
        # raw reads: each allocate_pd asks, and a buffered text open costs ~30 us more per file
        total = int(cgroups.read_raw("/proc/meminfo").partition("MemTotal:")[2].split(None, 1)[0]) * 1024
        pid_max = int(cgroups.read_raw("/proc/sys/kernel/pid_max"))
        return HostResources(cpus=len(os.sched_getaffinity(0)), memory=total, pids=pid_max)

    # -- allocation and images ----------------------------------------------------------------
    def allocate(self, pd_id: int, desc: PDDescription) -> LinuxPD:
        groups = cgroups.PDCgroups.create(self.cgroup_name(pd_id), pd_id=pd_id, cpus=desc.cpu)   # (pinned at once)
        try:
            self._limit(groups, desc.mem, desc.cpu, desc.performance, 0, DEFAULT_PIDS_MAX)
            ids = self._take_ids(pd_id)
        except BaseException:
            groups.destroy()
            raise
        return LinuxPD(pd_id, desc, groups, ids=ids, fresh_groups=True)

    def _take_ids(self, pd_id: int) -> uids.IdLease:
        """The PD's own host uid/gid, held until it is destroyed."""
        return self._ids.acquire(pd_id)

    @staticmethod
    def _limit(groups: cgroups.PDCgroups, mem: int, cpus: int, performance: int, priority: int,
               pids_max: int | None) -> None:
        """Every limit a PD's groups carry."""
        groups.set_memory_max(mem)
        groups.set_cpu_share(performance, groups.set_cpus(cpus))
        groups.set_weight(priority)
        groups.set_pids_max(pids_max)
        groups.limit_devices(devices.BASE_RULES)

    def check_config(self, pd: LinuxPD, name: str, value: str) -> None:
        if name == "/boot/cmdline":
            try:
                shlex.split(value)
            except ValueError as e:
                raise InvalidArgument(f"set_config_param /boot/cmdline of PD {pd.pd_id}: cannot split "
                                      f"{value!r} shell-style: {e}", pd_id=pd.pd_id) from None
        elif name == "/boot/capabilities":
            spawn.capability_mask(value, f"set_config_param {name} of PD {pd.pd_id}", pd.pd_id)
        elif name.startswith("/boot/env/") and not _ENV_NAME.match(name[len("/boot/env/"):]):
            raise InvalidArgument(f"set_config_param {name} of PD {pd.pd_id}: not a valid environment "
                                  f"variable name", pd_id=pd.pd_id)
        elif name == "/net" or name.startswith("/net/"):
            net.check_param(name, value, f"set_config_param {name} of PD {pd.pd_id}", pd.pd_id)

    def config_grants(self, name: str, value: str) -> int | None:
        return spawn.capability_mask(value, f"set_config_param {name}") if name == "/boot/capabilities" else None

    def load(self, pd: LinuxPD, image: PDImage, banks: Sequence[str],
             progress: Progress | None) -> dict[str, bytes]:
        what = f"setup_pd of PD {pd.pd_id}"
        fd = self._memfd(f"bmi-pd{pd.pd_id}", pd.pd_id)
        try:
            digests = measure_into(image, fd, banks=banks, progress=progress, pd_id=pd.pd_id)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
            archive = formats.classify(fd, os.fstat(fd).st_size, what=what)
        except BaseException:
            os.close(fd)
            raise
        old, pd.image_fd, pd.archive = pd.image_fd, fd, archive
        if old is not None:
            os.close(old)
        return digests

    @staticmethod
    def _memfd(name: str, pd_id: int) -> int:
        # MFD_EXEC: where vm.memfd_noexec is 1 a memfd without it cannot be executed.
        for flags in (MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_EXEC, MFD_CLOEXEC | MFD_ALLOW_SEALING):
            try:
                return os.memfd_create(name, flags)
            except OSError as e:
                error = e
        raise ResourceError(f"setup_pd of PD {pd_id}: memfd_create failed: {error.strerror}", pd_id=pd_id)

    # -- running ----------------------------------------------------------------------------
    def start(self, pd: LinuxPD, config: Mapping[str, str], priority: int, *, progress: Progress | None = None,
              channel_fd: int = -1) -> None:
        if pd.image_fd is None:
            raise InvalidState(f"start of PD {pd.pd_id}: no image loaded", pd_id=pd.pd_id)
        self._discard_run(pd)
        ids = pd.ids = pd.ids or self._take_ids(pd.pd_id)    # (an adopted PD whose uid was lost: a new one)
        argv = shlex.split(config.get("/boot/cmdline", "")) or ["init"]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/", "BMI_PD_ID": str(pd.pd_id)}
        env.update({k[len("/boot/env/"):]: v for k, v in config.items() if k.startswith("/boot/env/")})
        if channel_fd >= 0:
            env["BMI_CHANNEL_FD"] = "3"     # spawn makes the channel fd 3 in the PD's program
        console_r, console_w = os.pipe2(os.O_CLOEXEC)
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        try:
            oom_base = 0 if pd.fresh_groups else pd.groups.oom_kills()
            pd.fresh_groups = False     # (a start that fails may still have placed a process there)
            child = spawn.spawn(pd.image_fd, archive=pd.archive, argv=argv, env=env, console_fd=console_w,
                                status_fd=status_w, lifeline_fd=self._lifeline_r, channel_fd=channel_fd,
                                cgroup_procs=pd.groups.procs_files, outer_uid=ids.uid, outer_gid=ids.gid,
                                map_helper=self._ids.map_helper, hostname=f"pd{pd.pd_id}",
                                tmpfs_bytes=pd.desc.mem, pd_id=pd.pd_id,
                                keep_caps=spawn.capability_mask(config.get("/boot/capabilities", ""),
                                                                f"start of PD {pd.pd_id}", pd.pd_id),
                                io_uring="io_uring" in parse_allow(config.get("/boot/allow", ""),
                                                                   what=f"start of PD {pd.pd_id}: /boot/allow",
                                                                   pd_id=pd.pd_id),
                                hold=self._needs_attach(pd, config), progress=progress)
        except BaseException:
            os.close(console_r)
            os.close(status_r)
            raise
        finally:
            os.close(console_w)
            os.close(status_w)
        run = Run(child.pid, child.pidfd, status_r, oom_base)
        pd.run = run
        self._renice(pd, priority)
        self._watch(pd, run, console_r)
        if self._needs_attach(pd, config):
            try:
                self._attach(pd, run, config)
                signal.pidfd_send_signal(run.pidfd, signal.SIGCONT)    # its init lets the program exec
            except BaseException:
                self._discard_run(pd)
                raise

    # -- devices and networks: added from the manager's side once the PD's namespaces exist --------------
    @staticmethod
    def _needs_attach(pd: LinuxPD, config: Mapping[str, str]) -> bool:
        return bool(pd.assigned) or bool(net.interfaces(dict(config)))

    def _attach(self, pd: LinuxPD, run: Run, config: Mapping[str, str]) -> None:
        """The PD's assigned device nodes and its /net/... interfaces, into the namespaces of this run."""
        for device in sorted(pd.assigned):
            devices.bind(run.pid, self._owner(pd), device, f"start of PD {pd.pd_id}: assigned device {device}",
                         pd.pd_id)
        for iface in net.interfaces(dict(config)):
            pd.links.append(net.attach(run.pid, pd.pd_id, iface))

    @staticmethod
    def _owner(pd: LinuxPD) -> int:
        """The host uid of the PD's root (who may create files in its root tmpfs)."""
        return pd.ids.uid if pd.ids is not None else os.geteuid()

    def _detach_links(self, pd: LinuxPD) -> None:
        links, pd.links = pd.links, []
        for host in links:
            net.detach(host)

    def _watch(self, pd: LinuxPD, run: Run, console_r: int | None) -> None:
        """Drain the run's console into the PD's buffer (None: no console left) and notice its exit."""
        if console_r is None:
            run.console_closed.set()
        else:
            def on_console(data: bytes) -> None:
                if data:
                    pd.console.append(data)
                else:
                    run.console_closed.set()
                    pd.console.poke()

            self._monitor.watch_console(console_r, on_console)
        self._monitor.watch_exit(run.pidfd, lambda: self._on_exit(pd, run))

    def _on_exit(self, pd: LinuxPD, run: Run) -> None:
        """Runs on the monitor thread: reap the PD's init and say how the run ended."""
        try:
            waited = os.waitid(os.P_PIDFD, run.pidfd, os.WEXITED)
        except ChildProcessError:
            waited = None
        record = self._exit_record(pd, run)
        oom = pd.groups.oom_kills() > run.oom_base
        run.ended = self._classify(run, record, waited, oom)
        run.exited.set()
        pd.console.poke()

    def _exit_record(self, pd: LinuxPD, run: Run) -> tuple[str, int] | None:
        """What the PD's init wrote on its exit-status pipe (bmid reads it through its fd keeper)."""
        return spawn.read_exit(run.status_r)

    @staticmethod
    def _classify(run: Run, record: tuple[str, int] | None, waited: Any, oom: bool) -> ExitInfo:
        code = record[1] if record and record[0] == "exit" else None
        if record is None:
            init_signal = waited.si_status if waited is not None else signal.SIGKILL
            how = f"the PD's init was killed by {_signal_name(init_signal)}"
        elif record[0] == "signal":
            how = f"killed by {_signal_name(record[1])}"
        else:
            how = f"exited with status {record[1]}"
        if oom:
            return ExitInfo(PDStatus.CRASHED, code, "oom")
        if run.forced:
            return ExitInfo(PDStatus.SHUTDOWN, code, "shutdown requested; killed after the grace period")
        if run.stop_requested:
            return ExitInfo(PDStatus.SHUTDOWN, code, f"shutdown requested; {how}")
        if record is not None and record[0] == "exit":
            return ExitInfo(PDStatus.SHUTDOWN, code, how)
        return ExitInfo(PDStatus.CRASHED, code, how)

    def exit_info(self, pd: LinuxPD) -> ExitInfo | None:
        return pd.run.ended if pd.run is not None else None

    def wait(self, pd: LinuxPD, timeout: float | None) -> ExitInfo | None:
        if pd.run is None:
            return None
        pd.run.exited.wait(timeout)
        return pd.run.ended

    def stop(self, pd: LinuxPD, grace: float) -> ExitInfo:
        run = pd.run
        if run is None:
            raise InvalidState(f"shutdown of PD {pd.pd_id}: not running", pd_id=pd.pd_id)
        run.stop_requested = True
        if not run.exited.is_set():
            if pd.groups.frozen():
                pd.groups.thaw()
            try:
                signal.pidfd_send_signal(run.pidfd, signal.SIGTERM)
            except ProcessLookupError:
                pass
            if not run.exited.wait(grace):
                run.forced = True
                self._kill(pd, run)
        assert run.ended is not None
        return run.ended

    def _kill(self, pd: LinuxPD, run: Run) -> None:
        pd.groups.kill_all()
        if not run.exited.wait(KILL_TIMEOUT):
            raise ResourceError(f"PD {pd.pd_id}: its init (pid {run.pid}) did not end {KILL_TIMEOUT}s after "
                                f"SIGKILL", pd_id=pd.pd_id)
        run.console_closed.wait(KILL_TIMEOUT)

    def _discard_run(self, pd: LinuxPD) -> None:
        run, pd.run = pd.run, None
        self._detach_links(pd)
        if run is None:
            return
        if not run.exited.is_set():
            run.forced = True
            self._kill(pd, run)
        run.console_closed.wait(KILL_TIMEOUT)
        os.close(run.pidfd)
        os.close(run.status_r)

    def pause(self, pd: LinuxPD) -> None:
        pd.groups.freeze()

    def resume(self, pd: LinuxPD) -> None:
        pd.groups.thaw()

    def destroy(self, pd: LinuxPD) -> None:
        if pd.destroyed:
            return
        # (an ended run left no process to thaw: its init became a zombie only once its namespace was empty)
        if pd.run is not None and not pd.run.exited.is_set() and pd.groups.frozen():
            pd.groups.thaw()
        self._discard_run(pd)
        pd.groups.destroy()
        for device in list(pd.owners):
            devices.give_back(device, pd.owners.pop(device))
        image, pd.image_fd = pd.image_fd, None      # taken before the close: never closed twice
        if image is not None:
            os.close(image)
        if pd.ids is not None:      # its processes are gone with its cgroups: the uid is free again
            pd.ids.release()
            pd.ids = None
        pd.destroyed = True

    # -- resources --------------------------------------------------------------------------
    def set_priority(self, pd: LinuxPD, priority: int) -> None:
        pd.groups.set_weight(priority)
        self._renice(pd, priority)

    def _renice(self, pd: LinuxPD, priority: int) -> None:
        """nice = -priority for every process of the PD (children inherit it)."""
        if pd.run is None or pd.run.exited.is_set():
            return
        if priority == 0 and os.getpriority(os.PRIO_PROCESS, 0) == 0:
            return      # the PD inherited nice 0 from us: nothing to change
        for pid in pd.groups.pids():
            try:
                os.setpriority(os.PRIO_PROCESS, pid, -priority)
            except ProcessLookupError:
                continue
            except PermissionError:
                # Raising priority needs CAP_SYS_NICE; the CPU weight still applies.
                break

    def set_memory(self, pd: LinuxPD, nbytes: int) -> None:
        pd.groups.set_memory_max(nbytes)

    def memory_limit(self, pd: LinuxPD) -> int:
        return pd.groups.memory_max()

    def memory_used(self, pd: LinuxPD) -> int:
        return pd.groups.memory_current()

    def set_cpus(self, pd: LinuxPD, count: int) -> int:
        actual = pd.groups.set_cpus(count)
        pd.groups.set_cpu_share(pd.desc.performance, actual)
        return actual

    def cpus(self, pd: LinuxPD) -> int:
        return pd.groups.cpus()

    def set_performance(self, pd: LinuxPD, percent: int) -> None:
        pd.groups.set_cpu_share(percent, pd.groups.cpus())

    def extra_params(self, pd: LinuxPD, config: Mapping[str, str]) -> dict[str, Param]:
        def set_pids_max(value: str) -> None:
            limit = parse_int(value, what="/system/pids/max", pd_id=pd.pd_id, lo=1, hi=4194304)
            pd.groups.set_pids_max(limit)
            pd.pids_max = limit

        def proc_mem() -> str:
            kept = spawn.capability_mask(config.get("/boot/capabilities", ""), f"/boot/capabilities of PD {pd.pd_id}",
                                         pd.pd_id)
            return spawn.proc_mem_isolation(pd.archive if pd.image_fd is not None else None, kept)

        leaves: dict[str, Param] = {
            "/system/pids/current": Leaf(get=lambda: str(len(pd.groups.pids()))),
            "/system/pids/max": Leaf(get=lambda: str(pd.pids_max), set=set_pids_max),
            "/system/image/format": ("archive" if pd.archive else "elf") if pd.image_fd is not None else "none",
            "/capability/isolation/per-pd-uid": self._ids.capability(),
            "/capability/isolation/proc-mem": Leaf(get=proc_mem),
            **devices.capabilities(pd.groups.devices_enforcement()),
        }
        run = pd.run
        if run is not None and not run.exited.is_set():
            leaves["/system/uptime"] = Leaf(get=lambda: _uptime(run.pid))
        return leaves

    # -- console ----------------------------------------------------------------------------
    def read_console(self, pd: LinuxPD, since: int, timeout: float | None) -> tuple[int, bytes]:
        run = pd.run
        return pd.console.read(since, timeout, lambda: run is None or run.console_closed.is_set())

    def console_log(self, pd: LinuxPD) -> bytes:
        return pd.console.tail()

    # -- devices ----------------------------------------------------------------------------
    def list_devices(self) -> list[str]:
        return devices.assignable()

    def assigned_devices(self, pd: LinuxPD) -> list[str]:
        return [*PD_DEVICES, *sorted(pd.assigned)]

    def assign_device(self, pd: LinuxPD, device: str, mode: int = 3, own: bool = True) -> None:
        """Allow the node in the PD's devices cgroup, give it the PD's uid (own), and bind it into a running PD."""
        what = f"assign {device} to PD {pd.pd_id}"
        path = devices.check(device, what, pd.pd_id)
        previous, rule = pd.assigned.get(path), devices.rule(path, mode)
        if previous is not None:
            pd.groups.deny_device(devices.deny_rule(previous))
        pd.groups.allow_device(rule)
        taken = None
        try:
            if own and os.geteuid() == 0 and pd.ids is not None:
                owner = devices.take_owner(path, pd.ids.uid, pd.ids.gid, mode)
                taken = pd.owners.setdefault(path, owner)
            run = pd.run
            if previous is None and run is not None and not run.exited.is_set():
                devices.bind(run.pid, self._owner(pd), path, what, pd.pd_id)
        except BaseException:
            pd.groups.deny_device(devices.deny_rule(rule))
            if previous is not None:
                pd.groups.allow_device(previous)
            if taken is not None and previous is None:
                devices.give_back(path, pd.owners.pop(path))
            raise
        pd.assigned[path] = rule

    def unassign_device(self, pd: LinuxPD, device: str) -> None:
        """Deny the node first (no open gets through from here on), then remove it and give it back."""
        what = f"unassign {device} from PD {pd.pd_id}"
        rule = pd.assigned.get(device)
        if rule is not None:
            pd.groups.deny_device(devices.deny_rule(rule))
        run = pd.run
        if run is not None and not run.exited.is_set():
            devices.unbind(run.pid, self._owner(pd), device, what, pd.pd_id)
        pd.assigned.pop(device, None)
        owner = pd.owners.pop(device, None)
        if owner is not None:
            devices.give_back(device, owner)


    def close(self) -> None:
        self._monitor.close()
        if self._layout_held:
            self._layout_held = False
            cgroups.release_layout()
        ends, self._lifeline_w, self._lifeline_r = (self._lifeline_w, self._lifeline_r), -1, -1
        for end in ends:                # taken first: an interrupt must not close them twice
            if end >= 0:
                os.close(end)
