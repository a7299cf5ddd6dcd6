"""The layer's side of every PD channel: framing, per-PD order, fairness, accept.

A few threads serve every channel.  Each waits in epoll for a readable
channel; a channel is armed one-shot, so the thread that wakes for it holds
it alone: it reads the channel's records and runs each request itself, in
order, then arms the channel again.  No thread hands a request or the lead
to another (each hand-off cost as much as the round trip itself), and the
other threads go on waiting for the other channels, so a request that takes
long holds up only its own PD.  While a thread serves a channel and no other
waits, one more thread is started, up to THREADS.
Nothing a PD does can block the layer for other PDs:

- at most READ_BUDGET records are read from one PD before its channel goes
  to the back of the line (epoll hands out ready channels in turn); what a
  PD sends beyond what is served stays in its socket, whose buffer pushes
  back on the PD;
- replies are sent without blocking; a PD that does not read its replies
  (the send would block) has its channel dropped;
- a PD that keeps sending malformed records (STRIKE_LIMIT) has its channel
  dropped.

An accept and a connection queued for the same PD meet in whichever thread
brings the second of them: the thread that read the accept, or the thread
that ran the connect, right after it sent the connecting PD its reply.  A
PD already waiting in accept thus gets its end from the connecting PD's own
request, with no other thread woken for it, and the connecting PD's reply
waits for no more than its own work.  The waiting threads answer accepts
whose time is up.

The caller of a request is the PD the channel was opened for: the socket,
never the message, says who is asking.  When a channel ends (the PD's
programs all exited, it closed fd 3, or it was dropped), every connection
of that PD is cut.
"""
from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from . import protocol as p
from .connections import Registry

log = logging.getLogger("bmi.channel")

READ_BUDGET = 16          # records read from one PD before serving the others
STRIKE_LIMIT = 64         # malformed records before the channel is dropped
ACCEPT_LIMIT = 4          # accept calls waiting at once per PD
MAX_ACCEPT_WAIT = 24 * 3600.0
THREADS = 5               # threads serving channels: requests that run at once, one per PD
_ARMED = select.EPOLLIN | select.EPOLLONESHOT

#: (caller, method, params, fd) -> (result, fd to pass back or None); raises BMIError/ProtocolError.
Handler = Callable[[int, str, dict, "int | None"], "tuple[Any, int | None]"]


@dataclass(eq=False)          # each channel is itself (a set member by identity)
class _Channel:
    pd_id: int
    sock: socket.socket
    fd: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    queue: deque = field(default_factory=deque)      # requests taken up again (resume), run before reading
    held: bool = False          # a thread serves it (reads it, runs its requests); no other may
    readable: bool = False      # epoll said so while it was held: the holder reads again before letting go
    accepts: dict = field(default_factory=dict)      # request id -> deadline (monotonic) or None
    strikes: int = 0
    closed: bool = False
    forgotten: bool = False     # out of epoll, socket closed


class ChannelServer:
    """Serves the channels of one manager's PDs."""

    def __init__(self, handler: Handler, registry: Registry):
        self._handler = handler
        self._registry = registry
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._epoll.register(self._wake_r, select.EPOLLIN)     # level: at the stop, every thread sees it
        self._lock = threading.Lock()
        self._channels: dict[int, _Channel] = {}
        self._by_fd: dict[int, _Channel] = {}
        self._stopping = False
        self._timed: set[_Channel] = set()          # channels with an accept that times out
        self._request = threading.local()           # .queued: channels the request this thread runs queued for
        self._waiting = 0                           # threads waiting in epoll
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
        """Serve `layer` as pd_id's channel (any previous one is dropped); bmid re-attaches kept ones after a
        restart."""
        layer.setblocking(False)
        ch = _Channel(pd_id, layer, layer.fileno())
        with self._lock:
            old = self._channels.get(pd_id)
            self._channels[pd_id] = ch
            self._by_fd[ch.fd] = ch
            self._epoll.register(ch.fd, _ARMED)
        if old is not None:
            self._close(old)

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
        with self._lock:
            left = list(self._by_fd.values())
        for ch in left:
            self._forget(ch)
        self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def resume(self, pd_id: int, msg_id: Any, method: str, params: dict) -> None:
        """Take a request again that a previous server read but never answered (bmid after a restart)."""
        with self._lock:
            ch = self._channels.get(pd_id)
        if ch is None or ch.closed:
            return
        with ch.lock:
            ch.queue.append((msg_id, method, params))
        self._serve(ch, read=False)
        self._wake()        # a waiting thread looks at the accepts' deadlines again

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
        """A waiting thread: answer null to the accepts whose time is up; seconds until the next one's is
        (None: never)."""
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

    # -- the serving threads -----------------------------------------------------------------
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass            # a wake-up is pending already

    def _spawn(self) -> None:
        """One more serving thread, if THREADS are not there yet (the caller holds self._lock)."""
        self._threads = [t for t in self._threads if t.is_alive()]
        if not self._stopping and len(self._threads) < THREADS:
            t = threading.Thread(target=self._run, name="bmi-channel", daemon=True)
            self._threads.append(t)
            t.start()

    def _run(self) -> None:
        """A serving thread: wait for a readable channel and serve it; end the accepts whose time is up."""
        while not self._stopping:
            with self._lock:
                timed = list(self._timed)
            timeout = self._end_accepts(timed)
            events: list[tuple[int, int]] = []
            with self._lock:
                self._waiting += 1
            try:
                events = self._epoll.poll(-1 if timeout is None else timeout, 1)
            finally:
                with self._lock:
                    self._waiting -= 1
                    if self._waiting == 0 and events and events[0][0] != self._wake_r:
                        self._spawn()       # someone waits for the other channels while this one is served
            for fd, _ in events:
                if fd == self._wake_r:
                    if self._stopping:
                        return      # left unread: every other thread wakes for it too
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                    continue
                with self._lock:
                    ch = self._by_fd.get(fd)
                if ch is not None:
                    self._serve(ch, read=True)

    def _serve(self, ch: _Channel, read: bool) -> None:
        """Hold ch, run what it has (taken-up requests, then up to READ_BUDGET records), and let it go: armed
        again, or, once closed, out of epoll.  If another thread holds it, that one reads it again."""
        with ch.lock:
            if ch.held:
                ch.readable = ch.readable or read
                return
            ch.held = True
        try:
            while True:
                while True:
                    with ch.lock:
                        if ch.closed or not ch.queue:
                            break
                        msg_id, method, params = ch.queue.popleft()
                    try:
                        self._start(ch, msg_id, method, params, None)
                    except p.ProtocolError as e:
                        self._reply(ch, p.error_from(msg_id, e))
                if read and not ch.closed:
                    self._read(ch)
                with ch.lock:
                    read, ch.readable = ch.readable, False
                    if ch.closed or not (ch.queue or read):
                        ch.held = False
                        break
        except Exception:   # a bug serving one PD's channel must not end the thread (and the server)
            log.exception("PD %d: reading its channel failed inside the layer; closing the channel", ch.pd_id)
            self._close(ch)
            with ch.lock:
                ch.held = False
        if ch.closed:
            self._forget(ch)
        else:
            try:
                self._epoll.modify(ch.fd, _ARMED)
            except (OSError, ValueError):
                pass        # closed and forgotten meanwhile

    def _forget(self, ch: _Channel) -> None:
        """A closed channel out of epoll and its socket closed (once; the fd number may be reused at once)."""
        with self._lock:
            if ch.forgotten:
                return
            ch.forgotten = True
            if self._by_fd.get(ch.fd) is ch:
                del self._by_fd[ch.fd]
            if self._channels.get(ch.pd_id) is ch:
                del self._channels[ch.pd_id]
            self._timed.discard(ch)
            try:
                self._epoll.unregister(ch.fd)
            except (OSError, ValueError):
                pass
            ch.sock.close()
        with ch.lock:
            ch.queue.clear()

    def _close(self, ch: _Channel) -> None:
        """Any thread: stop the channel now; the socket is released by the thread that serves it next (its
        shutdown makes it readable) or at the server's close."""
        with ch.lock:
            if ch.closed:
                return
            ch.closed = True
            ch.accepts.clear()
            try:
                ch.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._registry.ended(ch.pd_id)
        self._ended(ch.pd_id)

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
            self._take(ch, data, fds, whole)

    def _take(self, ch: _Channel, data: bytes, fds: list[int], whole: bool) -> None:
        """Run one record's request (accept: take a queued connection or wait for one), or answer it with an
        error right here."""
        msg_id: Any = None
        try:
            if not whole:
                raise p.ProtocolError(p.INVALID_REQUEST, f"record truncated (at most {p.MAX_MESSAGE} bytes and "
                                                         f"{p.MAX_FDS} fds)")
            msg = p.decode(data)
            if isinstance(msg, dict):
                msg_id = msg.get("id")
            method, params = _check_request(msg)
            self._start(ch, msg_id, method, params, fds.pop(0) if fds and method == "setup_pd" else None)
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

    def _start(self, ch: _Channel, msg_id: Any, method: str, params: dict, fd: int | None) -> None:
        """A request taken (its reply is owed from here): an accept waits for a connection or takes a queued
        one; any other request runs now, in this thread."""
        self._taken(ch.pd_id, msg_id, method, params)
        if method != "accept":
            self._run_request(ch, msg_id, method, params, fd)
            return
        try:
            self._accept(ch, msg_id, params)
        except p.ProtocolError:
            self._answered(ch.pd_id, msg_id)        # answered right away, with that error
            raise

    def _run_request(self, ch: _Channel, msg_id: Any, method: str, params: dict, fd: int | None) -> None:
        """Answer one request; the thread lives on whatever happens (the next request of this PD is served)."""
        try:
            self._answer(ch, msg_id, method, params, fd)
        except Exception:
            log.exception("PD %d: answering %s failed inside the layer", ch.pd_id, method)

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
