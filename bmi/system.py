"""linux:///system and xen:///system: the PDManagement API as a client of bmid.

    mgr = bmi.open("linux:///system")            # or linux:///system?socket=/path/to/bmid.sock
    mgr = bmi.open("xen:///system")              # bmid --uri xen:///system, on /run/bmi/bmid-xen.sock
    pd = mgr.allocate_pd(bmi.PDDescription(mem=64 << 20))
    for event in mgr.events():                   # status changes, like libvirt domain events
        ...

The semantics are bmid's PDManagement (bmi/api.py), reached over the PD
channel's protocol; this module only carries calls, as bmi.pd does inside
a PD, and adds what a manager client has beyond a PD: the console, waits,
measurements, devices, sealing and events.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs, urlsplit

from .channel import protocol as p
from .drivers import BMIDS, DRIVERS
from .errors import DriverUnavailable, InvalidArgument, InvalidState, NotSupported, PermissionDenied, ResourceError
from .checks import check_progress
from .remote.ssh import is_remote
from .channel.board import BoardReader
from .channel.client import remote
from .pd import Channel, RemoteController
from .types import PDDescription, PDStatus

LINUX_URI = DRIVERS["linux"].system_uri          # the default


def system_uri(uri: str) -> str:
    """The URI without its query: the key of BMIDS (bmi/drivers/__init__.py)."""
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.path}"


def default_socket(uri: str) -> str:
    """Where bmid for this URI listens unless told otherwise: $BMID_SOCKET / $BMID_XEN_SOCKET, else /run/bmi/."""
    return BMIDS[system_uri(uri)].default_socket()


def socket_path(uri: str) -> str:
    """?socket= in the URI, else the default socket of the URI's bmid ("" for a remote host's default)."""
    query = parse_qs(urlsplit(uri).query)
    return (query.get("socket") or ["" if is_remote(uri) else default_socket(uri)])[0]


def _connect(uri: str, path: str) -> socket.socket:
    if is_remote(uri):              # SCHEME+ssh://host/system: bmid's socket there, through ssh
        from .remote.tunnel import connect
        return connect(uri)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        what = system_uri(uri)
        if e.errno in (errno.EACCES, errno.EPERM):
            raise PermissionDenied(f"open {what}: no permission on bmid's socket {path} (root only, "
                                   f"or the group bmid was started with --group)") from None
        unit = BMIDS[what].unit
        raise DriverUnavailable(f"open {what}: cannot reach bmid on {path}: {e.strerror}; start it with "
                                f"`bmid --uri {what}` (systemd: systemctl start {unit})") from None
    return sock


class _BmidChannel(Channel):
    """bmi.pd's channel to bmid: JSON-checked arguments, replies larger than one record, and a new connection
    after bmid restarted.

    A reply that does not fit one record (MAX_MESSAGE) comes as records
    {"id", "more": hex of a piece of the reply's JSON} ending with "last": true.
    The call that was in flight when bmid went away raises ResourceError;
    the next one connects again (`generation` counts the connections).
    """

    def __init__(self, fd: int, uri: str, path: str):
        super().__init__(fd)
        self._uri, self._path = uri, path
        self._gone = False
        self.generation = 0

    def call(self, method: str, params: dict[str, Any], fd: int | None = None, *,
             progress: Callable[[int, int], None] | None = None) -> tuple[Any, int | None]:
        """As Channel.call; progress(done, total) gets the progress records bmid sends before the reply."""
        with self._lock:
            if self._sock.fileno() < 0:
                raise InvalidState(f"{method}: this connection to bmid is closed")
            msg_id = next(self._ids)
            try:
                data = p.encode(p.request(msg_id, method, params))
            except (TypeError, ValueError) as e:
                raise InvalidArgument(f"{method}: an argument cannot be sent to bmid: {e}",
                                      pd_id=params.get("pd") if isinstance(params.get("pd"), int) else None) from None
            self._reconnect(method)
            try:
                p.send_encoded(self._sock, data, (fd,) if fd is not None else ())
                reply, got = self._receive(method, progress)
            except OSError as e:
                self._gone = True
                why = (" (bmid closed it: it restarted, or it serves as many clients as it may; its log says which)"
                       if e.errno in (errno.ECONNRESET, errno.EPIPE) else "")
                raise ResourceError(f"{method}: the connection to bmid failed: {e.strerror or e}{why}") from None
            except ResourceError:
                self._gone = True
                raise
        return self._unwrap(method, reply, msg_id, got, "from bmid")

    def _report(self, method: str, progress: Callable[[int, int], None] | None, value: Any) -> None:
        """Hand one progress record to the caller's callback.  If the callback raises, this connection is
        shut down, so bmid's next report fails and the start stops there, as a raising callback stops it in
        session mode; the next call connects again."""
        if progress is None or not (isinstance(value, list) and len(value) == 2
                                    and all(type(v) is int for v in value)):
            return
        try:
            progress(value[0], value[1])
        except BaseException as e:
            self._sock.shutdown(socket.SHUT_RDWR)
            self._gone = True
            if isinstance(e, Exception):
                raise InvalidArgument(f"{method}: stopped by the progress callback: {e!r}") from e
            raise

    def _reconnect(self, what: str) -> None:
        """A new connection when bmid went away since the last call (it was restarted, or is still down)."""
        if not self._gone:
            return
        try:
            sock = _connect(self._uri, self._path)
        except (DriverUnavailable, PermissionDenied) as e:
            raise ResourceError(f"{what}: bmid closed the connection and cannot be reached again: {e}") from None
        old, self._sock = self._sock, sock
        old.close()
        self._gone = False
        self.generation += 1

    def check_open(self, what: str) -> None:
        """Raise as a request would when bmid has gone and cannot be reached again (reads from the status board
        ask no one); connect again when it was restarted."""
        with self._lock:
            if self._sock.fileno() < 0:
                raise InvalidState(f"{what}: this connection to bmid is closed")
            if not self._gone:
                poller = select.poll()
                poller.register(self._sock, select.POLLIN | select.POLLRDHUP)
                self._gone = any(events & (select.POLLHUP | select.POLLRDHUP | select.POLLERR)
                                 for _, events in poller.poll(0))
            self._reconnect(what)

    def _receive(self, method: str, progress: Callable[[int, int], None] | None = None) -> tuple[Any, int | None]:
        pieces: list[bytes] = []
        while True:
            data, fds, whole = p.receive(self._sock)
            for extra in fds[1:]:
                os.close(extra)
            got = fds[0] if fds else None
            if not data:
                raise ResourceError(f"{method}: bmid closed the connection")
            message = p.decode(data) if whole else None
            if isinstance(message, dict) and "progress" in message:
                self._report(method, progress, message["progress"])
                continue
            if not isinstance(message, dict) or "more" not in message:
                return (p.decode(b"".join(pieces)) if pieces else message), got
            pieces.append(bytes.fromhex(message["more"]))
            if message.get("last"):
                return p.decode(b"".join(pieces)), got


@dataclass(frozen=True)
class Event:
    """A PD's status change: seq orders all events of one bmid."""

    seq: int
    time: float
    pd_id: int
    status: PDStatus
    reason: str
    name: str = ""          # the PD's /name when it had one


class EventStream:
    """Iterate status events; close() (or leaving a with block) ends the subscription."""

    def __init__(self, uri: str, since: int | None, timeout: float | None):
        self._sock = _connect(uri, socket_path(uri))
        self._timeout = timeout
        self._closed = False
        try:
            p.send(self._sock, p.request(1, "subscribe", {} if since is None else {"since": since}))
            data, fds, _ = p.receive(self._sock)
            for fd in fds:
                os.close(fd)
            reply = p.decode(data) if data else None
            if not isinstance(reply, dict):
                raise ResourceError("events: bmid closed the subscription")
            if "error" in reply:
                p.raise_error(reply["error"])
            #: the newest event number when the subscription started, then of the last event read
            self.last: int = reply["result"]["last"]
        except BaseException:
            self._sock.close()
            raise

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        """The next event; StopIteration after `timeout` seconds without one, or when closed;
        ResourceError when bmid went away (events(since=last seen seq) resumes once it is back)."""
        if self._closed:
            raise StopIteration
        ready, _, _ = select.select([self._sock], [], [], self._timeout)
        if not ready:
            raise StopIteration
        try:
            data, fds, _ = p.receive(self._sock)
        except OSError as e:
            data, fds = b"", []
            why = e.strerror or str(e)
        else:
            why = "it stopped or restarted"
        for fd in fds:
            os.close(fd)
        if not data:
            if self._closed:
                raise StopIteration
            raise ResourceError(f"events: bmid ended the subscription ({why}); once it is back, "
                                f"events(since={self.last}) resumes after the last event seen")
        event = p.decode(data)["params"]
        self.last = max(self.last, event["seq"])
        return Event(event["seq"], event["time"], event["pd"], PDStatus[event["status"]], event["reason"],
                     event.get("name", ""))

    def close(self) -> None:
        self._closed = True
        self._sock.close()

    def __enter__(self) -> "EventStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SystemController(RemoteController):
    """A PDController of a PD bmid owns (same methods as session mode's)."""

    def __init__(self, client: "SystemClient", pd_id: int):
        super().__init__(client._channel, pd_id)
        self._client = client

    def __repr__(self) -> str:
        return f"<PDController pd={self._id} {self._client.uri}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SystemController) and other._client is self._client and other._id == self._id

    def __hash__(self) -> int:
        return hash((id(self._client), self._id))

    def get_current_status(self) -> PDStatus:
        """From bmid's status board when the PD is on it (no request), else from bmid."""
        status = self._client._board_status(self._id, "get_current_status")
        return status if status is not None else super().get_current_status()

    def request_status_change(self, status: PDStatus | str | int, *,
                              progress: Callable[[int, int], None] | None = None) -> None:
        """As in session mode; bmid unpacks a root archive and sends progress(done, total) records before its reply."""
        check_progress(progress, f"request_status_change of PD {self._id}", self._id)
        if progress is None:
            super().request_status_change(status)
            return
        self._channel.call("request_status_change", {"pd": self._id, "status": p.status_to_wire(status),
                                                     "progress": True}, progress=progress)

    # -- what session mode's PDController has beyond the spec --------------------------------
    wait = remote("wait")
    measurement = remote("measurement")

    def read_console(self, since: int = 0, timeout: float | None = None) -> tuple[int, bytes]:
        """The console output after offset `since` (and the offset to ask from next); None: no waiting."""
        got = self._channel.value("read_console", pd=self._id, since=since, timeout=0 if timeout is None else timeout)
        return got["offset"], bytes.fromhex(got["data"])


class SystemDeviceManager:
    """DeviceManager over bmid."""

    def __init__(self, channel: Channel):
        self._channel = channel

    list_devices = remote("list_devices")
    assigned = remote("assigned")
    assign = remote("assign")
    unassign = remote("unassign")
    create_network = remote("create_network")
    list_networks = remote("list_networks")
    destroy_network = remote("destroy_network")


class SystemClient:
    """bmi.open("linux:///system") or ("xen:///system"): PDManagement as a client of bmid (PDs outlive this object)."""

    def __init__(self, uri: str = LINUX_URI):
        self.uri = uri
        self.socket_path = socket_path(uri)
        sock = _connect(uri, self.socket_path)
        try:
            self._channel = _BmidChannel(sock.fileno(), uri, self.socket_path)
        finally:
            sock.close()            # the channel holds its own dup
        self._lock = threading.Lock()
        self._closed = False
        self._board: BoardReader | None = None
        self._board_tried = False
        self._board_generation = 0

    def _status_board(self, what: str) -> BoardReader | None:
        """bmid's status board, mapped on first use (None from a bmid without one)."""
        self._channel.check_open(what)
        if self._board_generation != self._channel.generation:
            with self._lock:            # a restarted bmid: its board, not the old one's
                if self._board is not None:
                    self._board.close()
                self._board, self._board_tried = None, False
                self._board_generation = self._channel.generation
        if not self._board_tried:
            with self._lock:
                if not self._board_tried:
                    self._board_tried = True
                    try:
                        _, fd = self._channel.call("status_board", {})
                    except NotSupported:
                        return None
                    if fd is None:
                        raise ResourceError(f"{what}: bmid sent no status board")
                    self._board = BoardReader(fd)
        return self._board

    def _board_status(self, pd_id: Any, what: str) -> PDStatus | None:
        if isinstance(pd_id, bool) or not isinstance(pd_id, int):
            return None
        board = self._status_board(what)
        return board.status(pd_id) if board is not None else None

    # -- spec 7.1 ---------------------------------------------------------------------------
    get_version = remote("get_version")

    def allocate_pd(self, desc: PDDescription) -> SystemController:
        if not isinstance(desc, PDDescription):
            raise InvalidArgument(f"allocate_pd: expected a PDDescription, got {type(desc).__name__}")
        pd_id = self._channel.value("allocate_pd", mem=desc.mem, cpu=desc.cpu, performance=desc.performance)
        return SystemController(self, pd_id)

    def get_controller(self, pd_id: int | None = None) -> SystemController:
        """A PD on the status board needs no request; anything else bmid checks (and explains)."""
        if self._board_status(pd_id, "get_controller") is not None:
            return SystemController(self, pd_id)  # type: ignore[arg-type]  (an int: _board_status checked)
        params = {} if pd_id is None else {"pd": pd_id}
        return SystemController(self, self._channel.value("get_controller", **params))

    def list_pd(self) -> list[int]:
        board = self._status_board("list_pd")
        if board is not None and board.complete:
            return board.ids()
        return self._channel.value("list_pd")

    def get_device_manager(self) -> SystemDeviceManager:
        return SystemDeviceManager(self._channel)

    # -- beyond the spec ----------------------------------------------------------------------
    layer_info = remote("layer_info")
    describe = remote("describe")
    seal_credentials = remote("seal_credentials")
    get_storage_public = remote("get_storage_public")
    get_attestation_key = remote("get_attestation_key")

    def events(self, since: int | None = None, timeout: float | None = None) -> EventStream:
        """Status events from now on (or after event number `since`); iteration stops after timeout idle seconds."""
        return EventStream(self.uri, since, timeout)

    def on_event(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call callback(event) from a thread for every event; returns the function that stops it."""
        stream = EventStream(self.uri, None, None)

        def pump() -> None:
            try:
                for event in stream:
                    callback(event)
            except ResourceError:
                return              # bmid went away: the subscription is over

        thread = threading.Thread(target=pump, name="bmi-events", daemon=True)
        thread.start()

        def stop() -> None:
            stream._closed = True
            stream._sock.shutdown(socket.SHUT_RDWR)
            thread.join()
            stream.close()
        return stop

    def integrity_service(self) -> Any:
        raise NotSupported("integrity_service: the TPM belongs to bmid; use `bmi tpm` on the host as root")

    def close(self) -> None:
        """Close the connection; the PDs stay with bmid."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._channel.close()
                if self._board is not None:
                    self._board.close()

    def __enter__(self) -> "SystemClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
