"""The Linux driver as bmid runs it (linux:///system): PDs that outlive bmid (bmi/drivers/keeping.py).

It differs from session mode's in these mechanisms:
- no lifeline: a PD does not die with the process that started it;
- every fd whose other end a running PD holds (console pipe, exit-status
  pipe, channel) and the sealed image memfd are also handed to the fd
  keeper (keeper.py), so a SIGKILL of bmid breaks none of them;
- adopt() rebuilds a LinuxPD from a stored record: the cgroups by name,
  the image from the keeper (re-hashed against the stored measurement),
  and the running init only if pid, start time and cgroup all match;
- the lock on each PD's host uid (uids.py) is kept too, so no manager
  hands that uid to another PD while bmid is down or after it restarts.
"""
from __future__ import annotations

import glob
import logging
import os
import threading
from typing import Any, Callable, Iterable, Mapping, Sequence

from ...errors import BMIError, ResourceError
from ...image import PDImage
from ...server.keeper import Keeper
from ...types import PDDescription, PDStatus
from ..base import ExitInfo, Progress
from ..keeping import Adopted, Keeping, image_key, kept_image, stored_measurement
from . import cgroups, devices, spawn, uids
from .driver import DEFAULT_PIDS_MAX, LinuxDriver, LinuxPD, Run, process_start
from .monitor import Monitor

log = logging.getLogger("bmi.bmid")


def _kept_exit(data: bytes) -> tuple[str, int] | None:
    """The exit record among the bytes the keeper read from a PD's exit-status pipe (b"": none)."""
    return spawn.parse_exit(data.split(b"\n")[0][:64])


def reopen_cgroups(name: str, pd_id: int) -> cgroups.PDCgroups | None:
    """The existing cgroups called `name` under this process's own cgroups (None if there are none)."""
    groups = [cgroups._Group(tree.version, os.path.join(tree.own, name), tree.controllers)
              for tree in cgroups._layout() if os.path.isdir(os.path.join(tree.own, name))]
    return cgroups.PDCgroups(name, pd_id, groups) if groups else None


class _KeepingMonitor(Monitor):
    """The driver's monitor, telling the driver about each console fd before it watches it."""

    def __init__(self, on_console_fd: Callable[[int], None]):
        super().__init__()
        self._on_console_fd = on_console_fd

    def watch_console(self, fd: int, on_data: Callable[[bytes], None]) -> None:
        self._on_console_fd(fd)
        super().watch_console(fd, on_data)


class SystemDriver(LinuxDriver, Keeping):
    """LinuxDriver(lifeline=False) whose PDs' fds are kept across bmid restarts."""

    def __init__(self, keeper: Keeper, on_exit: Callable[[int], None]):
        super().__init__(lifeline=False)
        self._monitor.close()
        self._monitor = _KeepingMonitor(self._keep_console)
        self._keeper = keeper
        self._exit_hook = on_exit
        self._starting = threading.local()
        # per PD: the run whose identity was last read, and that identity (reading /proc once per run)
        self._idents: dict[int, tuple[Run | None, dict[str, int] | None]] = {}

    def cgroup_name(self, pd_id: int) -> str:
        """Not the session prefix: a session manager's sweep must never take the empty groups of
        READY PDs that wait for a restarted bmid."""
        return f"bmid-{os.getpid()}-pd{pd_id}"

    # -- keeping ----------------------------------------------------------------------------
    def load(self, pd: LinuxPD, image: PDImage, banks: Sequence[str],
             progress: Progress | None) -> dict[str, bytes]:
        digests = super().load(pd, image, banks, progress)
        assert pd.image_fd is not None
        self._keeper.put(image_key(pd.pd_id, digests), pd.image_fd)
        return digests

    def start(self, pd: LinuxPD, config: Mapping[str, str], priority: int, *, progress: Progress | None = None,
              channel_fd: int = -1) -> None:
        self._starting.pd = pd
        try:
            super().start(pd, config, priority, progress=progress, channel_fd=channel_fd)
        finally:
            self._starting.pd = None

    def _take_ids(self, pd_id: int) -> uids.IdLease:
        ids = super()._take_ids(pd_id)
        if ids.fd >= 0:
            try:
                self._keeper.put(f"pd{pd_id}.uid", ids.fd)
            except BaseException:
                ids.release()
                raise
        return ids

    def _keep_console(self, console_r: int) -> None:
        """Called by start() (through the monitor) once the PD runs: keep its console and status pipes."""
        pd: LinuxPD | None = getattr(self._starting, "pd", None)
        if pd is None or pd.run is None:
            return                  # adopt() watches a console it took from the keeper
        self._keeper.put(f"pd{pd.pd_id}.console", console_r)
        self._keeper.put(f"pd{pd.pd_id}.status", pd.run.status_r)

    def _on_exit(self, pd: LinuxPD, run: Run) -> None:
        super()._on_exit(pd, run)
        self._exit_hook(pd.pd_id)

    def _exit_record(self, pd: LinuxPD, run: Run) -> tuple[str, int] | None:
        """Read through the keeper, which keeps the bytes: the record is never consumed before it is stored."""
        try:
            data = self._keeper.read(f"pd{pd.pd_id}.status")
        except ResourceError as e:
            log.warning("PD %d: reading its exit status through the fd keeper: %s", pd.pd_id, e)
            data = None
        if data is None:        # the keeper never had this pipe (or is gone): read our own end
            return super()._exit_record(pd, run)
        return _kept_exit(data)

    def destroy(self, pd: LinuxPD) -> None:
        super().destroy(pd)
        self._keeper.drop(f"pd{pd.pd_id}.")
        self._idents.pop(pd.pd_id, None)

    def record(self, pd: LinuxPD) -> dict[str, Any]:
        return {"cgroup": pd.groups.name, "archive": pd.archive, "pids_max": pd.pids_max,
                "ids": [pd.ids.uid, pd.ids.gid] if pd.ids is not None else None, "run": self.run_identity(pd),
                "device_rules": dict(pd.assigned),
                "device_owners": {path: [o.uid, o.gid, o.mode] for path, o in pd.owners.items()}}

    def run_identity(self, pd: LinuxPD) -> dict[str, int] | None:
        """What identifies the PD's running init for a later adoption (None when it is not running)."""
        run = pd.run
        cached = self._idents.get(pd.pd_id)
        if cached is not None and cached[0] is run and (cached[1] is None or not run.exited.is_set()):
            return cached[1]
        ident = None
        if run is not None and not run.exited.is_set():
            ident = {"pid": run.pid, "start": process_start(run.pid) or 0, "oom_base": run.oom_base}
        self._idents[pd.pd_id] = (run, ident)
        return ident

    def allocation_intent(self, pd_id: int) -> dict[str, Any]:
        return {"cgroup": self.cgroup_name(pd_id)}

    def roll_back_allocation(self, pd_id: int, intent: Mapping[str, Any]) -> None:
        groups = reopen_cgroups(intent["cgroup"], pd_id)
        if groups is not None:
            groups.destroy()
        self._keeper.drop(f"pd{pd_id}.uid")

    # -- adoption ---------------------------------------------------------------------------
    def adopt(self, pd_id: int, desc: PDDescription, record: dict[str, Any]) -> Adopted:
        """The cgroups by name, the image from the keeper, the init only if pid, start time and cgroup match."""
        groups, remade = cgroups.PDCgroups.reopen(record["cgroup"], pd_id=pd_id)
        pids_max = record.get("pids_max", DEFAULT_PIDS_MAX)
        if remade:      # (some) lost while bmid was away: a PD gets its limits back before anything runs
            self._limit(groups, desc.mem - record.get("lent", 0), record["cpus_max"], record["performance"],
                        record["priority"], pids_max)
        pd = LinuxPD(pd_id, desc, groups, pids_max=pids_max, archive=record.get("archive", False),
                     ids=self._kept_ids(pd_id, record.get("ids")), assigned=dict(record.get("device_rules", {})),
                     owners={path: devices.Owner(*o) for path, o in record.get("device_owners", {}).items()})
        if remade:      # the device rules went with the lost group: the assigned ones come back with the limits
            for rule in pd.assigned.values():
                groups.allow_device(rule)
        else:           # the kept group still checks them; on v2 this manager takes over its BPF program
            groups.keep_devices((*devices.BASE_RULES, *pd.assigned.values()))
        measurement = stored_measurement(record)
        if measurement:
            pd.image_fd = kept_image(self._keeper, pd_id, measurement)
        ident = record.get("run")
        pidfd = self._identify(ident, groups) if ident else None
        if pidfd is None:
            ended = self._ended_while_away(pd, ident) if ident else None
            groups.kill_all()           # whatever runs there is not the PD we know (a start rolled back)
            return Adopted(pd, None, ended, pd.image_fd is not None,
                           tuple(f"pd{pd_id}.{kind}" for kind in ("console", "status", "channel")))
        status_r = self._keeper.get(f"pd{pd_id}.status")
        console_r = self._keeper.get(f"pd{pd_id}.console")
        if status_r is None:
            status_r, w = os.pipe2(os.O_CLOEXEC)
            os.close(w)
        run = Run(ident["pid"], pidfd, status_r, ident.get("oom_base", 0))
        pd.run = run
        self._idents[pd_id] = (run, ident)
        self._watch(pd, run, console_r)
        live = PDStatus.PAUSED if groups.frozen() else PDStatus.RUNNING
        return Adopted(pd, live, None, pd.image_fd is not None)

    def _kept_ids(self, pd_id: int, ids: list[int] | None) -> uids.IdLease | None:
        """The PD's host uid as the keeper held it; else taken again if still free (None: a new one at start)."""
        if not ids:
            return None
        fd = self._keeper.get(f"pd{pd_id}.uid")
        if fd is not None:
            return self._ids.lease(ids[0], ids[1], fd)
        lease = self._ids.reclaim(ids[0])
        if lease is None:
            log.warning("adopt PD %d: its host uid %d was lost with the fd keeper and is now another PD's; "
                        "it gets a new one at its next start", pd_id, ids[0])
            return None
        if lease.fd >= 0:
            self._keeper.put(f"pd{pd_id}.uid", lease.fd)
        return lease

    @staticmethod
    def _identify(ident: dict[str, int], groups: cgroups.PDCgroups) -> int | None:
        """A pidfd on the recorded init if pid, start time and cgroup all match (never a recycled pid)."""
        pid = ident["pid"]
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return None
        # checked after pidfd_open: the pidfd pins the process, so a recycled pid cannot slip in after
        if process_start(pid) != ident["start"] or pid not in groups.pids():
            os.close(pidfd)
            return None
        return pidfd

    def _ended_while_away(self, pd: LinuxPD, ident: dict[str, int]) -> ExitInfo:
        """How a run that ended while bmid was down ended, from the exit-status pipe the keeper held."""
        record = _kept_exit(self._keeper.read(f"pd{pd.pd_id}.status") or b"")
        oom = pd.groups.oom_kills() > ident.get("oom_base", 0)
        if oom:
            return ExitInfo(PDStatus.CRASHED, None, "oom")
        if record is None:
            return ExitInfo(PDStatus.CRASHED, None, "the PD's init ended while bmid was down")
        if record[0] == "exit":
            return ExitInfo(PDStatus.SHUTDOWN, record[1], f"exited with status {record[1]} while bmid was down")
        return ExitInfo(PDStatus.CRASHED, None, f"killed by signal {record[1]} while bmid was down")


def leftover_cgroups(bmid_pids: Iterable[int]) -> list[str]:
    """The PD cgroups the bmids with these pids made that still exist (paths)."""
    found: list[str] = []
    try:
        trees = cgroups._layout()
    except BMIError:
        return found
    for tree in trees:
        for pid in bmid_pids:
            found.extend(glob.glob(os.path.join(tree.own, f"bmid-{pid}-pd*")))
    return sorted(found)
