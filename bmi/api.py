"""PDManagement / PDController: the BMI v0.1 semantics, written once.

Every driver gets the same state machine, argument checks, parameter tree,
connection policy and integrity calls from here; a driver only supplies
mechanisms (bmi/drivers/base.py).  The spec's NULL returns become typed
exceptions whose messages say what was asked, of which PD, and why.
"""
from __future__ import annotations

import functools
import hmac
import logging
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from .channel import protocol as wire
from .channel.connections import Registry, lines as connection_lines
from .checks import (check_bytes, check_int, check_integrity_policy, check_pd_name, check_policies, check_progress,
                     check_setup)
from .drivers.base import Driver, ExitInfo, Progress
from .errors import (BMIError, InvalidArgument, InvalidState, NoSuchDomain, NotSupported,
                     PermissionDenied, ResourceError)
from .params import Leaf, Param, ParamTree, normalize, parse_allow, parse_int, read
from .types import (ConnectionIntegrityPolicy, ConnectionPolicy, ConnectionType, IntegrityPolicy,
                    IntegrityReport, PDDescription, PDStatus, RuntimeCapability)

if TYPE_CHECKING:
    from .integrity.keys import AttestationKey

log = logging.getLogger("bmi")

VERSION = 0x00000001
MANAGER_PD = 0
MIN_MEMORY = 4 * 1024 * 1024          # below this not even a static binary's stack fits
MAX_NONCE = 64
DEFAULT_SHUTDOWN_GRACE = 5.0
MAX_PRIORITY = 10                     # spec 7.2.2: -10..+10; higher runs more (Linux nice = -priority)
#: Bytes (UTF-8) of one PD's config parameters, names and values: a PD sets its children's, and bmid writes a
#: PD's whole record at each change of it (18 MB of config made each such change stall bmid 0.3 s).
MAX_PD_CONFIG = 256 * 1024
#: What a PD's controller hands it and it hands its children: a child never gets more than its parent has
#: (PD 0's are the host's).  "priority" is set_priority; the others are runtime parameters.
LIMITS = ("priority", "/system/cpu/current", "/system/cpu/performance", "/system/pids/max")
_ENDED = (PDStatus.SHUTDOWN, PDStatus.CRASHED)
_LIVE = (PDStatus.RUNNING, PDStatus.PAUSED)
_CAPABILITY_PARAMS = {
    PDStatus.PAUSED: ("pause",),
    PDStatus.RESTARTING: ("restart",),
    PDStatus.SUSPENDED: ("suspend", "resume"),
}


def _whole_number(value: object) -> int | None:
    """A decimal string's value, else None (the parameter's own setter then says what is wrong)."""
    try:
        return int(value, 10) if isinstance(value, str) else None
    except ValueError:
        return None


def _coerce_status(status: object, pd_id: int) -> PDStatus:
    """Accept a PDStatus, its int value, or its name (the /capability/... values)."""
    try:
        if isinstance(status, PDStatus):
            return status
        if isinstance(status, str):
            return PDStatus[status.strip().upper()]
        if isinstance(status, int) and not isinstance(status, bool):
            return PDStatus(status)
    except (KeyError, ValueError):
        pass
    raise InvalidArgument(f"request_status_change of PD {pd_id}: {status!r} is not a PDStatus", pd_id=pd_id)


@dataclass
class _PD:
    """What the layer knows of one PD; only api.py changes it."""

    pd_id: int
    desc: PDDescription
    cpus_max: int
    handle: Any
    status: PDStatus = PDStatus.ALLOCATED
    priority: int = 0
    config: dict[str, str] = field(default_factory=dict)
    policies: dict[int, list[ConnectionPolicy]] = field(default_factory=dict)
    measurement: dict[str, bytes] = field(default_factory=dict)
    performance: int = 100
    ended: ExitInfo | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)
    parent: int = 0             # the PD that created it (0: the manager)
    devices: dict[str, bool] = field(default_factory=dict)     # host devices assigned to it -> shared
    lent: int = 0               # memory (bytes) handed to its child PDs


class PDManagement:
    """Spec 7.1: the manager of protection domains (usable as a context manager)."""

    def __init__(self, driver: Driver, uri: str, *, integrity: Callable[[], Any] | None = None,
                 registry: Callable[[Callable[[int], None]], Registry] = Registry):
        self._driver = driver
        self.uri = uri
        self._pds: dict[int, _PD] = {}
        self._children: dict[int, set[int]] = {}    # parent id -> its children's ids, kept with _pds
        self._destroyed: set[int] = set()
        self._next_id = 1
        self._lock = threading.RLock()
        self._closed = False
        self._integrity_service: Any = None
        self._integrity_error: BaseException | None = None
        # `registry` is given the callback for a queued connection; bmid's keeps connections across restarts
        self._registry = registry(self._incoming)
        self._channel_server: Any = None
        self._networks: dict[str, dict[str, Any]] = {}     # host networks made through this manager (by name)
        #: Seconds a PD gets to end after SHUTDOWN/RESTARTING before it is killed.
        self.shutdown_grace = DEFAULT_SHUTDOWN_GRACE
        self._finalizer = weakref.finalize(self, PDManagement._release, driver, self._pds)
        if integrity is not None:
            # Spec 6.3.1: the layer measures itself into the TVL PCR when it starts.
            # Without a TPM the manager still works; integrity calls then say why not.
            try:
                self._integrity_service = integrity()
            except BMIError as e:
                self._integrity_error = e

    # -- spec 7.1 -------------------------------------------------------------------------
    def get_version(self) -> int:
        return VERSION

    def allocate_pd(self, desc: PDDescription) -> "PDController":
        return PDController(self, self._allocate(desc, MANAGER_PD))

    def _allocate(self, desc: PDDescription, parent: int) -> int:
        """A new PD; one created by a PD (parent != 0) takes its memory out of the parent's."""
        self._check_open("allocate_pd")
        if not isinstance(desc, PDDescription):
            raise InvalidArgument(f"allocate_pd: expected a PDDescription, got {type(desc).__name__}")
        mem = check_int(desc.mem, "allocate_pd: PDDescription.mem", None)
        cpu = check_int(desc.cpu, "allocate_pd: PDDescription.cpu", None)
        perf = check_int(desc.performance, "allocate_pd: PDDescription.performance", None)
        host = self._driver.host_resources()
        if mem < MIN_MEMORY:
            raise InvalidArgument(f"allocate_pd: mem={mem} bytes is below the minimum of {MIN_MEMORY}")
        if mem > host.memory:
            raise ResourceError(f"allocate_pd: mem={mem} bytes is more than the host can give ({host.memory})")
        if cpu < 1:
            raise InvalidArgument(f"allocate_pd: cpu={cpu}: a PD needs at least one CPU")
        if not 1 <= perf <= 100:
            raise InvalidArgument(f"allocate_pd: performance={perf} is outside 1..100 (percent of its CPUs)")
        # Spec 7.5.6: no guarantee on the CPU count; we clamp to what the host has.
        cpus_max = min(cpu, host.cpus)
        if parent != MANAGER_PD:
            return self._allocate_child(desc, PDDescription(mem, cpus_max, perf), self._pd(parent, "allocate_pd"))
        return self._allocate_with(desc, PDDescription(mem, cpus_max, perf), MANAGER_PD)

    def _allocate_with(self, desc: PDDescription, actual: PDDescription, parent: int) -> int:
        with self._lock:
            pd_id = self._next_id
            self._next_id += 1
        handle = self._driver.allocate(pd_id, actual)
        with self._lock:
            self._add(_PD(pd_id, desc, actual.cpu, handle, performance=actual.performance, parent=parent))
        return pd_id

    def _add(self, pd: _PD) -> None:
        """Put pd in _pds and under its parent (the caller holds the lock)."""
        self._pds[pd.pd_id] = pd
        self._children.setdefault(pd.parent, set()).add(pd.pd_id)

    def _children_of(self, pd_id: int) -> list[int]:
        """The ids of pd_id's children, in id order (the caller holds the lock).  From an index, not a scan of
        every PD: set_priority alone asks for them three times, and bmid may hold a thousand PDs."""
        return sorted(self._children.get(pd_id, ()))

    def _allocate_child(self, desc: PDDescription, actual: PDDescription, parent: _PD) -> int:
        """A task tree as on L4: the child's memory leaves the parent's limit until the child is destroyed."""
        what = f"allocate_pd by PD {parent.pd_id}"
        self._check_limit(parent.pd_id, "/system/cpu/current", actual.cpu, f"{what}: cpu")
        self._check_limit(parent.pd_id, "/system/cpu/performance", actual.performance, f"{what}: performance")
        with parent.lock:
            left = self._driver.memory_limit(parent.handle)
            if actual.mem > left - MIN_MEMORY:
                raise ResourceError(f"{what}: mem={actual.mem} bytes is more than the parent has left to give "
                                    f"({max(0, left - MIN_MEMORY)} of its {left}, keeping {MIN_MEMORY} for "
                                    f"itself)", pd_id=parent.pd_id)
            self._driver.set_memory(parent.handle, left - actual.mem)
            try:
                pd_id = self._allocate_with(desc, actual, parent.pd_id)
            except BaseException:
                self._driver.set_memory(parent.handle, left)
                raise
            parent.lent += actual.mem
        self._clamp_children(parent.pd_id, LIMITS, only=pd_id)
        return pd_id

    # -- limits: a child never gets more than its parent has ------------------------------------------
    def _limit(self, pd_id: int, name: str) -> int | None:
        """PD pd_id's own value of one of LIMITS (PD 0: the host's); None where the driver has no such limit."""
        if name == "priority":
            return MAX_PRIORITY if pd_id == MANAGER_PD else self._pd(pd_id, "priority").priority
        value = read(PDController(self, pd_id)._tree(name).leaves.get(name))
        return int(value) if value is not None else None

    def _check_limit(self, parent: int, name: str, asked: int, what: str) -> None:
        """Refuse giving a child of `parent` more of a limit than `parent` has itself (the host, for PD 0)."""
        bound = self._limit(parent, name)
        if bound is None or asked <= bound:
            return
        if parent == MANAGER_PD:
            raise InvalidArgument(f"{what}: {asked} is above what the host has ({name} {bound})")
        raise PermissionDenied(f"{what}: {asked} is above its parent PD {parent}'s own {name} ({bound}); a PD "
                               f"gives its children at most what it has", pd_id=parent)

    def _check_grants(self, parent: int, name: str, value: str, what: str) -> None:
        """A config value that grants powers (Linux capabilities) grants a child none its parent lacks."""
        asked = self._driver.config_grants(name, value)
        if asked is None or parent == MANAGER_PD:
            return
        own = self._pd(parent, what).config.get(name, "")
        if asked & ~self._driver.config_grants(name, own):
            raise PermissionDenied(f"{what}: {value!r} grants more than its parent PD {parent}'s own {name} "
                                   f"({own!r}); a PD gives its children at most what it has", pd_id=parent)

    def _set_limit(self, pd_id: int, name: str, value: int) -> None:
        if name == "priority":
            pd = self._pd(pd_id, "set_priority")
            with pd.lock:
                self._driver.set_priority(pd.handle, value)
                pd.priority = value
        else:
            PDController(self, pd_id)._tree(name).set(name, str(value))

    def _clamp_children(self, pd_id: int, names: Sequence[str], only: int | None = None) -> None:
        """Bring pd_id's children (or just `only`) down to pd_id's own limits, and theirs in turn.

        Runs when a PD is allocated (its defaults, e.g. 1024 pids, may be above its
        parent's) and when a PD's limit was lowered.
        """
        with self._lock:
            children = [c for c in self._children_of(pd_id) if only in (None, c)]
        for name in names:
            bound = self._limit(pd_id, name)
            if bound is None:
                continue
            for child in children:
                value = self._limit(child, name)
                if value is not None and value > bound:
                    log.info("PD %d: %s lowered from %d to its parent PD %d's %d", child, name, value, pd_id, bound)
                    self._set_limit(child, name, bound)
                    self._clamp_children(child, (name,))

    def scoped(self, caller: int) -> "CallerScope":
        """The manager as PD `caller` sees it over its channel (every call runs as that PD)."""
        return CallerScope(self, caller)

    def _controls(self, caller: int, pd_id: int) -> bool:
        """Whether `caller` may control pd_id: the manager all, a PD itself and its descendants."""
        if caller == MANAGER_PD:
            return True
        with self._lock:
            while pd_id != MANAGER_PD:
                if pd_id == caller:
                    return True
                pd = self._pds.get(pd_id)
                if pd is None:
                    return False
                pd_id = pd.parent
        return False

    def channels(self) -> Any:
        """The server of the PD channels, started with the first PD that runs."""
        with self._lock:
            if self._channel_server is None:
                from .channel.dispatch import Dispatcher
                from .channel.server import ChannelServer
                self._channel_server = ChannelServer(Dispatcher(self.scoped), self._registry)
            return self._channel_server

    def _incoming(self, pd_id: int) -> None:
        """A connection was queued for pd_id: its channel answers a waiting accept."""
        if self._channel_server is not None:
            self._channel_server.incoming(pd_id)

    def get_controller(self, pd_id: int | None = None) -> "PDController":
        self._check_open("get_controller")
        if pd_id is None:
            return PDController(self, MANAGER_PD)
        pd_id = check_int(pd_id, "get_controller: pd_id", None)
        if pd_id != MANAGER_PD:
            self._pd(pd_id, "get_controller")
        return PDController(self, pd_id)

    def list_pd(self) -> list[int]:
        self._check_open("list_pd")
        with self._lock:
            return [MANAGER_PD, *sorted(self._pds)]

    def get_device_manager(self) -> "DeviceManager":
        self._check_open("get_device_manager")
        return DeviceManager(self)

    # -- integrity on the manager (design.md) -------------------------------------------------
    def seal_credentials(self, policy: IntegrityPolicy, secret: bytes) -> bytes:
        """Seal `secret` for PDs meeting `policy` on this machine's TPM."""
        check_integrity_policy(policy, "seal_credentials", None)
        return self._integrity("seal_credentials").seal(policy, check_bytes(secret, "seal_credentials: secret", None))

    def get_storage_public(self) -> bytes:
        """The TPM storage key's public part, for bmi.wrap_credentials off the machine."""
        return self._integrity("get_storage_public").storage_public()

    def get_attestation_key(self) -> AttestationKey:
        """The TPM attestation key (.pem, .fingerprint) a verifier pins for bmi.verify_report(ak=...)."""
        return self._integrity("get_attestation_key").attestation_key()

    def layer_info(self) -> dict[str, Any]:
        """What the layer is and can do (driver facts, host resources, TPM kind): `bmi info`."""
        self._check_open("layer_info")
        host = self._driver.host_resources()
        info = dict(self._driver.info())
        info.update(uri=self.uri, api_version=f"{VERSION >> 16}.{VERSION & 0xFFFF}", host_cpus=host.cpus,
                    host_memory=host.memory)
        info["tpm"] = (self._integrity_service.tpm_kind if self._integrity_service is not None
                       else f"unavailable ({self._integrity_error or 'opened with integrity=False'})")
        return info

    def integrity_service(self) -> Any:
        """The TPM-backed service (for the CLI's `bmi tpm` / `bmi eventlog`)."""
        return self._integrity("integrity_service")

    # -- life time --------------------------------------------------------------------------
    def close(self) -> None:
        """Destroy every PD this manager owns and release the layer."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        errors = []
        for pd in sorted(self._pds.values(), key=lambda p: p.pd_id):
            if pd.pd_id not in self._pds:
                continue                # went with its parent
            try:
                self._destroy(pd)
            except BMIError as e:       # keep going: leave nothing behind
                errors.append(e)
        for name in sorted(self._networks):
            try:
                DeviceManager(self).destroy_network(name)      # (get_device_manager refuses: closed by now)
            except BMIError as e:
                errors.append(e)
        if self._channel_server is not None:
            self._channel_server.close()
        self._registry.close()
        self._finalizer.detach()
        self._driver.close()
        if self._integrity_service is not None:
            self._integrity_service.close()
        if errors:
            raise errors[0]

    def __enter__(self) -> "PDManagement":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _release(driver: Driver, pds: dict[int, _PD]) -> None:
        """Last resort when a manager is dropped without close()."""
        for pd in list(pds.values()):
            driver.destroy(pd.handle)
        driver.close()

    # -- for a daemon that keeps its PDs across its own restarts (bmid, bmi/server/daemon.py) -----------------
    def keep_pds_when_dropped(self) -> None:
        """This manager's end (or its process's) must never destroy its PDs: no last-resort cleanup."""
        self._finalizer.detach()

    def adopt_networks(self, networks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The host networks a daemon stored (list_networks() dicts): kept where they still exist, made again
        where they went (a host reboot); returns those now held (a network that cannot be made is logged
        and left out)."""
        for network in networks:
            try:
                self._driver.restore_network(network["name"], network["subnet"], bool(network.get("nat")))
            except BMIError as e:
                log.warning("host network %s (%s) could not be made again: %s", network.get("name"),
                            network.get("subnet"), e)
                continue
            with self._lock:
                self._networks[network["name"]] = {"name": network["name"], "subnet": network["subnet"],
                                                   "nat": bool(network.get("nat"))}
        return self.get_device_manager().list_networks()

    def install_channels(self, server: Any) -> None:
        """Serve the PD channels with `server` (bmid's keeps them across restarts) instead of a
        ChannelServer made with the first PD that runs."""
        with self._lock:
            self._channel_server = server

    @property
    def registry(self) -> Registry:
        """The connections between PDs (bmid's is kept across restarts)."""
        return self._registry

    def next_id(self) -> int:
        """The id the next allocate_pd will give (bmid writes it into the allocation's intent)."""
        with self._lock:
            return self._next_id

    def was_destroyed(self, pd_id: int) -> bool:
        """Whether pd_id named a PD that was destroyed (it then reports DESTROYED; a lookup says so)."""
        with self._lock:
            return pd_id in self._destroyed

    def destroyed_ids(self) -> set[int]:
        with self._lock:
            return set(self._destroyed)

    def status_of(self, pd_id: int) -> PDStatus | None:
        """pd_id's status as last seen (no look at the driver), None when no such PD exists."""
        with self._lock:
            pd = self._pds.get(pd_id)
        return None if pd is None else pd.status

    def refresh(self, pd_id: int) -> bool:
        """Pick up an exit the driver saw for pd_id (bmid's exit watcher); False when no such PD exists."""
        with self._lock:
            pd = self._pds.get(pd_id)
        if pd is None:
            return False
        with pd.lock:
            self._refresh(pd)
        return True

    def describe(self, *, refresh: bool = True) -> list[dict[str, Any]]:
        """Every PD as one row (`bmi list`): id, name, status, parent, resources, sha256.

        refresh=False reports the statuses as last seen, without asking the driver (bmid answers
        only with what it has stored)."""
        self._check_open("describe")
        with self._lock:
            pds = sorted(self._pds.values(), key=lambda x: x.pd_id)
        rows = []
        for pd in pds:
            if refresh:
                with pd.lock:
                    self._refresh(pd)
            rows.append({"pd": pd.pd_id, "name": pd.config.get("/name", ""), "status": pd.status.name,
                         "parent": pd.parent, "mem": pd.desc.mem, "cpu": pd.cpus_max, "priority": pd.priority,
                         "sha256": pd.measurement["sha256"].hex() if "sha256" in pd.measurement else ""})
        return rows

    def lock_now(self, pd_ids: Iterable[int]) -> Callable[[], None] | None:
        """Hold the locks of these PDs (those that exist) if no other thread holds one now: the function that
        lets them go, or None (nothing held) at once.  For a caller that must not wait behind a long call on a
        PD (a start, a shutdown's grace, an image's copy): bmid's client loop, which serves every client."""
        with self._lock:
            pds = [self._pds[i] for i in dict.fromkeys(pd_ids) if i in self._pds]
        held: list[_PD] = []
        for pd in pds:
            if not pd.lock.acquire(blocking=False):
                break
            held.append(pd)

        def release() -> None:
            for pd in reversed(held):
                pd.lock.release()
        if len(held) < len(pds):
            release()
            return None
        return release

    def subtree(self, pd_id: int) -> list[int]:
        """pd_id and every PD below it (what a lowered limit can change)."""
        with self._lock:
            found, frontier = [pd_id], [pd_id]
            while frontier:
                frontier = [c for parent in frontier for c in self._children_of(parent)]
                found.extend(frontier)
        return found

    def reach_of_destroy(self, pd_id: int) -> list[int]:
        """The PDs whose record a destroy of pd_id changes: its subtree (gone), its parent (the memory comes
        back) and every PD with a policy toward one of them (dropped).  Ids are never used again, so a policy
        set toward one of them after this was asked changes nothing."""
        gone = self.subtree(pd_id)
        gone_set = set(gone)        # (a whole tree of a thousand PDs: no list scan per PD)
        with self._lock:
            pd = self._pds.get(pd_id)
            others = [o.pd_id for o in self._pds.values()
                      if o.pd_id not in gone_set and not o.policies.keys().isdisjoint(gone_set)]
        return gone + ([pd.parent] if pd is not None and pd.parent != MANAGER_PD else []) + others

    def records(self, ids: Iterable[int] | None = None) -> tuple[dict[int, dict[str, Any]], int]:
        """What a store keeps of these PDs (all when None; those that exist) and the next id, as now."""
        with self._lock:
            pds = dict(self._pds) if ids is None else {i: self._pds[i] for i in ids if i in self._pds}
            next_id = self._next_id
        return {pd_id: self._record(pd) for pd_id, pd in pds.items()}, next_id

    def _record(self, pd: _PD) -> dict[str, Any]:
        ended = pd.ended
        return {
            "pd_id": pd.pd_id, "parent": pd.parent, "status": pd.status.name, "priority": pd.priority,
            "desc": {"mem": pd.desc.mem, "cpu": pd.desc.cpu, "performance": pd.desc.performance},
            "cpus_max": pd.cpus_max, "performance": pd.performance, "lent": pd.lent,
            "config": dict(pd.config), "devices": dict(pd.devices),
            "policies": {str(t): [wire.policy_to_wire(x) for x in ps] for t, ps in pd.policies.items()},
            "measurement": {b: d.hex() for b, d in pd.measurement.items()},
            "ended": None if ended is None else {"status": ended.status.name, "exit_status": ended.exit_status,
                                                 "reason": ended.reason},
            **self._driver.record(pd.handle),
        }

    def adopt(self, records: dict[int, dict[str, Any]], next_id: int,
              destroyed: Iterable[int]) -> dict[int, tuple[PDStatus, tuple[str, ...]]]:
        """Take over the PDs a store recorded (the driver finds each again, see Driver.adopt): for each its
        status now and what the driver kept for it until the result is stored (keys to release then)."""
        adopted: dict[int, _PD] = {}
        release: dict[int, tuple[PDStatus, tuple[str, ...]]] = {}
        for pd_id, record in records.items():
            adopted[pd_id], kept = self._adopt(pd_id, record)
            release[pd_id] = adopted[pd_id].status, kept
        with self._lock:
            for pd in adopted.values():
                self._add(pd)
            self._next_id = max(self._next_id, next_id)
            self._destroyed.update(destroyed)
        return release

    def _adopt(self, pd_id: int, record: dict[str, Any]) -> tuple[_PD, tuple[str, ...]]:
        desc = PDDescription(**record["desc"])
        found = self._driver.adopt(pd_id, desc, record)
        status = PDStatus[record["status"]]
        previous = record.get("ended")
        if previous is not None:
            previous = ExitInfo(PDStatus[previous["status"]], previous["exit_status"], previous["reason"])
        if found.live is not None:
            status = found.live
        elif status in _LIVE or status is PDStatus.RESTARTING:
            previous = found.ended or ExitInfo(PDStatus.CRASHED, None, "its start was interrupted by a bmid crash")
            status = previous.status
        if record.get("measurement") and not found.kept and status in (PDStatus.READY, PDStatus.SUSPENDED):
            previous = ExitInfo(PDStatus.CRASHED, None, "its kept image or saved state was lost (the fd keeper "
                                "ended) or no longer had its measurement; setup_pd again")
            status = PDStatus.CRASHED
        policies = {int(t): [wire.policy_from_wire(x) for x in ps] for t, ps in record.get("policies", {}).items()}
        return _PD(pd_id, desc, record["cpus_max"], found.handle, status=status, priority=record["priority"],
                   config=dict(record["config"]), policies=policies,
                   measurement={b: bytes.fromhex(h) for b, h in record["measurement"].items()},
                   performance=record["performance"], ended=previous, parent=record["parent"],
                   lent=record["lent"], devices=dict(record.get("devices", {}))), found.release

    def enforce_policies(self) -> None:
        """Tell the driver every stored policy between PDs again (after adopt; Xen: its rendezvous)."""
        with self._lock:
            pds = dict(self._pds)
        for pd in pds.values():
            for tid, policies in pd.policies.items():
                if tid in pds:
                    self._driver.connections_changed(pd.handle, pds[tid].handle, policies)

    def finish_shutdown(self, pd_id: int) -> None:
        """A SHUTDOWN asked for before the daemon died: a PD that ended meanwhile ended because of it."""
        pd = self._pd(pd_id, "request_status_change(SHUTDOWN)")
        if pd.status in _LIVE:
            self.get_controller(pd_id).request_status_change(PDStatus.SHUTDOWN)
        elif pd.ended is not None and pd.ended.reason != "oom":
            pd.status = PDStatus.SHUTDOWN
            pd.ended = ExitInfo(PDStatus.SHUTDOWN, pd.ended.exit_status, f"shutdown requested; {pd.ended.reason}")

    def close_integrity(self) -> None:
        """Close the TPM link and nothing else (bmid stopping: its PDs keep running)."""
        if self._integrity_service is not None:
            self._integrity_service.close()

    # -- internals --------------------------------------------------------------------------
    def _check_open(self, what: str) -> None:
        if self._closed:
            raise InvalidState(f"{what}: the manager ({self.uri}) is closed")

    def _pd(self, pd_id: int, what: str) -> _PD:
        self._check_open(what)
        with self._lock:
            pd = self._pds.get(pd_id)
        if pd is None:
            why = "it was destroyed" if self.was_destroyed(pd_id) else "no PD has that id"
            raise NoSuchDomain(f"{what}: PD {pd_id} does not exist ({why})", pd_id=pd_id)
        return pd

    def _destroy(self, pd: _PD) -> None:
        """Children first; then the PD's channel, connections and resources; memory back to its parent."""
        pd_id = pd.pd_id
        with self._lock:
            children = [self._pds[c] for c in self._children_of(pd_id)]
        for child in children:
            self._destroy(child)
        with pd.lock:
            if self._channel_server is not None:
                self._channel_server.drop(pd_id)
            self._registry.cut(pd_id=pd_id)
            self._driver.destroy(pd.handle)
            with self._lock:
                self._pds.pop(pd_id, None)
                self._children.pop(pd_id, None)
                self._children.get(pd.parent, set()).discard(pd_id)
                self._destroyed.add(pd_id)
                for other in self._pds.values():
                    other.policies.pop(pd_id, None)
                parent = self._pds.get(pd.parent)
            pd.status = PDStatus.DESTROYED
        if parent is not None:
            with parent.lock:
                parent.lent -= pd.desc.mem
                limit = self._driver.memory_limit(parent.handle) + pd.desc.mem
                self._driver.set_memory(parent.handle, min(limit, parent.desc.mem - parent.lent))

    def _integrity(self, what: str) -> Any:
        self._check_open(what)
        if self._integrity_service is None:
            why = self._integrity_error or "the manager was opened with integrity=False"
            raise NotSupported(f"{what}: the TPM link is unavailable: {why}")
        return self._integrity_service

    def _refresh(self, pd: _PD) -> None:
        """Pick up an exit the driver saw since we last looked."""
        if pd.status in _LIVE:
            ended = self._driver.exit_info(pd.handle)
            if ended is not None:
                pd.status, pd.ended = ended.status, ended


class PDController:
    """Spec 7.2 and 7.4: control (and integrity) of one PD."""

    def __init__(self, mgr: PDManagement, pd_id: int, caller: int = MANAGER_PD):
        self._mgr = mgr
        self._id = pd_id
        self._caller = caller       # who calls through this object (a PD over its channel, or 0)

    def __repr__(self) -> str:
        return f"<PDController pd={self._id} {self._mgr.uri}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PDController) and other._mgr is self._mgr and other._id == self._id

    def __hash__(self) -> int:
        return hash((id(self._mgr), self._id))

    # -- helpers ----------------------------------------------------------------------------
    def _pd(self, what: str) -> _PD:
        if self._id == MANAGER_PD:
            raise PermissionDenied(f"{what} of PD 0: PD 0 is the manager itself and cannot be changed "
                                   f"through the BMI", pd_id=MANAGER_PD)
        return self._mgr._pd(self._id, what)

    def _owned(self, what: str) -> _PD:
        """_pd() for calls that change the PD: a PD may read itself but only its controller changes it."""
        if self._caller != MANAGER_PD and self._caller == self._id:
            raise PermissionDenied(f"{what} of PD {self._id}: a PD cannot change itself over its channel "
                                   f"(only read it); its controller can", pd_id=self._id)
        return self._pd(what)

    @property
    def _driver(self) -> Driver:
        return self._mgr._driver

    # -- spec 7.2 ---------------------------------------------------------------------------
    def get_pd_id(self) -> int:
        return self._id

    def set_priority(self, priority: int) -> None:
        priority = check_int(priority, f"set_priority of PD {self._id}", self._id)
        if not -10 <= priority <= 10:
            raise InvalidArgument(f"set_priority of PD {self._id}: {priority} is outside -10..+10", pd_id=self._id)
        pd = self._owned("set_priority")
        self._mgr._check_limit(pd.parent, "priority", priority, f"set_priority of PD {self._id}")
        self._mgr._set_limit(self._id, "priority", priority)
        self._mgr._clamp_children(self._id, ("priority",))

    def get_priority(self) -> int:
        if self._id == MANAGER_PD:
            self._mgr._check_open("get_priority")
            return 0
        return self._pd("get_priority").priority

    def get_current_status(self) -> PDStatus:
        self._mgr._check_open("get_current_status")
        if self._id == MANAGER_PD:
            return PDStatus.RUNNING
        if self._mgr.was_destroyed(self._id):
            return PDStatus.DESTROYED
        pd = self._pd("get_current_status")
        with pd.lock:
            self._mgr._refresh(pd)
            return pd.status

    def request_status_change(self, status: PDStatus | str | int, *, progress: Progress | None = None) -> None:
        """Spec 7.2.4.  progress(done, total) is called as a start unpacks a root archive (the bytes of the
        archive done, increasing, last total of total); not for an image that is not unpacked.  In system mode
        bmid unpacks it and sends the same reports to the client before its reply."""
        target = _coerce_status(status, self._id)
        if target is PDStatus.DESTROYED:
            self.destroy()
            return
        pd = self._owned("request_status_change")
        what = f"request_status_change({target.name}) of PD {self._id}"
        check_progress(progress, what, self._id)
        if target in (PDStatus.ALLOCATED, PDStatus.READY, PDStatus.CRASHED):
            raise InvalidArgument(f"{what}: {target.name} is a state the layer reports, not one to request",
                                  pd_id=self._id)
        if target in _CAPABILITY_PARAMS and target not in self._driver.capabilities:
            reason = self._driver.unsupported_reasons.get(target, "the driver lacks it")
            raise NotSupported(f"{what}: not supported by the {self._driver.name} driver: {reason}", pd_id=self._id)
        with pd.lock:
            self._mgr._refresh(pd)
            current = pd.status
            if current is PDStatus.ALLOCATED:
                raise InvalidState(f"{what}: the PD has no image yet; call setup_pd first", pd_id=self._id)
            if target is current and target in _LIVE:
                return
            if target is PDStatus.RUNNING:
                if current is PDStatus.PAUSED:
                    self._driver.resume(pd.handle)
                    pd.status = PDStatus.RUNNING
                else:
                    self._start(pd, progress)
            elif target is PDStatus.PAUSED:
                if current is not PDStatus.RUNNING:
                    raise InvalidState(f"{what}: only a RUNNING PD can be paused (it is {current.name})",
                                       pd_id=self._id)
                self._driver.pause(pd.handle)
                pd.status = PDStatus.PAUSED
            elif target is PDStatus.SHUTDOWN:
                if current in _LIVE:
                    pd.ended = self._driver.stop(pd.handle, self._mgr.shutdown_grace)
                    pd.status = PDStatus.SHUTDOWN
                elif current is PDStatus.READY:
                    raise InvalidState(f"{what}: the PD has not been started", pd_id=self._id)
            elif target is PDStatus.RESTARTING:
                if current in _LIVE:
                    pd.status = PDStatus.RESTARTING
                    self._driver.stop(pd.handle, self._mgr.shutdown_grace)
                self._start(pd, progress)
            elif target is PDStatus.SUSPENDED:
                self._driver.suspend(pd.handle)
                pd.status = PDStatus.SUSPENDED

    def _start(self, pd: _PD, progress: Progress | None = None) -> None:
        """Run the image with a fresh channel to the layer (connections of an earlier run are cut)."""
        previous = pd.status
        channels = self._mgr.channels() if self._driver.channels else None
        extra: dict[str, int] = {}
        try:
            for name, value in pd.config.items():   # the parent's may have been narrowed since they were set
                self._mgr._check_grants(pd.parent, name, value, f"start of PD {pd.pd_id}: {name}")
            if channels is not None:
                extra["channel_fd"] = channels.open(pd.pd_id)
            if self._mgr._integrity_service is not None:     # Keylime mode: no PD runs unrecorded
                self._mgr._integrity_service.record_launch(pd.config.get("/name"), pd.measurement.get("sha256"))
            self._driver.start(pd.handle, dict(pd.config), pd.priority, progress=progress, **extra)
        except BaseException:
            if channels is not None:
                channels.drop(pd.pd_id)
            pd.status = previous if previous is not PDStatus.RESTARTING else PDStatus.CRASHED
            raise
        finally:
            if extra:
                os.close(extra["channel_fd"])
        pd.status, pd.ended = PDStatus.RUNNING, None

    def destroy(self) -> None:
        self._mgr._destroy(self._owned("destroy"))

    def setup_pd(self, image: Any, *, banks: Sequence[str] = ("sha256",),
                 progress: Progress | None = None) -> None:
        """Pull the image, copy it into the PD and measure it in the same pass (spec 7.2.7, 6.5)."""
        what = f"setup_pd of PD {self._id}"
        check_setup(image, banks, progress, what, self._id)
        pd = self._owned("setup_pd")
        if self._caller != MANAGER_PD:
            self._check_supplied_image(image, what)
        with pd.lock:
            self._mgr._refresh(pd)
            if pd.status in _LIVE or pd.status is PDStatus.SUSPENDED:
                raise InvalidState(f"{what}: the PD is {pd.status.name}; shut it down before loading a new image",
                                   pd_id=self._id)
            measurement = self._driver.load(pd.handle, image, tuple(banks), progress)
            pd.measurement = measurement
            pd.status = PDStatus.READY
            pd.ended = None
        service = self._mgr._integrity_service
        if service is not None:
            service.record_pd(self._id, f"pd{self._id}", measurement)

    def _check_supplied_image(self, image: Any, what: str) -> None:
        """The layer copies an image a PD supplies: no larger than that PD's own memory limit, sparse or not."""
        size = check_int(image.get_image_size(), what + ": image size", self._id)
        supplier = self._mgr._pd(self._caller, what)
        limit = self._driver.memory_limit(supplier.handle)
        if size > limit:
            raise ResourceError(f"{what}: the image PD {self._caller} supplied is {size} bytes, more than its own "
                                f"memory limit ({limit} bytes); the layer copies every byte of an image",
                                pd_id=self._id)

    def set_allowed_connections(self, tid: int, policies: list[ConnectionPolicy],
                                disable_existing: bool = False) -> None:
        what = "set_allowed_connections"
        tid = check_int(tid, f"{what} of PD {self._id}: tid", self._id)
        checked = check_policies(policies, what, self._id)
        if not isinstance(disable_existing, bool):
            raise InvalidArgument(f"{what} of PD {self._id}: disable_existing must be a bool", pd_id=self._id)
        pd = self._owned(what)
        if tid == self._id:
            raise InvalidArgument(f"{what} of PD {self._id}: a PD needs no connection to itself", pd_id=self._id)
        if not self._knows(pd, tid):
            # Whether tid exists, is gone or was never there, the caller learns nothing: a grant is
            # refused by its own (empty) policy and an empty one has nothing to withdraw.
            self._check_grant(tid, checked, what)
            return
        target = self._mgr._pd(tid, f"{what} of PD {self._id} towards tid") if tid != MANAGER_PD else None
        self._check_grant(tid, checked, what)
        with pd.lock:
            pd.policies[tid] = checked
            self._driver.connections_changed(pd.handle, target.handle if target else None, checked)
        if disable_existing:
            self._mgr._registry.cut(lambda c: c.source != self._id or c.dest != tid or _allowed(checked, c.con_type,
                                                                                                 c.mode),
                                    pd_id=self._id)

    def _check_grant(self, tid: int, policies: list[ConnectionPolicy], what: str) -> None:
        """A PD grants its descendants anything within its own subtree, elsewhere only what it has itself."""
        caller = self._caller
        if caller == MANAGER_PD or self._mgr._controls(caller, tid):
            return
        own = self._mgr._pd(caller, what).policies.get(tid, [])
        for policy in policies:
            if not _allowed(own, policy.con_type, policy.mode):
                raise PermissionDenied(f"{what} of PD {self._id} towards PD {tid}: PD {caller} cannot grant "
                                       f"{policy.con_type.name} mode {policy.mode}, it is not allowed that itself",
                                       pd_id=self._id)

    def _knows(self, pd: _PD, tid: int) -> bool:
        """Whether the caller may learn that tid exists: the manager; a PD that controls tid or
        holds a policy towards it (its own, or the controlled PD's; a destroyed PD's are gone)."""
        caller = self._caller
        if caller == MANAGER_PD or tid == MANAGER_PD or self._mgr._controls(caller, tid) or tid in pd.policies:
            return True
        return tid in self._mgr._pd(caller, "connection policy").policies

    def get_allowed_connections(self, tid: int) -> list[ConnectionPolicy]:
        """The policies towards tid ([] when none: for a PD caller the same whether tid exists or not)."""
        tid = check_int(tid, f"get_allowed_connections of PD {self._id}: tid", self._id)
        pd = self._pd("get_allowed_connections")
        if self._caller == MANAGER_PD and tid != MANAGER_PD:
            self._mgr._pd(tid, f"get_allowed_connections of PD {self._id} towards tid")
        with pd.lock:
            return list(pd.policies.get(tid, []))

    def set_config_param(self, name: str, value: str) -> None:
        path = normalize(name, what="set_config_param", pd_id=self._id)
        if not isinstance(value, str) or "\0" in value:
            raise InvalidArgument(f"set_config_param {path!r} of PD {self._id}: value must be a str without NUL",
                                  pd_id=self._id)
        pd = self._owned("set_config_param")
        if path == "/name":
            check_pd_name(value, f"set_config_param /name of PD {self._id}", self._id)
        self._check_boot_param(path)
        if path == "/boot/allow":
            self._check_allow(value)
        with pd.lock:
            self._driver.check_config(pd.handle, path, value)
            self._mgr._check_grants(pd.parent, path, value, f"set_config_param {path} of PD {self._id}")
            self._check_config_room(pd, path, value)
            pd.config[path] = value

    def _check_config_room(self, pd: _PD, path: str, value: str) -> None:
        """The PD's config stays within MAX_PD_CONFIG bytes with `value` at `path` (the caller holds pd.lock)."""
        size = sum(len(k.encode()) + len(v.encode()) for k, v in pd.config.items() if k != path)
        size += len(path.encode()) + len(value.encode())
        if size > MAX_PD_CONFIG:
            raise ResourceError(f"set_config_param {path} of PD {self._id}: its config would hold {size} bytes, "
                                f"more than the {MAX_PD_CONFIG} a PD may have (names and values); set what it "
                                f"no longer needs to ''", pd_id=self._id)

    def _check_boot_param(self, path: str) -> None:
        """/boot/ is what the driver reads to start the PD: a typo there (/boot/cmdlin) would be ignored silently."""
        if path != "/boot" and not path.startswith("/boot/"):
            return
        known = self._driver.boot_params
        if not any(path == k or (k.endswith("/") and path.startswith(k) and path != k) for k in known):
            names = ", ".join(k + "NAME" if k.endswith("/") else k for k in known)
            raise InvalidArgument(f"set_config_param {path!r} of PD {self._id}: not a boot parameter of the "
                                  f"{self._driver.name} driver; known: {names}", pd_id=self._id)

    def _check_allow(self, value: str) -> None:
        """/boot/allow names known surface; a PD may allow its child only what it is allowed itself."""
        what = f"set_config_param /boot/allow of PD {self._id}"
        wanted = parse_allow(value, what=what, pd_id=self._id)
        if self._caller == MANAGER_PD:
            return
        own = parse_allow(self._mgr._pd(self._caller, what).config.get("/boot/allow", ""), what=what,
                          pd_id=self._caller)
        if wanted - own:
            raise PermissionDenied(f"{what} by PD {self._caller}: {', '.join(sorted(wanted - own))} is more than "
                                   f"PD {self._caller} is allowed itself (its /boot/allow: "
                                   f"{' '.join(sorted(own)) or 'nothing'})", pd_id=self._id)

    def get_config_param(self, name: str) -> str:
        path = normalize(name, what="get_config_param", pd_id=self._id)
        if self._id == MANAGER_PD:
            self._mgr._check_open("get_config_param")
            config: dict[str, str] = {}
        else:
            config = self._pd("get_config_param").config
        try:
            return config[path]
        except KeyError:
            raise InvalidArgument(f"get_config_param {path!r} of PD {self._id}: not set", pd_id=self._id) from None

    def set_runtime_param(self, name: str, value: str | int) -> None:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)          # an int is its decimal text, checked against the limits like one
        pd = self._owned("set_runtime_param") if self._id != MANAGER_PD else None
        path = normalize(name, what="set_runtime_param", pd_id=self._id)
        asked = _whole_number(value) if pd is not None and path in LIMITS else None
        if asked is not None:
            self._mgr._check_limit(pd.parent, path, asked, f"set_runtime_param {path} of PD {self._id}")
        self._tree(path).set(path, value)
        if path in LIMITS:
            self._mgr._clamp_children(self._id, (path,))

    def get_runtime_param(self, name: str) -> str:
        return self._tree(name).get(name)

    def list_runtime_params(self, root: str = "/") -> list[RuntimeCapability]:
        return self._tree().list(root)

    # -- spec 7.4 ---------------------------------------------------------------------------
    def get_integrity_link(self, nonce: bytes) -> IntegrityReport:
        what = f"get_integrity_link of PD {self._id}"
        nonce = check_bytes(nonce, what + ": nonce", self._id)
        if not 1 <= len(nonce) <= MAX_NONCE:
            raise InvalidArgument(f"{what}: the nonce must be 1..{MAX_NONCE} bytes, got {len(nonce)}",
                                  pd_id=self._id)
        measurement = self._measurement(what)
        return self._mgr._integrity(what).integrity_link(nonce, measurement, pd_id=self._id)

    def get_protected_credentials(self, policy: IntegrityPolicy, protected_credentials: bytes) -> bytes:
        """The secret inside the blob if this PD meets the policy, else b"" (spec 7.4.2)."""
        what = f"get_protected_credentials of PD {self._id}"
        check_integrity_policy(policy, what, self._id)
        blob = check_bytes(protected_credentials, what + ": protected_credentials", self._id)
        measurement = self._measurement(what)
        from .integrity.service import policy_digest
        service = self._mgr._integrity(what)
        try:
            creds = service.unseal(blob, pd_id=self._id)
        except BMIError as e:
            log.warning("%s: refused: the TPM did not release the blob: %s", what, e)
            return b""
        refusal = self._policy_refusal(policy, measurement, creds.policy_validation, policy_digest(policy))
        if refusal:
            log.warning("%s: refused: %s", what, refusal)
            return b""
        return creds.secret

    def _policy_refusal(self, policy: IntegrityPolicy, measurement: bytes, validation: bytes,
                        expected_validation: bytes) -> str:
        if not hmac.compare_digest(validation, expected_validation):
            return "policy_validation does not match the hash of the policy given"
        if not hmac.compare_digest(bytes(policy.pd_integrity), measurement):
            return "the PD's measurement is not policy.pd_integrity"
        pd = self._pd("get_protected_credentials")
        for cip in policy.pd_connections:
            if not any(self._allows(pd, tid, cip) for tid in pd.policies):
                return (f"no allowed {cip.con_type.name} connection (mode {cip.mode}) towards a PD "
                        f"measured {bytes(cip.dest).hex()}")
        return ""

    def _allows(self, pd: _PD, tid: int, cip: ConnectionIntegrityPolicy) -> bool:
        target = self._mgr._pds.get(tid)
        if target is None or target.measurement.get("sha256") != bytes(cip.dest):
            return False
        return any(p.con_type == cip.con_type and p.mode & cip.mode == cip.mode for p in pd.policies[tid])

    def _measurement(self, what: str) -> bytes:
        if self._id == MANAGER_PD:
            raise InvalidState(f"{what}: PD 0 is the manager; its integrity is the TVL PCR in every report",
                               pd_id=MANAGER_PD)
        pd = self._pd(what)
        if "sha256" not in pd.measurement:
            raise InvalidState(f"{what}: the PD has no image yet; call setup_pd first", pd_id=self._id)
        return pd.measurement["sha256"]

    # -- extensions used by the CLI -------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> PDStatus:
        """Block until the PD's program ends (or timeout); return the status then."""
        pd = self._pd("wait")
        if pd.status in _LIVE:
            self._driver.wait(pd.handle, timeout)
        return self.get_current_status()

    def read_console(self, since: int = 0, timeout: float | None = None) -> tuple[int, bytes]:
        """Console output after byte offset `since`; returns (new offset, data)."""
        since = check_int(since, f"read_console of PD {self._id}: since", self._id)
        pd = self._pd("read_console")
        return self._driver.read_console(pd.handle, since, timeout)

    def measurement(self) -> dict[str, bytes]:
        """The image measurement in every bank that was asked for ({} before setup_pd)."""
        return dict(self._pd("measurement").measurement)

    # -- the parameter tree -------------------------------------------------------------------
    def _tree(self, name: str | None = None) -> ParamTree:
        """The PD's parameters as they are now; for `name`, when every PD has it (_PD_PARAMS), that one alone:
        the same leaf the whole tree holds, without the ~40 others (through bmid, a read spent 40 of its
        140 us making them)."""
        if self._id == MANAGER_PD:
            self._mgr._check_open("runtime parameters")
            return ParamTree(MANAGER_PD, self._host_leaves())
        pd = self._pd("runtime parameters")
        make = _PD_PARAMS.get(name) if name is not None else None
        with pd.lock:
            self._mgr._refresh(pd)
            return ParamTree(self._id, {name: make(self, pd)} if make is not None else self._pd_leaves(pd))

    def _host_leaves(self) -> dict[str, Param]:
        host = self._driver.host_resources()
        return {
            "/system/status": PDStatus.RUNNING.name,
            "/system/driver": self._driver.name,
            "/system/memory/max": str(host.memory),
            "/system/memory/min": str(host.memory),
            "/system/memory/current": str(host.memory),
            "/system/cpu/max": str(host.cpus),
            "/system/cpu/min": str(host.cpus),
            "/system/cpu/current": str(host.cpus),
            "/system/cpu/performance": "100",
            "/system/pds": Leaf(get=lambda: " ".join(map(str, self._mgr.list_pd()[1:]))),
            **({"/system/pids/max": str(host.pids)} if host.pids is not None else {}),
        }

    def _pd_leaves(self, pd: _PD) -> dict[str, Param]:
        drv = self._driver
        leaves = {path: make(self, pd) for path, make in _PD_PARAMS.items()}
        leaves.update(drv.extra_params(pd.handle, pd.config))
        if pd.ended is not None:
            if pd.ended.exit_status is not None:
                leaves["/system/exit-status"] = str(pd.ended.exit_status)
            leaves["/system/exit-reason"] = pd.ended.reason
        for bank, digest in pd.measurement.items():
            leaves[f"/system/measurement/{bank}"] = digest.hex()
        leaves.update(_CONNECTION_CAPABILITIES)
        if drv.channels:
            leaves["/capability/connections/fd-passing"] = Leaf(get=lambda: _fd_passing(pd))
        leaves.update(_capability_params(drv.capabilities))
        return leaves

    def _set_memory(self, pd: _PD, value: str) -> None:
        self._driver.set_memory(pd.handle, parse_int(value, what="/system/memory/current", pd_id=pd.pd_id,
                                                     lo=MIN_MEMORY, hi=pd.desc.mem - pd.lent, unit_suffixes=True))

    def _set_cpus(self, pd: _PD, value: str) -> None:
        self._driver.set_cpus(pd.handle, parse_int(value, what="/system/cpu/current", pd_id=pd.pd_id, lo=1,
                                                   hi=pd.cpus_max))
        self._driver.set_performance(pd.handle, pd.performance)     # the share is of the new count: keep the %

    def _set_performance(self, pd: _PD, value: str) -> None:
        percent = parse_int(value, what="/system/cpu/performance", pd_id=pd.pd_id, lo=1, hi=100)
        self._driver.set_performance(pd.handle, percent)
        pd.performance = percent


#: The parameters every PD has whatever its driver and state, each made from the PD alone (the caller holds its
#: lock): the whole tree holds them all, and a read or a write of one makes only that one (PDController._tree).
_PD_PARAMS: dict[str, Callable[[PDController, _PD], Param]] = {
    "/system/status": lambda c, pd: pd.status.name,
    "/system/priority": lambda c, pd: str(pd.priority),
    "/system/parent": lambda c, pd: str(pd.parent),
    "/system/memory/max": lambda c, pd: str(pd.desc.mem),
    "/system/memory/min": lambda c, pd: str(MIN_MEMORY),
    "/system/memory/current": lambda c, pd: Leaf(get=lambda: str(c._driver.memory_limit(pd.handle)),
                                                  set=lambda value: c._set_memory(pd, value)),
    "/system/memory/used": lambda c, pd: Leaf(get=lambda: str(c._driver.memory_used(pd.handle))),
    "/system/cpu/max": lambda c, pd: str(pd.cpus_max),
    "/system/cpu/min": lambda c, pd: "1",
    "/system/cpu/current": lambda c, pd: Leaf(get=lambda: str(c._driver.cpus(pd.handle)),
                                              set=lambda value: c._set_cpus(pd, value)),
    "/system/cpu/performance": lambda c, pd: Leaf(get=lambda: str(pd.performance),
                                                  set=lambda value: c._set_performance(pd, value)),
    "/console/log": lambda c, pd: Leaf(get=lambda: c._driver.console_log(pd.handle).decode("utf-8", "replace")),
    "/interfaces/connections": lambda c, pd: Leaf(get=lambda: connection_lines(c._mgr._registry.live(pd.pd_id),
                                                                               pd.pd_id)),
    "/interfaces/devices": lambda c, pd: " ".join(sorted(pd.devices)),
    "/interfaces/network": lambda c, pd: _network_lines(pd.config),
}


@functools.lru_cache(maxsize=None)
def _capability_params(capabilities: frozenset[PDStatus]) -> dict[str, str]:
    """/capability/pause etc.: the status each of the driver's optional transitions leads to (fixed per driver)."""
    return {f"/capability/{name}": PDStatus.RUNNING.name if name == "resume" else status.name
            for status, names in _CAPABILITY_PARAMS.items() if status in capabilities for name in names}


def _allowed(policies: Sequence[ConnectionPolicy], con_type: ConnectionType, mode: int) -> bool:
    """A connection of this type and mode is covered by one of the policies."""
    return any(p.con_type == con_type and p.mode & mode == mode for p in policies)


def _network_lines(config: dict[str, str]) -> str:
    """The PD's network interfaces as its config asks for them: "eth0 veth:br0 10.0.0.2/24", one a line."""
    lines = []
    for key, value in sorted(config.items()):
        if key.count("/") == 2 and key.startswith("/net/"):
            extra = [config[key + sub] for sub in ("/address", "/gateway") if key + sub in config]
            lines.append(" ".join([key[len("/net/"):], value, *extra]))
    return "\n".join(lines)


_CONNECTION_CAPABILITIES = {
    "/capability/connections/types": "IPC STREAM SHM EVENT",
    "/capability/connections/revocable": "IPC STREAM EVENT",
    "/capability/connections/shm-revocable":
        "no: revoking an SHM connection stops nothing already mapped or held; only new connections are refused",
}


def _fd_passing(pd: _PD) -> str:
    """Whether fds can ride pd's IPC, STREAM and EVENT connections (past their modes and revocation)."""
    from .channel.sockets import fd_passing_refusable
    if not fd_passing_refusable():
        return ("possible: this kernel has no SO_PASSRIGHTS (Linux 6.16 and later have it), so a socket passed "
                "over a connection outlives the connection's mode and its revocation")
    if "io_uring" in parse_allow(pd.config.get("/boot/allow", ""), what="/boot/allow", pd_id=pd.pd_id):
        # Not closable on Linux 6.18: the filter cannot see io_uring's operations, and io_uring's own
        # restrictions (IORING_REGISTER_RESTRICTIONS) bind only a ring its creator disabled and registered
        # them on, so nothing outside the PD can impose them.
        return ("possible into this PD: its /boot/allow lists io_uring, whose socket command "
                "(IORING_OP_URING_CMD setsockopt) turns SO_PASSRIGHTS back on for its own connection ends past "
                "the seccomp filter; any peer can then pass it fds (sockets too), which outlive the connection's "
                "mode and its revocation.  Out of it only to a peer whose own /boot/allow lists io_uring: every "
                "other peer's end keeps SO_PASSRIGHTS off")
    return "refused: connection ends have SO_PASSRIGHTS off and the seccomp filter refuses turning it on"


class CallerScope:
    """The manager as one PD sees it over its channel: every call runs as that PD (spec 4.3, 7.1.4).

    The caller is the PD the channel belongs to (the layer knows it by the
    socket).  It may control itself (read only) and the PDs it created.
    """

    #: A PD's channel carries one frame per reply (bmid's clients take more): the dispatcher
    #: (bmi/channel/dispatch.py, which does not import this module) trims long results to fit.
    one_frame_replies = True

    def __init__(self, mgr: PDManagement, caller: int):
        self._mgr = mgr
        self._caller = caller

    def get_version(self) -> int:
        return VERSION

    def allocate_pd(self, desc: PDDescription) -> PDController:
        return PDController(self._mgr, self._mgr._allocate(desc, self._caller), self._caller)

    def get_controller(self, pd_id: int | None = None) -> PDController:
        """None: the caller's own controller; otherwise itself or a descendant, else PermissionDenied."""
        self._mgr._check_open("get_controller")
        if pd_id is None:
            pd_id = self._caller
        pd_id = check_int(pd_id, f"get_controller by PD {self._caller}: pd_id", self._caller)
        if not self._mgr._controls(self._caller, pd_id):
            raise PermissionDenied(f"get_controller({pd_id}) by PD {self._caller}: a PD may control only itself "
                                   f"and the PDs it created", pd_id=pd_id)
        return PDController(self._mgr, pd_id, self._caller)

    def list_pd(self) -> list[int]:
        """The caller and its descendants (a PD learns nothing of other PDs)."""
        return [i for i in self._mgr.list_pd() if i != MANAGER_PD and self._mgr._controls(self._caller, i)]

    def get_device_manager(self) -> DeviceManager:
        raise PermissionDenied(f"get_device_manager by PD {self._caller}: only the manager assigns devices",
                               pd_id=self._caller)

    def get_attestation_key(self) -> AttestationKey:
        """The layer's AK: public, the key a PD's own verifier pins for the reports it relays."""
        return self._mgr.get_attestation_key()

    def connect(self, tid: int, con_type: ConnectionType, mode: int, size: int = 0) -> tuple[dict, int]:
        """Open a connection to tid if the caller's policy allows it; returns its description and the fd."""
        source = self._caller
        what = f"connect from PD {source} to PD {tid}"
        tid = check_int(tid, what + ": tid", source)
        check_policies([ConnectionPolicy(con_type, mode)], what, source)
        pd = self._mgr._pd(source, what)
        if tid == source or tid == MANAGER_PD:
            raise InvalidArgument(f"{what}: a PD connects to another PD, not to itself or the manager", pd_id=source)
        with self._mgr._lock:
            dest = self._mgr._pds.get(tid)
        # Both PDs' locks (lower id first) while checking and making: a policy withdrawn with
        # disable_existing, or the destination destroyed, cannot slip in between and leave a
        # connection that outlives the cut.
        low, high = (pd, dest or pd) if dest is None or pd.pd_id < dest.pd_id else (dest, pd)
        with low.lock, high.lock:           # RLocks: one PD's is taken twice when dest is None
            if not _allowed(pd.policies.get(tid, []), con_type, mode):
                raise PermissionDenied(f"{what}: no policy of PD {source} allows {con_type.name} mode {mode} "
                                       f"towards PD {tid}", pd_id=source)
            if dest is None or dest.status is PDStatus.DESTROYED or not self._mgr.channels().has_channel(tid):
                raise InvalidState(f"{what}: PD {tid} is not running (no channel to accept on)", pd_id=tid)
            if con_type is ConnectionType.SHM and isinstance(size, int) and size > pd.desc.mem:
                raise ResourceError(f"{what}: SHM of {size} bytes is more than PD {source}'s memory", pd_id=source)
            conn, fd = self._mgr._registry.make(source, tid, con_type, mode, size)
        return conn.describe(), fd


class DeviceManager:
    """Spec 7.1.6 (left open there): which host devices a PD gets.

    Only the manager assigns (a PD asking over its channel is refused in
    CallerScope).  A device belongs to one PD at a time, unless every PD that
    has it was given it with shared=True.
    """

    def __init__(self, mgr: PDManagement):
        self._mgr = mgr

    def list_devices(self) -> list[str]:
        self._mgr._check_open("list_devices")
        return self._mgr._driver.list_devices()

    def assigned(self, pd_id: int) -> list[str]:
        pd = self._mgr._pd(check_int(pd_id, "assigned: pd_id", None), "assigned")
        return self._mgr._driver.assigned_devices(pd.handle)

    def assign(self, device: str, pd_id: int, mode: int = 3, shared: bool = False) -> None:
        """Give PD pd_id the host node `device` with access `mode` (READ, WRITE or RW)."""
        pd_id = check_int(pd_id, "assign: pd_id", None)
        what = f"assign {device!r} to PD {pd_id}"
        if isinstance(mode, bool) or mode not in (1, 2, 3):
            raise InvalidArgument(f"{what}: mode {mode!r} is not READ (1), WRITE (2) or RW (3)", pd_id=pd_id)
        if not isinstance(shared, bool):
            raise InvalidArgument(f"{what}: shared must be a bool", pd_id=pd_id)
        if not isinstance(device, str):
            raise InvalidArgument(f"{what}: a device is named by a str", pd_id=pd_id)
        if pd_id == MANAGER_PD:
            raise InvalidArgument(f"{what}: PD 0 is the manager; it has the host's devices", pd_id=pd_id)
        pd = self._mgr._pd(pd_id, "assign")
        with self._mgr._lock:
            holders = {other.pd_id: other.devices[device] for other in self._mgr._pds.values()
                       if other.pd_id != pd_id and device in other.devices}
            exclusive = [i for i, was_shared in holders.items() if not (was_shared and shared)]
            if exclusive:
                raise InvalidState(f"{what}: it is assigned to PD {exclusive[0]}; a device goes to one PD at a time "
                                   f"unless every PD that has it is given it with shared=True", pd_id=pd_id)
            previous = pd.devices.get(device)
            pd.devices[device] = shared        # reserved before the (slow) mechanism runs
        try:
            with pd.lock:
                self._mgr._driver.assign_device(pd.handle, device, mode, own=not shared)
        except BaseException:
            with self._mgr._lock:
                if previous is None:
                    pd.devices.pop(device, None)
                else:
                    pd.devices[device] = previous
            raise

    # -- host networks (`bmi net`): they end with this manager (bmid's with bmid) -------------------
    def create_network(self, name: str, subnet: str, nat: bool = False) -> None:
        """A host network (bridge) named `name` on `subnet`; nat=True also routes it out (host firewall)."""
        what = f"create_network {name!r}"
        if not isinstance(name, str) or not isinstance(subnet, str) or not isinstance(nat, bool):
            raise InvalidArgument(f"{what}: name and subnet are str, nat a bool")
        self._mgr._check_open(what)
        with self._mgr._lock:
            if name in self._mgr._networks:
                raise InvalidState(f"{what}: this manager has a network of that name already")
            self._mgr._networks[name] = {"name": name, "subnet": subnet, "nat": nat}
        try:
            self._mgr._driver.create_network(name, subnet, nat)
        except BaseException:
            with self._mgr._lock:
                self._mgr._networks.pop(name, None)
            raise

    def list_networks(self) -> list[dict[str, Any]]:
        self._mgr._check_open("list_networks")
        with self._mgr._lock:
            return [dict(n) for _, n in sorted(self._mgr._networks.items())]

    def destroy_network(self, name: str) -> None:
        with self._mgr._lock:
            network = self._mgr._networks.get(name)
        if network is None:
            raise InvalidArgument(f"destroy_network {name!r}: this manager made no network of that name")
        self._mgr._driver.destroy_network(name, network["subnet"], network["nat"])
        with self._mgr._lock:
            self._mgr._networks.pop(name, None)

    def unassign(self, device: str, pd_id: int) -> None:
        pd_id = check_int(pd_id, "unassign: pd_id", None)
        pd = self._mgr._pd(pd_id, "unassign")
        if device not in pd.devices:
            raise InvalidArgument(f"unassign {device!r} from PD {pd_id}: it is not assigned to that PD", pd_id=pd_id)
        with pd.lock:
            self._mgr._driver.unassign_device(pd.handle, device)
            with self._mgr._lock:
                pd.devices.pop(device, None)
