"""The fd keeper: holds the fds that must outlive a bmid crash.

A PD started by bmid writes its console into a pipe, reports its exit into
another, talks to the layer over its channel and runs from a sealed memfd.
If bmid were the only holder of the other ends, a SIGKILL of bmid would
break them (a console write would get EPIPE/SIGPIPE, the channel EOF, the
image would be gone).  So bmid hands a copy of each to this tiny process,
which does nothing but hold them, and takes them back after a restart
(like systemd's fd store, without needing systemd).

The keeper runs detached (its own session, not a child of bmid), serves one
bmid at a time on a root-only SOCK_SEQPACKET socket with the channel codec
(bmi.channel.protocol), and exits when bmid disconnects and it holds no fd.
"""
from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import struct
import threading
from typing import Any, Mapping

from ..channel import protocol as p
from ..errors import ResourceError

START_TIMEOUT = 30.0        # s: python in a Xen dom0 under TCG starts 10-20x slower


class Keeper:
    """bmid's side of the keeper connection."""

    def __init__(self, path: str, *, start: bool = True):
        self.path = path
        self._sock = _connect(path)
        if self._sock is None:
            if not start:
                raise ResourceError(f"bmid: no fd keeper on {path}")
            _start(path)
            self._sock = _connect(path)
            if self._sock is None:
                raise ResourceError(f"bmid: the fd keeper did not come up on {path}")
        self._ids = 0
        self._lock = threading.Lock()       # one request and its reply at a time, whatever thread asks

    def _call(self, method: str, fds: tuple[int, ...] = (), **params: Any) -> tuple[Any, list[int]]:
        with self._lock:
            self._ids += 1
            try:
                p.send(self._sock, p.request(self._ids, method, params), fds)
                data, got, _ = p.receive(self._sock)
            except OSError as e:
                raise ResourceError(f"bmid: fd keeper {method} failed: {e.strerror or e}") from None
        reply = p.decode(data) if data else None
        if not isinstance(reply, dict) or "result" not in reply:
            for fd in got:
                os.close(fd)
            raise ResourceError(f"bmid: fd keeper {method}: bad reply {reply!r}"[:200])
        return reply["result"], got

    def put(self, key: str, fd: int) -> None:
        """Keep a copy of fd under key (replacing what was kept there)."""
        self.put_all({key: fd})

    def put_all(self, fds: Mapping[str, int]) -> None:
        """Keep a copy of each fd under its key in one message: a crash leaves all of them kept or none."""
        if len(fds) > p.MAX_FDS:
            raise ResourceError(f"bmid: fd keeper put of {len(fds)} fds (at most {p.MAX_FDS} at once)")
        self._call("put", tuple(fds.values()), keys=list(fds))

    def drop(self, prefix: str) -> None:
        """Close every fd kept under a key starting with prefix."""
        self._call("drop", prefix=prefix)

    def keys(self) -> list[str]:
        return self._call("keys")[0]

    def read(self, key: str) -> bytes | None:
        """What the pipe kept under key has delivered so far (the keeper reads it and keeps the bytes until the
        key is dropped, so a crash of bmid between reading and storing loses nothing); None: nothing kept."""
        value, fds = self._call("read", key=key)
        for fd in fds:
            os.close(fd)
        return bytes.fromhex(value) if isinstance(value, str) else None

    def get(self, key: str) -> int | None:
        """A new fd for what is kept under key (caller closes it), None if nothing is."""
        _, fds = self._call("get", key=key)
        return fds[0] if fds else None

    def close(self) -> None:
        self._sock.close()


def existing(path: str) -> list[str] | None:
    """The keys a running keeper on path holds (None: no keeper there); starts none."""
    try:
        keeper = Keeper(path, start=False)
    except ResourceError:
        return None
    try:
        return keeper.keys()
    finally:
        keeper.close()


def _connect(path: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
        return sock
    except OSError:
        sock.close()
        return None


def _start(path: str) -> None:
    """Start a detached keeper; returns once it listens."""
    proc = subprocess.run([sys.executable, "-m", "bmi.server.keeper", path], stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=START_TIMEOUT, close_fds=True)
    if proc.returncode != 0:
        raise ResourceError(f"bmid: starting the fd keeper on {path} failed: "
                            f"{proc.stderr.decode(errors='replace').strip()[-300:]}")


def serve(path: str) -> None:
    """The keeper process: bind, detach (the parent returns), then hold fds."""
    if os.path.exists(path):
        os.unlink(path)             # a keeper that died left it; _connect failed before we got here
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    old = os.umask(0o077)
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    listener.listen(4)
    if os.fork():
        os._exit(0)                 # the starter waits for this exit: the socket is ready
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    held: dict[str, int] = {}
    read: dict[str, bytes] = {}
    while True:
        conn, _ = listener.accept()
        if _peer_uid(conn) != os.getuid():
            conn.close()
            continue
        _serve_one(conn, held, read)
        conn.close()
        if not held:
            break
    listener.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _drain(fd: int) -> bytes:
    """What a pipe has for us now, without blocking (b"" at EOF or when it has nothing)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    data = b""
    while poller.poll(0) and len(data) < 4096:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data


def _serve_one(conn: socket.socket, held: dict[str, int], read: dict[str, bytes]) -> None:
    while True:
        record = p.next_record(conn)
        if record is None:
            return
        data, fds, _ = record
        try:
            msg = p.decode(data)
            method, params = msg["method"], msg.get("params", {})
        except (p.ProtocolError, KeyError, TypeError):
            for fd in fds:
                os.close(fd)
            return
        out: tuple[int, ...] = ()
        value: Any = None
        if method == "put":
            keys = params.get("keys", [])
            for key, fd in zip(keys, fds):
                read.pop(key, None)
                old = held.pop(key, None)
                if old is not None:
                    os.close(old)
                held[key] = fd
            fds = fds[len(keys):]
        elif method == "drop":
            for key in [k for k in held if k.startswith(params.get("prefix", "\0"))]:
                os.close(held.pop(key))
                read.pop(key, None)
        elif method == "read" and params.get("key") in held:
            key = params["key"]
            try:
                read[key] = read.get(key, b"") + _drain(held[key])
            except OSError:
                read.setdefault(key, b"")
            value = read[key].hex()
        elif method == "keys":
            value = sorted(held)
        elif method == "get" and params.get("key") in held:
            out = (held[params["key"]],)
        for fd in fds:
            os.close(fd)
        try:
            p.send(conn, p.result(msg.get("id"), value), out)
        except OSError:
            return


if __name__ == "__main__":
    serve(sys.argv[1])
