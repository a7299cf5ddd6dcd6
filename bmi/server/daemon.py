"""bmid: owns the PDs of linux:///system (or xen:///system) across its own restarts and crashes.

One bmid per driver, like libvirt's modular daemons (virtqemud, virtxend):
a libxl failure cannot take the Linux PDs' service down.  One PDManagement
(the same semantics as session mode, bmi/api.py) over the driver's Keeping
variant (bmi/server/driver.py, bmi/server/xen.py), answered on a Unix socket with the PD channel's protocol
(JSON-RPC 2.0 over SOCK_SEQPACKET, bmi/channel/protocol.py; the requests
are those of bmi/channel/dispatch.py plus a few manager-only ones below).

Crash safety, in order, for every call that changes something:
1. the intent is written to the store (ops table),
2. the call runs,
3. the changed PD records, any status events and the end of the intent are
   written in one transaction,
4. only then is the reply sent.
At start, restore() adopts every stored PD (driver.adopt: Linux checks pid +
start time + cgroup, Xen domid + UUID), takes back the connections between
PDs (connections.py), re-attaches the channels the fd keeper held, finishes what a
pending intent asked for where that is safe (destroy, shutdown) and rolls
back the rest (an allocation without a record, a start whose process was
never recorded); the store's record is the truth for everything else.
"""
from __future__ import annotations

import fcntl
import logging
import os
import queue
import select
import socket
import struct
import threading
import time
from typing import Any, Iterable

from ..api import PDController, PDManagement, _PD
from ..channel import protocol as p
from ..channel.dispatch import Dispatcher
from ..channel.server import ChannelServer, _check_request
from ..drivers.base import ExitInfo
from ..errors import BMIError, InvalidArgument, PermissionDenied, ResourceError
from ..store import Event, Store
from ..system import LINUX_URI, XEN_URI, default_socket
from ..types import PDDescription, PDStatus
from .board import BoardWriter
from .connections import KeptConnections
from .driver import Keeping, SystemDriver
from .inflight import Ledger, Pending
from .keeper import Keeper

log = logging.getLogger("bmi.bmid")

URIS = (LINUX_URI, XEN_URI)
MAX_CONSOLE_CHUNK = 16 * 1024       # bytes of console per reply (hex doubles it; MAX_MESSAGE is 64 KiB)
MAX_WAIT = 60.0
REPLY_PIECE = 30 * 1024         # bytes of reply JSON per record when a reply is split (hex: 60 KiB)
EVENT_POLL = 0.5
_LIVE = (PDStatus.RUNNING, PDStatus.PAUSED)

#: Calls a read-only client (the configured group) may make.
READ_ONLY = frozenset({
    "get_version", "list_pd", "get_controller", "get_priority", "get_current_status", "get_allowed_connections",
    "get_config_param", "get_runtime_param", "list_runtime_params", "get_integrity_link", "describe", "layer_info",
    "measurement", "read_console", "wait", "subscribe", "get_storage_public", "list_devices", "assigned",
    "status_board", "get_attestation_key"})


class SystemDispatcher(Dispatcher):
    """The channel's requests plus what a manager client needs beyond them (manager callers only)."""

    returns_fd = Dispatcher.returns_fd | {"status_board"}

    def __init__(self, scope_of: Any, board: BoardWriter):
        super().__init__(scope_of)
        self._board = board

    @staticmethod
    def _ctl(scope: Any, params: dict) -> Any:
        """For a manager client a controller of any id, so a destroyed PD reports DESTROYED as in session mode."""
        if not isinstance(scope, PDManagement):
            return Dispatcher._ctl(scope, params)
        pd_id = params.get("pd", 0)
        if isinstance(pd_id, bool) or not isinstance(pd_id, int):
            raise InvalidArgument(f"pd: expected an int, got {type(pd_id).__name__}")
        return PDController(scope, pd_id)

    def m_get_controller(self, scope: Any, params: dict, fd: None) -> int:
        return scope.get_controller(params.get("pd")).get_pd_id()

    @staticmethod
    def _manager(scope: Any, method: str) -> PDManagement:
        if not isinstance(scope, PDManagement):
            raise PermissionDenied(f"{method}: only a client of bmid (not a PD over its channel) may call it")
        return scope

    def m_describe(self, scope: Any, params: dict, fd: None) -> list[dict]:
        """Every PD in one reply (what `bmi list` shows): id, name, status, parent, resources, sha256."""
        mgr = self._manager(scope, "describe")
        with mgr._lock:
            pds = sorted(mgr._pds.values(), key=lambda x: x.pd_id)
        return [{"pd": pd.pd_id, "name": pd.config.get("/name", ""), "status": pd.status.name,
                 "parent": pd.parent, "mem": pd.desc.mem, "cpu": pd.cpus_max, "priority": pd.priority,
                 "sha256": pd.measurement["sha256"].hex() if "sha256" in pd.measurement else ""} for pd in pds]

    def m_status_board(self, scope: Any, params: dict, fd: None) -> tuple[dict[str, Any], int]:
        """A read-only descriptor of the status board (board.py): list_pd and statuses without a request."""
        self._manager(scope, "status_board")
        return {}, self._board.reader_fd()

    def m_layer_info(self, scope: Any, params: dict, fd: None) -> dict[str, Any]:
        return self._manager(scope, "layer_info").layer_info()

    def m_measurement(self, scope: Any, params: dict, fd: None) -> dict[str, str]:
        self._manager(scope, "measurement")
        return {b: d.hex() for b, d in self._ctl(scope, params).measurement().items()}

    def m_read_console(self, scope: Any, params: dict, fd: None) -> dict[str, Any]:
        self._manager(scope, "read_console")
        since, timeout = params.get("since", 0), _timeout(params.get("timeout"))
        total, data = self._ctl(scope, params).read_console(since, timeout)
        start = total - len(data)
        chunk = data[:MAX_CONSOLE_CHUNK]
        return {"offset": start + len(chunk), "data": chunk.hex()}

    def m_wait(self, scope: Any, params: dict, fd: None) -> str:
        self._manager(scope, "wait")
        return self._ctl(scope, params).wait(_timeout(params.get("timeout"))).name

    def m_seal_credentials(self, scope: Any, params: dict, fd: None) -> str:
        mgr = self._manager(scope, "seal_credentials")
        policy = p.integrity_policy_from_wire(params.get("policy"))
        return mgr.seal_credentials(policy, p.hex_bytes(params.get("secret"), "secret")).hex()

    def m_get_storage_public(self, scope: Any, params: dict, fd: None) -> str:
        return self._manager(scope, "get_storage_public").get_storage_public().hex()

    def m_list_devices(self, scope: Any, params: dict, fd: None) -> list[str]:
        return self._manager(scope, "list_devices").get_device_manager().list_devices()

    def m_assigned(self, scope: Any, params: dict, fd: None) -> list[str]:
        return self._manager(scope, "assigned").get_device_manager().assigned(params.get("pd"))

    def m_assign(self, scope: Any, params: dict, fd: None) -> None:
        self._manager(scope, "assign").get_device_manager().assign(params.get("device"), params.get("pd"))

    def m_unassign(self, scope: Any, params: dict, fd: None) -> None:
        self._manager(scope, "unassign").get_device_manager().unassign(params.get("device"), params.get("pd"))


def _timeout(value: Any) -> float:
    if value is None:
        return MAX_WAIT
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise InvalidArgument(f"timeout {value!r} must be a number of seconds >= 0")
    return min(float(value), MAX_WAIT)


class KeptChannels(ChannelServer):
    """The PD channel server whose layer ends are held by the fd keeper, and whose owed replies are in a ledger."""

    def __init__(self, handler: Any, registry: Any, keeper: Keeper, ledger: Ledger):
        super().__init__(handler, registry)
        self._keeper = keeper
        self._ledger = ledger

    def attach(self, pd_id: int, layer: socket.socket, *, keep: bool = True) -> None:
        if keep:
            self._keeper.put(f"pd{pd_id}.channel", layer.fileno())
        super().attach(pd_id, layer)

    def _taken(self, pd_id: int, msg_id: Any, method: str, params: dict) -> None:
        timeout = params.get("timeout") if method == "accept" else None
        self._ledger.add(pd_id, msg_id, method, params, timeout if isinstance(timeout, (int, float)) else None)

    def _answered(self, pd_id: int, msg_id: Any) -> None:
        self._ledger.remove(pd_id, msg_id)

    def _ended(self, pd_id: int) -> None:
        self._ledger.forget(pd_id)

    def take_up(self, owed: list[Pending]) -> None:
        """After a restart: run again what is safe to (reads, accept with what is left of its timeout),
        answer the rest with an error saying it was cut off."""
        for call in owed:
            if call.method == "accept":
                left = None if call.deadline is None else max(0.0, call.deadline - time.time())
                self.resume(call.pd_id, call.msg_id, "accept", {"timeout": left})
            elif call.method in READ_ONLY:
                self.resume(call.pd_id, call.msg_id, call.method, call.params)
            else:
                self.interrupt(call.pd_id, call.msg_id, ResourceError(
                    f"{call.method} by PD {call.pd_id} was cut off by a restart of bmid: what it had begun was "
                    f"finished or rolled back; look before calling it again", pd_id=call.pd_id))


def system_driver(uri: str, keeper: Keeper, on_exit: Any) -> Keeping:
    """The driver bmid runs for uri (Xen's imported only there: it needs the libxl shim)."""
    if uri == XEN_URI:
        from .xen import XenSystemDriver
        return XenSystemDriver(keeper, on_exit)
    return SystemDriver(keeper, on_exit)


class Daemon:
    """State, PDs and the socket of one bmid."""

    def __init__(self, *, state_dir: str, uri: str = LINUX_URI, socket_path: str | None = None,
                 group: int | None = None, integrity: bool = True, shutdown_grace: float | None = None):
        if uri not in URIS:
            raise InvalidArgument(f"bmid: cannot serve {uri!r}; it serves one of {', '.join(URIS)}")
        self.state_dir = state_dir
        self.socket_path = socket_path or default_socket(uri)
        self.group = group
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self._lockfile = os.open(os.path.join(state_dir, "bmid.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ResourceError(f"bmid: another bmid owns the state in {state_dir}") from None
        self.store = Store(state_dir)
        self.keeper = Keeper(os.path.join(state_dir, "keeper.sock"))
        self._exits: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        try:
            self.driver: Any = system_driver(uri, self.keeper, self._exits.put)
        except BaseException:
            self.keeper.close()
            self.store.close()
            os.close(self._lockfile)
            raise
        factory = None
        if integrity:
            from ..uri import _integrity_factory
            factory = _integrity_factory()
        self.mgr = PDManagement(self.driver, uri, integrity=factory,
                                registry=lambda on_incoming: KeptConnections(self.store, self.keeper, on_incoming))
        self.mgr._finalizer.detach()        # bmid ending must never destroy the PDs it owns
        if shutdown_grace is not None:
            self.mgr.shutdown_grace = shutdown_grace
        self.board = BoardWriter()
        self.board.set(0, PDStatus.RUNNING)
        self._dispatch = SystemDispatcher(lambda caller: self.mgr if caller == 0 else self.mgr.scoped(caller),
                                          self.board)
        self.ledger = Ledger(state_dir)
        if self.driver.channels:
            self.mgr._channel_server = KeptChannels(self._channel_call, self.mgr._registry, self.keeper,
                                                    self.ledger)
        self._cache: dict[int, dict[str, Any]] = {}
        self._subscribers: set[queue.SimpleQueue[Event]] = set()
        self._sub_lock = threading.Lock()
        self._alloc_lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self.restore()
        threading.Thread(target=self._reconcile_exits, name="bmid-exits", daemon=True).start()

    # -- persistence ----------------------------------------------------------------------
    def _record(self, pd: _PD) -> dict[str, Any]:
        ended = pd.ended
        return {
            "pd_id": pd.pd_id, "parent": pd.parent, "status": pd.status.name, "priority": pd.priority,
            "desc": {"mem": pd.desc.mem, "cpu": pd.desc.cpu, "performance": pd.desc.performance},
            "cpus_max": pd.cpus_max, "performance": pd.performance, "lent": pd.lent,
            "config": dict(pd.config),
            "policies": {str(t): [p.policy_to_wire(x) for x in ps] for t, ps in pd.policies.items()},
            "measurement": {b: d.hex() for b, d in pd.measurement.items()},
            "ended": None if ended is None else {"status": ended.status.name, "exit_status": ended.exit_status,
                                                 "reason": ended.reason},
            **self.driver.record(pd.handle),
        }

    def persist(self, ids: Iterable[int] | None = None, op_id: int | None = None) -> None:
        """Write the records of these PDs (all when None) as they are now, with an event per status change.

        The status board is updated in the same order, before the commit, so
        it never shows a status older than one a reply or an event reported.
        """
        events: list[Event] = []
        with self.store.tx() as db:
            with self.mgr._lock:
                current = dict(self.mgr._pds)
                next_id = self.mgr._next_id
            todo = set(current) | set(self._cache) if ids is None else set(ids)
            for pd_id in sorted(todo):
                pd, old = current.get(pd_id), self._cache.get(pd_id)
                if pd is None:
                    if old is not None:
                        Store.delete_pd(db, pd_id)
                        events.append(Store.add_event(db, pd_id, PDStatus.DESTROYED.name, ""))
                        del self._cache[pd_id]
                    self.board.remove(pd_id)
                    continue
                record = self._record(pd)
                self.board.set(pd_id, PDStatus[record["status"]])
                if record != old:
                    Store.write_pd(db, record)
                    if old is None or old["status"] != record["status"]:
                        reason = record["ended"]["reason"] if record["ended"] else ""
                        events.append(Store.add_event(db, pd_id, record["status"], reason))
                    self._cache[pd_id] = record
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES('next_id', ?)", (str(next_id),))
            if op_id is not None:
                Store.end(db, op_id)
        self._publish(events)

    # -- restart --------------------------------------------------------------------------
    def restore(self) -> None:
        """Adopt what the store knows; finish or roll back what was pending when bmid stopped."""
        records = self.store.pds()
        pending = self.store.pending()
        next_id = int(self.store.meta("next_id") or 1)
        for op in pending:
            if op.method == "allocate_pd" and op.pd_id is not None:
                next_id = max(next_id, op.pd_id + 1)
                if op.pd_id not in records:
                    log.info("rolling back the allocation of PD %d (never acknowledged)", op.pd_id)
                    self.driver.roll_back_allocation(op.pd_id, op.detail)
        restored: dict[int, _PD] = {}
        for pd_id, record in records.items():
            restored[pd_id] = self._adopt(pd_id, record)
            self._cache[pd_id] = record
            next_id = max(next_id, pd_id + 1)
        with self.mgr._lock:
            self.mgr._pds.update(restored)
            self.mgr._next_id = next_id
            self.mgr._destroyed.update(self.store.destroyed())
        kept_channels = {pd_id: fd for pd_id, pd in restored.items() if self.driver.channels and pd.status in _LIVE
                         and (fd := self.keeper.get(f"pd{pd_id}.channel")) is not None}
        # connections first: a channel that ends as soon as it is attached cuts them
        self.mgr._registry.restore(set(restored), set(kept_channels))
        owed = [call for call in self.ledger.take_all() if call.pd_id in kept_channels]
        if kept_channels:
            channels = self.mgr._channels()
            for pd_id, fd in kept_channels.items():
                channels.attach(pd_id, socket.socket(fileno=fd), keep=False)
        for pd in restored.values():        # what the layer enforces of the stored policies (Xen: rendezvous)
            for tid, policies in pd.policies.items():
                if tid in restored:
                    self.driver.connections_changed(pd.handle, restored[tid].handle, policies)
        for op in pending:
            pd = restored.get(op.pd_id) if op.pd_id is not None else None
            if pd is None:
                continue
            try:
                if op.method == "destroy":
                    log.info("finishing the destruction of PD %d", op.pd_id)
                    self.mgr._destroy(pd)
                elif op.method == "request_status_change" and op.detail.get("status") == "SHUTDOWN":
                    self.mgr.get_controller(pd.pd_id).request_status_change(PDStatus.SHUTDOWN)
            except BMIError as e:
                log.warning("finishing %s of PD %s after a restart: %s", op.method, op.pd_id, e)
        self.persist()
        with self.store.tx() as db:
            for op in pending:
                Store.end(db, op.op_id)
        if owed:
            self.mgr._channels().take_up(owed)

    def _adopt(self, pd_id: int, record: dict[str, Any]) -> _PD:
        desc = PDDescription(**record["desc"])
        found = self.driver.adopt(pd_id, desc, record)
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
        handle = found.handle
        policies = {int(t): [p.policy_from_wire(x) for x in ps] for t, ps in record.get("policies", {}).items()}
        return _PD(pd_id, desc, record["cpus_max"], handle, status=status, priority=record["priority"],
                   config=dict(record["config"]), policies=policies,
                   measurement={b: bytes.fromhex(h) for b, h in record["measurement"].items()},
                   performance=record["performance"], ended=previous, parent=record["parent"],
                   lent=record["lent"])

    def _reconcile_exits(self) -> None:
        """PD exits seen by the driver's monitor: pick up the status, store it, tell subscribers."""
        while True:
            pd_id = self._exits.get()
            if pd_id is None:
                return
            with self.mgr._lock:
                pd = self.mgr._pds.get(pd_id)
            if pd is None:
                continue
            with pd.lock:
                self.mgr._refresh(pd)
            try:
                self.persist([pd_id])
            except Exception:
                log.exception("storing the exit of PD %d", pd_id)

    # -- calls ----------------------------------------------------------------------------
    def call(self, caller: int, method: str, params: dict, fd: int | None) -> tuple[Any, int | None]:
        """One request, with its intent and its result stored before it is answered."""
        if method in READ_ONLY or not hasattr(self._dispatch, "m_" + method):
            answer = self._dispatch(caller, method, params, fd)
            self._settle(params.get("pd"))
            return answer
        target = params.get("pd", caller if caller else None)
        detail = {k: v for k, v in params.items() if k in ("status", "tid", "name")}
        if method == "allocate_pd":
            with self._alloc_lock:
                pd_id = self.mgr._next_id
                op = self.store.begin(method, pd_id, **self.driver.allocation_intent(pd_id))
                try:
                    value, out = self._dispatch(caller, method, params, fd)
                finally:
                    self.persist([pd_id, caller] if caller else [pd_id], op)
            return value, out
        op = self.store.begin(method, target if isinstance(target, int) else None, **detail)
        try:
            return self._dispatch(caller, method, params, fd)
        finally:
            # destroy removes descendants; a lowered limit lowers theirs (api.LIMITS): store them all
            everyone = method in ("destroy", "set_priority", "set_runtime_param")
            self.persist(None if everyone else [t for t in (target, caller) if isinstance(t, int) and t], op)

    def _settle(self, pd_id: Any) -> None:
        """Store (and show on the board) an exit this read noticed before the exit watcher did.

        A client that saw `wait` return or /system/exit-status filled in
        must not then read the old status from the board.
        """
        with self.mgr._lock:
            pd = self.mgr._pds.get(pd_id) if isinstance(pd_id, int) else None
        cached = self._cache.get(pd_id) if pd is not None else None
        if cached is not None and pd.status.name != cached["status"]:
            self.persist([pd_id])

    def _channel_call(self, caller: int, method: str, params: dict, fd: int | None) -> tuple[Any, int | None]:
        return self.call(caller, method, params, fd)

    # -- events ---------------------------------------------------------------------------
    def _publish(self, events: list[Event]) -> None:
        if not events:
            return
        with self._sub_lock:
            subscribers = list(self._subscribers)
        for sub in subscribers:
            for event in events:
                sub.put(event)

    def _stream_events(self, conn: socket.socket, msg_id: Any, params: dict) -> None:
        """Turn this connection into an event stream: backlog after `since`, then live events."""
        since = params.get("since")
        if since is not None and (isinstance(since, bool) or not isinstance(since, int)):
            p.send(conn, p.error_from(msg_id, InvalidArgument("subscribe: since must be an event number")))
            return
        sub: queue.SimpleQueue[Event] = queue.SimpleQueue()
        with self._sub_lock:
            self._subscribers.add(sub)
        try:
            last = self.store.last_event() if since is None else since
            p.send(conn, p.result(msg_id, {"last": last}))
            while not self._stopping.is_set():
                backlog = self.store.events_since(last) if since is not None else []
                since = None
                for event in backlog:
                    self._send_event(conn, event)
                    last = event.seq
                try:
                    event = sub.get(timeout=EVENT_POLL)
                except queue.Empty:
                    if _peer_gone(conn):
                        return
                    continue
                if event.seq > last:
                    self._send_event(conn, event)
                    last = event.seq
        except OSError:
            return
        finally:
            with self._sub_lock:
                self._subscribers.discard(sub)

    @staticmethod
    def _send_event(conn: socket.socket, event: Event) -> None:
        p.send(conn, {"jsonrpc": "2.0", "method": "event", "params": event.to_wire()})

    # -- the socket -----------------------------------------------------------------------
    def listen(self) -> None:
        """Bind the socket (root-only; 0660 to the read-only group when one is configured)."""
        directory = os.path.dirname(self.socket_path)
        os.makedirs(directory, mode=0o755, exist_ok=True)
        try:
            os.unlink(self.socket_path)         # left by a bmid that died; we hold the state lock
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(self.socket_path)
        finally:
            os.umask(old)
        if self.group is not None:
            os.chown(self.socket_path, 0, self.group)
            os.chmod(self.socket_path, 0o660)
        sock.listen(128)
        self._listener = sock

    def serve_forever(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                raise
            threading.Thread(target=self._serve_client, args=(conn,), name="bmid-client", daemon=True).start()

    def _role(self, conn: socket.socket) -> str:
        """'admin' for root, 'read' for the configured group, '' for anyone else."""
        pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                             struct.calcsize("3i")))
        if uid == 0:
            return "admin"
        if self.group is not None and (gid == self.group or self.group in _groups_of(pid)):
            return "read"
        return ""

    def _serve_client(self, conn: socket.socket) -> None:
        with conn:
            role = self._role(conn)
            while True:
                record = p.next_record(conn)
                if record is None:
                    return
                data, fds, whole = record
                msg_id: Any = None
                out: int | None = None
                try:
                    if not whole:
                        raise p.ProtocolError(p.INVALID_REQUEST, f"record truncated (at most {p.MAX_MESSAGE} bytes)")
                    msg = p.decode(data)
                    msg_id = msg.get("id") if isinstance(msg, dict) else None
                    method, params = _check_request(msg)
                    if not role or (role == "read" and method not in READ_ONLY):
                        who = "a read-only client" if role else "this user"
                        raise PermissionDenied(f"{method}: {who} may not call it on bmid ({self.socket_path})")
                    if method == "subscribe":
                        self._stream_events(conn, msg_id, params)
                        return
                    fd = fds.pop(0) if fds and method == "setup_pd" else None
                    try:
                        value, out = self.call(0, method, params, fd)
                    finally:
                        if fd is not None:
                            os.close(fd)
                    reply = p.result(msg_id, value)
                except Exception as e:      # a request must never take bmid down
                    if not isinstance(e, (p.ProtocolError, BMIError)):
                        log.exception("a client's %s failed inside bmid", msg_id)
                    reply = p.error_from(msg_id, e)
                finally:
                    for fd in fds:
                        os.close(fd)
                try:
                    _send_reply(conn, reply, (out,) if out is not None else ())
                except (OSError, BMIError):
                    return
                finally:
                    if out is not None:
                        os.close(out)

    def stop(self) -> None:
        """Stop serving; the PDs keep running and the keeper keeps their fds."""
        self._stopping.set()
        if self._listener is not None:
            self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass


def _send_reply(conn: socket.socket, reply: dict, fds: tuple[int, ...]) -> None:
    """One record, or when the reply is larger (a 256 KiB console log) pieces {"more": hex} ending in "last"."""
    data = p.encode(reply)
    if len(data) <= p.MAX_MESSAGE:
        p.send_encoded(conn, data, fds)
        return
    pieces = range(0, len(data), REPLY_PIECE)
    for start in pieces:
        last = start == pieces[-1]
        p.send(conn, {"jsonrpc": "2.0", "id": reply.get("id"), "more": data[start:start + REPLY_PIECE].hex(),
                      "last": last}, fds if last else ())


def _groups_of(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            line = next(x for x in f if x.startswith("Groups:"))
    except (OSError, StopIteration):
        return set()
    return {int(g) for g in line.split()[1:]}


def _peer_gone(conn: socket.socket) -> bool:
    poller = select.poll()
    poller.register(conn, select.POLLIN | select.POLLHUP | select.POLLRDHUP)
    return bool(poller.poll(0))

