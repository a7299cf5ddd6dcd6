"""The client end of a +ssh URI: a SOCK_SEQPACKET socket that behaves as bmid's, carried over `ssh`.

connect(uri) returns one end of a socketpair; the bmid client (bmi/system.py)
uses it as it uses bmid's socket.  A thread pumps the other end to an `ssh`
running bmi-remote-helper on the host (bmi/remote/helper.py) and back,
turning records into frames (bmi/remote/frames.py).  An fd passed with a
request (setup_pd's image) is read here and streamed; the helper makes a
sealed memfd of it for the remote bmid, which measures what it receives.

Failures come back as typed errors with ssh's own words: at connect time
raised by connect(); for a call in flight, as that call's error reply
(the connection dropped, or no reply within the timeout).  The next call
after such a failure starts a new ssh session.
"""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import tempfile
import threading
import time
from typing import Any

from .. import errors
from ..channel import protocol as p
from ..errors import BMIError, DriverUnavailable, PermissionDenied, ResourceError
from . import frames as f
from .ssh import HELPER, TIMEOUT_VARIABLE, SshTarget, parse

#: Calls whose own `timeout` parameter says how long bmid may take to answer (None: forever).
WAITING_CALLS = frozenset({"wait", "read_console", "accept"})
IMAGE_RATE = 10 << 20           # bytes per second of image bmid is allowed to copy and hash, beyond the timeout
STOP_GRACE = 2.0                # seconds ssh gets to end after its stdin closed


def connect(uri: str) -> socket.socket:
    """A connected socket to bmid on the URI's host (raises the typed error of a failed ssh or helper)."""
    tunnel = Tunnel(parse(uri))
    try:
        tunnel.start_session()
    except BaseException:
        tunnel.discard()
        raise
    return tunnel.start()


def _exit_words(status: int) -> str:
    """How ssh ended, when it said nothing on stderr."""
    if status < 0:
        return f"ssh was killed by {signal.Signals(-status).name}"
    if status == 255:
        return "ssh exit status 255 without a message (the remote end of the session was closed or killed)"
    return f"the remote side exited with status {status}"


class Session:
    """One ssh process running the helper, after its greeting."""

    def __init__(self, target: SshTarget):
        self.target = target
        self.errors = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(target.argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self.errors, start_new_session=True, bufsize=0)
        except OSError as e:
            self.errors.close()
            raise DriverUnavailable(f"open {target.uri}: cannot run ssh: {e.strerror}") from None
        self.reader = f.FrameReader()
        self.hello: dict[str, Any] = {}

    @property
    def stdin(self) -> int:
        return self.proc.stdin.fileno()     # type: ignore[union-attr]

    @property
    def stdout(self) -> int:
        return self.proc.stdout.fileno()    # type: ignore[union-attr]

    def greet(self) -> None:
        """Wait (at most the timeout) for the helper's greeting and hello; raise what went wrong."""
        deadline = time.monotonic() + self.target.timeout
        while True:
            hello = self._hello()
            if hello is not None:
                break
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.stdout], [], [], left)[0]:
                self.stop(kill=True)
                raise DriverUnavailable(f"open {self.target.uri}: no answer from {self.target.destination} within "
                                        f"{self.target.timeout:g} s (?timeout= or ${TIMEOUT_VARIABLE})"
                                        f"{self._said()}")
            data = os.read(self.stdout, 65536)
            if not data:
                raise self._refusal()
            self.reader.feed(data)
        if "error" in hello:
            error = hello["error"]
            cls = getattr(errors, str(error.get("type")), None)
            if not (isinstance(cls, type) and issubclass(cls, BMIError)):
                cls = DriverUnavailable
            self.stop()
            raise cls(f"open {self.target.uri}: on {self.target.destination}: {error.get('message')}")
        self.hello = hello

    def _hello(self) -> dict[str, Any] | None:
        if not self.hello and len(self.reader) < len(f.GREETING) + f.HEADER.size:
            return None
        if not self.hello:
            greeting = self.reader.take(len(f.GREETING))
            if greeting != f.GREETING:
                self.stop(kill=True)
                raise DriverUnavailable(f"open {self.target.uri}: {self.target.destination} answered "
                                        f"{greeting[:40]!r}, not {HELPER}'s greeting {f.GREETING!r} "
                                        f"(a login script printing on stdout, or another bmi version)")
            self.hello = {"greeted": True}
        try:
            frames = self.reader.frames()
        except ValueError as e:
            raise DriverUnavailable(f"open {self.target.uri}: {HELPER} on {self.target.destination} "
                                    f"sent garbage ({e})") from None
        if not frames:
            return None
        kind, payload = frames[0]
        try:
            hello = json.loads(payload) if kind == f.HELLO else None
        except ValueError:
            hello = None
        if not isinstance(hello, dict):
            raise DriverUnavailable(f"open {self.target.uri}: {HELPER} on {self.target.destination} "
                                    f"sent no hello")
        return hello

    def _refusal(self) -> BMIError:
        """Why ssh ended before the helper said hello, as a typed error with ssh's words."""
        status = self.stop()
        said = self.stderr()
        where, what = self.target.uri, self.target.destination
        lowered = said.lower()
        if "host key verification failed" in lowered or "host key for" in lowered or "no host key" in lowered:
            return PermissionDenied(f"open {where}: the host key of {what} is not trusted "
                                    f"(known_hosts= names the file to trust, no_verify=1 trusts any): ssh: {said}")
        if "permission denied" in lowered or "too many authentication failures" in lowered:
            return PermissionDenied(f"open {where}: {what} refused the login: ssh: {said}")
        if status == 127 or "not found" in lowered or "no such file" in lowered:
            return DriverUnavailable(f"open {where}: {what} has no {HELPER} on its PATH (install bmi there; "
                                     f"README, Remote hosts): {said or f'exit status {status}'}")
        why = f"ssh: {said}" if said else _exit_words(status)
        return DriverUnavailable(f"open {where}: cannot reach bmi on {what}: {why}")

    def _said(self) -> str:
        said = self.stderr()
        return f": ssh: {said}" if said else ""

    def stderr(self) -> str:
        """The last lines ssh (and the remote side) wrote on stderr, as one line."""
        try:           # its tail only: a host that writes gigabytes there must not fill this process's memory
            self.errors.seek(max(0, self.errors.seek(0, os.SEEK_END) - 2000))
            text = self.errors.read().decode(errors="replace")
        except (OSError, ValueError):
            return ""
        return "; ".join(line.strip() for line in text.splitlines() if line.strip())[-600:]

    def stop(self, *, kill: bool = False) -> int:
        """End ssh (closing its stdin ends the helper; kill after STOP_GRACE or at once) and reap it."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        if kill and self.proc.poll() is None:
            self._signal(signal.SIGKILL)
        try:
            status = self.proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            status = self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return status

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)       # ssh and a ProxyCommand it may have started
        except OSError:
            pass

    def close(self) -> None:
        self.stop()
        self.errors.close()


class Tunnel:
    """Records between the local socket end and the ssh session, one pumping thread."""

    def __init__(self, target: SshTarget):
        self.target = target
        self.local, self._far = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.session: Session | None = None
        self._pending: dict[Any, tuple[str, float | None]] = {}     # id -> (method, deadline)
        self._streaming = False         # a subscription: events follow, the connection ends with the session
        self._thread: threading.Thread | None = None

    def start_session(self) -> None:
        session = Session(self.target)
        try:
            session.greet()
        except BaseException:
            session.stop(kill=True)
            session.errors.close()
            raise
        self.session = session

    def start(self) -> socket.socket:
        self._thread = threading.Thread(target=self._pump, name=f"bmi-ssh-{self.target.destination}", daemon=True)
        self._thread.start()
        return self.local

    def discard(self) -> None:
        self.local.close()
        self._far.close()

    # -- the pump ------------------------------------------------------------------------------
    def _pump(self) -> None:
        try:
            while self._step():
                pass
        finally:
            if self.session is not None:
                self.session.close()
            self._far.close()

    def _step(self) -> bool:
        """One round; False when the local end closed (or a subscription's session ended)."""
        watched = [self._far] + ([self.session.stdout] if self.session is not None else [])
        deadlines = [d for _, d in self._pending.values() if d is not None]
        wait = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        ready, _, _ = select.select(watched, [], [], wait)
        if self.session is not None and self.session.stdout in ready:
            if not self._from_host():
                return False
        if self._far in ready:
            data, fds, _ = p.receive(self._far)
            if not data:
                for fd in fds:
                    os.close(fd)
                return False
            self._to_host(data, fds)
        now = time.monotonic()
        if any(d is not None and d <= now for _, d in self._pending.values()):
            self._fail_pending(f"no reply from {self.target.destination} within its timeout "
                               f"({self.target.timeout:g} s, ?timeout= or ${TIMEOUT_VARIABLE}); the ssh connection "
                               f"was closed, the next call connects again", kill=True)
            return not self._streaming
        return True

    def _from_host(self) -> bool:
        session = self.session
        assert session is not None
        try:
            data = os.read(session.stdout, 1 << 20)
        except OSError:
            data = b""
        if not data:
            self._fail_pending(f"the ssh connection to {self.target.destination} dropped mid-call", kill=False)
            return not self._streaming
        session.reader.feed(data)
        try:
            received = session.reader.frames()
        except ValueError as e:
            self._fail_pending(f"{HELPER} on {self.target.destination} sent garbage ({e})", kill=True)
            return not self._streaming
        for kind, payload in received:
            if kind == f.CLOSED:
                return False            # bmid closed the connection: so does the local end
            if kind == f.RECORD:
                self._reply(payload)
        return True

    def _reply(self, payload: bytes) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            message = None
        if isinstance(message, dict) and not p.is_interim(message):
            self._pending.pop(message.get("id"), None)
        try:
            p.send_encoded(self._far, payload)
        except (OSError, BMIError):
            pass                        # the local end went away: the next round sees it

    def _to_host(self, data: bytes, fds: list[int]) -> None:
        try:
            request = json.loads(data)
        except ValueError:
            request = None
        msg_id = request.get("id") if isinstance(request, dict) else None
        method = str(request.get("method")) if isinstance(request, dict) else "?"
        try:
            if self.session is None:
                try:
                    self.start_session()
                except BMIError as e:
                    self._answer(msg_id, e)
                    return
            image_size = self._send(data, fds)
        finally:
            for fd in fds:
                os.close(fd)
        if image_size is None:
            self._fail_pending(f"the ssh connection to {self.target.destination} dropped mid-call", kill=False,
                               also=(msg_id, method))
            return
        if method == "subscribe":
            self._streaming = True
        self._pending[msg_id] = (method, self._deadline(method, request, image_size))

    def _send(self, data: bytes, fds: list[int]) -> int | None:
        """The request (and its fd's bytes) to the helper: the image's size, None when ssh is gone."""
        session = self.session
        assert session is not None
        size = 0
        try:
            if fds:
                size = os.fstat(fds[0]).st_size
                f.write_all(session.stdin, f.json_frame(f.FD_SIZE, {"size": size}))
                offset = 0
                while True:
                    chunk = os.pread(fds[0], f.CHUNK, offset)
                    if not chunk:
                        break
                    f.write_all(session.stdin, f.frame(f.DATA, chunk))
                    offset += len(chunk)
            f.write_all(session.stdin, f.frame(f.RECORD, data))
        except OSError:
            return None
        return size

    def _deadline(self, method: str, request: Any, image_size: int) -> float | None:
        own = 0.0
        if method in WAITING_CALLS:
            params = request.get("params") if isinstance(request, dict) else None
            own = params.get("timeout") if isinstance(params, dict) else 0
            if own is None:
                return None             # waits as long as it takes: ssh's keepalive notices a dead link
            own = float(own) if isinstance(own, (int, float)) else 0.0
        return time.monotonic() + self.target.timeout + own + image_size / IMAGE_RATE

    def _fail_pending(self, why: str, *, kill: bool, also: tuple[Any, str] | None = None) -> None:
        """Answer every call in flight with ResourceError(why + ssh's words); the next call connects again."""
        session, self.session = self.session, None
        said = ""
        if session is not None:
            status = session.stop(kill=kill)
            said = session.stderr() or _exit_words(status)
            session.errors.close()
        pending = dict(self._pending)
        if also is not None:
            pending[also[0]] = (also[1], None)
        self._pending.clear()
        for msg_id, (method, _) in pending.items():
            self._answer(msg_id, ResourceError(f"{method}: {why}: {said}"))

    def _answer(self, msg_id: Any, error: BMIError) -> None:
        try:
            p.send(self._far, p.error_from(msg_id, error))
        except (OSError, BMIError):
            pass
