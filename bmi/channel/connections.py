"""Connections between PDs: the fd pairs, their kernel-enforced modes, and revocation.

Mechanisms only; *whether* a connection may exist is decided in bmi/api.py.
Each connection keeps a layer-side duplicate of the source's socket end, so
that revoking it is one shutdown(SHUT_RDWR): both PDs see EOF / EPIPE at
once, whatever copies of the fds they made (on an AF_UNIX stream or
seqpacket pair the kernel shuts the peer's opposite directions with it).
Modes are seen from the source towards the destination and enforced by the
kernel:

- IPC (SOCK_SEQPACKET), STREAM (SOCK_STREAM), EVENT (SOCK_SEQPACKET carrying
  8-byte counters): READ shuts the source's sending side, WRITE its
  receiving side; shutdown cannot be undone by either PD.  Neither end
  accepts fds (SO_PASSRIGHTS off, see sockets.py), so no other socket can
  ride a connection past its mode or its revocation.
- SHM: a memfd of fixed size (sealed against shrink/grow) chmod 0444 and
  owned by the layer; a read-only side gets an O_RDONLY fd, so PROT_WRITE
  MAP_SHARED mappings fail (EACCES) and it cannot reopen the file for
  writing.  A mapping cannot be taken back: revoking SHM closes nothing
  the PD already holds (see /capability/connections/shm-revocable).
"""
from __future__ import annotations

import fcntl
import itertools
import os
import resource
import socket
import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

from ..errors import InvalidArgument, ResourceError
from ..types import READ, WRITE, ConnectionType
from .protocol import mode_name
from .sockets import SocketMaker

INBOX_LIMIT = 16                       # connections waiting for one PD's accept
#: Live connections one PD may have opened: the layer holds an fd for each until it is revoked or a PD
#: ends (a PD closing its end does not end it), so without a bound a PD connecting in a loop would grow
#: the layer's open fds without end.
SOURCE_LIMIT = 1024
MAX_SHM = 1 << 30
EVENT_BUFFER = 4096                    # EVENT carries counters, not data
_SHM_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_SOCKET_KIND = {ConnectionType.IPC: socket.SOCK_SEQPACKET, ConnectionType.STREAM: socket.SOCK_STREAM,
                ConnectionType.EVENT: socket.SOCK_SEQPACKET}


@dataclass
class Connection:
    """One live connection as the layer sees it."""

    conn_id: int
    source: int
    dest: int
    con_type: ConnectionType
    mode: int
    size: int = 0
    held: list[socket.socket] = field(default_factory=list)   # layer dup(s) of an end, for revocation
    pending_fd: int | None = None                             # the dest's end until accepted

    def describe(self) -> dict[str, object]:
        return {"conn": self.conn_id, "source": self.source, "dest": self.dest,
                "con_type": self.con_type.name, "mode": self.mode, "size": self.size}


def fd_limit() -> int:
    """This process's soft RLIMIT_NOFILE (2**20 when unlimited): what the layer's own bounds are shares of."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


def live_limit() -> int:
    """Live connections of all PDs together: a quarter of the fd limit, as the layer holds an fd of each (and
    bmid's keeper another); past it PDs of different sources connecting in a loop ran bmid out of the fds its
    store needs, and a store that fails stops bmid."""
    return max(64, fd_limit() // 4)


class Registry:
    """Every live connection of one manager; thread-safe.

    A layer that must keep connections across its own restarts (bmid)
    subclasses it and overrides the three hooks _keep, _let_go and _forget;
    here they do nothing.
    """

    def __init__(self, on_incoming: Callable[[int], None] = lambda pd_id: None):
        self._lock = threading.Lock()
        self._live: dict[int, Connection] = {}
        self._inbox: dict[int, deque[Connection]] = {}
        self._opened: Counter[int] = Counter()        # live connections per source PD
        self._ids = itertools.count(1)
        self._on_incoming = on_incoming
        self.sockets = SocketMaker()       # every socket pair handed to a PD (channels too) is made here

    def make(self, source: int, dest: int, con_type: ConnectionType, mode: int, size: int = 0) -> tuple[Connection, int]:
        """Create the pair, queue the dest's end for its accept; return the source's fd (caller owns it)."""
        what = f"connect from PD {source} to PD {dest} ({con_type.name}, mode {mode})"
        with self._lock:
            if len(self._inbox.get(dest, ())) >= INBOX_LIMIT:
                raise ResourceError(f"{what}: PD {dest} has {INBOX_LIMIT} connections it has not accepted",
                                    pd_id=dest)
            if len(self._live) >= live_limit():
                raise ResourceError(f"{what}: the layer holds {len(self._live)} live connections, all its fd limit "
                                    f"allows (a quarter of RLIMIT_NOFILE); revoke some (set_allowed_connections "
                                    f"with disable_existing), or give bmid a higher LimitNOFILE", pd_id=source)
            if self._opened[source] >= SOURCE_LIMIT:
                raise ResourceError(f"{what}: PD {source} has {SOURCE_LIMIT} live connections it opened (closing "
                                    f"an end does not end one); revoke some (set_allowed_connections with "
                                    f"disable_existing) or restart the PD", pd_id=source)
        conn = Connection(next(self._ids), source, dest, con_type, mode)
        if con_type is ConnectionType.SHM:
            src_fd, dst_fd = self._shm_pair(conn, size, what)
        else:
            src_fd, dst_fd = self._socket_pair(conn, what)
        conn.pending_fd = dst_fd
        try:
            self._keep(conn)
        except BaseException:
            os.close(src_fd)
            self._discard(conn)
            raise
        with self._lock:
            self._add_live(conn)
            self._inbox.setdefault(dest, deque()).append(conn)
        self._on_incoming(dest)
        return conn, src_fd

    def _socket_pair(self, conn: Connection, what: str) -> tuple[int, int]:
        kind = _SOCKET_KIND[conn.con_type]
        src, dst = self.sockets.pair(kind, fds=False, what=what, pd_id=conn.source)
        try:
            if conn.con_type is ConnectionType.EVENT:
                for s in (src, dst):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, EVENT_BUFFER)
            if conn.mode == READ:
                src.shutdown(socket.SHUT_WR)        # the source may only read from dest
            elif conn.mode == WRITE:
                src.shutdown(socket.SHUT_RD)        # the source may only write to dest
            conn.held = [socket.socket(socket.AF_UNIX, kind, fileno=os.dup(src.fileno()))]
            return src.detach(), dst.detach()
        finally:
            src.close()
            dst.close()

    @staticmethod
    def _shm_pair(conn: Connection, size: int, what: str) -> tuple[int, int]:
        if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_SHM:
            raise InvalidArgument(f"{what}: SHM needs a size of 1..{MAX_SHM} bytes, got {size!r}",
                                  pd_id=conn.source)
        conn.size = size
        opened: list[int] = []
        try:
            rw = os.memfd_create(f"bmi-shm-{conn.source}-{conn.dest}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            opened.append(rw)
            os.ftruncate(rw, size)
            fcntl.fcntl(rw, fcntl.F_ADD_SEALS, _SHM_SEALS)
            os.fchmod(rw, 0o444)        # nobody may reopen it for writing via /proc/self/fd
            ro = os.open(f"/proc/self/fd/{rw}", os.O_RDONLY | os.O_CLOEXEC)
            opened.append(ro)
            src = ro if conn.mode == READ else os.dup(rw)
            opened.append(src)
            dst = ro if conn.mode == WRITE else os.dup(rw)
            opened.append(dst)
        except OSError as e:
            for x in set(opened):
                os.close(x)
            raise ResourceError(f"{what}: making the shared memory failed: {e.strerror}", pd_id=conn.source) from None
        for x in set(opened) - {src, dst}:
            os.close(x)
        return src, dst

    def _add_live(self, conn: Connection) -> None:
        """Under self._lock."""
        self._live[conn.conn_id] = conn
        self._opened[conn.source] += 1

    def take(self, dest: int) -> tuple[Connection, int] | None:
        """The oldest connection waiting for dest's accept, and its fd (now the caller's)."""
        with self._lock:
            queue = self._inbox.get(dest)
            if not queue:
                return None
            conn = queue.popleft()
            fd, conn.pending_fd = conn.pending_fd, None
        assert fd is not None
        self._let_go(conn, "pending")
        return conn, fd

    def live(self, pd_id: int) -> list[Connection]:
        with self._lock:
            return [c for c in self._live.values() if pd_id in (c.source, c.dest)]

    def cut(self, keep: Callable[[Connection], bool] | None = None, *, pd_id: int | None = None) -> list[Connection]:
        """Revoke every connection of pd_id (or all) that `keep` does not keep."""
        with self._lock:
            gone = [c for c in self._live.values()
                    if (pd_id is None or pd_id in (c.source, c.dest)) and (keep is None or not keep(c))]
            for c in gone:
                del self._live[c.conn_id]
                self._opened[c.source] -= 1
                if not self._opened[c.source]:
                    del self._opened[c.source]      # (PD ids are not reused: no entry per PD ever seen)
                queue = self._inbox.get(c.dest)
                if queue is not None and c in queue:
                    queue.remove(c)
        for c in gone:
            self._discard(c)
        return gone

    def ended(self, pd_id: int) -> None:
        """pd_id's channel ended (its programs exited): cut its connections.

        A connection it opened that the peer has not accepted yet stays
        queued, already at end-of-file: what the PD sent before it ended
        still arrives, as it would on any socket whose writer exits.
        """
        self.cut(lambda c: c.source == pd_id and c.pending_fd is not None, pd_id=pd_id)
        with self._lock:
            kept = [c for c in self._live.values() if c.source == pd_id and c.pending_fd is not None]
        for c in kept:
            self._shut(c)
            self._let_go(c, "held")

    @staticmethod
    def _shut(conn: Connection) -> None:
        """Both ends see EOF/EPIPE from now on (the layer's own copies are what makes that possible)."""
        for s in conn.held:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        conn.held = []

    def _discard(self, conn: Connection) -> None:
        """Revoke conn and forget it: shut first, so that nothing kept elsewhere stays connected."""
        self._shut(conn)
        pending, conn.pending_fd = conn.pending_fd, None    # taken before the close: never closed twice
        if pending is not None:
            os.close(pending)
        self._forget(conn)

    # -- hooks ----------------------------------------------------------------------------
    def _keep(self, conn: Connection) -> None:
        """conn was just made (held dups and pending end set), before anyone can see it; may raise."""

    def _let_go(self, conn: Connection, part: str) -> None:
        """conn's "held" dups were shut and closed, or its "pending" end went to the dest's accept."""

    def _forget(self, conn: Connection) -> None:
        """conn was revoked and is no longer live."""

    def close(self) -> None:
        self.cut()
        with self._lock:
            self._inbox.clear()
        self.sockets.close()


def lines(conns: Iterable[Connection], pd_id: int) -> str:
    """The /interfaces/connections value: one line per connection, as seen from pd_id."""
    out = []
    for c in sorted(conns, key=lambda c: c.conn_id):
        out.append(f"{c.conn_id} {'to' if c.source == pd_id else 'from'} "
                   f"{c.dest if c.source == pd_id else c.source} {c.con_type.name} "
                   f"{mode_name(c.mode)}"
                   + (f" {c.size}" if c.con_type is ConnectionType.SHM else "")
                   + (" pending" if c.pending_fd is not None else ""))
    return "\n".join(out)
