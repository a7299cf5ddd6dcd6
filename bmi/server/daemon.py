"""bmid: owns the PDs of linux:///system (or xen:///system) across its own restarts and crashes.

One bmid per driver, like libvirt's modular daemons (virtqemud, virtxend):
a libxl failure cannot take the Linux PDs' service down.  One PDManagement
(the same semantics as session mode, bmi/api.py) over the driver's Keeping
variant (bmi/drivers/*/system.py, bmi/drivers/keeping.py), answered on a Unix socket with the PD channel's protocol
(JSON-RPC 2.0 over SOCK_SEQPACKET, bmi/channel/protocol.py; the requests
are those of bmi/channel/dispatch.py plus a few manager-only ones below).

Crash safety, in order, for every call that changes something:
0. while the state directory is full (the store's reserve spent and not
   made again) the call is refused before anything happens,
1. the intent is written to the store (ops table; no fsync of its own,
   see Store.begin) when restore() would act on it (INTENDED),
2. the call runs,
3. the changed PD records, any status events and the end of the intent are
   written in one transaction (from the reserve if the disk is full),
   shared with the changes other clients made meanwhile (group commit:
   Store.commit, or the client loop's commit_held, clients.py), then made
   durable by one sync of the WAL for all; if either fails bmid exits at
   once (failstop.FAIL_STOP) so memory never holds a change the store
   lacks, every member of the group is refused, and the next start treats
   it as a crash,
4. the record cache follows the commit; only once it is durable do the
   status board and event subscribers see the change, and only then is
   the reply sent.
A PD's exit record is read through the fd keeper, which keeps it until the
PD's exit is stored.  Before any of this, at start, the state is checked
(locks, database, ledger, reserve, leftovers of an earlier bmid) and a
state bmid cannot use is refused in one line before any PD is touched
(docs/bmid-state.md).
At start, restore() adopts every stored PD (driver.adopt: Linux checks pid +
start time + cgroup, Xen domid + UUID), takes back the connections between
PDs (connections.py), re-attaches the channels the fd keeper held, finishes what a
pending intent asked for where that is safe (destroy, shutdown: a PD that
ended meanwhile is SHUTDOWN with its exit status) and rolls back the rest
(an allocation without a record, a start whose process was never
recorded); the store's record is the truth for everything else.  What it
needs to say how a run ended stays with the keeper until its result is
committed.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import queue
import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterable

from ..api import PDController, PDManagement
from ..channel import protocol as p
from ..channel.board import BoardWriter
from ..channel.dispatch import Dispatcher
from ..channel.methods import READ_ONLY
from ..channel.server import ChannelServer
from ..drivers import BMIDS
from ..drivers.keeping import Keeping
from ..drivers.linux.system import leftover_cgroups
from ..errors import BMIError, InvalidArgument, PermissionDenied, ResourceError
from ..store import DB_FILE, RESERVE_BYTES, Commit, Event, StateError, Store, private_dir, state_failure
from ..system import LINUX_URI, default_socket
from ..types import PDStatus
from .clients import SEND_TIMEOUT, ClientLoop
from .connections import KeptConnections
from .failstop import stop_unstored
from .inflight import Ledger, Pending
from .keeper import Keeper, existing as existing_keeper

log = logging.getLogger("bmi.bmid")

URIS = tuple(BMIDS)
MAX_CONSOLE_CHUNK = 16 * 1024       # bytes of console per reply (hex doubles it; MAX_MESSAGE is 64 KiB)
MAX_WAIT = 60.0
EVENT_POLL = 0.5
EXIT_RETRY = 1.0                # s between attempts to store an exit while the state directory is full
ACCEPT_WAKE = 1.0               # s: how long a pending SIGTERM may wait for the main thread (serve_forever)
ACCEPT_BACKOFF = 0.1            # s serve_forever waits when accept() is short of fds or memory
ACCEPT_BACKOFF_LOG = 10.0       # s between two log lines about it
SUBSCRIBERS_MAX = 128           # event streams at once (a thread each, woken every EVENT_POLL s)
SUBSCRIBER_QUEUE = 1000         # live events held for one stream; past that it reads them from the store
_SHORT_OF = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
TEST_PAUSE = "BMID_TEST_PAUSE"  # tests only: e.g. "commit:destroy exit" stops bmid there (see test_pause)
_PAUSES = frozenset(os.environ.get(TEST_PAUSE, "").split())     # read once: test_pause runs on every change
_LIVE = (PDStatus.RUNNING, PDStatus.PAUSED)
NETWORK_METHODS = ("create_network", "destroy_network")
NETWORKS_KEY = "networks"        # meta: the host networks bmid made (list_networks() dicts), made again at start
_NEXT_ID = "next_id"            # in Store.staged (keyed by PD id otherwise): the next_id this group wrote
#: The changes whose stored intent restore() acts on (an allocation rolled back, a destroy or a SHUTDOWN
#: finished): only these store one before they begin.  Any other change is stored by the commit after it;
#: an intent of it would be deleted unread at the next start, for a transaction per call.
INTENDED = ("allocate_pd", "destroy", "request_status_change")
#: READ_ONLY (bmi/channel/methods.py): what a read-only client (the configured group) may call.


class SystemDispatcher(Dispatcher):
    """The channel's requests plus what a manager client needs beyond them (manager callers only)."""

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
        return self._manager(scope, "describe").describe(refresh=False)

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
        self._manager(scope, "assign").get_device_manager().assign(params.get("device"), params.get("pd"),
                                                                   params.get("mode", 3), params.get("shared", False))

    def m_unassign(self, scope: Any, params: dict, fd: None) -> None:
        self._manager(scope, "unassign").get_device_manager().unassign(params.get("device"), params.get("pd"))

    def m_create_network(self, scope: Any, params: dict, fd: None) -> None:
        self._manager(scope, "create_network").get_device_manager().create_network(
            params.get("name"), params.get("subnet"), params.get("nat", False))

    def m_list_networks(self, scope: Any, params: dict, fd: None) -> list[dict]:
        return self._manager(scope, "list_networks").get_device_manager().list_networks()

    def m_destroy_network(self, scope: Any, params: dict, fd: None) -> None:
        self._manager(scope, "destroy_network").get_device_manager().destroy_network(params.get("name"))


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
    """The driver bmid runs for uri (imported only there: Xen's needs the libxl shim)."""
    return BMIDS[uri].bmid_driver(keeper, on_exit)


class Daemon:
    """State, PDs and the socket of one bmid."""

    def __init__(self, *, state_dir: str, uri: str = LINUX_URI, socket_path: str | None = None,
                 group: int | None = None, integrity: bool = True, shutdown_grace: float | None = None):
        if uri not in URIS:
            raise InvalidArgument(f"bmid: cannot serve {uri!r}; it serves one of {', '.join(URIS)}")
        self.state_dir = state_dir
        self.socket_path = socket_path or default_socket(uri)
        self.group = group
        with contextlib.ExitStack() as undo:
            self._lockfile = _lock_state(state_dir)
            undo.callback(os.close, self._lockfile)
            self._socket_lock = _lock_socket(self.socket_path, state_dir)
            undo.callback(os.close, self._socket_lock)
            earlier = _earlier_bmids(self._lockfile)
            _refuse_fresh_state_beside_leftovers(state_dir, earlier)
            self.store = Store(state_dir)
            undo.callback(self.store.close)
            self.ledger = Ledger(state_dir)
            undo.callback(self.ledger.close)
            if not self.store.make_reserve():
                raise StateError(f"start bmid in {state_dir}: the state directory is full (bmid needs "
                                 f"{RESERVE_BYTES >> 20} MiB there in reserve before it touches any PD); free "
                                 f"space there and start it again")
            _note_bmid(self._lockfile, state_dir, [p for p in earlier if leftover_cgroups([p])])
            self.keeper = Keeper(os.path.join(state_dir, "keeper.sock"))
            undo.callback(self.keeper.close)
            self._exits: queue.SimpleQueue[int | None] = queue.SimpleQueue()
            self.driver: Any = system_driver(uri, self.keeper, self._exits.put)
            undo.pop_all()
        factory = None
        if integrity:
            from ..uri import _integrity_factory
            factory = _integrity_factory()
        self.mgr = PDManagement(self.driver, uri, integrity=factory,
                                registry=lambda on_incoming: KeptConnections(self.store, self.keeper, on_incoming))
        self.mgr.keep_pds_when_dropped()        # bmid ending must never destroy the PDs it owns
        if shutdown_grace is not None:
            self.mgr.shutdown_grace = shutdown_grace
        self.board = BoardWriter()
        self.board.set(0, PDStatus.RUNNING)
        self._dispatch = SystemDispatcher(lambda caller: self.mgr if caller == 0 else self.mgr.scoped(caller),
                                          self.board)
        if self.driver.channels:
            self.mgr.install_channels(KeptChannels(self._channel_call, self.mgr.registry, self.keeper,
                                                   self.ledger))
        self._cache: dict[int, dict[str, Any]] = {}
        self._stored_next_id: int | None = None     # meta next_id as committed (None: not yet by this bmid)
        self._subscribers: set[_Subscriber] = set()
        self._sub_lock = threading.Lock()
        self._published = self.store.last_event()  # the newest event published (stored and durable)
        self._alloc_lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._accept_logged = 0.0                # when serve_forever last logged an accept() short of fds
        self._stopping = threading.Event()
        self._holding = threading.local()       # .changes: what hold_changes() collects in a thread
        self._held_calls = 0                    # how many calls the commit_held() under way stores (tests)
        self._clients = ClientLoop(self)
        if "group" in _PAUSES:
            self._gather_groups_for_tests()
        self.restore()
        threading.Thread(target=self._reconcile_exits, name="bmid-exits", daemon=True).start()

    def _gather_groups_for_tests(self) -> None:
        """BMID_TEST_PAUSE=group (tests only): while a file gather-<n> is in the state directory, a change
        waits (up to 30 s) until n changes are queued for the next commit group, and that group stops at the
        pause point group-of-<its size> inside its transaction, before its COMMIT."""
        def gathering() -> int:
            return next((int(n[7:]) for n in os.listdir(self.state_dir) if n.startswith("gather-")), 0)

        def gather() -> None:
            if self._held_calls:        # the client loop's commit: its calls were gathered by the loop
                return
            want, deadline = gathering(), time.monotonic() + 30
            while want and 0 < self.store.queued() < want and time.monotonic() < deadline:
                time.sleep(0.005)       # (an empty queue: a group took this change already)

        def pause(members: int) -> None:
            if gathering():     # the client loop's calls are one member (commit_held): count the calls
                _pause_at(self.state_dir, f"group-of-{self._held_calls or members}")

        self.gathering = gathering                      # type: ignore[method-assign]
        self.store.before_group_test_hook = gather       # type: ignore[method-assign]
        self.store.group_test_hook = pause               # type: ignore[method-assign]

    def gathering(self) -> int:
        """How many changes the client loop's round is to gather before its commit: 0 (tests: see above)."""
        return 0

    # -- persistence ----------------------------------------------------------------------
    def persist(self, ids: Iterable[int] | None = None, op_id: int | None = None, *, ops: Iterable[int] = (),
                restarted: int | None = None, made_by: str | None = None) -> None:
        """Write the records of these PDs (all when None) as they are now, with an event per status change.

        Nothing in memory changes before the commit succeeded: the record
        cache (what the database holds, which the next work compares with)
        follows the COMMIT, and what clients see (the status board, events)
        follows only once it is durable; a failed commit leaves both as the
        store has them.  The board is updated under the store's lock, in
        commit order, so it never shows a status older than one a reply or
        an event reported.  `restarted`: that PD went through RESTARTING in
        this call.  In a thread that holds its changes (hold_changes) the
        commit waits for commit_held(); `made_by` names the call whose
        change this is (bmid stops if it cannot be stored, see
        _store_or_stop), None for a status a read noticed.
        """
        ended = [*ops, *(() if op_id is None else (op_id,))]
        held = getattr(self._holding, "changes", None)
        if held is not None:
            held.append(_Held(None if ids is None else list(ids), ended, restarted, made_by))
            return
        work, after, committed = self._persistence(ids, ended, () if restarted is None else (restarted,))
        self.store.commit(work, after, committed)

    def _persistence(self, ids: Iterable[int] | None, ended: list[int], restarted: Collection[int]
                     ) -> tuple[Callable[[Any], Any], Callable[[Any], None], Callable[[Any], None]]:
        """persist()'s work, after and committed for Store.commit: see there."""
        def work(db: Any) -> tuple[list[Event], dict[int, dict[str, Any] | None], dict[int, PDStatus], int]:
            events: list[Event] = []
            written: dict[int, dict[str, Any] | None] = {}
            shown: dict[int, PDStatus] = {}
            current, next_id = self.mgr.records(ids)
            staged = self.store.staged          # what earlier members of this commit group wrote
            todo = set(current) | set(self._cache) | set(staged) - {_NEXT_ID} if ids is None else set(ids)
            for pd_id in sorted(todo):
                record = current.get(pd_id)
                old = staged[pd_id] if pd_id in staged else self._cache.get(pd_id)
                if record is None:
                    if old is not None:
                        self.store.delete_pd(pd_id)
                        events.append(Store.add_event(db, pd_id, PDStatus.DESTROYED.name, "",
                                                      old["config"].get("/name", "")))
                        written[pd_id] = staged[pd_id] = None
                    continue
                shown[pd_id] = PDStatus[record["status"]]
                name = record["config"].get("/name", "")
                if pd_id in restarted:
                    events.append(Store.add_event(db, pd_id, PDStatus.RESTARTING.name, "restart requested", name))
                if record != old or pd_id in restarted:
                    self.store.write_pd(record)
                    if old is None or old["status"] != record["status"] or pd_id in restarted:
                        reason = record["ended"]["reason"] if record["ended"] else ""
                        events.append(Store.add_event(db, pd_id, record["status"], reason, name))
                    written[pd_id] = staged[pd_id] = record
            if next_id != staged.get(_NEXT_ID, self._stored_next_id):
                db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES('next_id', ?)", (str(next_id),))
                staged[_NEXT_ID] = next_id
            for op in ended:
                Store.end(db, op)
            return events, written, shown, next_id

        def committed(result: tuple[list[Event], dict[int, dict[str, Any] | None], dict[int, PDStatus], int]
                      ) -> None:
            _, written, _, self._stored_next_id = result
            for pd_id, record in written.items():
                if record is None:
                    self._cache.pop(pd_id, None)
                else:
                    self._cache[pd_id] = record

        def after(result: tuple[list[Event], dict[int, dict[str, Any] | None], dict[int, PDStatus], int]) -> None:
            events, written, shown, _ = result
            for pd_id, record in written.items():
                if record is None:
                    self.board.remove(pd_id)
            for pd_id, status in shown.items():
                self.board.set(pd_id, status)
            self._publish(events)

        return work, after, committed

    def hold_changes(self) -> list[Any]:
        """From now on what persist() is asked for in this thread is not committed but collected in the list
        returned, for commit_held() to commit as one group: the client loop's calls (clients.py)."""
        self._holding.changes = []
        return self._holding.changes

    def commit_held(self, changes: list[Any]) -> Commit:
        """Commit what hold_changes() collected as one persist() of all of it (a few calls' records in one pass,
        not one group member each), without waiting for the sync: the caller answers the calls once
        store.durable() reaches the Commit's seq, and checks it again then."""
        ids = None if any(h.ids is None for h in changes) else [i for h in changes for i in h.ids]
        ended = [op for h in changes for op in h.ended]
        restarted = {h.restarted for h in changes if h.restarted is not None}
        self._held_calls = len(changes)
        try:
            commit = self.store.commit_all([self._persistence(ids, ended, restarted)])
        finally:
            self._held_calls = 0
        self.check_held(changes, commit)
        return commit

    @staticmethod
    def check_held(changes: list[Any], commit: Commit) -> None:
        """bmid stops if the calls' changes in `commit` could not be stored (only statuses reads noticed: a
        warning, their exit watcher stores them)."""
        error = next((e for e in commit.errors() if e is not None), None)
        if error is None:
            return
        calls = sorted({h.made_by for h in changes if h.made_by is not None})
        if calls:
            stop_unstored(", ".join(calls), error)
        log.warning("storing a PD's exit a read noticed (its exit watcher stores it): %s", error)

    # -- restart --------------------------------------------------------------------------
    def restore(self) -> None:
        """Adopt what the store knows; finish or roll back what was pending when bmid stopped.

        Nothing a later start needs is let go of before the result is
        stored: the keeper's copies of ended runs' pipes are dropped only
        after the commit, so a death anywhere in here leaves the next start
        the same picture.
        """
        self._restore_networks()
        records = self.store.pds()
        pending = self.store.pending()
        next_id = int(self.store.meta("next_id") or 1)
        for op in pending:
            if op.method == "allocate_pd" and op.pd_id is not None:
                next_id = max(next_id, op.pd_id + 1)
                if op.pd_id not in records:
                    log.info("rolling back the allocation of PD %d (never acknowledged)", op.pd_id)
                    self.driver.roll_back_allocation(op.pd_id, op.detail)
        for pd_id, record in records.items():
            self._cache[pd_id] = record
            next_id = max(next_id, pd_id + 1)
        restored = self.mgr.adopt(records, next_id, self.store.destroyed())
        release = [key for _, kept_keys in restored.values() for key in kept_keys]
        kept_channels = {pd_id: fd for pd_id, (status, _) in restored.items() if self.driver.channels
                         and status in _LIVE and (fd := self.keeper.get(f"pd{pd_id}.channel")) is not None}
        # connections first: a channel that ends as soon as it is attached cuts them
        self.mgr.registry.restore(set(restored), set(kept_channels))
        left = self.ledger.owed()       # removed only once restore() is stored
        owed = [call for call in left if call.pd_id in kept_channels]
        if kept_channels:
            channels = self.mgr.channels()
            for pd_id, fd in kept_channels.items():
                channels.attach(pd_id, socket.socket(fileno=fd), keep=False)
        self.mgr.enforce_policies()        # what the layer enforces of the stored policies (Xen: rendezvous)
        for op in pending:
            if op.pd_id not in restored:
                continue
            try:
                if op.method == "destroy":
                    log.info("finishing the destruction of PD %d", op.pd_id)
                    self.mgr.get_controller(op.pd_id).destroy()
                elif op.method == "request_status_change" and op.detail.get("status") == "SHUTDOWN" and \
                        records[op.pd_id]["status"] in (s.name for s in _LIVE):
                    self.mgr.finish_shutdown(op.pd_id)
            except BMIError as e:
                log.warning("finishing %s of PD %s after a restart: %s", op.method, op.pd_id, e)
        test_pause(self.state_dir, "restore")
        self.persist(ops=[op.op_id for op in pending])
        for key in release:
            self.keeper.drop(key)
        for call in left:
            self.ledger.remove(call.pd_id, call.msg_id)
        if owed:
            self.mgr.channels().take_up(owed)

    # -- host networks: bmid's own, kept in its store (meta "networks") and made again at its start --------
    def _store_networks(self) -> None:
        self.store.set_meta(NETWORKS_KEY, json.dumps(self.mgr.get_device_manager().list_networks()))

    def _restore_networks(self) -> None:
        """Before PDs are adopted: the bridges their /net config names exist again (after a host reboot)."""
        stored = json.loads(self.store.meta(NETWORKS_KEY) or "[]")
        if self.mgr.adopt_networks(stored) != stored:
            self._store_networks()

    def _reconcile_exits(self) -> None:
        """PD exits seen by the driver's monitor: pick up the status, store it, tell subscribers.

        An exit that cannot be stored (a full disk) is tried again later; its
        record stays with the fd keeper until then, so a crash loses nothing.
        """
        while True:
            pd_id = self._exits.get()
            if pd_id is None:
                return
            if not self.mgr.refresh(pd_id):
                continue
            test_pause(self.state_dir, "exit")
            try:
                self.persist([pd_id])
            except BMIError as e:
                log.warning("storing the exit of PD %d (tried again in %gs): %s", pd_id, EXIT_RETRY, e)
                threading.Timer(EXIT_RETRY, self._exits.put, (pd_id,)).start()

    # -- calls ----------------------------------------------------------------------------
    def call(self, caller: int, method: str, params: dict, fd: int | None) -> tuple[Any, int | None]:
        """One request, with its intent and its result stored before it is answered.

        A change is refused before it begins while the state directory is
        full.  Once it has run, its result is stored or bmid stops (see
        _store_or_stop): memory never holds a change the store does not.
        """
        if method in READ_ONLY or not hasattr(self._dispatch, "m_" + method):
            answer = self._dispatch(caller, method, params, fd)
            self._settle(params.get("pd"))
            return answer
        if self.store.short and not self.store.make_reserve():
            raise self.store.full_error(f"{method} by {'PD %d' % caller if caller else 'a client'}")
        target = params.get("pd", caller if caller else None)
        if method == "allocate_pd":
            with self._alloc_lock:
                pd_id = self.mgr.next_id()
                op = self.store.begin(method, pd_id, **self.driver.allocation_intent(pd_id))
                try:
                    value, out = self._dispatch(caller, method, params, fd)
                finally:
                    self._store_or_stop(method, [pd_id, caller] if caller else [pd_id], op)
            return value, out
        op: int | None = None
        restarted: int | None = None
        # what the call can change: a destroy, the PDs it reaches (found before they are gone); a lowered limit
        # lowers the PD's subtree's (api.LIMITS); any call, its target and caller
        ids = [t for t in (target, caller) if isinstance(t, int) and t]
        if method == "destroy" and isinstance(target, int):
            ids = [*self.mgr.reach_of_destroy(target), *ids]
        elif method in ("set_priority", "set_runtime_param") and isinstance(target, int):   # 0: the manager
            ids = [*self.mgr.subtree(target), *ids]
        if method in INTENDED:
            detail = {k: v for k, v in params.items() if k in ("status", "tid", "name")}
            op = self.store.begin(method, target if isinstance(target, int) else None, **detail)
            restarted = target if method == "request_status_change" and str(params.get("status")).upper() == \
                PDStatus.RESTARTING.name and isinstance(target, int) else None
        try:
            answer = self._dispatch(caller, method, params, fd)
            if method in NETWORK_METHODS:
                self._store_networks()
        except BMIError:
            restarted = None
            raise
        finally:
            self._store_or_stop(method, ids, op, restarted)
        return answer

    def _store_or_stop(self, method: str, ids: list[int] | None, op: int | None,
                       restarted: int | None = None) -> None:
        """Store what the call did; if even the reserve cannot make that possible, end bmid at once.

        What the call changed outside bmid (a process started, a cgroup
        made) cannot be taken back reliably, and memory must not hold a
        change the store lacks; the next start finishes or rolls back the
        call from its stored intent, as after a crash.
        """
        test_pause(self.state_dir, "commit", f"commit:{method}")
        try:
            self.persist(ids, op, restarted=restarted, made_by=method)
        except BaseException as e:
            stop_unstored(method, e)

    def _settle(self, pd_id: Any) -> None:
        """Store (and show on the board) an exit this read noticed before the exit watcher did.

        A client that saw `wait` return or /system/exit-status filled in
        must not then read the old status from the board.
        """
        status = self.mgr.status_of(pd_id) if isinstance(pd_id, int) else None
        cached = self._cache.get(pd_id) if status is not None else None
        if cached is not None and status.name != cached["status"]:
            try:
                self.persist([pd_id])
            except BMIError as e:       # a full disk: the exit watcher stores it once there is room
                log.warning("storing the exit of PD %d: %s", pd_id, e)

    def _channel_call(self, caller: int, method: str, params: dict, fd: int | None) -> tuple[Any, int | None]:
        return self.call(caller, method, params, fd)

    # -- events ---------------------------------------------------------------------------
    def _publish(self, events: list[Event]) -> None:
        if not events:
            return
        with self._sub_lock:
            self._published = max(self._published, max(event.seq for event in events))
            subscribers = list(self._subscribers)
        for sub in subscribers:
            for event in events:
                sub.put(event)

    def stream_events(self, conn: socket.socket, msg_id: Any, params: dict) -> None:
        """Turn this connection into an event stream: backlog after `since`, then live events.

        A client that stops reading costs bmid at most SUBSCRIBER_QUEUE
        events (then its stream catches up from the store) and its thread
        for SEND_TIMEOUT (then it is dropped).
        """
        since = params.get("since")
        if since is not None and (isinstance(since, bool) or not isinstance(since, int)):
            p.send(conn, p.error_from(msg_id, InvalidArgument("subscribe: since must be an event number")))
            return
        sub = _Subscriber()
        with self._sub_lock:
            full = len(self._subscribers) >= SUBSCRIBERS_MAX
            if not full:
                self._subscribers.add(sub)
            published = self._published
        if full:
            p.send(conn, p.error_from(msg_id, ResourceError(
                f"subscribe: bmid streams events to {SUBSCRIBERS_MAX} subscribers at most; close one first")))
            return
        conn.settimeout(SEND_TIMEOUT)
        try:
            # "from now" is the newest event published: one stored but not yet durable comes live
            last = published if since is None else since
            p.send(conn, p.result(msg_id, {"last": last}))
            behind = since is not None
            while not self._stopping.is_set():
                if behind or sub.behind:
                    sub.behind = False      # (before reading the store: what is published meanwhile is queued)
                    last = self._catch_up(conn, last)
                    behind = False
                try:
                    event = sub.events.get(timeout=EVENT_POLL)
                except queue.Empty:
                    if _peer_gone(conn):
                        return
                    continue
                if event.seq > last:
                    self._send_event(conn, event)
                    last = event.seq
        except OSError:         # the client went, or left its socket full for SEND_TIMEOUT
            return
        finally:
            with self._sub_lock:
                self._subscribers.discard(sub)

    def _catch_up(self, conn: socket.socket, last: int) -> int:
        """Send the stored events after `last`, up to the newest published (later ones are not durable yet: they
        come live), in batches; the seq of the last one sent."""
        while True:
            with self._sub_lock:
                upto = self._published
            backlog = [event for event in self.store.events_since(last) if event.seq <= upto]
            for event in backlog:
                self._send_event(conn, event)
                last = event.seq
            if not backlog or last >= upto:
                return last

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
        # Python runs a signal handler (SIGTERM -> stop) only in the main thread, between bytecodes: a
        # SIGTERM the kernel delivers to another thread would leave accept() blocked for good (seen under
        # load).  A timeout brings the main thread back to the interpreter at least once a second.
        self._listener.settimeout(ACCEPT_WAKE)
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if self._stopping.is_set():
                    return
                if e.errno not in _SHORT_OF:
                    raise
                self._short_of(e)
                continue
            self._clients.add(conn)

    def _short_of(self, error: OSError) -> None:
        """accept() found no fd or memory for a new connection: say so (once in ACCEPT_BACKOFF_LOG s), wait a
        little for some to be freed, and go on; bmid used to exit here."""
        now = time.monotonic()
        if now - self._accept_logged >= ACCEPT_BACKOFF_LOG:
            log.warning("cannot accept a connection: %s; retrying every %.1f s", error.strerror, ACCEPT_BACKOFF)
            self._accept_logged = now
        time.sleep(ACCEPT_BACKOFF)

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


def _lock_state(state_dir: str) -> int:
    """The state directory, private (0700), locked for this bmid: the lock file's fd."""
    path = os.path.join(state_dir, "bmid.lock")
    try:
        private_dir(state_dir)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise state_failure(e, f"lock the bmid state {path}", state_dir) from None
    try:
        os.fchmod(fd, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateError(f"lock the bmid state in {state_dir}: another bmid owns it; stop that one first, or give "
                         f"this one another --state-dir") from None
    except OSError as e:
        os.close(fd)
        raise state_failure(e, f"lock the bmid state {path}", state_dir) from None
    return fd


def _lock_socket(path: str, state_dir: str) -> int:
    """A lock beside the socket (path.lock), so a second bmid never unlinks a socket another one serves."""
    lock = path + ".lock"
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StateError(f"lock the socket {path}: cannot open {lock}: {e.strerror}; choose another --socket "
                            f"or make its directory writable by root") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "a bmid"
        os.close(fd)
        raise StateError(f"serve on {path}: another bmid serves that socket ({holder}); stop it first, or "
                            f"give this one another --socket") from None
    try:
        note = f"pid {os.getpid()}, state in {state_dir}".encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, note, 0)
    except OSError:
        pass                    # only the refusal's wording needs it
    return fd


def _earlier_bmids(lock_fd: int) -> list[int]:
    """The pids of the earlier bmids on this state whose PD cgroups may remain (one per line of bmid.lock)."""
    text = os.pread(lock_fd, 1 << 16, 0).decode("ascii", "replace")
    return [int(word) for word in text.split() if word.isdigit()]


def _note_bmid(lock_fd: int, state_dir: str, earlier: list[int]) -> None:
    """Add this bmid's pid (its PD cgroups are named by it) to those whose cgroups remain."""
    text = "".join(f"{pid}\n" for pid in [*earlier, os.getpid()]).encode()
    try:
        os.pwrite(lock_fd, text, 0)
        os.ftruncate(lock_fd, len(text))
    except OSError as e:
        raise state_failure(e, "note this bmid in the state lock", state_dir) from None


def _refuse_fresh_state_beside_leftovers(state_dir: str, earlier: list[int]) -> None:
    """Never start on an empty state while the keeper or PD cgroups of an earlier bmid on it remain."""
    db = os.path.join(state_dir, DB_FILE)
    if os.path.exists(db) and os.path.getsize(db) > 0:
        return
    sock = os.path.join(state_dir, "keeper.sock")
    keys = existing_keeper(sock) if os.path.exists(sock) else None
    groups = leftover_cgroups(earlier)
    if not keys and not groups:
        return
    found = []
    if keys:
        found.append(f"the fd keeper on {sock} holds {len(keys)} fds of its PDs")
    if groups:
        found.append(f"{len(groups)} PD cgroups remain ({', '.join(groups[:3])}{', ...' if len(groups) > 3 else ''})")
    raise StateError(f"start bmid in {state_dir}: the state database {db} is missing or empty but PDs of an "
                     f"earlier bmid remain ({'; '.join(found)}); restore the database from a backup, or end those "
                     f"PDs first (kill the processes in those cgroups and remove the cgroups, and stop the keeper "
                     f"process `python -m bmi.server.keeper {sock}`)")


class _Subscriber:
    """One event stream's live events, at most SUBSCRIBER_QUEUE of them: past that it is `behind`, and its thread
    reads what it missed from the store (events were queued without bound for a client that stopped reading)."""

    __slots__ = ("events", "behind")

    def __init__(self) -> None:
        self.events: queue.Queue[Event] = queue.Queue(SUBSCRIBER_QUEUE)
        self.behind = False

    def put(self, event: Event) -> None:
        try:
            self.events.put_nowait(event)
        except queue.Full:
            self.behind = True


@dataclass
class _Held:
    """A persist() held for commit_held() (see hold_changes)."""

    ids: list[int] | None
    ended: list[int]
    restarted: int | None
    made_by: str | None


def test_pause(state_dir: str, *points: str) -> None:
    """For tests of the crash windows: with one of points in $BMID_TEST_PAUSE, say so (a file paused-<point>
    in the state directory) and block this thread until the test SIGKILLs bmid exactly here or lets it go on
    (a file resume-<point>)."""
    if not _PAUSES:
        return
    for point in points:
        if point in _PAUSES:
            _pause_at(state_dir, point)


def _pause_at(state_dir: str, point: str) -> None:
    """test_pause's stop at one point: the file paused-<point>, then wait for resume-<point>."""
    with open(os.path.join(state_dir, f"paused-{point}"), "w"):
        pass
    resume = os.path.join(state_dir, f"resume-{point}")
    while not os.path.exists(resume):
        time.sleep(0.01)
    os.unlink(resume)


def _peer_gone(conn: socket.socket) -> bool:
    poller = select.poll()
    poller.register(conn, select.POLLIN | select.POLLHUP | select.POLLRDHUP)
    return bool(poller.poll(0))

