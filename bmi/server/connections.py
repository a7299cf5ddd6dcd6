"""bmid's connection registry: connections between PDs survive bmid's restarts and crashes.

The layer's dups of a connection's socket ends and the end waiting for the
destination's accept are handed to the fd keeper (keys conn<ID>.held<N>,
conn<ID>.pending) in one message when the connection is made, and leave it
when they are let go (accepted, shut, revoked).  The metadata (id, source,
dest, type, mode, size) is a row of the store.  Order, so that a SIGKILL
anywhere leaves nothing that cannot be revoked:

- make: fds to the keeper, then the row (with the next id, so ids never
  repeat).  Kept fds without a row are a connect that was never answered:
  restore() shuts and drops them.
- cut: shutdown(SHUT_RDWR) (the kept dups are the same sockets, so they
  are cut too), then the keeper drops them, then the row goes.  A row whose
  socket connection has no kept fd left is a cut that was under way (or a
  connection already at end-of-file both ways): restore() forgets it.
"""
from __future__ import annotations

import itertools
import logging
import os
import re
import socket
from collections import deque
from typing import Callable

from ..channel.connections import Connection, Registry
from ..errors import BMIError
from ..store import Store
from ..types import ConnectionType
from .keeper import Keeper

log = logging.getLogger("bmi.bmid")

_KEY = re.compile(r"conn(\d+)\.(held\d+|pending)$")


class KeptConnections(Registry):
    """The Registry whose connections are kept by the fd keeper and recorded in the store."""

    def __init__(self, store: Store, keeper: Keeper, on_incoming: Callable[[int], None]):
        super().__init__(on_incoming)
        self._store = store
        self._keeper = keeper

    # -- the hooks ------------------------------------------------------------------------
    def _keep(self, conn: Connection) -> None:
        fds = {f"conn{conn.conn_id}.held{i}": s.fileno() for i, s in enumerate(conn.held)}
        if conn.pending_fd is not None:
            fds[f"conn{conn.conn_id}.pending"] = conn.pending_fd
        self._keeper.put_all(fds)
        try:
            self._store.add_connection(conn.describe())
        except BaseException:           # not recorded (a full disk): the keeper lets go of it too
            try:
                self._keeper.drop(f"conn{conn.conn_id}.")
            except BMIError as e:
                log.warning("connection %d: the fd keeper did not let go of it: %s", conn.conn_id, e)
            raise

    def _let_go(self, conn: Connection, part: str) -> None:
        try:
            self._keeper.drop(f"conn{conn.conn_id}.{part}")
        except BMIError as e:           # called from the channel thread: log, never raise
            log.warning("connection %d: the fd keeper did not let go of its %s end(s): %s", conn.conn_id, part, e)

    def _forget(self, conn: Connection) -> None:
        try:
            self._keeper.drop(f"conn{conn.conn_id}.")
            self._store.delete_connection(conn.conn_id)
        except BMIError as e:
            log.warning("connection %d was cut but stays recorded: %s", conn.conn_id, e)

    # -- after a restart ------------------------------------------------------------------
    def restore(self, existing: set[int], running: set[int]) -> None:
        """Take back the recorded connections with their kept fds; cut what can no longer be live.

        `existing` are the PDs bmid owns now, `running` those whose channel it
        re-attaches: a connection of a PD that is gone is cut, one of a PD that
        ended while bmid was down is treated as its channel's end would have.
        """
        kept: dict[int, list[str]] = {}
        for key in self._keeper.keys():
            match = _KEY.match(key)
            if match:
                kept.setdefault(int(match[1]), []).append(key)
        restored: list[Connection] = []
        for row in self._store.connections():
            conn = Connection(row["conn"], row["source"], row["dest"], ConnectionType[row["con_type"]],
                              row["mode"], row["size"])
            for key in sorted(kept.pop(conn.conn_id, [])):
                fd = self._keeper.get(key)
                if fd is None:
                    continue
                if key.endswith(".pending"):
                    conn.pending_fd = fd
                else:
                    conn.held.append(socket.socket(fileno=fd))
            if conn.con_type is not ConnectionType.SHM and not conn.held and conn.pending_fd is None:
                self._forget(conn)
            else:
                restored.append(conn)
        for conn_id, keys in kept.items():
            log.info("connection %d was made but never recorded (bmid stopped during connect): cutting it", conn_id)
            for key in keys:
                fd = self._keeper.get(key)
                if fd is not None:
                    _shut_fd(fd)
            self._keeper.drop(f"conn{conn_id}.")
        first = max([int(self._store.meta("next_conn") or 1), *(c.conn_id + 1 for c in restored),
                     *(i + 1 for i in kept)])
        with self._lock:
            self._ids = itertools.count(first)
            for conn in restored:
                self._add_live(conn)
                if conn.pending_fd is not None:
                    self._inbox.setdefault(conn.dest, deque()).append(conn)
        for pd_id in sorted({x for c in restored for x in (c.source, c.dest)} - running):
            if pd_id in existing:
                self.ended(pd_id)
            else:
                self.cut(pd_id=pd_id)


def _shut_fd(fd: int) -> None:
    """Cut a kept socket end both ways and close it (a kept SHM memfd is only closed)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
