"""bmi-remote-helper: what `ssh HOST bmi-remote-helper` runs for a +ssh URI, on the remote host.

It connects to bmid's socket there (as the ssh login's user, so bmid's own
permission check applies) and bridges frames on stdio (bmi/remote/frames.py)
to bmid's records.  An image streamed ahead of setup_pd becomes a sealed
memfd passed to bmid, which copies and measures it as it would a local
client's.  What cannot cross ssh, fds that bmid hands out, is refused here
with the reason (NotSupported), and layer_info lists it under "remote".
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import socket
import sys
import threading
from typing import Any, Sequence

from .. import __version__
from ..channel import protocol as p
from ..channel.methods import RETURNS_FD
from ..errors import BMIError, NotSupported, ResourceError
from . import frames as f

#: Why each call whose reply is an fd does not work over ssh (bmi/channel/methods.py fd_out).
NOT_OVER_SSH = {
    "connect": "a connection is a pair of fds held by PDs on the host; fds cannot cross ssh (PDs connect "
               "to each other through their own channels)",
    "accept": "a connection is a pair of fds held by PDs on the host; fds cannot cross ssh",
    "status_board": "the status board is a memory page of the host; over ssh each status is asked of bmid",
}


def main(argv: Sequence[str] | None = None) -> int:
    from ..drivers import BMIDS
    parser = argparse.ArgumentParser(prog="bmi-remote-helper",
                                     description="Bridge a bmi +ssh client on stdio to bmid on this host "
                                                 "(run by ssh for linux+ssh:// and xen+ssh:// URIs).")
    parser.add_argument("--uri", default="linux:///system", choices=sorted(BMIDS), help="which bmid")
    parser.add_argument("--socket", help="bmid's socket (default: that bmid's default)")
    args = parser.parse_args(argv)
    out, inp = sys.stdout.fileno(), sys.stdin.fileno()
    try:
        f.write_all(out, f.GREETING)
        sock = _open_bmid(args.uri, args.socket)
    except OSError:
        return 1                    # the client is gone already
    except BMIError as e:
        f.write_all(out, f.json_frame(f.HELLO, {"error": {"type": type(e).__name__, "message": str(e)}}))
        return 1
    try:
        f.write_all(out, f.json_frame(f.HELLO, {"protocol": f.PROTOCOL, "version": __version__,
                                                "socket": _path(args.uri, args.socket)}))
        Bridge(sock, inp, out).run()
    except OSError:
        pass                        # stdout closed: the ssh session ended
    finally:
        sock.close()
    return 0


def _path(uri: str, given: str | None) -> str:
    from ..system import default_socket
    return given or default_socket(uri)


def _open_bmid(uri: str, given: str | None) -> socket.socket:
    from ..system import _connect
    return _connect(uri, _path(uri, given))


class Bridge:
    """stdin frames -> bmid records (main thread); bmid records -> stdout frames (a thread)."""

    def __init__(self, sock: socket.socket, inp: int, out: int):
        self.sock, self.inp, self.out = sock, inp, out
        self._write_lock = threading.Lock()
        self._layer_info: set[Any] = set()     # ids of layer_info requests: their replies say what ssh lacks
        self._image: int | None = None          # the memfd an F frame started, for the next R
        self._image_size = 0
        self._refusal: BMIError | None = None   # why that image is not passed on

    def run(self) -> None:
        downlink = threading.Thread(target=self._downlink, name="bmid-to-ssh", daemon=True)
        downlink.start()
        reader = f.FrameReader()
        try:
            while True:
                data = os.read(self.inp, 1 << 20)
                if not data:
                    break
                reader.feed(data)
                for kind, payload in reader.frames():
                    self._frame(kind, payload)
        except (OSError, ValueError):
            pass                    # the client's side ended or sent garbage: end the session
        finally:
            self._drop_image()
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            downlink.join()

    def _write(self, data: bytes) -> None:
        with self._write_lock:
            f.write_all(self.out, data)

    def _downlink(self) -> None:
        try:
            while True:
                got = p.next_record(self.sock)
                if got is None:
                    self._write(f.json_frame(f.CLOSED, {"reason": "bmid closed the connection"}))
                    return
                data, fds, _ = got
                for fd in fds:
                    os.close(fd)        # none are asked for: replies with fds are refused before bmid sees them
                self._write(f.frame(f.RECORD, self._amend(data)))
        except OSError:
            return

    def _amend(self, data: bytes) -> bytes:
        """layer_info's reply, plus what works differently over ssh."""
        if not self._layer_info:
            return data
        try:
            reply = json.loads(data)
        except ValueError:
            return data
        if not isinstance(reply, dict) or reply.get("id") not in self._layer_info:
            return data
        self._layer_info.discard(reply.get("id"))
        if isinstance(reply.get("result"), dict):
            reply["result"]["remote"] = {"transport": "ssh", "helper": __version__, "not_over_ssh": NOT_OVER_SSH,
                                         "images": "streamed; the remote bmid copies and measures what it receives"}
        return p.encode(reply)

    def _frame(self, kind: int, payload: bytes) -> None:
        if kind == f.FD_SIZE:
            header = json.loads(payload)
            self._start_image(header.get("size") if isinstance(header, dict) else None)
        elif kind == f.DATA:
            self._add_image(payload)
        elif kind == f.RECORD:
            self._request(payload)

    def _start_image(self, size: Any) -> None:
        from ..integrity.measure import max_image_size
        self._drop_image()
        limit = max_image_size()
        if not isinstance(size, int) or size < 0 or size > limit:
            self._refusal = ResourceError(f"setup_pd: an image of {size} bytes is over this host's limit of "
                                          f"{limit} bytes (BMI_MAX_IMAGE)")
            return
        self._image = os.memfd_create("bmi-remote-image", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self._image_size = size

    def _add_image(self, chunk: bytes) -> None:
        if self._image is None:
            return
        if os.fstat(self._image).st_size + len(chunk) > self._image_size:
            self._drop_image()
            self._refusal = ResourceError("setup_pd: the image grew while it was sent (more bytes than announced)")
            return
        f.write_all(self._image, chunk)

    def _drop_image(self) -> None:
        image, self._image = self._image, None      # taken before the close: never closed twice
        if image is not None:
            os.close(image)
        self._refusal = None

    def _request(self, data: bytes) -> None:
        try:
            request = json.loads(data)
        except ValueError:
            request = None
        method = request.get("method") if isinstance(request, dict) else None
        msg_id = request.get("id") if isinstance(request, dict) else None
        if method in RETURNS_FD or self._refusal is not None:
            error = self._refusal or NotSupported(
                f"{method} over ssh: {NOT_OVER_SSH.get(method, 'its reply is an fd, which cannot cross ssh')}")
            self._drop_image()
            self._write(f.frame(f.RECORD, p.encode(p.error_from(msg_id, error))))
            return
        if method == "layer_info":
            self._layer_info.add(msg_id)
        image, self._image = self._image, None
        try:
            if image is not None:
                fcntl.fcntl(image, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                            | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            p.send_encoded(self.sock, data, (image,) if image is not None else ())
        except BMIError as e:
            self._write(f.frame(f.RECORD, p.encode(p.error_from(msg_id, e))))
        finally:
            if image is not None:
                os.close(image)


if __name__ == "__main__":
    sys.exit(main())
