"""The sockets handed to PDs: made in an empty network namespace, and carrying fds only where the protocol needs them.

A socket belongs to the network namespace it was made in, whoever holds it
later: a name a PD binds on its channel or on a connection end (an abstract
name, or the one autobind picks) lands in that namespace.  Made by the
manager, that would be the host's, where a PD could squat a name a host
service uses (X11's @/tmp/.X11-unix/X0, D-Bus).  So every socket pair
handed to a PD is made by a small process that sits in a network namespace
of its own, which no other process ever joins (csrc/sockmaker.c; one per
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


class SocketMaker:
    """Makes socket pairs in an empty network namespace (see the module's docstring); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._pid = self._pidfd = -1

    def pair(self, kind: int, *, fds: bool, what: str, pd_id: int | None = None) -> tuple[socket.socket, socket.socket]:
        """A connected AF_UNIX pair of `kind`; with fds=False neither end accepts fds (where the kernel can refuse)."""
        with self._lock:
            for attempt in (1, 2):          # a maker that died (killed by hand) is replaced once
                if self._sock is None:
                    from ..drivers.linux.spawn import start_socket_maker
                    self._sock, self._pid, self._pidfd = start_socket_maker()
                try:
                    self._sock.send(kind.to_bytes(4, sys.byteorder))
                    data, got, _, _ = socket.recv_fds(self._sock, 4, 2)
                except OSError as e:
                    data, got, failure = b"", [], e.strerror
                else:
                    failure = "it ended" if not data else None
                if failure is None or attempt == 2:
                    break
                self._stop()
        if len(data) != 4 or len(got) != (2 if data == bytes(4) else 0):
            for fd in got:
                os.close(fd)
            if failure is None:
                code = int.from_bytes(data[:4], sys.byteorder) if len(data) == 4 else errno.EPROTO
                failure = os.strerror(code)
            raise ResourceError(f"{what}: making the socket pair failed: {failure}", pd_id=pd_id)
        ends = socket.socket(fileno=got[0]), socket.socket(fileno=got[1])
        try:
            if not fds and fd_passing_refusable():
                for end in ends:
                    end.setsockopt(socket.SOL_SOCKET, SO_PASSRIGHTS, 0)
        except OSError as e:
            for end in ends:
                end.close()
            raise ResourceError(f"{what}: turning fd passing off failed: {e.strerror}", pd_id=pd_id) from None
        return ends

    def _stop(self) -> None:
        if self._sock is None:
            return
        self._sock.close()              # the maker reads EOF and exits
        self._sock = None
        try:
            os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED)
        except ChildProcessError:
            pass
        os.close(self._pidfd)
        self._pid = self._pidfd = -1

    def close(self) -> None:
        with self._lock:
            self._stop()
