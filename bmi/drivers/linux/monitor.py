"""One thread per driver that drains PD consoles and notices PD exits.

A PD writes its console into a pipe; if nobody read it, the PD would block
once the pipe is full, so the layer must read all the time.  Exits are seen
on the PD init's pidfd (race-free, no SIGCHLD handler needed) and reaped
here with waitid(P_PIDFD), so each exit is observed exactly once.
"""
from __future__ import annotations

import os
import selectors
import threading
from typing import Callable

class Monitor:
    """Watches console fds and pidfds; calls back from its own thread."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._pending: list[tuple[int, Callable[[], None] | Callable[[bytes], None], bool]] = []
        self._woken = False     # a wake-up is written and _pending not yet taken
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="bmi-monitor", daemon=True)
        self._thread.start()

    def watch_console(self, fd: int, on_data: Callable[[bytes], None]) -> None:
        """Read fd until EOF, passing data on; the monitor closes fd at EOF."""
        self._add(fd, on_data, True)

    def watch_exit(self, pidfd: int, on_exit: Callable[[], None]) -> None:
        """Call on_exit once when the process behind pidfd ends (caller owns pidfd)."""
        self._add(pidfd, on_exit, False)

    def _add(self, fd: int, callback, is_console: bool) -> None:
        with self._lock:
            self._pending.append((fd, callback, is_console))
            wake, self._woken = not self._woken, True
        if wake:    # (one wake-up for a console and an exit added together)
            os.write(self._wake_w, b"x")

    def _run(self) -> None:
        while True:
            for key, _ in self._sel.select():
                if key.data is None:
                    self._take_pending()
                    if self._stopping:
                        self._shutdown()
                        return
                    continue
                callback, is_console = key.data
                if is_console:
                    self._read_console(key.fd, callback)
                else:
                    self._sel.unregister(key.fd)
                    callback()

    def _take_pending(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            pending, self._pending, self._woken = self._pending, [], False
        for fd, callback, is_console in pending:
            self._sel.register(fd, selectors.EVENT_READ, (callback, is_console))

    def _read_console(self, fd: int, on_data) -> None:
        try:
            data = os.read(fd, 65536)
        except OSError:
            data = b""
        if data:
            on_data(data)
            return
        self._sel.unregister(fd)
        os.close(fd)
        on_data(b"")

    def _shutdown(self) -> None:
        for key in list(self._sel.get_map().values()):
            if key.data is not None and key.data[1]:
                os.close(key.fd)
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def close(self) -> None:
        """Stop the thread; console fds still open are closed."""
        if self._stopping:
            return
        self._stopping = True
        os.write(self._wake_w, b"x")
        self._thread.join()
