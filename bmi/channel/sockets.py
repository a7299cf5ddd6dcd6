"""The sockets handed to PDs: made in an empty network namespace, and carrying fds only where the protocol needs them.

A socket belongs to the network namespace it was made in, whoever holds it
later: a name a PD binds on its channel or on a connection end (an abstract
name, or the one autobind picks) lands in that namespace.  Made by the
manager, that would be the host's, where a PD could squat a name a host
service uses (X11's @/tmp/.X11-unix/X0, D-Bus).  So every socket pair
handed to a PD is made by a small process that sits in a network namespace
of its own, which no other process ever joins (csrc/spawn/sockmaker.c; one per
manager, started with the first pair): a name bound there is seen by
nobody.  The ends are connected already, so they cannot connect anywhere
(EISCONN), and a path name a PD binds is resolved in its own mount
namespace.  Sockets a PD makes itself are in its own network namespace.

SO_PASSRIGHTS (Linux 6.16) off on a socket makes sending fds to it fail
with EPERM.  IPC, STREAM and EVENT ends have it off on both sides and the
PD's seccomp filter refuses turning it back on, so a connection cannot
carry an end of another socket past its mode or its revocation.  A PD's
channel keeps it: the manager hands connection ends to the PD, and the PD
hands the manager its child's image (setup_pd), the one fd the protocol
takes from a PD.
"""
from __future__ import annotations

import errno
import functools
import os
import socket
import sys
import threading
from collections import deque

from ..errors import ResourceError

SO_PASSRIGHTS = 83          # <asm-generic/socket.h> since Linux 6.16 (Python 3.11 does not name it)


@functools.cache
def fd_passing_refusable() -> bool:
    """Whether this kernel has SO_PASSRIGHTS, i.e. whether a socket can refuse the fds sent to it."""
    a, b = socket.socketpair()
    try:
        a.setsockopt(socket.SOL_SOCKET, SO_PASSRIGHTS, 0)
        return True
    except OSError as e:
        if e.errno in (errno.ENOPROTOOPT, errno.EINVAL):
            return False
        raise
    finally:
        a.close()
        b.close()


#: Pairs of one kind kept made ahead: when fewer than LOW are ready or asked for, BATCH more are asked
#: for at once, so the maker wakes once per BATCH pairs (not once per pair, on a CPU the caller needs).
LOW, BATCH = 2, 8


class SocketMaker:
    """Makes socket pairs in an empty network namespace (see the module's docstring); thread-safe.

    Pairs of each kind asked for are made ahead, in batches (LOW, BATCH):
    a pair then costs two syscalls here, not a round trip through another
    process.  A pair made ahead is as good as one made now: it was made by
    the maker, in its namespace, and is connected to nothing else.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._pidfd = -1
        self._asked: deque[int] = deque()                   # kinds asked for, replies not read yet
        self._ready: dict[int, deque[tuple[int, int]]] = {}  # pairs made ahead, per kind

    def pair(self, kind: int, *, fds: bool, what: str, pd_id: int | None = None) -> tuple[socket.socket, socket.socket]:
        """A connected AF_UNIX pair of `kind`; with fds=False neither end accepts fds (where the kernel can refuse)."""
        with self._lock:
            try:
                got = self._take(kind)
            except OSError:                 # the maker died (killed by hand): a new one, once
                self._stop()
                try:
                    got = self._take(kind)
                except OSError as e:
                    self._stop()
                    raise ResourceError(f"{what}: the socket maker failed: {e.strerror or e}", pd_id=pd_id) from None
        if isinstance(got, int):
            raise ResourceError(f"{what}: making the socket pair failed: {os.strerror(got)}", pd_id=pd_id)
        # family and type given: socket(fileno=) alone asks the kernel for them (three getsockopt per end)
        ends = socket.socket(socket.AF_UNIX, kind, fileno=got[0]), socket.socket(socket.AF_UNIX, kind, fileno=got[1])
        try:
            if not fds and fd_passing_refusable():
                for end in ends:
                    end.setsockopt(socket.SOL_SOCKET, SO_PASSRIGHTS, 0)
        except OSError as e:
            for end in ends:
                end.close()
            raise ResourceError(f"{what}: turning fd passing off failed: {e.strerror}", pd_id=pd_id) from None
        return ends

    def _take(self, kind: int) -> tuple[int, int] | int:
        """A pair of `kind` (one made ahead, if there is one) or the maker's errno; asks for more when few are left."""
        if self._sock is None:
            from ..drivers.linux.spawn import start_socket_maker
            self._sock, _, self._pidfd = start_socket_maker()
        ready = self._ready.setdefault(kind, deque())
        if not ready:
            self._collect(None)
        if not ready and kind not in self._asked:
            self._ask(kind, 1)
        got = ready.popleft() if ready else self._collect(kind)
        if not isinstance(got, int):
            ahead = len(ready) + self._asked.count(kind)
            if ahead < LOW:
                try:
                    self._ask(kind, BATCH - ahead)
                except OSError:         # the next call finds the maker gone and starts another
                    pass
        return got

    def _ask(self, kind: int, count: int) -> None:
        """One message for the whole batch: the maker wakes once (csrc/spawn/sockmaker.c)."""
        assert self._sock is not None
        self._sock.send(kind.to_bytes(4, sys.byteorder) + count.to_bytes(4, sys.byteorder))
        self._asked.extend([kind] * count)

    def _collect(self, kind: int | None) -> tuple[int, int] | int | None:
        """Read the maker's replies: all that are there (kind None), or until the next one for `kind`, returned."""
        assert self._sock is not None
        while self._asked:
            try:
                data, got, _, _ = socket.recv_fds(self._sock, 4, 2, 0 if kind is not None else socket.MSG_DONTWAIT)
            except BlockingIOError:
                return None
            if not data:
                raise BrokenPipeError(errno.EPIPE, "the socket maker ended")
            asked = self._asked.popleft()
            code = int.from_bytes(data, sys.byteorder) if len(data) == 4 else errno.EPROTO
            if code or len(got) != 2:
                for fd in got:
                    os.close(fd)
                if asked == kind:
                    return code or errno.EPROTO
                continue
            if asked == kind:
                return got[0], got[1]
            self._ready.setdefault(asked, deque()).append((got[0], got[1]))
        return None

    def _stop(self) -> None:
        for pairs in self._ready.values():
            for pair in pairs:
                for fd in pair:
                    os.close(fd)
        self._ready.clear()
        self._asked.clear()
        if self._sock is None:
            return
        self._sock.close()              # the maker reads EOF and exits
        self._sock = None
        try:
            os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED)
        except ChildProcessError:
            pass
        pidfd, self._pidfd = self._pidfd, -1      # taken before the close: an interrupt must not close it twice
        os.close(pidfd)

    def close(self) -> None:
        with self._lock:
            self._stop()
