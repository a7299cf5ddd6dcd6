"""Inside a PD: the BMI over the channel the layer started it with (fd $BMI_CHANNEL_FD).

    import bmi, bmi.pd
    mgr = bmi.open("pd:///")                      # PDManagement-compatible
    me = mgr.get_controller()                     # this PD's own controller
    cmdline = me.get_config_param("/boot/cmdline")
    conn = bmi.pd.connect(2, bmi.ConnectionType.IPC, bmi.RW)   # if PD 2 is allowed
    peer = bmi.pd.accept(timeout=5)               # in PD 2

The layer knows who is asking by the channel itself; nothing sent here can
claim another identity.  docs/protocol.md describes the wire format.
"""
from __future__ import annotations

import itertools
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .channel import protocol as p
from .channel.client import remote
from .checks import check_setup
from .errors import BMIError, InvalidArgument, NotSupported, ResourceError
from .integrity.measure import handover_fd
from .types import RW, ConnectionType, PDDescription

URI = "pd:///"


@dataclass
class Connection:
    """One end of a connection: `fd` is ours to use and close (a socket, or a memfd for SHM)."""

    conn: int
    peer: int
    con_type: ConnectionType
    mode: int               # seen from the source towards the destination
    size: int
    fd: int

    def fileno(self) -> int:
        return self.fd

    def socket(self) -> socket.socket:
        """The fd as a socket object (IPC, STREAM, EVENT); the socket then owns the fd."""
        if self.con_type is ConnectionType.SHM:
            raise InvalidArgument(f"connection {self.conn} is SHM: mmap the fd instead")
        sock, self.fd = socket.socket(fileno=self.fd), -1
        return sock

    def close(self) -> None:
        fd, self.fd = self.fd, -1       # taken before the close: an interrupt must not close it twice
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Channel:
    """Request/response over the PD's SOCK_SEQPACKET channel (one call at a time)."""

    def __init__(self, fd: int):
        try:
            kind = socket.socket(fileno=os.dup(fd))
        except OSError as e:
            raise ResourceError(f"open {URI}: fd {fd} is not usable as the PD channel: {e.strerror}") from None
        if kind.type != socket.SOCK_SEQPACKET or kind.family != socket.AF_UNIX:
            kind.close()
            raise ResourceError(f"open {URI}: fd {fd} is not an AF_UNIX SOCK_SEQPACKET channel")
        self._sock = kind
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def call(self, method: str, params: dict[str, Any], fd: int | None = None) -> tuple[Any, int | None]:
        """The result (and the fd passed back, if any); a layer error is raised as its bmi exception."""
        with self._lock:
            if self._sock.fileno() < 0:
                raise ResourceError(f"{method}: the PD channel is closed")
            msg_id = next(self._ids)
            try:
                p.send(self._sock, p.request(msg_id, method, params), (fd,) if fd is not None else ())
                data, fds, whole = p.receive(self._sock)
            except OSError as e:
                raise ResourceError(f"{method}: the PD channel failed: {e.strerror or e}") from None
        extra = fds[1:]
        for x in extra:
            os.close(x)
        got = fds[0] if fds else None
        if not data:
            if got is not None:
                os.close(got)
            raise ResourceError(f"{method}: the layer closed this PD's channel")
        try:
            reply = p.decode(data) if whole else None
        except p.ProtocolError:
            reply = None            # reported as a malformed reply, with `got` closed
        return self._unwrap(method, reply, msg_id, got, "on the PD channel")

    @staticmethod
    def _unwrap(method: str, reply: Any, msg_id: int, got: int | None, where: str) -> tuple[Any, int | None]:
        """The result of `reply` (and the fd it passed), or its error raised with that fd closed."""
        try:
            if not isinstance(reply, dict) or reply.get("id") != msg_id:
                raise ResourceError(f"{method}: malformed reply {where}")
            if "error" in reply:
                p.raise_error(reply["error"])
        except BaseException:
            if got is not None:
                os.close(got)
            raise
        return reply.get("result"), got

    def value(self, method: str, **params: Any) -> Any:
        result, fd = self.call(method, params)
        if fd is not None:
            os.close(fd)
        return result

    def close(self) -> None:
        self._sock.close()


def _connection(info: Any, fd: int | None, me: int | None) -> Connection:
    if not isinstance(info, dict) or fd is None:
        if fd is not None:
            os.close(fd)
        raise BMIError("malformed connection from the layer")
    peer = info["dest"] if info["source"] == me else info["source"]
    return Connection(info["conn"], peer, ConnectionType[info["con_type"]], info["mode"], info["size"], fd)


class PDClient:
    """bmi.open("pd:///"): the PDManagement interface as this PD may use it."""

    uri = URI

    def __init__(self, fd: int | None = None):
        if fd is None:
            name = os.environ.get("BMI_CHANNEL_FD")
            if name is None or not name.isdigit():
                raise NotSupported(f"open {URI}: BMI_CHANNEL_FD is not set; this process is not a PD "
                                   f"started by bmi")
            fd = int(name)
        self._channel = Channel(fd)
        self._me: int | None = None

    # -- spec 7.1 -------------------------------------------------------------------------------
    get_version = remote("get_version")
    list_pd = remote("list_pd")
    get_attestation_key = remote("get_attestation_key")

    def allocate_pd(self, desc: PDDescription) -> "RemoteController":
        if not isinstance(desc, PDDescription):
            raise InvalidArgument(f"allocate_pd: expected a PDDescription, got {type(desc).__name__}")
        pd_id = self._channel.value("allocate_pd", mem=desc.mem, cpu=desc.cpu, performance=desc.performance)
        return RemoteController(self._channel, pd_id)

    def get_controller(self, pd_id: int | None = None) -> "RemoteController":
        params = {} if pd_id is None else {"pd": pd_id}
        return RemoteController(self._channel, self._channel.value("get_controller", **params))

    def get_device_manager(self) -> Any:
        raise NotSupported("get_device_manager: a PD cannot assign host devices")

    # -- connections ----------------------------------------------------------------------------
    def my_id(self) -> int:
        if self._me is None:
            self._me = self.get_controller().get_pd_id()
        return self._me

    def connect(self, tid: int, con_type: ConnectionType, mode: int = RW, size: int = 0) -> Connection:
        """Open a connection to PD tid (the layer checks this PD's policy towards tid)."""
        kind = ConnectionType(con_type).name
        params: dict[str, Any] = {"tid": tid, "con_type": kind, "mode": mode}
        if size:
            params["size"] = size
        info, fd = self._channel.call("connect", params)
        return _connection(info, fd, self.my_id())

    def accept(self, timeout: float | None = None) -> Connection | None:
        """The next connection another PD opened to this one; None after timeout seconds."""
        info, fd = self._channel.call("accept", {"timeout": timeout})
        return None if info is None else _connection(info, fd, self.my_id())

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "PDClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RemoteController:
    """A PDController over the channel; the layer decides what this PD may do with it."""

    def __init__(self, channel: Channel, pd_id: int):
        self._channel = channel
        self._id = pd_id

    def __repr__(self) -> str:
        return f"<RemoteController pd={self._id} {URI}>"

    def get_pd_id(self) -> int:
        return self._id

    # -- built from the method table (bmi/channel/methods.py) ------------------------------------
    get_priority = remote("get_priority")
    set_priority = remote("set_priority")
    get_current_status = remote("get_current_status")
    request_status_change = remote("request_status_change")
    destroy = remote("destroy")
    set_allowed_connections = remote("set_allowed_connections")
    get_allowed_connections = remote("get_allowed_connections")
    set_config_param = remote("set_config_param")
    get_config_param = remote("get_config_param")
    set_runtime_param = remote("set_runtime_param")
    get_runtime_param = remote("get_runtime_param")
    list_runtime_params = remote("list_runtime_params")
    get_integrity_link = remote("get_integrity_link")
    get_protected_credentials = remote("get_protected_credentials")

    # -- with an fd --------------------------------------------------------------------------
    def setup_pd(self, image: Any, *, banks: Sequence[str] = ("sha256",),
                 progress: Callable[[int, int], None] | None = None) -> None:
        """Hand the image to the layer, which copies it into its own sealed memfd and hashes it, once
        (handover_fd: a FileImage as its own file, any other PDImage copied into a memfd here, unhashed).

        A misbehaving PDImage gets the same error here as in session mode,
        before the layer sees it; the layer trusts no digest of ours.
        """
        check_setup(image, banks, progress, f"setup_pd of PD {self._id}", self._id)
        fd = handover_fd(image, progress=progress, pd_id=self._id)
        try:
            _, extra = self._channel.call("setup_pd", {"pd": self._id, "banks": list(banks)}, fd)
        finally:
            os.close(fd)
        if extra is not None:
            os.close(extra)


_default: PDClient | None = None
_default_lock = threading.Lock()


def open(fd: int | None = None) -> PDClient:  # noqa: A001 (mirrors bmi.open)
    """A client on the channel fd (default: $BMI_CHANNEL_FD)."""
    return PDClient(fd)


def _client() -> PDClient:
    global _default
    with _default_lock:
        if _default is None:
            _default = PDClient()
        return _default


def connect(tid: int, con_type: ConnectionType, mode: int = RW, size: int = 0) -> Connection:
    """From the source PD: a connection to tid of this type and mode (SHM: size in bytes)."""
    return _client().connect(tid, con_type, mode, size)


def accept(timeout: float | None = None) -> Connection | None:
    """In the destination PD: the next incoming connection (peer, type, mode, fd), None on timeout."""
    return _client().accept(timeout)
