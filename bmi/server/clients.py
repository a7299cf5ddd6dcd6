"""bmid's clients: one thread serves the quick calls of all of them, and commits them in groups.

Why: with a thread per client, every change woke that client's thread, and
the threads then took turns at the GIL and at the store's group-commit locks
(about 40 futex calls per change with 8 clients, most of bmid's CPU).  Here
one thread waits in epoll on every client connection.  Each round it reads
the request of each client that sent one and runs the quick ones itself
(QUICK: reads of memory and of cgroup files, and changes that only write
those).  Their changes are committed as one transaction, and the WAL's sync
then runs in a C thread without the GIL (walsync.py) while the loop goes on
with the next rounds, whose changes wait for that sync to end and then share
the next commit and sync (when no other client is about to call, the loop
syncs itself: a lone client does not pay the hand-over).  Replies go out
only once their commit is durable, so no reply tells of a change the store
might lose.  A call that can block (a start, a wait, an image's copy, the
TPM, a memory limit the kernel reclaims for) runs in a thread of its own,
which answers it; so does a quick call on a PD that such a call holds.  One
request of a client is in hand at a time (see Client), so its calls run in
its order.
"""
from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..channel import protocol as p
from ..channel.connections import fd_limit
from ..channel.dispatch import reporting_progress
from ..channel.methods import READ_ONLY
from ..channel.server import _check_request
from ..errors import BMIError, PermissionDenied
from ..store import Commit
from .failstop import stop_unstored
from .walsync import WalSyncer

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger("bmi.bmid")

#: The calls the loop runs itself: they read bmid's memory or a cgroup file, or change only memory and a
#: cgroup weight (no reclaim, no process, no fd, no TPM).  set_runtime_param is not one: a lowered memory
#: limit makes the kernel reclaim before the write returns.
QUICK = frozenset({"get_version", "list_pd", "get_controller", "get_current_status", "get_config_param",
                   "get_runtime_param", "list_runtime_params", "set_priority", "set_config_param"})
REPLY_PIECE = 30 * 1024         # bytes of reply JSON per record when a reply is split (hex: 60 KiB)
GATHER_WAIT = 30.0              # s a test's gathered round waits for its members at most
COMING = 0.002                  # s: a client answered this recently is taken to be about to call again
TAKE_MORE = 4                   # rounds of requests that came meanwhile a commit takes in at most (_take_ready)
CLIENTS_MAX = 1024              # connections served at once (fewer under a low fd limit, see client_limit)
ROOT_EXTRA = 0.25               # root may have this much more: a flood of the read group never locks root out
REFUSAL_LOG = 10.0              # s between two log lines about refused connections
SEND_TIMEOUT = 60.0             # s a client may leave its socket full (a reply, progress, events) before it is dropped
_READABLE = select.EPOLLIN | select.EPOLLRDHUP


@dataclass(eq=False)
class Client:
    """One connection and what its peer may do: 'admin' (root), 'read' (the configured group) or ''.

    A client whose request is in hand (`in_hand`: read, its reply not yet
    sent) is left in the epoll (level-triggered: it has nothing more to
    read, and no system call is spent on it) unless it gives the loop
    something to see before its reply -- another request, a hang-up -- or
    its call goes to a thread: then it is `parked` (out of the epoll) until
    the reply is sent, so its calls run one at a time, in its order.
    """

    conn: socket.socket
    role: str
    in_hand: bool = False
    parked: bool = False


@dataclass
class Request:
    msg_id: Any
    method: str
    params: dict
    fds: list[int] = field(default_factory=list)

    @property
    def quick(self) -> bool:
        return self.method in QUICK and self.params.get("progress") is not True


#: A quick call's reply, and the fd to pass with it, waiting for its round's commit.
Answered = tuple[Client, dict, "int | None"]


@dataclass
class Round:
    """The quick calls run since the last commit: their replies, sent once the store is durable up to
    `needed` (their own commit and every one before it: what their reads may have seen)."""

    needed: int
    answered: list[Answered]
    changes: list[Any]
    commit: Commit | None


class ClientLoop:
    """Every client connection of one bmid, served as the module says."""

    def __init__(self, daemon: "Daemon"):
        self._daemon = daemon
        self._store = daemon.store
        self._epoll = select.epoll()
        self._clients: dict[int, Client] = {}
        self._lock = threading.Lock()
        self._syncer = WalSyncer(self._store.path + "-wal")
        self._answered_at: dict[Client, float] = {}    # the loop's last reply to each client, for COMING s
        self._limit = client_limit()
        self._root_extra = int(self._limit * ROOT_EXTRA)
        self._refused, self._refusal_logged = 0, 0.0
        self._epoll.register(self._syncer.fileno(), select.EPOLLIN)
        threading.Thread(target=self._serve, name="bmid-clients", daemon=True).start()

    def add(self, conn: socket.socket) -> None:
        """Serve a new connection, unless bmid serves as many as it may (closed then: see client_limit)."""
        client = Client(conn, role_of(conn, self._daemon.group))
        room = self._limit + (self._root_extra if client.role == "admin" else 0)
        with self._lock:
            served = len(self._clients) < room or len(self._clients) - self._hung_up() < room
            if served:
                self._clients[conn.fileno()] = client
        if served:
            self._epoll.register(conn.fileno(), _READABLE)
            return
        conn.close()
        self._refused += 1
        now = time.monotonic()
        if now - self._refusal_logged >= REFUSAL_LOG:
            log.warning("refused %d connection(s): bmid serves %d clients at most (root %d more); a client that "
                        "does not close its connections?", self._refused, self._limit, self._root_extra)
            self._refused, self._refusal_logged = 0, now

    def _hung_up(self) -> int:
        """How many clients have gone without the loop having dropped them yet (it drops each when it next
        polls): a client that just closed must not keep the next one out.  Only when bmid is full."""
        poller = select.poll()
        for fd in self._clients:
            poller.register(fd, select.POLLRDHUP)
        return sum(1 for _, events in poller.poll(0) if events & (select.POLLHUP | select.POLLRDHUP | select.POLLERR))

    def _serve(self) -> None:
        try:
            self._rounds()
        except BaseException as e:          # a bug: bmid stops rather than go on without answering anyone
            log.exception("bmid's client loop failed")
            stop_unstored("the client loop", e)

    def _rounds(self) -> None:
        """Rounds of calls.  While a sync is in flight the calls of further rounds gather (their changes made,
        not committed); once it is done they are committed in one transaction and the next sync begins: one
        COMMIT and one fdatasync for all the calls of that time, as many as the clients sent."""
        changes = self._daemon.hold_changes()       # of the calls run since the last commit
        answered: list[Answered] = []               # their replies (and those of reads among them)
        syncing: Round | None = None                # what the sync in flight is for
        syncer = self._syncer.fileno()
        while True:
            events = self._epoll.poll()
            if syncing is not None and any(fd == syncer for fd, _ in events):
                self._synced(syncing, self._syncer.answer())
                syncing = None
            self._round(events, answered)
            wanted = self._daemon.gathering()
            if wanted:                              # tests only
                deadline = time.monotonic() + GATHER_WAIT
                while len(changes) < wanted and time.monotonic() < deadline:
                    self._round(self._epoll.poll(0.01), answered)
            if syncing is not None or not answered:
                continue
            if not changes and self._store.durable() >= self._store.committed():
                self._send(answered)        # reads, with nothing stored still on its way to the disk
            else:
                self._take_ready(answered)
                batch = changes[:]
                changes.clear()
                commit = self._daemon.commit_held(batch) if batch else None
                done = Round(self._store.committed(), answered, batch, commit)
                if self._store.durable() >= done.needed:
                    self._synced(done, None)        # the calls wrote nothing new
                elif self._others_coming():
                    syncing = done
                    self._syncer.ask()
                else:
                    self._sync_here()
                    self._synced(done, None)
            answered = []

    def _take_ready(self, answered: list[Answered]) -> None:
        """Before a commit, the requests that came while the round ran: they share its COMMIT and sync rather
        than make the next ones (a commit costs the loop more than a call: with 8 clients this took the loop's
        CPU per change from ~190 to ~160 us, bench/system.py).  Not before reads that wait for no commit:
        nothing to share, so no poll for them.  At most TAKE_MORE rounds, so the replies in hand are not held
        back for long."""
        for _ in range(TAKE_MORE):
            ready = self._epoll.poll(0)
            if not ready:
                return
            self._round(ready, answered)

    def _others_coming(self) -> bool:
        """Whether other clients are likely to send while this sync runs: some were answered within the last
        COMING seconds and have not sent again yet.  Then the sync runs in the syncer's thread and the loop
        serves them meanwhile; otherwise (one client, say) the loop syncs itself, which spares the two
        thread wake-ups a hand-over costs (~10% of a lone client's call here)."""
        now = time.monotonic()
        coming = False
        for client, at in list(self._answered_at.items()):
            if now - at > COMING:
                self._answered_at.pop(client, None)
            elif not client.in_hand:
                coming = True
        return coming

    def _sync_here(self) -> None:
        try:
            self._store.flush()
        except BMIError as e:
            stop_unstored("a change of a client", e)

    def _synced(self, done: Round, failure: OSError | None) -> None:
        """done's commit was synced (`failure`: how the sync failed): run the after()s of what it made durable,
        then answer the calls it was for."""
        if failure is not None:
            stop_unstored("a change of a client", self._store.flush_failed(failure))
        try:
            self._store.made_durable(done.needed)
        except BMIError as e:
            stop_unstored("a change of a client", e)
        if done.commit is not None:
            self._daemon.check_held(done.changes, done.commit)
        self._send(done.answered)

    def _send(self, answered: list[Answered]) -> None:
        now = time.monotonic()
        for client, reply, out in answered:
            self._reply(client, reply, out)
            if client.conn.fileno() >= 0:       # not dropped: it may call again
                self._answered_at[client] = now

    def _round(self, events: list[tuple[int, int]], answered: list[Answered]) -> None:
        """The request of each ready client: a quick one answered here (its reply kept for after the round's
        commit), any other handed to a thread of its own."""
        with self._lock:
            ready = [self._clients[fd] for fd, _ in events if fd in self._clients]
        for client in ready:
            if client.in_hand:
                self._park(client)      # more from it before its reply: after the reply
                continue
            record = p.next_record(client.conn)
            if record is None:
                self._drop(client)
                continue
            client.in_hand = True
            request = self._request(client, *record)
            if isinstance(request, dict):
                answered.append((client, request, None))
            elif request.quick and (release := self._lock_now(request)) is not None:
                try:
                    answered.append((client, *self._answer(client, request)))
                finally:
                    release()
            else:
                self._park(client)
                threading.Thread(target=self._serve_one, args=(client, request), name="bmid-call",
                                 daemon=True).start()

    def _lock_now(self, request: Request) -> Callable[[], None] | None:
        """The locks of the PDs a quick call takes, held if they are free now; None when a call on one of them
        runs elsewhere (a shutdown holds its PD for its grace period): the quick call then runs in a thread of
        its own rather than have the loop, and every client, wait."""
        pd_id = request.params.get("pd")
        if not isinstance(pd_id, int) or isinstance(pd_id, bool) or pd_id == 0:
            return _no_lock         # the manager's own calls: no PD lock
        mgr = self._daemon.mgr
        return mgr.lock_now(mgr.subtree(pd_id) if request.method == "set_priority" else (pd_id,))

    def _park(self, client: Client) -> None:
        """Out of the epoll until its reply is sent (see Client)."""
        with self._lock:
            if client.in_hand and not client.parked and self._clients.get(client.conn.fileno()) is client:
                self._epoll.unregister(client.conn.fileno())
                client.parked = True

    def _request(self, client: Client, data: bytes, fds: list[int], whole: bool) -> Request | dict:
        """The request in one record, or the error reply when it is none this client may make (its fds closed
        then; else they belong to the Request)."""
        msg_id: Any = None
        try:
            if not whole:
                raise p.ProtocolError(p.INVALID_REQUEST, f"record truncated (at most {p.MAX_MESSAGE} bytes)")
            msg = p.decode(data)
            msg_id = msg.get("id") if isinstance(msg, dict) else None
            method, params = _check_request(msg)
            if not client.role or (client.role == "read" and method not in READ_ONLY):
                who = "a read-only client" if client.role else "this user"
                raise PermissionDenied(f"{method}: {who} may not call it on bmid ({self._daemon.socket_path})")
        except Exception as e:      # a request must never take bmid down
            if not isinstance(e, (p.ProtocolError, BMIError)):
                log.exception("a client's request %r could not be read", msg_id)
            for fd in fds:
                os.close(fd)
            return p.error_from(msg_id, e)
        return Request(msg_id, method, params, fds)

    def _answer(self, client: Client, request: Request) -> tuple[dict, int | None]:
        """Run one request: its reply, and the fd to pass with it (closed by whoever sends it)."""
        fd = request.fds.pop(0) if request.fds and request.method == "setup_pd" else None
        try:
            if request.params.get("progress") is True:
                with reporting_progress(_progress_to(client.conn, request.msg_id)):
                    value, out = self._daemon.call(0, request.method, request.params, fd)
            else:
                value, out = self._daemon.call(0, request.method, request.params, fd)
            return p.result(request.msg_id, value), out
        except Exception as e:      # a request must never take bmid down
            if not isinstance(e, (p.ProtocolError, BMIError)):
                log.exception("a client's %s failed inside bmid", request.msg_id)
            return p.error_from(request.msg_id, e), None
        finally:
            for extra in ([fd] if fd is not None else []) + request.fds:
                os.close(extra)

    def _serve_one(self, client: Client, request: Request) -> None:
        """A call that may block, in its own thread; an event subscription keeps the connection for good."""
        if request.method == "subscribe":
            for fd in request.fds:
                os.close(fd)
            try:
                self._daemon.stream_events(client.conn, request.msg_id, request.params)
            finally:
                self._drop(client)
            return
        client.conn.settimeout(SEND_TIMEOUT)    # its progress records too: a client that does not read them
        reply, out = self._answer(client, request)     # stops the start it asked for (see _progress_to)
        self._durable_before_reply()
        self._reply(client, reply, out, blocking=True)

    def _durable_before_reply(self) -> None:
        """A call in a thread may have read what another committed and has not synced yet -- `wait` returning
        the exit the exit watcher is storing -- so its reply waits until every commit made so far is durable,
        as the loop's replies do: no reply tells of a state the store could still lose, or that the status
        board (updated once durable) does not show yet (a client saw CRASHED from wait, then RUNNING)."""
        if self._store.durable() >= self._store.committed():
            return
        try:
            self._store.sync()
        except BMIError as e:
            stop_unstored("what a call's reply reports", e)

    def _reply(self, client: Client, reply: dict, out: int | None, *, blocking: bool = False) -> None:
        """Send a reply (and the fd `out`, closed then); the client's next request may be read.  The loop never
        waits for a client: a reply that does not fit its socket now (a client that does not read, a reply of
        several records) is sent from a thread of its own, which drops a client that leaves its socket full for
        SEND_TIMEOUT (it waited for good, and held the reply and the thread)."""
        data, fds = p.encode(reply), (out,) if out is not None else ()
        if blocking:
            client.conn.settimeout(SEND_TIMEOUT)
        try:
            if len(data) > p.MAX_MESSAGE and not blocking:
                raise BlockingIOError
            if len(data) <= p.MAX_MESSAGE:
                p.send_encoded(client.conn, data, fds, blocking=blocking)
            else:
                _send_pieces(client.conn, reply, data, fds)
            sent = True
        except BlockingIOError:
            threading.Thread(target=self._reply, args=(client, reply, out), kwargs={"blocking": True},
                             name="bmid-reply", daemon=True).start()
            return                  # out is the thread's now
        except (OSError, BMIError):
            sent = False
        if out is not None:
            os.close(out)
        if not sent:
            self._drop(client)
            return
        if blocking:
            client.conn.settimeout(None)        # the loop's again: it reads and sends without waiting
        with self._lock:
            client.in_hand = False
            if client.parked and self._clients.get(client.conn.fileno()) is client:
                self._epoll.register(client.conn.fileno(), _READABLE)
                client.parked = False

    def _drop(self, client: Client) -> None:
        with self._lock:
            if self._clients.get(client.conn.fileno()) is not client:
                return
            del self._clients[client.conn.fileno()]
            if not client.parked:
                self._epoll.unregister(client.conn.fileno())
        self._answered_at.pop(client, None)     # (a client that only ever read would stay there for good)
        client.conn.close()


def _no_lock() -> None:
    """What _lock_now gives for a call that takes no PD's lock: nothing to let go of."""


def client_limit() -> int:
    """How many connections bmid serves at once: CLIENTS_MAX, or an eighth of its fd limit when that is lower,
    so a client that leaks connections (or a flood of them) leaves bmid the fds its PDs, its store and its keeper
    need; past it bmid failed in accept() with EMFILE and exited."""
    return max(16, min(CLIENTS_MAX, fd_limit() // 8))


def role_of(conn: socket.socket, group: int | None) -> str:
    """'admin' for root, 'read' for the configured group, '' for anyone else."""
    pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    if uid == 0:
        return "admin"
    if group is not None and (gid == group or group in _groups_of(pid)):
        return "read"
    return ""


def _groups_of(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            line = next(x for x in f if x.startswith("Groups:"))
    except (OSError, StopIteration):
        return set()
    return {int(g) for g in line.split()[1:]}


def _progress_to(conn: socket.socket, msg_id: Any) -> Callable[[int, int], None]:
    """A progress callback that sends records to the client before its reply; when it has gone, the send
    fails and the start it asked for stops (a Ctrl-C'd `bmi create --start` leaves the PD READY)."""
    return lambda done, total: p.send(conn, p.progress(msg_id, done, total))


def _send_pieces(conn: socket.socket, reply: dict, data: bytes, fds: tuple[int, ...]) -> None:
    """A reply larger than one record (a 256 KiB console log) as pieces {"more": hex} ending in "last"."""
    pieces = range(0, len(data), REPLY_PIECE)
    for start in pieces:
        last = start == pieces[-1]
        p.send(conn, {"jsonrpc": "2.0", "id": reply.get("id"), "more": data[start:start + REPLY_PIECE].hex(),
                      "last": last}, fds if last else ())
