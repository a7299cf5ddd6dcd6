"""The layer's side of every PD channel: framing, per-PD queues, fairness, accept.

Leader/followers: of a few threads, one (the leader) waits on all channels
and reads them; when it has read a request it hands the lead to an idle
thread and runs the request itself, so a reply leaves from the thread that
read the request (no hand-off to a worker on the way: that cost as much as
the round trip itself).  The lead is handed over only to a thread that is
there to take it: while WORKERS requests run, the leader keeps reading and
the requests it reads wait for a thread.  At most one request per PD runs
at a time, in order; a thread that finished one takes the next waiting
PD's (the back of the line: fair between PDs).
Nothing a PD does can block the layer for other PDs:

- each PD has a bounded queue (QUEUE_LIMIT); beyond it the request gets a
  BUSY error at once;
- at most READ_BUDGET records are read from one PD per round;
- replies are sent without blocking; a PD that does not read its replies
  (the send would block) has its channel dropped;
- a PD that keeps sending malformed records (STRIKE_LIMIT) has its channel
  dropped.

An accept and a connection queued for the same PD meet in whichever thread
brings the second of them: the leader that read the accept, or the thread
that ran the connect, right after it sent the connecting PD its reply.  A
PD already waiting in accept thus gets its end from the connecting PD's own
request, with no other thread woken for it, and the connecting PD's reply
waits for no more than its own work.  The leader only answers accepts whose
time is up.

The caller of a request is the PD the channel was opened for: the socket,
never the message, says who is asking.  When a channel ends (the PD's
programs all exited, it closed fd 3, or it was dropped), every connection
of that PD is cut.
"""
from __future__ import annotations

import logging
import os
import selectors
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from . import protocol as p
from .connections import Registry

log = logging.getLogger("bmi.channel")

QUEUE_LIMIT = 16          # requests queued or running per PD
READ_BUDGET = 16          # records read from one PD before serving the others
STRIKE_LIMIT = 64         # malformed records before the channel is dropped
ACCEPT_LIMIT = 4          # accept calls waiting at once per PD
MAX_ACCEPT_WAIT = 24 * 3600.0
WORKERS = 4               # requests running at once (plus the leader)

#: (caller, method, params, fd) -> (result, fd to pass back or None); raises BMIError/ProtocolError.
Handler = Callable[[int, str, dict, "int | None"], "tuple[Any, int | None]"]


@dataclass(eq=False)          # each channel is itself (a set member by identity)
class _Channel:
    pd_id: int
    sock: socket.socket
    lock: threading.Lock = field(default_factory=threading.Lock)
    queue: deque = field(default_factory=deque)
    running: bool = False
    accepts: dict = field(default_factory=dict)      # request id -> deadline (monotonic) or None
    strikes: int = 0
    closed: bool = False


class ChannelServer:
    """Serves the channels of one manager's PDs."""

    def __init__(self, handler: Handler, registry: Registry):
        self._handler = handler
        self._registry = registry
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._channels: dict[int, _Channel] = {}
        self._ops: deque[tuple[str, _Channel]] = deque()
        self._stopping = False
        self._leader = threading.Lock()             # held by the thread that reads the channels
        self._ready: deque[_Channel] = deque()      # channels with a request waiting for a thread
        self._timed: set[_Channel] = set()          # channels with an accept that times out (the leader ends it)
        self._request = threading.local()           # .queued: channels the request this thread runs queued for
        self._idle = 0                              # threads waiting to lead
        self._running = 0                           # threads running a request
        self._threads: list[threading.Thread] = []
        with self._lock:
            self._spawn()

    # -- called by the layer ----------------------------------------------------------------
    def open(self, pd_id: int) -> int:
        """A fresh channel for pd_id (any previous one is dropped); returns the PD's end (caller closes it)."""
        layer, pd_end = self._registry.sockets.pair(socket.SOCK_SEQPACKET, fds=True, what=f"channel of PD {pd_id}",
                                                    pd_id=pd_id)
        self.attach(pd_id, layer)
        return pd_end.detach()

    def attach(self, pd_id: int, layer: socket.socket) -> None:
        """Serve `layer` as pd_id's channel (any previous one is dropped); bmid re-attaches kept ones after a restart."""
        layer.setblocking(False)
        ch = _Channel(pd_id, layer)
        with self._lock:
            old = self._channels.get(pd_id)
            self._channels[pd_id] = ch
            self._ops.append(("add", ch))
        if old is not None:
            self._close(old)
        self._wake()

    def drop(self, pd_id: int) -> None:
        """End pd_id's channel (the PD sees EOF on fd 3) and cut its connections."""
        with self._lock:
            ch = self._channels.get(pd_id)
        if ch is not None:
            self._close(ch)

    def has_channel(self, pd_id: int) -> bool:
        with self._lock:
            ch = self._channels.get(pd_id)
        return ch is not None and not ch.closed

    def incoming(self, pd_id: int) -> None:
        """A connection was queued for pd_id: hand it to an accept of pd_id's that waits, in this thread
        (after the reply to the request running here, if one is: the connecting PD's comes first).

        With no accept waiting the connection stays queued for the next one.
        """
        with self._lock:
            ch = self._channels.get(pd_id)
        if ch is None:
            return
        queued = getattr(self._request, "queued", None)
        if queued is not None:
            queued.append(ch)
        else:
            self._hand_over_queued(ch)

    def _hand_over_queued(self, ch: _Channel) -> None:
        """_hand_over for a connection just queued: whatever happens to the accept, the connection stays made."""
        try:
            self._hand_over(ch)
        except Exception:
            log.exception("PD %d: handing a connection to its accept failed inside the layer", ch.pd_id)

    def close(self) -> None:
        with self._lock:
            self._stopping = True
            channels = list(self._channels.values())
        for ch in channels:
            self._close(ch)
        self._wake()
        while True:
            with self._lock:
                alive = [t for t in self._threads if t.is_alive()]
            if not alive:
                break
            for t in alive:
                t.join()
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- the selector thread ----------------------------------------------------------------
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass            # a wake-up is pending already

    def _spawn(self) -> bool:
        """One more serving thread, if WORKERS + 1 are not there yet (the caller holds self._lock)."""
        self._threads = [t for t in self._threads if t.is_alive()]
        if self._stopping or len(self._threads) > WORKERS:
            return False
        t = threading.Thread(target=self._serve, name="bmi-channel", daemon=True)
        self._threads.append(t)
        t.start()
        return True

    def _serve(self) -> None:
        """A serving thread: run waiting requests; else lead (read the channels) until there is one to run."""
        while True:
            with self._lock:
                ch = self._ready.popleft() if self._ready else None
                if ch is None:
                    self._idle += 1
                else:
                    self._running += 1
            if ch is None:
                with self._leader:
                    with self._lock:
                        self._idle -= 1
                    ch = self._lead()
                if ch is None:
                    return
            try:
                self._work(ch)
            finally:
                with self._lock:
                    self._running -= 1

    def _lead(self) -> _Channel | None:
        """Read the channels until a request is there to run and another thread can take the lead
        (that channel is returned, counted as running), or the server stops (None)."""
        while True:
            self._apply_ops()
            with self._lock:
                if self._stopping and not self._channels:
                    return None
                if self._ready and self._running < WORKERS and (self._idle > 0 or self._spawn()):
                    self._running += 1
                    return self._ready.popleft()
                timed = list(self._timed)
            for key, _ in self._sel.select(self._end_accepts(timed)):
                if key.data is None:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                else:
                    try:
                        self._read(key.data)
                    except Exception:   # a bug reading one PD's channel must not end the leader (and the server)
                        log.exception("PD %d: reading its channel failed inside the layer; closing the channel",
                                      key.data.pd_id)
                        self._close(key.data)

    def _apply_ops(self) -> None:
        while True:
            with self._lock:
                if not self._ops:
                    return
                op, ch = self._ops.popleft()
            if op == "add" and not ch.closed:
                self._sel.register(ch.sock, selectors.EVENT_READ, ch)
            elif op == "remove":
                try:
                    self._sel.unregister(ch.sock)
                except (KeyError, ValueError):
                    pass
                ch.sock.close()
                with self._lock:
                    if self._channels.get(ch.pd_id) is ch:
                        del self._channels[ch.pd_id]

    def _close(self, ch: _Channel) -> None:
        """Any thread: stop the channel now; the selector thread releases the socket."""
        with ch.lock:
            if ch.closed:
                return
            ch.closed = True
            ch.accepts.clear()
            try:
                ch.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._lock:
            self._ops.append(("remove", ch))
        self._registry.ended(ch.pd_id)
        self._ended(ch.pd_id)
        self._wake()

    def _read(self, ch: _Channel) -> None:
        for _ in range(READ_BUDGET):
            if ch.closed:
                return
            try:
                data, fds, whole = p.receive(ch.sock, blocking=False)
            except BlockingIOError:
                return
            except OSError:
                self._close(ch)
                return
            if not data and not fds:
                self._close(ch)            # EOF: every process of the PD closed its channel
                return
            idle = not ch.running
            self._take(ch, data, fds, whole)
            if idle and ch.running:
                return      # a request to run now: the next leader reads the rest (the channel stays readable)

    def _take(self, ch: _Channel, data: bytes, fds: list[int], whole: bool) -> None:
        """Turn one record into a queued request, or answer it with an error right here."""
        msg_id: Any = None
        try:
            if not whole:
                raise p.ProtocolError(p.INVALID_REQUEST, f"record truncated (at most {p.MAX_MESSAGE} bytes and "
                                                         f"{p.MAX_FDS} fds)")
            msg = p.decode(data)
            if isinstance(msg, dict):
                msg_id = msg.get("id")
            method, params = _check_request(msg)
            self._enqueue(ch, msg_id, method, params, fds.pop(0) if fds and method == "setup_pd" else None)
        except p.ProtocolError as e:
            if e.code != p.BUSY:
                ch.strikes += 1
            self._reply(ch, p.error_from(msg_id if _valid_id(msg_id) else None, e))
            if ch.strikes >= STRIKE_LIMIT:
                log.warning("PD %d: %d malformed channel records; dropping its channel", ch.pd_id, ch.strikes)
                self._close(ch)
        finally:
            for fd in fds:
                os.close(fd)

    def _enqueue(self, ch: _Channel, msg_id: Any, method: str, params: dict, fd: int | None) -> None:
        """Queue a request for the workers (accept: take a queued connection or wait for one); its fd is ours
        from here.

        The reply is owed (_taken) before any worker can send it.
        """
        self._taken(ch.pd_id, msg_id, method, params)
        try:
            if method == "accept":
                self._accept(ch, msg_id, params)
                return
            with ch.lock:
                if len(ch.queue) + ch.running >= QUEUE_LIMIT:
                    raise p.ProtocolError(p.BUSY, f"PD {ch.pd_id} has {QUEUE_LIMIT} requests in flight; "
                                                  f"read the replies first")
                ch.queue.append((msg_id, method, params, fd))
                fd = None
                start = not ch.running
                ch.running = True
        except p.ProtocolError:
            self._answered(ch.pd_id, msg_id)        # answered right away, with that error
            raise
        finally:
            if fd is not None:
                os.close(fd)
        if start:
            with self._lock:
                self._ready.append(ch)

    def resume(self, pd_id: int, msg_id: Any, method: str, params: dict) -> None:
        """Take a request again that a previous server read but never answered (bmid after a restart)."""
        with self._lock:
            ch = self._channels.get(pd_id)
        if ch is None or ch.closed:
            return
        try:
            self._enqueue(ch, msg_id, method, params, None)
        except p.ProtocolError as e:
            self._reply(ch, p.error_from(msg_id, e))
        self._wake()

    def interrupt(self, pd_id: int, msg_id: Any, error: BaseException) -> None:
        """Answer a request a previous server read but never answered with `error`."""
        with self._lock:
            ch = self._channels.get(pd_id)
        if ch is not None:
            self._reply(ch, p.error_from(msg_id, error))

    # -- hooks (bmid keeps a ledger of unanswered requests; here they do nothing) --------------
    def _taken(self, pd_id: int, msg_id: Any, method: str, params: dict) -> None:
        """A request was taken (queued, or an accept now waiting); its reply is owed."""

    def _answered(self, pd_id: int, msg_id: Any) -> None:
        """The reply to msg_id is about to be sent."""

    def _ended(self, pd_id: int) -> None:
        """pd_id's channel ended: no reply is owed any more."""

    def _accept(self, ch: _Channel, msg_id: Any, params: dict) -> None:
        timeout = params.get("timeout")
        if set(params) - {"timeout"} or not (
                timeout is None or (isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
                                    and 0 <= timeout <= MAX_ACCEPT_WAIT)):
            raise p.ProtocolError(p.INVALID_PARAMS, f"accept takes {{timeout: null or 0..{MAX_ACCEPT_WAIT:.0f} "
                                                    f"seconds}}")
        with ch.lock:
            if len(ch.accepts) >= ACCEPT_LIMIT or msg_id in ch.accepts:
                raise p.ProtocolError(p.BUSY, f"PD {ch.pd_id} already waits in {len(ch.accepts)} accept calls")
            ch.accepts[msg_id] = None if timeout is None else time.monotonic() + timeout
            if timeout is not None:
                with self._lock:
                    self._timed.add(ch)
        self._hand_over(ch)

    def _hand_over(self, ch: _Channel) -> None:
        """Any thread: answer ch's waiting accepts with the connections queued for its PD, each oldest first."""
        while True:
            with ch.lock:
                if ch.closed or not ch.accepts:
                    return
                got = self._registry.take(ch.pd_id)
                if got is None:
                    return
                msg_id = next(iter(ch.accepts))
                del ch.accepts[msg_id]
            conn, fd = got
            try:
                self._answered(ch.pd_id, msg_id)
                self._reply(ch, p.result(msg_id, conn.describe()), (fd,))
            finally:
                os.close(fd)

    def _end_accepts(self, timed: list[_Channel]) -> float | None:
        """The leader: answer null to the accepts whose time is up; seconds until the next one's is (None: never)."""
        now = time.monotonic()
        nearest: float | None = None
        for ch in timed:
            with ch.lock:
                ended = [m for m, deadline in ch.accepts.items() if deadline is not None and deadline <= now]
                for msg_id in ended:
                    del ch.accepts[msg_id]
                left = [deadline for deadline in ch.accepts.values() if deadline is not None]
                if not left:
                    with self._lock:
                        self._timed.discard(ch)
            if left:
                nearest = min(left) if nearest is None else min(nearest, *left)
            for msg_id in ended:
                self._answered(ch.pd_id, msg_id)
                self._reply(ch, p.result(msg_id, None))
        return None if nearest is None else max(0.0, nearest - now)

    # -- workers ----------------------------------------------------------------------------
    def _work(self, ch: _Channel) -> None:
        """Run ch's next request; put ch back in line if it has more."""
        with ch.lock:
            if not ch.queue or ch.closed:
                for *_, fd in ch.queue:
                    if fd is not None:
                        os.close(fd)
                ch.queue.clear()
                ch.running = False
                return
            msg_id, method, params, fd = ch.queue.popleft()
        try:
            self._answer(ch, msg_id, method, params, fd)
        except Exception:           # the thread lives on: the next request of this PD is served
            log.exception("PD %d: answering %s failed inside the layer", ch.pd_id, method)
        with ch.lock:
            more = bool(ch.queue)
            if not more:
                ch.running = False
        if more:
            with self._lock:
                self._ready.append(ch)

    def _answer(self, ch: _Channel, msg_id: Any, method: str, params: dict, fd: int | None) -> None:
        """Run one request and send its reply, or an error the caller gets in its place."""
        out_fd = None
        self._request.queued = []
        try:
            value, out_fd = self._handler(ch.pd_id, method, params, fd)
            data = self._encoded(ch.pd_id, method, p.result(msg_id, value))
        except Exception as e:      # a request must never take the server down
            if not isinstance(e, (p.ProtocolError, p.errors.BMIError)):
                log.exception("PD %d: %s failed inside the layer", ch.pd_id, method)
            data = p.encode(p.error_from(msg_id, e))
            if out_fd is not None:
                os.close(out_fd)
                out_fd = None
        finally:
            if fd is not None:
                os.close(fd)
        self._answered(ch.pd_id, msg_id)
        try:
            self._send(ch, data, (out_fd,) if out_fd is not None else ())
        finally:
            if out_fd is not None:
                os.close(out_fd)
            queued, self._request.queued = self._request.queued, None
            for dest in queued:
                self._hand_over_queued(dest)

    @staticmethod
    def _encoded(pd_id: int, method: str, reply: dict) -> bytes:
        """The reply's record; one that JSON cannot carry or that exceeds the frame is the caller's error."""
        try:
            data = p.encode(reply)
        except (TypeError, ValueError) as e:
            log.error("PD %d: the reply to %s cannot be encoded: %s", pd_id, method, e)
            raise p.ProtocolError(p.INTERNAL_ERROR, f"{method}: the layer could not encode its reply") from None
        if len(data) > p.MAX_MESSAGE:
            raise p.errors.ResourceError(
                f"{method} by PD {pd_id}: the reply was {len(data)} bytes, over the channel's frame of "
                f"{p.MAX_MESSAGE} bytes; ask for less at a time (a narrower root, a shorter value)", pd_id=pd_id)
        return data

    def _reply(self, ch: _Channel, message: dict, fds: tuple[int, ...] = ()) -> None:
        self._send(ch, p.encode(message), fds)

    def _send(self, ch: _Channel, data: bytes, fds: tuple[int, ...] = ()) -> None:
        """One record without blocking; a PD that cannot take it has its channel dropped."""
        with ch.lock:
            if ch.closed:
                return
            try:
                p.send_encoded(ch.sock, data, fds, blocking=False)
                return
            except BlockingIOError:
                why = "it does not read its replies"
            except OSError as e:
                why = e.strerror or str(e)
        log.warning("PD %d: cannot answer on its channel (%s); dropping it", ch.pd_id, why)
        self._close(ch)


def _valid_id(msg_id: Any) -> bool:
    return msg_id is None or (isinstance(msg_id, (int, str)) and not isinstance(msg_id, bool)
                              and (not isinstance(msg_id, str) or len(msg_id) <= 64))


def _check_request(msg: Any) -> tuple[str, dict]:
    if not isinstance(msg, dict):
        raise p.ProtocolError(p.INVALID_REQUEST, "a request is one JSON object (no batches)")
    if msg.get("jsonrpc") != "2.0":
        raise p.ProtocolError(p.INVALID_REQUEST, 'a request needs "jsonrpc": "2.0"')
    if "id" not in msg or msg["id"] is None or not _valid_id(msg["id"]):
        raise p.ProtocolError(p.INVALID_REQUEST, "a request needs an id (int, or str of <= 64 chars); "
                                                 "the channel has no notifications")
    method, params = msg.get("method"), msg.get("params", {})
    if not isinstance(method, str):
        raise p.ProtocolError(p.INVALID_REQUEST, "method must be a string")
    if not isinstance(params, dict):
        raise p.ProtocolError(p.INVALID_PARAMS, "params must be an object (named parameters)")
    if set(msg) - {"jsonrpc", "id", "method", "params"}:
        raise p.ProtocolError(p.INVALID_REQUEST, f"unknown members {sorted(set(msg) - {'jsonrpc', 'id', 'method', 'params'})}"[:200])
    return method, params
