"""The framing bmi's ssh tunnel speaks on the ssh session's stdio, both ends (bmi/remote/tunnel.py, helper.py).

ssh carries a byte stream; bmid speaks records (SOCK_SEQPACKET) and passes
fds.  So each bmid record travels as one frame, and an fd a request passes
(setup_pd's image) travels as its bytes, ahead of the record:

    frame = length (4 bytes, big-endian, of kind + payload) + kind (1 byte) + payload

| kind | direction | payload |
|---|---|---|
| H | helper -> client, first | JSON {"protocol", "version", "socket"} or {"error": {"type", "message"}} |
| R | both | one bmid record (the JSON-RPC message, as bmid sends or takes it) |
| F | client -> helper | JSON {"size"}: an image's bytes follow as D frames, for the next R |
| D | client -> helper | a piece of that image |
| X | helper -> client | JSON {"reason"}: bmid closed the connection; the helper exits |

Before the first frame the helper writes GREETING, so that whatever else a
login prints on stdout is told apart from bmi.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any

PROTOCOL = 1
GREETING = b"bmi-remote-helper %d\n" % PROTOCOL
HEADER = struct.Struct(">IB")
MAX_FRAME = 1 << 20             # D frames carry at most this much; R frames at most one record
CHUNK = MAX_FRAME - 64

HELLO, RECORD, FD_SIZE, DATA, CLOSED = (ord(k) for k in "HRFDX")


def frame(kind: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload) + 1, kind) + payload


def json_frame(kind: int, value: Any) -> bytes:
    return frame(kind, json.dumps(value, separators=(",", ":")).encode())


def write_all(fd: int, data: bytes | memoryview) -> None:
    """The whole buffer to a (blocking) pipe; OSError (EPIPE) when the other side is gone."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class FrameReader:
    """Frames out of a byte stream read in whatever pieces the pipe gives."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def frames(self) -> list[tuple[int, bytes]]:
        """The complete frames received so far; ValueError for a stream that is not frames."""
        out = []
        while len(self._buffer) >= HEADER.size:
            length, kind = HEADER.unpack_from(self._buffer)
            if not 1 <= length <= MAX_FRAME + 1:
                raise ValueError(f"a frame of {length} bytes (at most {MAX_FRAME + 1})")
            end = 4 + length
            if len(self._buffer) < end:
                break
            out.append((kind, bytes(self._buffer[5:end])))
            del self._buffer[:end]
        return out

    def take(self, count: int) -> bytes:
        """Raw bytes before the frames (the greeting)."""
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    def __len__(self) -> int:
        return len(self._buffer)
