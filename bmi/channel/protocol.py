"""The PD channel's wire format: JSON-RPC 2.0, one message per SOCK_SEQPACKET record.

Both sides use this module: the layer's server (bmi.channel.server) and the
Python client inside a PD (bmi.pd).  docs/protocol.md is the reference for
other languages; csrc/client/bmi_client.c is the C one.  Values that JSON lacks
are encoded here once: bytes as lowercase hex, enums by name.
"""
from __future__ import annotations

import array
import json
import os
import socket
from dataclasses import fields
from typing import Any

from .. import errors
from ..types import (ConnectionIntegrityPolicy, ConnectionPolicy, ConnectionType, IntegrityPolicy,
                     IntegrityReport, PDStatus, RuntimeCapability)

MAX_MESSAGE = 64 * 1024          # bytes of one JSON message, either direction
MAX_FDS = 4                      # fds accepted in one message (extra ones are closed)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
BUSY = -32011                    # the PD already waits in ACCEPT_LIMIT accept calls

#: bmi exception <-> JSON-RPC error code (server errors live in -32000..-32099).
ERROR_CODES: dict[type[errors.BMIError], int] = {
    errors.BMIError: -32000,
    errors.InvalidArgument: -32001,
    errors.InvalidState: -32002,
    errors.NoSuchDomain: -32003,
    errors.PermissionDenied: -32004,
    errors.NotSupported: -32005,
    errors.ResourceError: -32006,
    errors.ImageError: -32007,
    errors.IntegrityError: -32008,
    errors.DriverUnavailable: -32009,
}
_BY_CODE = {code: cls for cls, code in ERROR_CODES.items()}
_BY_CODE.update({PARSE_ERROR: errors.InvalidArgument, INVALID_REQUEST: errors.InvalidArgument,
                 METHOD_NOT_FOUND: errors.NotSupported, INVALID_PARAMS: errors.InvalidArgument,
                 INTERNAL_ERROR: errors.BMIError, BUSY: errors.ResourceError})


class ProtocolError(Exception):
    """A request the server cannot execute; carries its JSON-RPC code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


# -- framing ----------------------------------------------------------------------------------
_SEND_FLAGS = {True: int(socket.MSG_NOSIGNAL), False: int(socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)}
_RECV_FLAGS = {True: 0, False: int(socket.MSG_DONTWAIT)}
_ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS * 4)
_TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)     # an int: enum flag arithmetic costs ~5 us a record
_ENCODER = json.JSONEncoder(separators=(",", ":"))         # json.dumps makes a new one per call for separators


def encode(message: dict[str, Any]) -> bytes:
    """The record for one message (raises TypeError/ValueError for what JSON cannot carry)."""
    return _ENCODER.encode(message).encode()


def send(sock: socket.socket, message: dict[str, Any], fds: tuple[int, ...] = (), *,
         blocking: bool = True) -> None:
    """One JSON object as one record, with fds as SCM_RIGHTS; raises OSError like sendmsg."""
    send_encoded(sock, encode(message), fds, blocking=blocking)


def send_encoded(sock: socket.socket, data: bytes, fds: tuple[int, ...] = (), *, blocking: bool = True) -> None:
    """send() of a message encode() made already."""
    if len(data) > MAX_MESSAGE:
        raise errors.ResourceError(f"channel message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([data], ancillary, _SEND_FLAGS[blocking])


def receive(sock: socket.socket, *, blocking: bool = True) -> tuple[bytes, list[int], bool]:
    """(data, fds, well_formed) of one record; data b"" means the peer closed.

    well_formed is False when the record or its fds were truncated; the
    caller owns (and must close) every fd returned.
    """
    data, ancdata, msg_flags, _ = sock.recvmsg(MAX_MESSAGE + 1, _ANCILLARY_SPACE, _RECV_FLAGS[blocking])
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(array.array("i", payload[:usable]))
    truncated = bool(msg_flags & _TRUNCATED) or len(data) > MAX_MESSAGE
    return data, fds, not truncated


def next_record(sock: socket.socket) -> tuple[bytes, list[int], bool] | None:
    """receive() for a serving loop: None once the peer closed or the socket failed (fds closed)."""
    try:
        data, fds, whole = receive(sock)
    except OSError:
        return None
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    return data, fds, whole


def decode(data: bytes) -> Any:
    """Parse one message; anything unparsable (bad UTF-8, nesting bombs, huge ints) is a ProtocolError."""
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise ProtocolError(PARSE_ERROR, f"not a JSON message: {type(e).__name__}: {str(e)[:100]}") from None


# -- messages ---------------------------------------------------------------------------------
def progress(msg_id: Any, done: int, total: int) -> dict[str, Any]:
    """A record sent before the reply of a request that asked for progress (bmid: a start unpacking a root)."""
    return {"jsonrpc": "2.0", "id": msg_id, "progress": [done, total]}


def is_interim(message: Any) -> bool:
    """Whether a record is not yet the reply: a progress report, or a piece of a long reply other than the last."""
    return isinstance(message, dict) and ("progress" in message or
                                          (isinstance(message.get("more"), str) and not message.get("last")))


def request(msg_id: int, method: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params}


def result(msg_id: Any, value: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg_id, "result": value}


def error(msg_id: Any, code: int, message: str, *, kind: str = "", pd_id: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message[:2000]}
    if kind:
        body["data"] = {"type": kind, "pd_id": pd_id}
    return {"jsonrpc": "2.0", "id": msg_id, "error": body}


def error_from(msg_id: Any, exc: BaseException) -> dict[str, Any]:
    """A bmi exception as a JSON-RPC error (the most specific known class wins)."""
    if isinstance(exc, ProtocolError):
        return error(msg_id, exc.code, str(exc))
    if isinstance(exc, errors.BMIError):
        cls = next(c for c in type(exc).__mro__ if c in ERROR_CODES)
        return error(msg_id, ERROR_CODES[cls], str(exc), kind=cls.__name__, pd_id=exc.pd_id)
    return error(msg_id, INTERNAL_ERROR, f"internal error: {type(exc).__name__}")


def raise_error(body: Any) -> None:
    """Turn an error object of a response back into the bmi exception it stands for."""
    if not isinstance(body, dict):
        raise errors.BMIError(f"malformed error from the layer: {body!r}"[:300])
    code, message = body.get("code"), str(body.get("message", ""))
    data = body.get("data") if isinstance(body.get("data"), dict) else {}
    cls = getattr(errors, str(data.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, errors.BMIError)):
        cls = _BY_CODE.get(code, errors.BMIError) if isinstance(code, int) else errors.BMIError
    pd_id = data.get("pd_id")
    raise cls(message, pd_id=pd_id if isinstance(pd_id, int) else None)


# -- values -----------------------------------------------------------------------------------
def mode_name(mode: int) -> str:
    return {1: "READ", 2: "WRITE", 3: "RW"}.get(mode, str(mode))


def con_type(value: Any) -> ConnectionType:
    if isinstance(value, str) and value.upper() in ConnectionType.__members__:
        return ConnectionType[value.upper()]
    raise ProtocolError(INVALID_PARAMS, f"con_type {value!r} is not one of {', '.join(ConnectionType.__members__)}")


def status_to_wire(status: Any) -> Any:
    """A PDStatus, or its value as an int, by name; anything else as given, for the layer to check
    (bmi/api.py: one check of what a status may be, in every mode)."""
    if isinstance(status, int) and not isinstance(status, bool) and status in PDStatus._value2member_map_:
        return PDStatus(status).name
    return status


def policy_to_wire(policy: ConnectionPolicy) -> dict[str, Any]:
    out: dict[str, Any] = {"con_type": ConnectionType(policy.con_type).name, "mode": policy.mode}
    if isinstance(policy, ConnectionIntegrityPolicy):
        out["dest"] = bytes(policy.dest).hex()
    return out


def policy_from_wire(value: Any) -> ConnectionPolicy:
    if not isinstance(value, dict) or not set(value) <= {"con_type", "mode", "dest"}:
        raise ProtocolError(INVALID_PARAMS, f"a connection policy is {{con_type, mode[, dest]}}, got {value!r}"[:300])
    mode = value.get("mode")
    if not isinstance(mode, int) or isinstance(mode, bool):
        raise ProtocolError(INVALID_PARAMS, f"policy mode {mode!r} is not an int (1 READ, 2 WRITE, 3 RW)")
    kind = con_type(value.get("con_type"))
    if "dest" in value:
        return ConnectionIntegrityPolicy(kind, mode, hex_bytes(value["dest"], "dest"))
    return ConnectionPolicy(kind, mode)


def integrity_policy_to_wire(policy: IntegrityPolicy) -> dict[str, Any]:
    return {"pd_integrity": bytes(policy.pd_integrity).hex(),
            "pd_connections": [policy_to_wire(c) for c in policy.pd_connections]}


def integrity_policy_from_wire(value: Any) -> IntegrityPolicy:
    if not isinstance(value, dict) or not isinstance(value.get("pd_connections", []), list):
        raise ProtocolError(INVALID_PARAMS, "policy is {pd_integrity: hex, pd_connections: [...]}")
    conns = tuple(policy_from_wire(c) for c in value.get("pd_connections", []))
    if not all(isinstance(c, ConnectionIntegrityPolicy) for c in conns):
        raise ProtocolError(INVALID_PARAMS, "each of policy.pd_connections needs a dest (hex measurement)")
    return IntegrityPolicy(hex_bytes(value.get("pd_integrity"), "pd_integrity"), conns)  # type: ignore[arg-type]


def hex_bytes(value: Any, what: str) -> bytes:
    try:
        if isinstance(value, str):
            return bytes.fromhex(value)
    except ValueError:
        pass
    raise ProtocolError(INVALID_PARAMS, f"{what} must be a hex string")


def capability_to_wire(cap: RuntimeCapability) -> dict[str, Any]:
    return {"name": cap.name, "read": cap.read, "write": cap.write}


def report_to_wire(report: IntegrityReport) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(report):
        value = getattr(report, f.name)
        if isinstance(value, bytes):
            value = value.hex()
        elif isinstance(value, dict):
            value = {str(k): v.hex() if isinstance(v, bytes) else v for k, v in value.items()}
        out[f.name] = value
    return out


def report_from_wire(value: Any) -> IntegrityReport:
    if not isinstance(value, dict):
        raise errors.BMIError("malformed integrity report from the layer")
    kwargs: dict[str, Any] = {}
    for f in fields(IntegrityReport):
        if f.name not in value:
            continue
        item = value[f.name]
        if f.name in ("pd_integrity", "pubkey", "signature", "attestation"):
            item = bytes.fromhex(item)
        elif f.name == "pcr_values":
            item = {int(k): bytes.fromhex(v) for k, v in item.items()}
        kwargs[f.name] = item
    return IntegrityReport(**kwargs)
