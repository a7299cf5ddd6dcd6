"""Xen driver: a PD is a PV (or PVH) domain built by libxl from the measured image.

Mechanisms only, through bmi/drivers/xen/libxl.py: a domain is built
paused from libxl JSON (config.py) when the PD starts, its config
parameters are published read-only to the guest under
/local/domain/<domid>/bmi/config (spec 7.2.10), its console pty (from
xenconsoled) is read into a bounded buffer, and one monitor thread
watches @releaseDomain to see guests power off, reboot or crash.
SUSPENDED is a libxl save into a memfd and the domain's destruction;
RUNNING from SUSPENDED restores it.

Connections: Debian's Xen is built without XSM/FLASK, so the hypervisor
does not restrict grants or event channels between guests.  What this
driver enforces is only the rendezvous (open_rendezvous): a xenstore
directory that only the two allowed domains (and dom0) can read and
write.  /capability/connection-enforcement says exactly that:
"rendezvous".
"""
from __future__ import annotations

import fcntl
import logging
import os
import selectors
import threading
import time
import tty
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ...errors import BMIError, InvalidArgument, InvalidState, NotSupported, ResourceError
from ...image import PDImage
from ...integrity.measure import measure_into
from ...params import Leaf, Param
from ...types import PDDescription, PDStatus
from ..base import Driver, ExitInfo, HostResources, Progress
from ..console import Console
from .. import net
from . import config as xcfg
from . import image as ximage
from .libxl import PERM_NONE, PERM_READ, PERM_RW, Xen

log = logging.getLogger("bmi.xen")

CONSOLE_WAIT = 20.0             # seconds for xenconsoled to publish the guest's pty
DESTROY_WAIT = 10.0
CONNECTION_ENFORCEMENT = "rendezvous"
PCIBACK = "/sys/bus/pci/drivers/pciback"
NO_PASSTHROUGH = ("PCI passthrough is not supported by the Xen driver: it needs an IOMMU (VT-d or AMD-Vi) that "
                  "Xen enabled (the QEMU test rig has none), and this driver does not yet hand PCI functions to "
                  "domains through libxl")
NETWORK = ("veth: a vif into a dom0 bridge (/net/IFNAME = veth:BRIDGE, in IFNAME order; the guest names them "
           "itself, Linux eth0, eth1, ...); the guest sets its own address: /net/IFNAME/address and gateway are "
           "published in its xenstore home (bmi/config/net/IFNAME/...)")
NO_MACVLAN = "a Xen PD's interfaces are vifs into a dom0 bridge: use veth:BRIDGE (macvlan is for Linux PDs)"
DEVICE_CAPABILITIES = {
    "/capability/devices/assign": f"no: {NO_PASSTHROUGH}",
    "/capability/devices/network": NETWORK,
}
_RELEASE_TOKEN = "bmi-release"
_REASONS = {
    "poweroff": (PDStatus.SHUTDOWN, "the guest powered off"),
    "reboot": (PDStatus.SHUTDOWN, "the guest asked to reboot; request RESTARTING to boot it again"),
    "crash": (PDStatus.CRASHED, "the guest kernel crashed"),
    "watchdog": (PDStatus.CRASHED, "the guest's watchdog fired"),
    "soft_reset": (PDStatus.CRASHED, "the guest asked for a soft reset, which bmi does not do"),
}


@dataclass
class XenPD:
    pd_id: int
    desc: PDDescription
    name: str
    memory: int                                 # balloon target, bytes
    vcpus: int
    performance: int                            # percent of its vCPUs (credit2 cap)
    weight: int = xcfg.DEFAULT_WEIGHT
    boot: ximage.Boot | None = None
    domid: int | None = None
    json: str | None = None                     # the config the domain was built from (restore needs it)
    saved_fd: int | None = None                 # libxl save stream while SUSPENDED
    console: Console = field(default_factory=Console)
    console_fd: int | None = None
    stop_requested: bool = False
    expecting_exit: bool = False                # our own suspend: not an exit
    ended: ExitInfo | None = None
    exited: threading.Event = field(default_factory=threading.Event)
    destroyed: bool = False
    uuid: str = field(default_factory=lambda: str(uuid.uuid4()))   # the domain's, with domid its identity


class XenDriver(net.HostBridges, Driver):
    name = "xen"
    boot_params = ("/boot/cmdline", "/boot/type")
    capabilities = frozenset({PDStatus.PAUSED, PDStatus.RESTARTING, PDStatus.SUSPENDED})

    def __init__(self) -> None:
        self._xen = Xen()
        try:
            self._phys = self._xen.physinfo(what="open the Xen driver")
            self._xen.xs_watch("@releaseDomain", _RELEASE_TOKEN, what="open the Xen driver")
        except BaseException:
            self._xen.close()
            raise
        self._lock = threading.RLock()
        self._pds: dict[int, XenPD] = {}
        # Pairs of PDs (ids) some policy allows to connect, and the open
        # rendezvous of those pairs whose domains both run.
        self._allowed: dict[frozenset[int], set[tuple[int, int]]] = {}
        self._rendezvous: dict[frozenset[int], str] = {}
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._sel.register(self._xen.xs_fileno(), selectors.EVENT_READ, "xs")
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="bmi-xen-monitor", daemon=True)
        self._thread.start()

    # -- facts ------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        phys = self._xen.physinfo()
        return {
            "driver": self.name,
            "cpus": phys.cpus,
            "memory_total": phys.total_memory,
            "memory_free": phys.free_memory,
            "guest_types": "pv, pvh" if phys.pvh else "pv (this CPU has no HVM with HAP, so no PVH)",
            "capabilities": ", ".join(s.name for s in sorted(self.capabilities)),
            "connection_enforcement": CONNECTION_ENFORCEMENT,
            "domains": len(self._xen.domains()),
        }

    def host_resources(self) -> HostResources:
        phys = self._xen.physinfo(what="host resources")
        return HostResources(cpus=phys.cpus, memory=phys.free_memory)

    # -- allocation and images ----------------------------------------------------------------
    def allocate(self, pd_id: int, desc: PDDescription) -> XenPD:
        pd = XenPD(pd_id, desc, f"bmi-{os.getpid()}-pd{pd_id}", memory=desc.mem, vcpus=desc.cpu,
                   performance=desc.performance)
        with self._lock:
            self._pds[pd_id] = pd
        return pd

    def check_config(self, pd: XenPD, name: str, value: str) -> None:
        what = f"set_config_param {name} of PD {pd.pd_id}"
        if name == "/net" or name.startswith("/net/"):
            net.check_param(name, value, what, pd.pd_id)
            if name.count("/") == 2 and not value.startswith("veth:"):
                raise NotSupported(f"{what}: {NO_MACVLAN}", pd_id=pd.pd_id)
        if xcfg.xenstore_name(name) is None:
            raise InvalidArgument(f"{what}: config parameters are published in the guest's xenstore home, whose "
                                  f"names allow only letters, digits, '_', '-' and '@' between the '/'",
                                  pd_id=pd.pd_id)
        if len(value.encode()) > xcfg.MAX_XS_VALUE:
            raise InvalidArgument(f"{what}: {len(value.encode())} bytes is over xenstore's {xcfg.MAX_XS_VALUE}",
                                  pd_id=pd.pd_id)
        if name == "/boot/cmdline":
            ximage.check_cmdline(value, what=what, error=InvalidArgument)
        elif name == "/boot/type":
            if value not in xcfg.GUEST_TYPES:
                raise InvalidArgument(f"{what}: {value!r} is not one of {', '.join(xcfg.GUEST_TYPES)}",
                                      pd_id=pd.pd_id)
            if value == "pvh" and not self._phys.pvh:
                raise NotSupported(f"{what}: this CPU has no HVM with HAP, so Xen cannot run PVH guests here",
                                   pd_id=pd.pd_id)

    def load(self, pd: XenPD, image: PDImage, banks: Sequence[str],
             progress: Progress | None) -> dict[str, bytes]:
        what = f"setup_pd of PD {pd.pd_id}"
        fd = ximage.memfd(f"bmi-xen-pd{pd.pd_id}", what=what, pd_id=pd.pd_id)
        try:
            digests = measure_into(image, fd, banks=banks, progress=progress, pd_id=pd.pd_id)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, ximage.SEALS)
        except BaseException:
            os.close(fd)
            raise
        self._boot_from(pd, fd, digests, what)
        return digests

    def _boot_from(self, pd: XenPD, fd: int, digests: Mapping[str, bytes], what: str) -> None:
        """The sealed, measured image (fd, taken over) becomes what the PD boots next."""
        boot = ximage.prepare(fd, what=what, pd_id=pd.pd_id)
        old, pd.boot = pd.boot, boot
        self._drop_saved(pd)
        if old is not None:
            old.close()

    # -- running ----------------------------------------------------------------------------
    def start(self, pd: XenPD, config: Mapping[str, str], priority: int, *, progress: Progress | None = None) -> None:
        """Build and boot the domain (load() already placed the kernel: nothing is unpacked, progress is not called)."""
        what = f"start of PD {pd.pd_id}"
        if pd.boot is None:
            raise InvalidState(f"{what}: no image loaded", pd_id=pd.pd_id)
        self._discard_domain(pd, what)
        pd.weight = xcfg.priority_weight(priority)
        if pd.saved_fd is not None:
            self._restore(pd, what, config)
            return
        guest_type = config.get("/boot/type", "pv")
        bridges = self._bridges(pd, config, what)
        pd.json = xcfg.domain_json(
            name=pd.name, guest_type=guest_type, memory=pd.memory, max_memory=pd.desc.mem, vcpus=pd.vcpus,
            max_vcpus=pd.desc.cpu, weight=pd.weight, cap=xcfg.performance_cap(pd.performance, pd.vcpus), kernel=pd.boot.kernel_path,
            ramdisk=pd.boot.ramdisk_path, cmdline=xcfg.cmdline(pd.boot.cmdline, config.get("/boot/cmdline")),
            uuid=pd.uuid, bridges=bridges)
        domid = self._xen.create(pd.json, what=what, pd_id=pd.pd_id)
        self._run(pd, domid, what, config)

    @staticmethod
    def _bridges(pd: XenPD, config: Mapping[str, str], what: str) -> tuple[str, ...]:
        """The dom0 bridges of the PD's /net/... interfaces, checked to exist (libxl's hotplug script would
        fail the whole domain build, less clearly)."""
        bridges = tuple(iface.link for iface in net.interfaces(dict(config)))
        for bridge in bridges:
            if not net.exists(bridge):
                raise InvalidArgument(f"{what}: there is no bridge {bridge!r} in dom0 (bmi net create makes "
                                      f"bridges)", pd_id=pd.pd_id)
        return bridges

    def _restore(self, pd: XenPD, what: str, config: Mapping[str, str]) -> None:
        assert pd.saved_fd is not None and pd.json is not None
        os.lseek(pd.saved_fd, 0, os.SEEK_SET)
        domid = self._xen.restore(pd.json, pd.saved_fd, what=what, pd_id=pd.pd_id)
        self._drop_saved(pd)
        self._run(pd, domid, what, config)

    def _run(self, pd: XenPD, domid: int, what: str, config: Mapping[str, str]) -> None:
        """The domain exists, paused: publish config, attach the console, let it run."""
        with self._lock:
            pd.domid, pd.ended, pd.stop_requested, pd.expecting_exit = domid, None, False, False
            pd.exited.clear()
        try:
            self._publish(pd, domid, config, what)
            self._attach_console(pd, domid, what)
            self._sync_rendezvous()
            self._xen.unpause(domid, what=what, pd_id=pd.pd_id)
        except BaseException:
            self._discard_domain(pd, what)
            raise

    def _publish(self, pd: XenPD, domid: int, config: Mapping[str, str], what: str) -> None:
        """Config parameters, readable (not writable) by the guest: spec 7.2.10."""
        home = f"/local/domain/{domid}/bmi"
        guest_reads = [(0, PERM_NONE), (domid, PERM_READ)]
        nodes = {f"{home}/pd-id": str(pd.pd_id)}
        nodes.update({f"{home}/config/{xcfg.xenstore_name(k)}": v for k, v in config.items()})
        self._xen.xs_mkdir(home, what=what, pd_id=pd.pd_id)
        self._xen.xs_set_perms(home, guest_reads, what=what, pd_id=pd.pd_id)
        for path, value in nodes.items():
            self._xen.xs_write(path, value, what=what, pd_id=pd.pd_id)
        for path in self._subtree(home, what, pd.pd_id):
            self._xen.xs_set_perms(path, guest_reads, what=what, pd_id=pd.pd_id)

    def _subtree(self, path: str, what: str, pd_id: int) -> list[str]:
        out = []
        for child in self._xen.xs_directory(path, what=what, pd_id=pd_id):
            out.append(f"{path}/{child}")
            out.extend(self._subtree(f"{path}/{child}", what, pd_id))
        return out

    def _attach_console(self, pd: XenPD, domid: int, what: str) -> None:
        """Open the guest's pty before it runs, so no output is lost."""
        deadline = time.monotonic() + CONSOLE_WAIT
        while True:
            try:
                path = self._xen.console_tty(domid, what=what, pd_id=pd.pd_id)
                break
            except BMIError as e:
                if time.monotonic() > deadline:
                    pd.console.append(f"[bmi: no console: xenconsoled published no pty: {e}]\n".encode())
                    return
                time.sleep(0.05)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            pd.console.append(f"[bmi: no console: cannot open {path}: {e.strerror}]\n".encode())
            return
        tty.setraw(fd)
        with self._lock:
            self._close_console(pd)
            pd.console_fd = fd
            self._sel.register(fd, selectors.EVENT_READ, pd)
        self._wake()

    def pause(self, pd: XenPD) -> None:
        self._xen.pause(self._domid(pd, "pause"), what=f"pause of PD {pd.pd_id}", pd_id=pd.pd_id)

    def resume(self, pd: XenPD) -> None:
        self._xen.unpause(self._domid(pd, "resume"), what=f"resume of PD {pd.pd_id}", pd_id=pd.pd_id)

    def suspend(self, pd: XenPD) -> None:
        what = f"suspend of PD {pd.pd_id}"
        domid = self._domid(pd, "suspend")
        fd = ximage.memfd(f"bmi-xen-save-pd{pd.pd_id}", what=what, pd_id=pd.pd_id)
        pd.expecting_exit = True
        try:
            info = self._xen.info(domid, what=what, pd_id=pd.pd_id)
            if info is not None and info.state == "paused":
                self._xen.unpause(domid, what=what, pd_id=pd.pd_id)   # a paused guest cannot suspend itself
            self._xen.suspend(domid, fd, what=what, pd_id=pd.pd_id)
        except BaseException:
            os.close(fd)
            pd.expecting_exit = False
            raise
        self._discard_domain(pd, what)
        pd.saved_fd = fd

    def stop(self, pd: XenPD, grace: float) -> ExitInfo:
        what = f"shutdown of PD {pd.pd_id}"
        if pd.domid is None:
            raise InvalidState(f"{what}: no domain is running", pd_id=pd.pd_id)
        pd.stop_requested = True
        if not pd.exited.is_set():
            try:
                info = self._xen.info(pd.domid, what=what, pd_id=pd.pd_id)
                if info is not None and info.state == "paused":
                    self._xen.unpause(pd.domid, what=what, pd_id=pd.pd_id)
                self._xen.shutdown(pd.domid, what=what, pd_id=pd.pd_id)
            except BMIError as e:
                # e.g. a guest without PV shutdown support: the grace period ends it
                log.info("%s: %s", what, e)
            if not pd.exited.wait(grace):
                self._end(pd, ExitInfo(PDStatus.SHUTDOWN, None, "shutdown requested; destroyed after the "
                                       f"{grace:g} s grace period"))
        assert pd.ended is not None
        return pd.ended

    def exit_info(self, pd: XenPD) -> ExitInfo | None:
        return pd.ended

    def wait(self, pd: XenPD, timeout: float | None) -> ExitInfo | None:
        if pd.domid is None and pd.ended is None:
            return None
        pd.exited.wait(timeout)
        return pd.ended

    def destroy(self, pd: XenPD) -> None:
        if pd.destroyed:
            return
        with self._lock:
            for pair in [p for p in self._allowed if pd.pd_id in p]:
                del self._allowed[pair]
        self._discard_domain(pd, f"destroy of PD {pd.pd_id}")
        self._sync_rendezvous()
        self._drop_saved(pd)
        if pd.boot is not None:
            pd.boot.close()
            pd.boot = None
        with self._lock:
            self._pds.pop(pd.pd_id, None)
        pd.destroyed = True

    # -- domain ends --------------------------------------------------------------------------
    def _end(self, pd: XenPD, ended: ExitInfo) -> None:
        """Record how the run ended (first writer wins) and remove the domain."""
        with self._lock:
            if pd.ended is None and pd.domid is not None:
                pd.ended = ended
        self._discard_domain(pd, f"end of PD {pd.pd_id}")
        pd.exited.set()
        pd.console.poke()

    def _discard_domain(self, pd: XenPD, what: str) -> None:
        with self._lock:
            domid, pd.domid = pd.domid, None
            self._close_console(pd)
        if domid is None:
            return
        self._sync_rendezvous()
        self._xen.destroy(domid, what=what, pd_id=pd.pd_id)
        deadline = time.monotonic() + DESTROY_WAIT
        while self._xen.info(domid, what=what, pd_id=pd.pd_id) is not None:
            if time.monotonic() > deadline:
                raise ResourceError(f"{what}: domain {domid} still exists {DESTROY_WAIT:g} s after destroy",
                                    pd_id=pd.pd_id)
            time.sleep(0.05)

    def _drop_saved(self, pd: XenPD) -> None:
        saved, pd.saved_fd = pd.saved_fd, None      # taken before the close: never closed twice
        if saved is not None:
            os.close(saved)

    def _close_console(self, pd: XenPD) -> None:
        fd, pd.console_fd = pd.console_fd, None
        if fd is not None:
            try:
                self._sel.unregister(fd)
            except (KeyError, ValueError):
                pass
            os.close(fd)

    def _domid(self, pd: XenPD, verb: str) -> int:
        if pd.domid is None:
            raise InvalidState(f"{verb} of PD {pd.pd_id}: no domain is running", pd_id=pd.pd_id)
        return pd.domid

    # -- the monitor thread -------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._closing:
            for key, _ in self._sel.select(1.0):
                if key.data is None:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                elif key.data == "xs":
                    self._on_xenstore()
                else:
                    self._on_console(key.data, key.fd)

    def _on_console(self, pd: XenPD, fd: int) -> None:
        with self._lock:
            if pd.console_fd != fd:
                return
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""          # EIO: xenconsoled closed the pty (domain gone)
            if not data:
                self._close_console(pd)
                return
        pd.console.append(data)

    def _on_xenstore(self) -> None:
        try:
            events = self._xen.xs_watch_events()
        except BMIError as e:
            log.warning("xenstore watch: %s", e)
            return
        if not any(token == _RELEASE_TOKEN for _, token in events):
            return
        with self._lock:
            running = [pd for pd in self._pds.values() if pd.domid is not None and not pd.expecting_exit]
        for pd in running:
            domid = pd.domid
            if domid is None:
                continue
            try:
                info = self._xen.info(domid, what=f"watch PD {pd.pd_id}", pd_id=pd.pd_id)
            except BMIError as e:
                log.warning("%s", e)
                continue
            if info is not None and info.state not in ("shutdown", "dying"):
                continue
            if pd.expecting_exit:
                continue
            reason = info.shutdown_reason if info is not None else None
            status, how = _REASONS.get(reason or "", (PDStatus.CRASHED, "the domain disappeared"))
            if pd.stop_requested and status is PDStatus.SHUTDOWN:
                how = f"shutdown requested; {how}"
            try:
                self._end(pd, ExitInfo(status, None, how))
            except BMIError as e:
                log.warning("%s", e)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    # -- resources --------------------------------------------------------------------------
    def set_priority(self, pd: XenPD, priority: int) -> None:
        pd.weight = xcfg.priority_weight(priority)
        if pd.domid is not None:
            self._xen.set_sched(pd.domid, weight=pd.weight, what=f"set_priority of PD {pd.pd_id}", pd_id=pd.pd_id)

    def set_memory(self, pd: XenPD, nbytes: int) -> None:
        if pd.domid is not None:
            self._xen.set_memory(pd.domid, nbytes, what=f"set /system/memory/current of PD {pd.pd_id}",
                                 pd_id=pd.pd_id)
        pd.memory = nbytes

    def memory_limit(self, pd: XenPD) -> int:
        if pd.domid is not None:
            return self._xen.memory_target(pd.domid, what=f"get /system/memory/current of PD {pd.pd_id}",
                                           pd_id=pd.pd_id)
        return pd.memory

    def memory_used(self, pd: XenPD) -> int:
        info = self._live_info(pd, "get /system/memory/used")
        return info.memory if info is not None else 0

    def set_cpus(self, pd: XenPD, count: int) -> int:
        if pd.domid is not None:
            self._xen.set_vcpus(pd.domid, count, pd.desc.cpu, what=f"set /system/cpu/current of PD {pd.pd_id}",
                                pd_id=pd.pd_id)
        pd.vcpus = count
        self.set_performance(pd, pd.performance)
        return count

    def cpus(self, pd: XenPD) -> int:
        return pd.vcpus

    def set_performance(self, pd: XenPD, percent: int) -> None:
        pd.performance = percent
        if pd.domid is not None:
            self._xen.set_sched(pd.domid, cap=xcfg.performance_cap(percent, pd.vcpus), what=f"set /system/cpu/performance of PD {pd.pd_id}",
                                pd_id=pd.pd_id)

    def _live_info(self, pd: XenPD, what: str):
        domid = pd.domid
        if domid is None:
            return None
        return self._xen.info(domid, what=f"{what} of PD {pd.pd_id}", pd_id=pd.pd_id)

    def extra_params(self, pd: XenPD, config: Mapping[str, str]) -> dict[str, Param]:
        def online() -> str:
            info = self._live_info(pd, "get /system/cpu/online")
            return str(info.vcpus_online if info is not None else 0)

        def weight() -> str:
            if pd.domid is None:
                return str(pd.weight)
            return str(self._xen.sched(pd.domid, what=f"get /system/cpu/weight of PD {pd.pd_id}",
                                       pd_id=pd.pd_id)[1])

        return {
            **DEVICE_CAPABILITIES,
            "/capability/connection-enforcement": CONNECTION_ENFORCEMENT,
            "/system/cpu/online": Leaf(get=online),
            "/system/cpu/weight": Leaf(get=weight),
            "/system/xen/domid": Leaf(get=lambda: "" if pd.domid is None else str(pd.domid)),
            "/system/xen/name": pd.name,
            "/system/image/format": pd.boot.fmt if pd.boot is not None else "none",
        }

    # -- devices: PCI passthrough needs an IOMMU; said instead of ignored ------------------------------
    def list_devices(self) -> list[str]:
        """PCI functions dom0 set aside for guests (bound to pciback): what passthrough would hand out."""
        try:
            return sorted(f"pci:{bdf}" for bdf in os.listdir(PCIBACK) if bdf.count(":") == 2)
        except OSError:
            return []

    def assigned_devices(self, pd: XenPD) -> list[str]:
        return []

    def assign_device(self, pd: XenPD, device: str, mode: int = 3, own: bool = True) -> None:
        raise NotSupported(f"assign {device!r} to PD {pd.pd_id}: {NO_PASSTHROUGH}", pd_id=pd.pd_id)

    def unassign_device(self, pd: XenPD, device: str) -> None:
        raise NotSupported(f"unassign {device!r} from PD {pd.pd_id}: {NO_PASSTHROUGH}", pd_id=pd.pd_id)

    # -- connections: the rendezvous only (see the module docstring) ---------------------------
    def open_rendezvous(self, pd: XenPD, peer: XenPD) -> str:
        """A xenstore directory only the two PDs' domains (and dom0) may read and write; returns its path."""
        what = f"open rendezvous of PD {pd.pd_id} with PD {peer.pd_id}"
        a, b = self._domid(pd, what), self._domid(peer, what)
        path = f"/local/domain/0/bmi/rendezvous/{min(a, b)}-{max(a, b)}"
        self._xen.xs_mkdir(path, what=what, pd_id=pd.pd_id)
        self._xen.xs_set_perms(path, [(0, PERM_NONE), (a, PERM_RW), (b, PERM_RW)], what=what, pd_id=pd.pd_id)
        return path

    def close_rendezvous(self, path: str) -> None:
        self._xen.xs_rm(path, what=f"close rendezvous {path}")

    def connections_changed(self, pd: XenPD, peer: XenPD | None, policies: Sequence[Any]) -> None:
        """Without XSM the hypervisor guards only the rendezvous: open it while a policy allows the pair."""
        if peer is None:
            return                      # PD 0 (dom0) reaches every guest anyway
        pair = frozenset((pd.pd_id, peer.pd_id))
        with self._lock:
            directions = self._allowed.setdefault(pair, set())
            directions.discard((pd.pd_id, peer.pd_id))
            if policies:
                directions.add((pd.pd_id, peer.pd_id))
            if not directions:
                del self._allowed[pair]
        self._sync_rendezvous()

    def _sync_rendezvous(self) -> None:
        """Open the rendezvous of every allowed pair whose domains run; close every other."""
        with self._lock:
            running = {i for i, x in self._pds.items() if x.domid is not None}
            wanted = {pair for pair in self._allowed if pair <= running}
            to_close = [(pair, path) for pair, path in self._rendezvous.items() if pair not in wanted]
            to_open = [pair for pair in wanted if pair not in self._rendezvous]
            for pair, path in to_close:
                del self._rendezvous[pair]
            for pair in to_open:
                a, b = sorted(pair)
                self._rendezvous[pair] = self.open_rendezvous(self._pds[a], self._pds[b])
        for _, path in to_close:
            self.close_rendezvous(path)

    def rendezvous_path(self, pd: XenPD, peer: XenPD) -> str | None:
        """Where the pair meets while both run and a policy allows them (None otherwise)."""
        with self._lock:
            return self._rendezvous.get(frozenset((pd.pd_id, peer.pd_id)))

    # -- console ----------------------------------------------------------------------------
    def read_console(self, pd: XenPD, since: int, timeout: float | None) -> tuple[int, bytes]:
        return pd.console.read(since, timeout, lambda: pd.domid is None)

    def console_log(self, pd: XenPD) -> bytes:
        return pd.console.tail()

    def close(self) -> None:
        if self._closing:
            return
        with self._lock:
            pds = list(self._pds.values())
        for pd in pds:
            self.destroy(pd)
        self._closing = True
        self._wake()
        self._thread.join(5)
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._xen.close()
